"""The fast apply path (act_core.kernels) against the reference (LayerMap.apply), over forms, dtypes,
shapes, supports and strengths.

Without a GPU the kernels run through Triton's interpreter, which reads TRITON_INTERPRET when Triton
is imported: so the comparison runs in a fresh Python process with the variable set, and the
process that runs the rest of the suite never sees it.
"""
from __future__ import annotations

import json
import logging
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
# Token launches take 1024 elements per program: [2, 7, 8] and [1, 1, 8] fit one program, [5, 300, 8]
# takes 12 and [3, 77, 40] takes 10 with a column count that does not divide the block (the columns
# of a program start mid-row). Conv launches take one program per (sample, channel) row: rows of up to
# ONE_BLOCK_PIXELS are one block (36, 63 and 2500 pixels leave lanes masked), longer ones are walked
# in blocks of 2048 (16900 pixels: eight whole blocks and a partial one).
SHAPES = {(8, "token"): ([2, 7, 8], [1, 1, 8], [5, 300, 8]), (40, "token"): ([3, 77, 40],),
          (8, "conv"): ([2, 8, 6, 6], [1, 8, 50, 50], [8, 3, 5], [1, 8, 130, 130]),
          (40, "conv"): ([2, 40, 7, 9], [1, 40, 50, 50])}
rows = []
for dim in (8, 40):
    source, target = torch.randn(30, dim, generator=g), torch.randn(30, dim, generator=g) * 1.5 + 0.5
    for kind, method in (("token", "linear"), ("conv", "linear"), ("conv", "gaussian"), ("conv", "mean")):
        for support in ("q_5_95", "all"):
            layer = fit_layer(source, target, method, support, kind=kind)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for shape in SHAPES[dim, kind]:
                    x = (torch.randn(*shape, generator=g) * 1.2 + 0.3).to(dtype)
                    pixels = shape[-1] * shape[-2]
                    programs = -(-x.numel() // 1024) if kind == "token" else x.numel() // pixels
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
                                     "shape": shape, "dim": dim, "strength": strength, "programs": programs,
                                     "blocks_per_row": (-(-pixels // 2048) if kind == "conv"
                                                        and pixels > kernels.ONE_BLOCK_PIXELS else 1),
                                     "pixels": pixels,
                                     "error": (reference.double() - fast.double()).abs().max().item(),
                                     "scale": reference.double().abs().max().item(),
                                     "closed": int(closed.sum()),
                                     "untouched_kept": bool(torch.equal(fast[closed], x[closed])
                                                            and torch.equal(reference[closed], x[closed])),
                                     "moved": bool((reference != x).any())})
print(json.dumps(rows))
"""

# Layouts a model hands the transport function: strided and channels_last activations (the kernel
# reads a flat contiguous buffer, so these must reach the PyTorch path), and the batch views of the
# conditional-only branch: `output[rows]` (a gathered copy) and a slice of the batch (a view that
# starts mid-storage), which the kernel takes. Compared with LayerMap.apply on the whole tensor.
LAYOUTS = r"""
import json, torch
from act_core import fit_layer, kernels
assert kernels.available(), "Triton's interpreter is not active"
launches = []
launch = kernels._launch
kernels._launch = lambda *a: launches.append(1) or launch(*a)
g = torch.Generator().manual_seed(1)
results = []
for kind, method in (("token", "linear"), ("conv", "linear"), ("conv", "gaussian")):
    layer = fit_layer(torch.randn(30, 40, generator=g), torch.randn(30, 40, generator=g) * 1.5 + 0.5, method,
                      "q_5_95", kind=kind)
    for dtype in (torch.float32, torch.float16):
        whole = (torch.randn(*((4, 77, 40) if kind == "token" else (4, 40, 9, 7)), generator=g) * 1.2 + 0.3).to(dtype)
        rows = torch.tensor([0, 2])
        cases = {"rows": (lambda t: t[rows], rows), "batch_slice": (lambda t: t[1:3], slice(1, 3))}
        if kind == "token":
            cases["strided"] = (lambda t: t.transpose(0, 1).contiguous().transpose(0, 1), slice(None))
            cases["every_other_token"] = (lambda t: t[:, ::2], (slice(None), slice(None, None, 2)))
        else:
            cases["channels_last"] = (lambda t: t.contiguous(memory_format=torch.channels_last), slice(None))
            cases["every_other_column"] = (lambda t: t[..., ::2], (Ellipsis, slice(None, None, 2)))
        for name, (view, index) in cases.items():
            x = view(whole)
            # Every view keeps whole rows, tokens or pixels of a channel, except every other column of
            # a conv activation, whose channel means are its own.
            expected = (layer.apply(x.contiguous(), 0.8) if name == "every_other_column"
                        else layer.apply(whole, 0.8)[index])
            kept = whole.clone()
            before = len(launches)
            moved = kernels.transport(layer, 0.8)(x)
            results.append({"kind": kind, "form": layer.form, "dtype": str(dtype), "case": name,
                            "contiguous": x.is_contiguous(), "launched": len(launches) - before,
                            "error": (moved.double() - expected.double()).abs().max().item(),
                            "scale": expected.double().abs().max().item(),
                            "input_kept": bool(torch.equal(whole, kept)),
                            "moved": bool((expected != x).any())})
