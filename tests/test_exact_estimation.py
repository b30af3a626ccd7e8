"""Incremental estimation at any batch size gives the reference's maps (one truncated pass per layer,
in execution order), on tiny SD1.5, SD2 and SDXL, through the real nodes.

The layer-by-layer reference costs one pass per layer; where the test compares many settings, it
uses the one-batch schedule (fitting inside the hooks), which test_learn shows equal to the
reference, and the layer-by-layer reference itself on SDXL with both text encoders and UNet."""
from __future__ import annotations

import logging

import pytest
import torch

import comfy.model_management
from conftest import patch_state, sample
from test_learn import all_hooks, collect, fit, interrupt_on_call

FALLBACK = "fitting layer by layer instead"


def assert_same_maps(maps, reference, order):
    assert list(maps) == list(order)
    for name in order:
        for key in ("scale", "shift", "lo", "hi"):
            ours, ref = getattr(maps[name], key), getattr(reference[name], key)
            finite = torch.isfinite(ref)
            assert torch.equal(finite, torch.isfinite(ours)), (name, key)
            if finite.any():
                scale = max(1.0, ref[finite].abs().max().item())
                assert (ours[finite] - ref[finite]).abs().max().item() <= 1e-5 * scale, (name, key)


@pytest.mark.parametrize("where", ["diffusion model", "both"])
@pytest.mark.parametrize("fixture", ["sd15", "sd2", "sdxl"])
def test_incremental_maps_equal_the_layer_by_layer_reference_at_any_batch_size(pack, request, caplog, fixture, where):
    """The reference runs the same batches one layer at a time: float sums then agree to rounding. (Across
    batch sizes the model's own float math differs: on a 2-core AVX2 machine with torch 2.14 a tiny
    UNet's maps at batch 4 and 32 differ by up to 3e-4, which no schedule can remove.)"""
    model, clip, _ = request.getfixturevalue(fixture)
    for batch_size in (4, 16):
        small = collect(pack, model, clip, where=where, batch_size=batch_size)[0]
        assert len(small.collector.batches()) > 1
        reference = small.collector.incremental(small, "linear", "q_0_100", blocks="layers")
        small.collector.passes = 0
        with caplog.at_level(logging.WARNING, logger="comfyui_act"):
            maps = fit(pack, small)
        assert FALLBACK not in caplog.text
        # The model's entry (text encoding, sampler call) runs a few times per batch, not once per layer.
        assert small.collector.passes < len(small.order)
        assert_same_maps(maps, reference, small.order)


def test_sdxl_text_encoders_and_unet_in_batches_of_16_equal_the_layer_by_layer_reference(pack, sdxl, caplog):
    model, clip, _ = sdxl
    # 20 prompts in two batches: the reference costs one sweep per layer and batch.
    activations = collect(pack, model, clip, where="both", batch_size=16)[0]
    reference = activations.collector.incremental(activations, "linear", "q_0_100", blocks="layers")
    with caplog.at_level(logging.WARNING, logger="comfyui_act"):
        maps = fit(pack, activations)
    assert FALLBACK not in caplog.text
    assert_same_maps(maps, reference, activations.order)


def test_nested_layers_and_several_noise_levels_in_small_batches(pack, sd15, caplog):
    model, clip, _ = sd15
    # A spatial transformer, its transformer block and a norm inside it are all chosen: each map is
    # fitted with the inner ones applied, as the reference's hooks do.
    pattern = r"middle_block\.1(\.transformer_blocks\.0(\.norm2)?)?$|input_blocks\.1\.0\.in_layers\.0$|model\.out\.0$"
    activations = collect(pack, model, clip, where="diffusion model", batch_size=6, noise_levels=2,
                          layers="custom pattern", pattern=pattern)[0]
    assert activations.source[activations.order[0]].shape[0] == 20  # 10 prompts x 2 noise levels
    assert activations.order[1:4] == ["diffusion_model.middle_block.1.transformer_blocks.0.norm2",
                                      "diffusion_model.middle_block.1.transformer_blocks.0",
                                      "diffusion_model.middle_block.1"]
    # Same batches as the reference: float sums then agree bit for bit (other batch sizes round
    # differently, which the gaussian fit of 20 samples magnifies to about 2e-5).
    reference = activations.collector.incremental(activations, "gaussian", "all", blocks="layers")
    with caplog.at_level(logging.WARNING, logger="comfyui_act"):
        maps = fit(pack, activations, method="gaussian", support="all")
    assert FALLBACK not in caplog.text
    assert_same_maps(maps, reference, activations.order)


