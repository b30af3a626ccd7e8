"""Exact mode folds the maps whose fold is the method, and only those: it must sample what the per-step
reference samples (every map run on the layer's output), on tiny SD1.5 and SDXL, for several strengths,
chained nodes, an earlier LoRA-like patch and a ComfyUI hook LoRA; each fold holds O(neurons) memory.
Real host, real nodes, real KSampler."""
from __future__ import annotations

import logging

import pytest
import torch

import comfy.hooks
from conftest import sample
from test_learn import collect, fit

from act_core import LayerMap, TransportMaps

BOTH = "conditional and unconditional"


@pytest.fixture(scope="module")
def maps_sd15(pack, sd15):
    model, clip, _ = sd15
    return fit(pack, collect(pack, model, clip, where="both")[0], support="all")


@pytest.fixture(scope="module")
def maps_sdxl(pack, sdxl):
    model, clip, _ = sdxl
    return fit(pack, collect(pack, model, clip, where="both")[0], support="all")


def apply(pack, model, maps, strength=1.0, clip=None, mode="exact"):
    node = pack.nodes.nodes_apply.ApplyTransportMaps
    return node.execute(model, maps, strength, 0.0, 1.0, BOTH, mode, clip).args


def per_step(pack, model, maps, strength=1.0, clip=None):
    """The reference: every map run on its layer's output (nothing folded)."""
    steering = pack.nodes.steering
    return (steering.steer_model(model, maps, strength, fold=False),
            steering.steer_clip(clip, maps, strength, fold=False) if clip is not None else None)


def norms(pack, patcher_modules):
    return {n: m for n, m in patcher_modules.items() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}


def assert_close(folded, reference, plain):
    """Folded equals the reference to float rounding (float32 rounding of the folded weights, amplified by
    four steps at cfg 5 on latents of magnitude ~200: measured 2e-5 of the latent's range), far closer
    than the steering moves the latent."""
    moved = (reference - plain).abs().max().item()
    error = (folded - reference).abs().max().item()
    assert moved > 1e-2, moved
    assert error <= 1e-4 * max(1.0, reference.abs().max().item()) and error <= 1e-2 * moved, (error, moved)


@pytest.mark.parametrize("strength", [0.5, 1.0, -1.0])
@pytest.mark.parametrize("fixture, maps_fixture", [("sd15", "maps_sd15"), ("sdxl", "maps_sdxl")])
def test_exact_folds_the_token_layers_and_samples_what_the_per_step_reference_samples(
        pack, request, fixture, maps_fixture, strength):
    model, clip, _ = request.getfixturevalue(fixture)
    maps = request.getfixturevalue(maps_fixture)
    steering, layers = pack.nodes.steering, pack.nodes.model_layers
    folded_model, unet = steering.steer_model_placed(model, maps, strength)
    folded_clip, text = steering.steer_clip_placed(clip, maps, strength)
    # What folds: every LayerNorm (token maps on affine norms), UNet and text encoders; GroupNorms
    # (Linear-AcT's mean form) run per step, their shift folded into the norm's bias (a bias patch,
    # no weight patch) and the mean's slope run on the output.
    unet_norms, text_norms = norms(pack, layers.unet_modules(model)), norms(pack, layers.clip_modules(clip))
    assert sorted(unet.folded) == sorted(n for n, m in unet_norms.items() if isinstance(m, torch.nn.LayerNorm))
    assert sorted(unet.per_step) == sorted(n for n, m in unet_norms.items() if isinstance(m, torch.nn.GroupNorm))
    assert sorted(text.folded) == sorted(n for n in maps if n in text_norms) and not text.per_step
    assert not any(f"{n}.forward" in folded_model.object_patches for n in unet.folded)
    # The shift folds where dividing it by the mean's scale keeps it within 4x (LayerMap.mean_shift_fold):
    # most GroupNorms of the fitted maps; the rest keep the shift per step.
    assert sorted(unet.shift_folded) == sorted(n for n in unet.per_step if maps[n].mean_shift_fold(strength))
    assert unet.shift_folded
    assert all(f"{n}.bias" in folded_model.patches and f"{n}.weight" not in folded_model.patches
               and f"{n}.forward" in folded_model.object_patches for n in unet.shift_folded)
    assert not [k for k in folded_clip.patcher.object_patches if k.endswith(".forward")]  # all folded, none hooked
    reference = sample(*per_step(pack, model, maps, strength, clip))
    assert_close(sample(folded_model, folded_clip), reference, sample(model, clip))


