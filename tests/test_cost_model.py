"""The cost model of bench/cost (bench/_step_counter.py): kernels and bytes counted per aten operation,
checked on operations whose traffic is known by hand, on the meta device as the benchmark runs."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from act_core import fit_layer, kernels

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from _step_counter import FlashAttention, StepCounter  # noqa: E402

META = torch.device("meta")


def counted(fn):
    counter = StepCounter()
    with torch.no_grad(), counter, FlashAttention(counter):
        fn()
    return counter


def test_an_elementwise_kernel_reads_its_inputs_and_writes_its_output():
    x, y, z = (torch.empty(1000, dtype=torch.float16, device=META) for _ in range(3))
    for fn in (lambda: x + y, lambda: z.add_(y), lambda: torch.add(x, y, out=z)):
        counter = counted(fn)
        assert (counter.kernels, counter.read, counter.written) == (1, 4000, 2000)


def test_views_and_allocations_are_free():
    x = torch.empty(4, 6, dtype=torch.float32, device=META)
    counter = counted(lambda: (x.view(-1), x.t(), x[1:], x.transpose(0, 1)[::2], torch.empty_like(x), x.unsqueeze(0)))
    assert counter.kernels == 0 and counter.read + counter.written == 0


def test_a_mean_reads_everything_and_writes_one_value_per_channel():
    x = torch.empty(2, 3, 4, 5, dtype=torch.float32, device=META)
    counter = counted(lambda: x.mean((-2, -1)))
    assert counter.kernels == 1 and counter.read == 480 and counter.written == 24


def test_a_linear_layer_reads_input_weight_and_bias():
    layer = torch.nn.Linear(8, 16, device=META)
    x = torch.empty(4, 8, device=META)
    counter = counted(lambda: layer(x))
    assert counter.kernels == 1 and counter.read == (4 * 8 + 16 * 8 + 16) * 4 and counter.written == 4 * 16 * 4


def test_attention_is_one_fused_kernel():
    q, k, v = (torch.empty(2, 8, 4096, 64, dtype=torch.float16, device=META) for _ in range(3))
    counter = counted(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert counter.kernels == 1 and counter.read == 3 * q.numel() * 2 and counter.written == q.numel() * 2


def test_the_pytorch_path_moves_an_activation_in_fewer_kernels_than_apply():
    """What a GPU without Triton runs per layer and step, counted: fp16 activations of SDXL's sizes."""
    g = torch.Generator().manual_seed(0)
    source, target = torch.randn(40, 320, generator=g), torch.randn(40, 320, generator=g) + 0.5
    token = torch.empty(2, 4096, 320, dtype=torch.float16, device=META)
    conv = torch.empty(2, 320, 128, 128, dtype=torch.float16, device=META)
    expected = {  # (kind, method, support): (kernels, of them on the whole activation), apply's kernels
        ("token", "linear", "all"): ((1, 1), 3), ("token", "linear", "q_0_100"): ((4, 4), 7),
        ("conv", "linear", "all"): ((3, 2), 5), ("conv", "gaussian", "all"): ((2, 2), 5)}
    for (kind, method, support), ((count, large), apply_count) in expected.items():
        layer = fit_layer(source, target, method, support, kind=kind)
        x = token if kind == "token" else conv
        move = kernels.reference_transport(layer, 0.7)
        move(x)  # the first call moves the map's parameters to the device
        layer.apply(x, 0.7)
        fast, reference = counted(lambda: move(x)), counted(lambda: layer.apply(x, 0.7))
        assert (fast.kernels, fast.large, reference.kernels) == (count, large, apply_count), (kind, method, support)
        assert fast.read + fast.written < reference.read + reference.written