def test_a_model_with_patched_calls_falls_back_to_the_exact_per_layer_schedule(pack, sd15, caplog):
    model, clip, _ = sd15
    steered = pack.nodes.nodes_apply.ApplyTransportMaps.execute(
        model, fit(pack, collect(pack, model, clip, where="diffusion model")[0], "at once"), 1.0, 0.0, 1.0,
        "conditional and unconditional", "exact", None).args[0]
    few = dict(where="diffusion model", layers="custom pattern", pattern=r"output_blocks\.3\.0\.(in|out)_layers\.0$")
    activations = collect(pack, steered, clip, batch_size=8, **few)[0]
    whole = collect(pack, steered, clip, batch_size=32, **few)[0]
    reference = whole.collector.incremental(whole, "linear", "q_0_100", blocks="auto")
    with caplog.at_level(logging.WARNING, logger="comfyui_act"):
        maps = fit(pack, activations)
    assert FALLBACK in caplog.text
    assert_same_maps(maps, reference, activations.order)


def patched_forwards(*roots) -> list[str]:
    """Modules whose forward is anything but their class's own. ComfyUI, when it unloads a model
    that carried object patches, puts the original bound method back as an instance attribute:
    that one is the module's own forward, not a leftover."""
    return [n for r in roots for n, m in r.named_modules()
            if "forward" in m.__dict__ and getattr(m.__dict__["forward"], "__func__", None) is not type(m).forward]


def test_interrupting_the_replay_leaves_no_hook_or_patch_behind(pack, sdxl):
    model, clip, _ = sdxl
    before, patches_before = sample(model, clip), patch_state(model, clip)
    activations = collect(pack, model, clip, where="both", batch_size=4)[0]
    unet = model.model.diffusion_model  # the replay enters it a few times per layer
    with interrupt_on_call(unet, 10**9) as uninterrupted:
        fit(pack, activations)
    with interrupt_on_call(unet, 5) as calls:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            fit(pack, activations)
    # Stopped mid-replay (ComfyUI's own layers check for an interrupt at every op).
    assert 5 <= calls["n"] < uninterrupted["n"]
    roots = (model.model, clip.cond_stage_model)
    assert all_hooks(*roots) == 0
    assert not patched_forwards(*roots)
    assert patch_state(model, clip) == patches_before
    assert torch.equal(sample(model, clip), before)
    # The same activations still fit afterwards, to the same maps as an uninterrupted run.
    again = fit(pack, collect(pack, model, clip, where="both", batch_size=4)[0])
    assert_same_maps(fit(pack, activations), again, activations.order)


def test_an_error_during_the_replay_leaves_no_hook_or_patch_behind(pack, sd2):
    model, clip, _ = sd2
    name = "diffusion_model.output_blocks.1.0.out_layers.0"
    weight = pack.nodes.model_layers.unet_modules(model)[name].weight
    activations = collect(pack, model, clip, where="diffusion model", batch_size=4)[0]
    # Break a late layer of the collector's own clone only now: the collection was clean, the
    # replay meets NaN there.
    activations.collector.model.add_patches({f"{name}.weight": (torch.full_like(weight, float("nan")),)}, 1.0)
    with pytest.raises(ValueError, match="out_layers.0 produced NaN"):
        fit(pack, activations)
    assert all_hooks(model.model) == 0
    assert not patched_forwards(model.model)