def strong(maps, factor=0.9, shift=0.05, gated=False):
    return TransportMaps({n: LayerMap(torch.full_like(l.scale, factor), torch.full_like(l.shift, shift),
                                      l.lo if gated else torch.full_like(l.lo, -float("inf")),
                                      l.hi if gated else torch.full_like(l.hi, float("inf")), l.kind)
                          for n, l in maps.items()}, maps.info)


@pytest.mark.parametrize("first_gated", [False, True])
def test_chained_apply_nodes_fold_in_graph_order(pack, sd15, maps_sd15, first_gated):
    """Two nodes on the same layers. With a gated first node its maps run per step, and the second
    node must then not fold (its map has to act after the first one's, which a fold would precede)."""
    model, clip, _ = sd15
    first = strong(maps_sd15, 1.1, -0.1, gated=first_gated)
    if first_gated:
        first = TransportMaps({n: LayerMap(l.scale, l.shift, torch.full_like(l.lo, -0.5), torch.full_like(l.hi, 0.5),
                                           l.kind) for n, l in first.items()}, first.info)
    second = strong(maps_sd15)
    m1, c1 = apply(pack, model, first, 0.8, clip)
    folded = sample(*apply(pack, m1, second, 1.0, c1))
    r1, rc1 = per_step(pack, model, first, 0.8, clip)
    reference = sample(*per_step(pack, r1, second, 1.0, rc1))
    assert_close(folded, reference, sample(model, clip))
    # The order matters here, so the check can tell a reversed composition.
    s1, sc1 = per_step(pack, model, second, 1.0, clip)
    reversed_order = sample(*per_step(pack, s1, first, 0.8, sc1))
    assert (reversed_order - reference).abs().max() > 1e-3


def lora_like(model, keys, scale=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd = model.model.state_dict()
    return {k: scale * torch.randn(sd[k].shape, generator=g) for k in keys}


def test_folds_start_from_the_weights_an_earlier_lora_made(pack, sd15, maps_sd15):
    model, clip, _ = sd15
    layer = next(n for n, m in norms(pack, pack.nodes.model_layers.unet_modules(model)).items()
                 if isinstance(m, torch.nn.LayerNorm))
    lora = model.clone()
    lora.add_patches({k: (d,) for k, d in lora_like(model, [f"{layer}.weight", f"{layer}.bias",
                      "diffusion_model.input_blocks.1.0.in_layers.2.weight"]).items()}, 1.0)
    with_lora = sample(lora, clip)
    assert (with_lora - sample(model, clip)).abs().max() > 1e-2
    folded_model, placement = pack.nodes.steering.steer_model_placed(lora, maps_sd15, 1.0)
    assert layer in placement.folded
    assert_close(sample(folded_model, clip), sample(per_step(pack, lora, maps_sd15, 1.0)[0], clip), with_lora)


def hooked(cond, hooks):
    return comfy.hooks.set_hooks_for_conditioning(cond, hooks)


def test_a_hook_lora_on_a_folded_layer_is_moved_by_the_map_as_per_step_moves_it(pack, sd15, maps_sd15):
    """Create Hook LoRA's patches are added on top of the clone's weights when a hooked cond runs; the
    map must move the hooked layer's output (the per-step reference does), so the fold has to move
    the hook's change too."""
    import nodes as comfy_nodes
    model, clip, _ = sd15
    layers = [n for n, m in norms(pack, pack.nodes.model_layers.unet_modules(model)).items()
              if isinstance(m, torch.nn.LayerNorm)]
    diffs = lora_like(model, [f"{n}.weight" for n in layers] + [f"{n}.bias" for n in layers], 0.5)
    lora = {}
    for key, diff in diffs.items():
        lora[key[:-len(".weight")] + ".diff" if key.endswith(".weight") else key[:-len(".bias")] + ".diff_b"] = diff
    hooks = comfy.hooks.create_hook_lora(lora, strength_model=1.0, strength_clip=0.0)

    def run(m):
        (pos,) = comfy_nodes.CLIPTextEncode().encode(clip, "a house on a hill")
        (neg,) = comfy_nodes.CLIPTextEncode().encode(clip, "blurry")
        (latent,) = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)
        return comfy_nodes.KSampler().sample(m, 7, 4, 5.0, "euler", "normal", hooked(pos, hooks), hooked(neg, hooks),
                                             latent)[0]["samples"]
    reference = run(per_step(pack, model, maps_sd15, 0.8)[0])
    assert (reference - sample(per_step(pack, model, maps_sd15, 0.8)[0], clip)).abs().max() > 1e-2  # the hook acts
    folded_model, placement = pack.nodes.steering.steer_model_placed(model, maps_sd15, 0.8)
    assert set(layers) <= set(placement.folded)
    assert_close(run(folded_model), reference, run(model))


