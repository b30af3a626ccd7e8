"""Exact mode is the per-step result at the lowest cost, never a less precise one. Folding a mean-form
map's shift into a GroupNorm's bias rounds the folded bias and the norm's shifted output in the
model's dtype, where per step only the map's result is rounded: in fp16 and bf16 that is measurably
worse (against a float64 reference of the same inputs), so there the shift stays per step. In float32
both are far below anything visible and the fold saves a kernel per layer on the PyTorch path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from act_core import LayerMap, kernels
from test_memory_modes import sd15_bf16  # noqa: F401  (fixture)

GROUPS, D, SIZE = 8, 32, 16


def norm_output_errors(pack, dtype, one_plus_a: float, shift: float, strength: float):
    """Max absolute error against float64 of one GroupNorm's steered output, computed as exact mode
    computes it in `dtype` (the shift folded into the bias where LayerMap.mean_shift_fold allows it,
    through the pack's bias patch) and as the per-step path does; and whether the shift was folded."""
    scale = 1 + (one_plus_a - 1) / strength  # so that 1 + a = 1 + strength (scale - 1) = one_plus_a
    inf = torch.full((D,), float("inf"))
    layer = LayerMap(torch.full((D,), scale), torch.full((D,), shift), -inf, inf, "conv", form="mean")
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, D, SIZE, SIZE, generator=g) + 1).to(dtype)
    weight, bias = (1 + 0.3 * torch.randn(D, generator=g)).to(dtype), (0.5 * torch.randn(D, generator=g)).to(dtype)
    reference = layer.apply(F.group_norm(x.double(), GROUPS, weight.double(), bias.double()), strength)
    per_step = kernels.transport(layer, strength)(F.group_norm(x, GROUPS, weight, bias))
    split = layer.mean_shift_fold(strength, dtype)
    if split is None:
        exact = per_step
    else:
        shift_folded, rest = split
        key = "norm.bias"
        patch = pack.nodes.folding.shift_patch("norm", shift_folded)[key]
        folded_bias = patch.calculate_weight(bias.clone(), key, 1.0, 1.0, None, lambda t: t)
        exact = kernels.transport(rest, 1.0)(F.group_norm(x, GROUPS, weight, folded_bias))
    error = lambda t: (t.double() - reference).abs().max().item()  # noqa: E731
    return error(exact), error(per_step), split is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("one_plus_a, shift, strength", [(0.26, 1.0, 7.4), (0.26, 8.0, 1.0), (0.8, 8.0, 1.0),
                                                         (2.0, 8.0, 1.0)])
def test_exact_is_never_less_precise_than_per_step_in_fp16_and_bf16(pack, dtype, one_plus_a, shift, strength):
    exact, per_step, _folded = norm_output_errors(pack, dtype, one_plus_a, shift, strength)
    assert exact <= per_step, (exact, per_step)


def test_in_float32_the_shift_still_folds_within_float32_rounding(pack):
    exact, per_step, folded = norm_output_errors(pack, torch.float32, 0.26, 8.0, 1.0)
    assert folded and exact < 1e-5 and per_step < 1e-5, (exact, per_step)


def test_a_bf16_model_keeps_its_groupnorm_shifts_per_step(pack, sd15, sd15_bf16):  # noqa: F811
    """The same maps on the float32 and the bf16 UNet: the float32 one folds the shifts."""
    steering = pack.nodes.steering
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, module in pack.nodes.model_layers.unet_modules(sd15[0]).items():
        if isinstance(module, torch.nn.GroupNorm):
            d = module.num_channels
            layers[name] = LayerMap(0.8 + 0.1 * torch.rand(d, generator=g), 0.3 * torch.randn(d, generator=g),
                                    torch.full((d,), -float("inf")), torch.full((d,), float("inf")), "conv")
    maps = pack.act_core.TransportMaps(layers, {"family": "SD1.x"})
    _, on_float32 = steering.steer_model_placed(sd15[0], maps, 1.0)
    _, on_bf16 = steering.steer_model_placed(sd15_bf16[0], maps, 1.0)
    assert sorted(on_float32.shift_folded) == sorted(layers)
    assert not on_bf16.shift_folded and sorted(on_bf16.per_step) == sorted(layers)