def test_exact_mode_adds_two_kernels_per_group_norm_and_none_per_folded_layer(pack):
    """One call of a real ComfyUI UNet (the tiny SD1.5), steered in exact mode on the PyTorch path (no
    Triton), counted against the same call unsteered: the LayerNorms' maps are folded (0 kernels), the
    GroupNorms' mean-form maps have their shift folded into the norm's bias and run a mean and one
    multiply-add each (2 kernels), whatever the strength's sign."""
    from make_models import TINY_CLIP, tiny_model
    from act_core import LayerMap, TransportMaps
    # A model of its own: the session's tiny SD1.5 has been patched, loaded and cast by the tests before
    # (in the whole suite on ComfyUI 0.33 its unsteered call counted 5 kernels fewer than alone).
    model = tiny_model("SD15", seed=0)[0]
    modules = pack.nodes.model_layers.unet_modules(model)
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, module in modules.items():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            d = module.weight.shape[0]
            layers[name] = LayerMap(1 + 0.2 * torch.randn(d, generator=g), 0.1 * torch.randn(d, generator=g),
                                    torch.full((d,), -float("inf")), torch.full((d,), float("inf")),
                                    "conv" if isinstance(module, torch.nn.GroupNorm) else "token")
    group_norms = sum(m.kind == "conv" for m in layers.values())
    maps = TransportMaps(layers, {"family": "SD1.x", "method": "linear"})
    feed = {"x": torch.randn(2, 4, 8, 8, generator=g), "timesteps": torch.tensor([500.0, 500.0]),
            "context": torch.randn(2, 77, TINY_CLIP["hidden_size"], generator=g)}

    def call(patcher):
        patcher.patch_model()
        try:
            dm = patcher.model.diffusion_model
            dm(**feed, transformer_options={"cond_or_uncond": [0, 1]})  # settles the maps' parameters
            return counted(lambda: dm(**feed, transformer_options={"cond_or_uncond": [0, 1]}))
        finally:
            patcher.unpatch_model()

    saved = kernels.ENABLED
    kernels.ENABLED = False  # the PyTorch path, as on a GPU without Triton
    try:
        base = call(model)
        for strength in (0.8, -0.6):
            steered, placement = pack.nodes.steering.steer_model_placed(model, maps, strength)
            assert len(placement.shift_folded) == len(placement.per_step) == group_norms > 0
            assert call(steered).kernels - base.kernels == 2 * group_norms, strength
    finally:
        kernels.ENABLED = saved


@functools.lru_cache(maxsize=1)
def full_size_sdxl_costs() -> dict:
    """bench/cost on the full-size SDXL UNet (meta device, 1024x1024): its JSON goals (run once)."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "bench" / "cost"),
                           "--models", "sdxl"], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["goals"]


def test_full_size_sdxl_exact_step_adds_at_most_3_percent_bytes_with_triton():
    """The per-step goal on a full-size SDXL at 1024x1024 (fp16, cfg batch 2): exact mode with the Triton
    kernel adds at most one kernel per layer run per step and <= 3% of the step's bytes (counted)."""
    verdicts = full_size_sdxl_costs()
    assert verdicts["sdxl exact/triton kernels"].startswith("met"), verdicts["sdxl exact/triton kernels"]
    assert verdicts["sdxl exact/triton bytes"].startswith("met"), verdicts["sdxl exact/triton bytes"]
    assert verdicts["sdxl fused/pytorch kernels"].startswith("met"), verdicts["sdxl fused/pytorch kernels"]


@pytest.mark.xfail(strict=True, reason="goal <= 3% extra bytes per step on full SDXL without Triton: measured "
                                       "+3.993% (a mean and a multiply-add each read the GroupNorm's output; a "
                                       "GroupNorm that moves the mean in its own passes would add nothing)")
def test_full_size_sdxl_exact_step_adds_at_most_3_percent_bytes_without_triton():
    verdicts = full_size_sdxl_costs()
    assert verdicts["sdxl exact/pytorch kernels"].startswith("met"), verdicts["sdxl exact/pytorch kernels"]
    assert verdicts["sdxl exact/pytorch bytes"].startswith("met"), verdicts["sdxl exact/pytorch bytes"]