def test_a_fold_holds_per_neuron_vectors_not_a_copy_of_the_weight(pack, sdxl):
    """A Linear layer chosen by pattern (an attention output projection) and a GroupNorm, folded in
    exact mode (token map) and in fold-all mode (conv map): the patches hold O(neurons) bytes."""
    model, clip, _ = sdxl
    modules = pack.nodes.model_layers.unet_modules(model)
    linear = next(n for n, m in modules.items() if n.endswith("attn1.to_out.0"))
    group = next(n for n, m in modules.items() if isinstance(m, torch.nn.GroupNorm))
    d_linear, d_group = modules[linear].weight.shape[0], modules[group].num_channels
    g = torch.Generator().manual_seed(0)

    def layer_map(d, kind):
        return LayerMap(1 + 0.2 * torch.randn(d, generator=g), 0.1 * torch.randn(d, generator=g),
                        torch.full((d,), -float("inf")), torch.full((d,), float("inf")), kind)
    maps = TransportMaps({linear: layer_map(d_linear, "token"), group: layer_map(d_group, "conv")}, {"family": "SDXL"})
    for mode, expected in (("exact", {linear}), ("fold all (approximate)", {linear, group})):
        folded_model, placement = pack.nodes.steering.steer_model_placed(model, maps, 0.7, mode=mode)
        assert set(placement.folded) == expected
        for name in expected:
            d = maps[name].dim
            held = sum(_bytes(p[1]) for key in (f"{name}.weight", f"{name}.bias") for p in folded_model.patches[key])
            assert held <= 3 * 4 * d, (name, held)  # slope for the weight; slope and shift for the bias
    # The Linear fold is exact: it equals running the map on the layer's output.
    exact_model, _ = pack.nodes.steering.steer_model_placed(model, TransportMaps({linear: maps[linear]}, maps.info), 0.7)
    reference = pack.nodes.steering.steer_model(model, TransportMaps({linear: maps[linear]}, maps.info), 0.7, fold=False)
    assert_close(sample(exact_model, clip), sample(reference, clip), sample(model, clip))


def _bytes(patch) -> int:
    if hasattr(patch, "bytes_held"):
        return patch.bytes_held()
    return sum(t.numel() * t.element_size() for t in patch if isinstance(t, torch.Tensor))


def test_apply_says_how_many_layers_fold_and_how_many_run_per_step(pack, sd15, maps_sd15, caplog):
    model, clip, _ = sd15
    modules = norms(pack, pack.nodes.model_layers.unet_modules(model))
    layer_norms = sum(isinstance(m, torch.nn.LayerNorm) for m in modules.values())
    group_norms = len(modules) - layer_norms
    text = sum(1 for n in maps_sd15 if not n.startswith("diffusion_model."))
    with caplog.at_level(logging.INFO, logger="comfyui_act"):
        apply(pack, model, maps_sd15, 1.0, clip)
    assert (f"diffusion model: {layer_norms} layers folded into weights, {group_norms} run per step "
            f"({group_norms} of them with their shift folded into the norm's bias); "
            f"text encoders: {text} layers folded into weights, 0 run per encode") in caplog.text
    chart, summary = pack.nodes.nodes_view.InspectMaps.execute(maps_sd15, model, clip).args
    assert (f"{layer_norms} layers folded into weights, {group_norms} run per step ({group_norms} of them with "
            "their shift folded") in summary


