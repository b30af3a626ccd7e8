"""The fast apply path (act_core.kernels) against the reference (LayerMap.apply), over forms, dtypes,
shapes, supports and strengths.

Without a GPU the kernels run through Triton's interpreter, which reads TRITON_INTERPRET when Triton
is imported: so the comparison runs in a fresh Python process with the variable set, and the
process that runs the rest of the suite never sees it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from act_core import fit_layer, kernels

PACK_DIR = Path(__file__).resolve().parent.parent

COMPARE = r"""
import json, sys, torch
from act_core import fit_layer, kernels
assert kernels.available(), "Triton's interpreter is not active"
g = torch.Generator().manual_seed(0)
source, target = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g) * 1.5 + 0.5
shapes = {"token": ([2, 7, 8], [5, 8], [1, 1, 8]), "conv": ([2, 8, 6, 6], [1, 8, 50, 50], [8, 3, 5])}
rows = []
for kind, method in (("token", "linear"), ("conv", "linear"), ("conv", "gaussian"), ("conv", "mean")):
    for support in ("q_5_95", "all"):
        layer = fit_layer(source, target, method, support, kind=kind)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for shape in shapes[kind]:
                x = (torch.randn(*shape, generator=g) * 1.2 + 0.3).to(dtype)
                for strength in (1.0, 0.4, -0.7, 2.5):
                    reference, fast = layer.apply(x, strength), kernels.fast_apply(layer, x, strength)
                    assert fast.dtype == dtype and fast.shape == x.shape
                    _a, _b, lo, hi = layer.params(x.device, strength)
                    closed = torch.zeros(x.shape, dtype=torch.bool)
                    if lo is not None:
                        v = x.float() if kind == "token" else x.float().mean((-2, -1))[..., None, None].expand(x.shape)
                        bounds = (lo, hi) if kind == "token" else (lo[:, None, None], hi[:, None, None])
                        closed = (v < bounds[0]) | (v > bounds[1])
                    rows.append({"kind": kind, "form": layer.form, "support": support, "dtype": str(dtype),
                                 "shape": shape, "strength": strength,
                                 "error": (reference.double() - fast.double()).abs().max().item(),
                                 "scale": reference.double().abs().max().item(),
                                 "closed": int(closed.sum()),
                                 "untouched_kept": bool(torch.equal(fast[closed], x[closed])
                                                        and torch.equal(reference[closed], x[closed])),
                                 "moved": bool((reference != x).any())})
print(json.dumps(rows))
"""

# One unit in the last place of each dtype, relative: the kernel and the reference both compute in
# float32 and round once; they may differ in how a sum or a multiply-add is rounded.
ULP = {"torch.float32": 2.0 ** -22, "torch.float16": 2.0 ** -10, "torch.bfloat16": 2.0 ** -7}


STEERED_CALL = r"""
import json, os, sys, torch
sys.path[:0] = [os.environ["COMFYUI_PATH"], "tests"]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management
from make_models import build_model
from pack_loader import load_pack
pack = load_pack()
kernels, steering = pack.act_core.kernels, pack.nodes.steering
assert kernels.available(), "Triton's interpreter is not active"
launches = []
launch = kernels._launch
kernels._launch = lambda *a: launches.append(1) or launch(*a)
model, _ = build_model("SD15", 0)
g = torch.Generator().manual_seed(0)
x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)


def unet_call(patcher):
    comfy.model_management.unload_all_models()
    patcher.patch_model(device_to=patcher.load_device)
    try:
        with torch.no_grad():
            return patcher.model.apply_model(x, torch.tensor([5.0, 5.0]), c_crossattn=context)
    finally:
        patcher.unpatch_model(device_to=patcher.offload_device)


result = {"plain": unet_call(model)}
for method in ("linear", "gaussian"):
    layers = {}
    for name, module in model.model.diffusion_model.named_modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            conv = isinstance(module, torch.nn.GroupNorm)
            width = module.num_channels if conv else module.normalized_shape[-1]
            layers["diffusion_model." + name] = pack.act_core.fit_layer(
                torch.randn(32, width, generator=g), torch.randn(32, width, generator=g) * 1.3 + 0.2, method,
                kind="conv" if conv else "token")
    maps = pack.act_core.TransportMaps(layers, {"family": "SD1.x"})
    before = len(launches)
    result[method] = unet_call(steering.steer_model(model, maps, 0.8, mode="exact", fold=False))
    result[method + "_launches"] = len(launches) - before
    kernels.ENABLED = False
    before = len(launches)
    result[method + "_reference"] = unet_call(steering.steer_model(model, maps, 0.8, mode="exact", fold=False))
    result[method + "_reference_launches"] = len(launches) - before
    kernels.ENABLED = True
    result["layers"] = len(layers)
torch.save(result, sys.argv[1])
"""


def run_interpreted(script: str, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(PACK_DIR))
    done = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True,
                          timeout=600, cwd=PACK_DIR)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_exact_mode_runs_each_layer_through_the_kernel_and_matches_the_reference(tmp_path):
    """The whole exact-mode path (layer patches -> transport -> kernel) in one UNet call, through
    the interpreter, against the same steering with the kernels switched off."""
    run_interpreted(STEERED_CALL, str(tmp_path / "out.pt"))
    result = torch.load(tmp_path / "out.pt")
    plain = result["plain"]
    for method in ("linear", "gaussian"):
        assert result[f"{method}_launches"] == result["layers"] and result[f"{method}_reference_launches"] == 0
        kernel, reference = result[method], result[f"{method}_reference"]
        moved = (reference - plain).pow(2).mean().sqrt()
        assert moved > 1e-3 * plain.pow(2).mean().sqrt()
        assert (kernel - reference).pow(2).mean().sqrt() < 1e-4 * moved


@pytest.fixture(scope="module")
def comparison():
    return json.loads(run_interpreted(COMPARE).stdout.strip().splitlines()[-1])


def test_kernel_matches_the_reference_for_every_form_dtype_and_shape(comparison):
    assert len(comparison) == 4 * 2 * 3 * 3 * 4
    for row in comparison:
        assert row["error"] <= 2 * ULP[row["dtype"]] * max(1.0, row["scale"]), row
        assert row["moved"], row  # each case really moves something, so the comparison means something


def test_kernel_leaves_what_the_reference_leaves_bit_for_bit(comparison):
    gated = [row for row in comparison if row["support"] == "q_5_95"]
    assert sum(row["closed"] for row in gated) > 100 and all(row["untouched_kept"] for row in comparison)


def test_without_a_gpu_the_transport_function_is_the_reference():
    layer = fit_layer(torch.randn(20, 4), torch.randn(20, 4) + 1.0, kind="conv")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float16)
    assert torch.equal(kernels.transport(layer, 0.6)(x), layer.apply(x, 0.6))
    assert kernels.transport(layer, 0.0)(x) is x
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fast path cannot run"):
            kernels.fast_apply(layer, x, 0.6)