print(json.dumps(results))
"""

# Compiled (not interpreted) for a CUDA target: Triton lowers to PTX and runs ptxas, which Triton's
# wheel carries, so this needs no GPU. It fails on what the interpreter accepts but a compiler
# refuses (a loop-carried constexpr, a type the backend lacks) for each dtype and specialisation.
COMPILE = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from act_core import kernels
done = []
for capability in (80, 90):
    for dtype in ("fp16", "bf16", "fp32"):
        pointers = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "a_ptr": "*fp32", "b_ptr": "*fp32",
                    "lo_ptr": "*fp32", "hi_ptr": "*fp32"}
        for gated in (False, True):
            token = triton.compiler.ASTSource(
                kernels._token_kernel, dict(pointers, n="i64", dim="i32", GATED="constexpr", BLOCK="constexpr"),
                {"GATED": gated, "BLOCK": 1024})
            compiled = [("token", None, triton.compile(token, target=GPUTarget("cuda", capability, 32)))]
            for pixel in (False, True):
                conv = triton.compiler.ASTSource(
                    kernels._conv_kernel, dict(pointers, channels="i32", pixels="i32", GATED="constexpr",
                                               PIXEL="constexpr", BLOCK="constexpr", ONE_BLOCK="constexpr"),
                    {"GATED": gated, "PIXEL": pixel, "BLOCK": 2048, "ONE_BLOCK": False})
                compiled.append(("conv", pixel, triton.compile(conv, target=GPUTarget("cuda", capability, 32))))
                whole = triton.compiler.ASTSource(
                    kernels._conv_kernel, dict(pointers, channels="i32", pixels="i32", GATED="constexpr",
                                               PIXEL="constexpr", BLOCK="constexpr", ONE_BLOCK="constexpr"),
                    {"GATED": gated, "PIXEL": pixel, "BLOCK": kernels.ONE_BLOCK_PIXELS, "ONE_BLOCK": True})
                compiled.append(("conv one block", pixel,
                                 triton.compile(whole, target=GPUTarget("cuda", capability, 32), options={"num_warps": 16})))
            for kind, pixel, kernel in compiled:
                done.append({"capability": capability, "dtype": dtype, "gated": gated, "kind": kind,
                             "pixel": pixel, "cubin_bytes": len(kernel.asm["cubin"])})
print(json.dumps(done))
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
    # (token: 3 + 1 shapes, conv: 3 forms x (4 + 2) shapes) x 2 supports x 3 dtypes x 4 strengths
    assert len(comparison) == (4 + 3 * 6) * 2 * 3 * 4
    for row in comparison:
        assert row["error"] <= 2 * ULP[row["dtype"]] * max(1.0, row["scale"]), row
        assert row["moved"], row  # each case really moves something, so the comparison means something
    # The shapes do what they are there for: token launches over several programs, with a column
    # count that is not a power of two; conv rows read once in one block of a size that is not a
    # power of two, and rows walked in more than one block, for every form.
    token = [row for row in comparison if row["kind"] == "token"]
    assert any(row["programs"] > 1 and row["dim"] == 40 for row in token)
    assert any(row["programs"] > 1 and row["dim"] == 8 for row in token)
    conv = [row for row in comparison if row["kind"] == "conv"]
    for form in ("mean", "pixel"):
        assert any(row["blocks_per_row"] > 1 for row in conv if row["form"] == form)
        assert any(row["blocks_per_row"] == 1 and row["pixels"] == 2500 for row in conv if row["form"] == form)


def test_kernel_leaves_what_the_reference_leaves_bit_for_bit(comparison):
    gated = [row for row in comparison if row["support"] == "q_5_95"]
    assert sum(row["closed"] for row in gated) > 100 and all(row["untouched_kept"] for row in comparison)


def test_strided_channels_last_and_batch_views_transport_as_the_reference():
    results = json.loads(run_interpreted(LAYOUTS).stdout.strip().splitlines()[-1])
    assert len(results) == 3 * 2 * 4
    for row in results:
        assert row["moved"] and row["input_kept"], row
        assert row["error"] <= 2 * ULP[row["dtype"]] * max(1.0, row["scale"]), row
        # contiguous inputs (batch views included) take the kernel, the others the PyTorch path
        assert row["launched"] == int(row["contiguous"]), row
    assert {row["case"] for row in results if row["launched"]} == {"rows", "batch_slice"}


def test_kernels_compile_for_cuda_targets():
    """The kernels compiled as a GPU would (sm_80 and sm_90), for every dtype and specialisation."""
    env = dict(os.environ, PYTHONPATH=str(PACK_DIR))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True,
                          timeout=600, cwd=PACK_DIR)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(compiled) == 2 * 3 * 2 * 5 and all(row["cubin_bytes"] > 1000 for row in compiled)


def test_without_a_gpu_the_transport_function_is_the_reference():
    layer = fit_layer(torch.randn(20, 4), torch.randn(20, 4) + 1.0, kind="conv")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float16)
    assert torch.equal(kernels.transport(layer, 0.6)(x), layer.apply(x, 0.6))
    assert kernels.transport(layer, 0.0)(x) is x
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fast path cannot run"):
            kernels.fast_apply(layer, x, 0.6)


def test_a_kernel_that_fails_to_compile_or_launch_falls_back_to_pytorch_with_one_warning(monkeypatch, caplog):
    """Triton installed but unable to compile (no C compiler, an old driver): sampling goes on with the
    PyTorch path, the same numbers, and one warning in the log, not one per layer and step."""
    attempts = []

    def failing_launch(layer, x, params):
        attempts.append(layer.form if layer.kind == "conv" else "token")
        raise RuntimeError("ptxas fatal: unsupported GPU architecture")

    monkeypatch.setattr(kernels, "triton", kernels.triton or object())
    monkeypatch.setattr(kernels, "ENABLED", True)
    monkeypatch.setattr(kernels, "_fast_ok", lambda x: True)
    monkeypatch.setattr(kernels, "_launch", failing_launch)
    path = kernels.FastPath()
    g = torch.Generator().manual_seed(0)
    layers = [fit_layer(torch.randn(20, 6, generator=g), torch.randn(20, 6, generator=g) + 1.0, method, kind=kind)
              for kind, method in (("token", "linear"), ("conv", "linear"), ("conv", "gaussian"))]
    inputs = [torch.randn(2, 5, 6, generator=g), torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)]
    with caplog.at_level(logging.DEBUG, logger="comfyui_act"):
        for _step in range(3):
            for layer, x in zip(layers, inputs):
                moved = kernels.transport(layer, 0.7, path=path)(x)
                assert torch.equal(moved, layer.apply(x, 0.7))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "PyTorch" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert "unsupported GPU architecture" in warnings[0].getMessage()
    # each configuration tried once, then left to PyTorch for the rest of the process
    assert sorted(attempts) == ["mean", "pixel", "token"]


class _TensorOnSecondGpu(torch.Tensor):
    """A tensor that reports cuda:1 and holds no data: enough to see which device a launch is under."""

    @staticmethod
    def __new__(cls, shape):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float16, device=torch.device("cuda", 1))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} has no data to run on")


def test_the_kernel_launches_under_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: for a model on cuda:1 that must be cuda:1."""
    current = [0]

    class RecordingDevice:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    seen = []
    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    monkeypatch.setattr(kernels, "triton", kernels.triton or object())
    monkeypatch.setattr(kernels, "ENABLED", True)
    monkeypatch.setattr(kernels, "_launch", lambda layer, x, params: seen.append(current[0]) or x)
    layer = fit_layer(torch.randn(20, 8), torch.randn(20, 8) + 1.0, kind="conv")
    monkeypatch.setattr(layer, "params", lambda device, strength: (None, None, None, None))
    x = _TensorOnSecondGpu((2, 8, 4, 4))
    assert kernels.transport(layer, 0.5, path=kernels.FastPath())(x) is x
    assert seen == [1] and current[0] == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_on_the_second_gpu_is_transported_there():
    layer = fit_layer(torch.randn(20, 40), torch.randn(20, 40) + 1.0, "gaussian", kind="conv")
    x = torch.randn(2, 40, 33, 17, device="cuda:1", dtype=torch.float16)
    torch.cuda.set_device(0)
    moved = kernels.transport(layer, 0.7, path=kernels.FastPath())(x)
    reference = layer.apply(x, 0.7)
    assert moved.device == x.device and (moved.float() - reference.float()).abs().max() <= 2e-3