def test_fold_all_is_named_approximate_and_old_fused_workflows_still_run_it_with_one_warning(
        pack, sd15, maps_sd15, caplog):
    model, clip, _ = sd15
    node = pack.nodes.nodes_apply.ApplyTransportMaps
    mode_input = next(i for i in node.define_schema().inputs if i.id == "mode")
    assert mode_input.options == ["exact", "fold all (approximate)"]
    assert all(word in mode_input.tooltip for word in ("channel mean", "support range", "'fused'"))
    assert node.validate_inputs(strength=1.0, mode="fused") is True  # a saved workflow still validates
    assert "mode 'fuzed' is unknown" in node.validate_inputs(strength=1.0, mode="fuzed")
    approximate = sample(*apply(pack, model, maps_sd15, 1.0, clip, "fold all (approximate)"))
    with caplog.at_level(logging.WARNING, logger="comfyui_act"):
        legacy = sample(*apply(pack, model, maps_sd15, 1.0, clip, "fused"))
    assert torch.equal(legacy, approximate)
    assert caplog.text.count("mode 'fused' is now called 'fold all (approximate)'") == 1
    # It is an approximation of Linear-AcT: its GroupNorm maps scale every pixel instead of the mean.
    exact = sample(*apply(pack, model, maps_sd15, 1.0, clip, "exact"))
    assert (approximate - exact).abs().max() > 1e-2 * (exact - sample(model, clip)).abs().max()


def test_a_lora_loaded_after_apply_on_a_folded_layer_is_reported_once(pack, sd15, caplog):
    model, clip, _ = sd15
    modules = pack.nodes.model_layers.unet_modules(model)
    layer = next(n for n, m in modules.items() if isinstance(m, torch.nn.LayerNorm))
    d = modules[layer].normalized_shape[-1]
    maps = TransportMaps({layer: LayerMap(torch.full((d,), 1.2), torch.full((d,), 0.1), torch.full((d,), -float("inf")),
                                          torch.full((d,), float("inf")))}, {"family": "SD1.x"})
    patch = {k: (d,) for k, d in lora_like(model, [f"{layer}.weight"]).items()}
    before = model.clone()
    before.add_patches(patch, 1.0)
    with caplog.at_level(logging.WARNING, logger="comfyui_act"):
        sample(apply(pack, before, maps)[0], clip)  # LoRA, then Apply: the fold starts from it
        assert "loaded after Apply" not in caplog.text
        after = apply(pack, model, maps)[0]
        after.add_patches(patch, 1.0)
        sample(after, clip)
        sample(after, clip)
    assert caplog.text.count("a LoRA loaded after Apply") == 1 and layer in caplog.text


def conv_maps(model, pack, scale: float, shift: float):
    modules = pack.nodes.model_layers.unet_modules(model)
    d = {n: m.num_channels for n, m in modules.items() if isinstance(m, torch.nn.GroupNorm)}
    g = torch.Generator().manual_seed(3)
    return TransportMaps({n: LayerMap(scale + 0.05 * torch.randn(c, generator=g), shift + 0.1 * torch.randn(c, generator=g),
                                      torch.full((c,), -float("inf")), torch.full((c,), float("inf")), "conv")
                          for n, c in d.items()}, {"family": "SD1.x", "method": "linear"})