def test_the_pytorch_path_is_layer_map_apply_bit_for_bit():
    """reference_transport (what CPUs, MPS and GPUs without Triton run) computes apply's numbers exactly,
    NaN, infinities and signed zeros included, for every form, support, dtype and layout."""
    g = torch.Generator().manual_seed(0)
    cases = 0
    for dim in (8, 40):
        source, target = torch.randn(50, dim, generator=g), torch.randn(50, dim, generator=g) * 1.4 + 0.3
        for kind, method in (("token", "linear"), ("conv", "linear"), ("conv", "gaussian"), ("conv", "mean")):
            for support in ("all", "q_5_95", "q_30_70"):
                layer = fit_layer(source, target, method, support, kind=kind)
                for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                    shape = (3, 77, dim) if kind == "token" else (2, dim, 9, 7)
                    x = (torch.randn(*shape, generator=g) * 1.5 + 0.2).to(dtype)
                    x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
                    layouts = (x, x.transpose(0, 1).contiguous().transpose(0, 1) if kind == "token"
                               else x.contiguous(memory_format=torch.channels_last))
                    for view in layouts:
                        for strength in (1.0, 0.4, -0.7, 2.5):
                            expected, moved = layer.apply(view, strength), kernels.reference_transport(layer, strength)(view)
                            assert moved.dtype == expected.dtype and moved.shape == expected.shape
                            same = torch.equal(moved.isnan(), expected.isnan()) and torch.equal(
                                moved.nan_to_num(7.0), expected.nan_to_num(7.0))
                            assert same, (kind, method, support, dtype, strength, view.is_contiguous())
                            cases += 1
    assert cases == 2 * 4 * 3 * 4 * 2 * 4