def test_a_mean_form_map_keeps_its_shift_per_step_where_folding_it_is_not_exact(pack, sd15):
    """The shift folds into the bias divided by the mean's scale 1 + strength (scale - 1): where that
    is near 0 (here 1 + 1.2 (0.2 - 1) = 0.04) it stays per step; a window or the conditional branch
    alone keeps every conv map as it is (the fold would act outside them). Each samples the reference."""
    model, clip, _ = sd15
    steering = pack.nodes.steering
    maps = conv_maps(model, pack, 0.2, 0.3)
    near_zero, placement = steering.steer_model_placed(model, maps, 1.2)
    assert not placement.shift_folded and len(placement.per_step) == len(maps)
    assert not [k for k in near_zero.patches if k.endswith(".bias")]
    assert_close(sample(near_zero, clip), sample(steering.steer_model(model, maps, 1.2, fold=False), clip),
                 sample(model, clip))
    assert steering.steer_model_placed(model, maps, 0.5)[1].shift_folded  # 1 + 0.5 (0.2 - 1) = 0.6 folds
    for window, branch in (((0.0, 0.6), BOTH), ((0.0, 1.0), "conditional only")):
        _, placement = steering.steer_model_placed(model, maps, 0.5, *window, branch)
        assert not placement.shift_folded and len(placement.per_step) == len(maps)


def test_a_folded_shift_adds_to_an_earlier_lora_on_the_norm_and_a_later_one(pack, sd15):
    """A bias patch from a LoRA, before or after Apply, on a GroupNorm whose shift is folded: the shift
    adds to whatever the bias is, so both orders sample the per-step reference, without a warning."""
    model, clip, _ = sd15
    maps = conv_maps(model, pack, 0.9, 0.2)
    layer = next(iter(maps))
    patch = {k: (d,) for k, d in lora_like(model, [f"{layer}.bias", f"{layer}.weight"], 0.5).items()}
    before = model.clone()
    before.add_patches(patch, 1.0)
    reference = sample(pack.nodes.steering.steer_model(before, maps, 0.8, fold=False), clip)
    steered, placement = pack.nodes.steering.steer_model_placed(before, maps, 0.8)
    assert layer in placement.shift_folded
    assert_close(sample(steered, clip), reference, sample(before, clip))
    after, _ = pack.nodes.steering.steer_model_placed(model, maps, 0.8)
    after.add_patches(patch, 1.0)
    reference_after = pack.nodes.steering.steer_model(model, maps, 0.8, fold=False)
    reference_after.add_patches(patch, 1.0)
    assert_close(sample(after, clip), sample(reference_after, clip), sample(model, clip))


def test_fold_all_says_when_it_cannot_fold_flux_norms_and_runs_them_as_exact(pack, flux, caplog):
    """FLUX.1's norms have no weight and bias (their scale and shift come from the timestep's
    modulation), so fold all has nothing to fold them into: Apply warns, its summary and Inspect say
    how many run per step, and it runs them exactly as exact mode does."""
    model, clip, _ = flux
    modules = pack.nodes.model_layers.unet_modules(model)
    names = [n for n, m in modules.items() if isinstance(m, torch.nn.LayerNorm)]
    assert names and all(modules[n].weight is None for n in names)
    g = torch.Generator().manual_seed(0)

    def token_map(d):
        return LayerMap(1 + 0.1 * torch.randn(d, generator=g), 0.1 * torch.randn(d, generator=g),
                        torch.full((d,), -float("inf")), torch.full((d,), float("inf")))
    maps = TransportMaps({n: token_map(modules[n].normalized_shape[-1]) for n in names}, {"family": "FLUX.1"})
    with caplog.at_level(logging.INFO, logger="comfyui_act"):
        steered = apply(pack, model, maps, 1.0, mode="fold all (approximate)")[0]
    line = f"0 layers folded into weights, {len(names)} run per step ({len(names)} of them with no weight and bias"
    assert f"fold all cannot fold {len(names)} layers" in caplog.text and line in caplog.text
    exact = apply(pack, model, maps, 1.0)[0]
    assert sorted(k for k in steered.object_patches) == sorted(k for k in exact.object_patches)
    assert not steered.patches and not exact.patches
    _chart, summary = pack.nodes.nodes_view.InspectMaps.execute(maps, model).args
    assert f"in fold all (approximate) mode, diffusion model: {line}" in summary