def test_the_pytorch_path_of_a_map_without_shift_is_apply_within_one_rounding():
    """What runs per step of a mean-form map whose shift is folded into the norm's bias: x + a m in
    one multiply-add (a fused one where the CPU has it), apply's numbers within one rounding of the
    dtype, NaN and infinities where apply has them, for every dtype and layout."""
    g = torch.Generator().manual_seed(1)
    source, target = torch.randn(50, 40, generator=g), torch.randn(50, 40, generator=g) * 1.4 + 0.3
    fitted = fit_layer(source, target, "linear", "all", kind="conv")
    for strength in (0.8, -0.6, 2.5):
        _shift, layer = fitted.mean_shift_fold(strength)
        assert not layer.shift.any() and layer.form == "mean"
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            x = (torch.randn(2, 40, 9, 7, generator=g) * 1.5 + 0.2).to(dtype)
            x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
            for view in (x, x.contiguous(memory_format=torch.channels_last)):
                expected, moved = layer.apply(view, 1.0), kernels.reference_transport(layer, 1.0)(view)
                assert moved.dtype == dtype and torch.equal(moved.isnan(), expected.isnan())
                finite = expected.isfinite()
                assert torch.equal(moved[~finite & ~expected.isnan()], expected[~finite & ~expected.isnan()])
                error = (moved[finite].double() - expected[finite].double()).abs()
                ulp = torch.finfo(dtype).eps * expected[finite].double().abs().clamp_min(1.0)
                assert (error <= ulp).all(), (strength, dtype, view.is_contiguous())
