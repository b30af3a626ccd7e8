"""FLUX.1 and SD3 beside the SD families: collect, fit, apply (exact and fused), save and load, on tiny
random-weight models built with ComfyUI's own classes, through the real nodes and KSampler; in the
diffusion model and in the text encoders these CLIPs carry (CLIP-L and T5 for FLUX.1, CLIP-L and
CLIP-G for the SD3 model here, built without T5 as an SD3.5 checkpoint loaded without it)."""
from __future__ import annotations

import logging
import random

import pytest
import torch

import comfy.model_management
import folder_paths
import nodes as comfy_nodes
from act_core import LayerMap, TransportMaps
from conftest import patch_state
from conftest import sample as conftest_sample
from pack_loader import load_pack
from test_exact_estimation import FALLBACK, assert_same_maps
from test_learn import all_hooks, collect, fit

BOTH = "conditional and unconditional"
NEW = [("FLUX.1", "flux"), ("SD3", "sd3")]
# Ten prompt pairs as elsewhere would do; eight (the minimum) keep the transformer passes few.
THINGS = ["a house", "a dog", "a street", "a kitchen", "a beach", "a car", "a forest", "a cat"]
SOURCE = "\n".join(f"a photo of {t} with a pink elephant" for t in THINGS)
TARGET = "\n".join(f"a photo of {t}" for t in THINGS)
MODES = load_pack().nodes.steering.MODES
# Linear layers of both token streams (and FLUX's single-stream blocks): a token map on a linear
# layer's output folds exactly into its weight and bias, which these models' norms do not have.
LINEAR_LAYERS = {"flux": r"(img_attn\.proj|txt_mlp\.2|single_blocks\.\d+\.linear2)$",
                 "sd3": r"(x_block\.attn\.proj|context_block\.mlp\.fc2)$"}


def sample(model, clip, vae=None):
    return conftest_sample(model, clip, vae, steps=2)


def collect_small(pack, model, clip, **kw):
    return collect(pack, model, clip, where="diffusion model", source=SOURCE, target=TARGET, **kw)


@pytest.fixture(scope="module")
def maps_by_family(pack, flux, sd3):
    return {fixture: fit(pack, collect_small(pack, *(flux if fixture == "flux" else sd3)[:2])[0])
            for fixture in ("flux", "sd3")}


@pytest.fixture(scope="module")
def both_by_family(pack, flux, sd3):
    """Activations and incremental maps for text encoders and diffusion model, all prompts in one batch."""
    found = {}
    for fixture, (model, clip, _) in (("flux", flux), ("sd3", sd3)):
        activations = collect(pack, model, clip, where="both", source=SOURCE, target=TARGET)[0]
        found[fixture] = (activations, fit(pack, activations))
    return found


def text_part(maps):
    return TransportMaps({n: m for n, m in maps.items() if not n.startswith("diffusion_model.")}, maps.info)


def conditioning(clip, prompt="a photo of a garden with a pink elephant"):
    """What CLIPTextEncode hands the sampler: the token stream and the pooled vector."""
    (cond,) = comfy_nodes.CLIPTextEncode().encode(clip, prompt)
    return cond[0][0], cond[0][1]["pooled_output"]


def apply(pack, model, maps, strength=1.0, clip=None, mode="exact"):
    node = pack.nodes.nodes_apply.ApplyTransportMaps
    return node.execute(model, maps, strength, 0.0, 1.0, BOTH, mode, clip).args


def layer_norms(pack, model):
    return {n: m for n, m in pack.nodes.model_layers.unet_modules(model).items() if isinstance(m, torch.nn.LayerNorm)}


@pytest.mark.parametrize("family, fixture", NEW)
def test_collect_and_fit_give_maps_for_the_norm_layers_of_both_token_streams(pack, request, maps_by_family,
                                                                            family, fixture):
    model, clip, _ = request.getfixturevalue(fixture)
    maps = maps_by_family[fixture]
    assert maps.family == family and maps.info["family"] == family
    expected = layer_norms(pack, model)
    # The last SD3 block keeps only the context stream's pre-attention norm (its text output is unused).
    assert set(maps) <= set(expected) and len(maps) >= len(expected) - 2
    streams = ("img_norm", "txt_norm") if family == "FLUX.1" else ("x_block.norm", "context_block.norm")
    for stream in streams:
        assert any(stream in name for name in maps), stream
    if family == "FLUX.1":
        assert any("single_blocks" in name for name in maps)
    for name, layer in maps.items():
        assert layer.kind == "token" and layer.dim == expected[name].normalized_shape[-1]
        assert torch.isfinite(layer.scale).all()


@pytest.mark.parametrize("fixture", ["flux", "sd3"])
def test_incremental_in_batches_equals_the_one_batch_fit(pack, request, caplog, both_by_family, fixture):
    model, clip, _ = request.getfixturevalue(fixture)
    whole = both_by_family[fixture][0]
    small = collect(pack, model, clip, where="both", source=SOURCE, target=TARGET, batch_size=8)[0]
    assert len(small.collector.batches()) > 1
    # Layer by layer over the same batches (across batch sizes the model's own float sums differ;
    # see test_exact_estimation).
    reference = small.collector.incremental(small, "linear", "q_0_100", blocks="layers")
    small.collector.passes = 0
    with caplog.at_level(logging.WARNING, logger="comfyui_act"):
        maps = fit(pack, small)
    # The text encoders go layer by layer (prompts are encoded one by one); in the diffusion model the
    # replay of module calls handles these transformers: the layer-by-layer fallback is not needed.
    assert FALLBACK not in caplog.text
    text = sum(1 for n in small.order if not n.startswith("diffusion_model."))
    assert small.collector.passes - text * len(small.collector.batches()) < len(small.order) - text
    assert_same_maps(maps, reference, whole.order)


@pytest.mark.parametrize("fixture", ["flux", "sd3"])
def test_strength_zero_is_bit_identical_the_dial_is_monotonic_and_fused_equals_exact(pack, request,
                                                                                    maps_by_family, fixture):
    model, clip, vae = request.getfixturevalue(fixture)
    maps = maps_by_family[fixture]
    plain = sample(model, clip, vae)
    distances = []
    for strength in (0.0, 0.5, 1.0):
        steered = sample(apply(pack, model, maps, strength)[0], clip, vae)
        if strength == 0.0:
            assert torch.equal(steered, plain)
        # These norms have no weight or bias to fold into: fused mode runs them exactly, the same image.
        assert torch.equal(sample(apply(pack, model, maps, strength, mode="fused")[0], clip, vae), steered)
        distances.append((steered - plain).pow(2).mean().sqrt().item())
    assert distances[0] == 0 < distances[1] < distances[2], distances
    assert torch.equal(sample(model, clip, vae), plain)  # the unpatched model is untouched


def reference_sample(model, clip, chain, vae=None):
    """What sampling gives when each map of `chain` ([(maps, strength), ...], applied in that order) is
    applied by the reference LayerMap.apply through plain forward hooks on the unpatched model: an
    unfolded reference sharing nothing with the pack's patching."""
    modules = dict(model.model.named_modules())
    names = {n for maps, _ in chain for n in maps}

    def hook(name):
        def move(_module, _inputs, output):
            for maps, strength in chain:
                if name in maps:
                    output = maps[name].apply(output, strength)
            return output
        return move
    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        return sample(model, clip, vae)
    finally:
        for handle in handles:
            handle.remove()


def close(a, b, tolerance=1e-4):
    return torch.allclose(a, b, atol=tolerance, rtol=tolerance)


def test_two_apply_nodes_chain_on_flux_as_the_composed_map(pack, flux, maps_by_family):
    """Apply A then Apply B must steer as B after A, layer by layer, computed with plain hooks; the
    reversed composition (B, then A) is far from it, so an apply chain in the wrong order fails."""
    model, clip, _ = flux
    first = maps_by_family["flux"]
    second = TransportMaps({n: LayerMap(torch.full_like(l.scale, 0.9), l.shift * 0 + 0.05, l.lo * 0 - float("inf"),
                                        l.hi * 0 + float("inf"), l.kind) for n, l in first.items()}, first.info)
    once = apply(pack, model, first)[0]
    assert torch.equal(sample(apply(pack, once, second, 0.0)[0], clip), sample(once, clip))
    both = sample(apply(pack, once, second, 0.8)[0], clip)
    composed = reference_sample(model, clip, [(first, 1.0), (second, 0.8)])
    reversed_order = reference_sample(model, clip, [(second, 0.8), (first, 1.0)])
    assert close(both, composed)
    assert not close(both, reversed_order, 1e-2)
    assert not close(both, sample(once, clip), 1e-2)


@pytest.fixture(scope="module")
def linear_maps_by_family(pack, flux, sd3):
    """Ungated Gaussian maps on linear layers of each family: every element is moved, so the fold is exact."""
    found = {}
    for fixture, (model, clip, _) in (("flux", flux), ("sd3", sd3)):
        activations = collect_small(pack, model, clip, layers="custom pattern", pattern=LINEAR_LAYERS[fixture])[0]
        found[fixture] = fit(pack, activations, method="gaussian", support="all")
    return found


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fixture", ["flux", "sd3"])
def test_maps_on_linear_layers_steer_as_the_unfolded_reference(pack, request, linear_maps_by_family, fixture,
                                                               mode):
    """On layers with a weight and a bias to fold into, a mode that folds really does (a weight and a
    bias patch per mapped layer), and every mode samples what the plain-hook reference samples."""
    model, clip, _ = request.getfixturevalue(fixture)
    maps = linear_maps_by_family[fixture]
    modules = pack.nodes.model_layers.unet_modules(model)
    assert len(maps) >= 3 and all(isinstance(modules[n], torch.nn.Linear) and modules[n].bias is not None
                                  for n in maps)
    assert all(layer.kind == "token" and not layer.gated for layer in maps.values())
    steered = apply(pack, model, maps, 0.7, mode=mode)[0]
    if mode != "exact":
        assert set(steered.patches) == {f"{n}.{p}" for n in maps for p in ("weight", "bias")}
    image = sample(steered, clip)
    reference = reference_sample(model, clip, [(maps, 0.7)])
    plain = sample(model, clip)
    assert not close(reference, plain, 1e-2)
    assert close(image, reference)


def test_maps_save_load_and_steer_alike(pack, sd3, maps_by_family):
    model, clip, _ = sd3
    maps = maps_by_family["sd3"]
    path = pack.nodes.nodes_files.SaveTransportMaps.execute(maps, "test-families-sd3", True).args[0]
    try:
        name = "test-families-sd3.safetensors"
        assert name in folder_paths.get_filename_list("act")
        loaded, summary = pack.nodes.nodes_files.LoadTransportMaps.execute(name).args
    finally:
        import os
        os.remove(path)
    assert loaded.family == "SD3" and "SD3" in summary and list(loaded) == list(maps)
    assert torch.equal(sample(apply(pack, model, loaded)[0], clip), sample(apply(pack, model, maps)[0], clip))


@pytest.mark.parametrize("maps_from, model_of, names", [
    ("flux", "sd3", ("FLUX.1", "SD3")), ("sd3", "flux", ("SD3", "FLUX.1")), ("flux", "sd15", ("FLUX.1", "SD1.x"))])
def test_maps_of_one_family_are_refused_on_another_naming_both(pack, request, maps_by_family, maps_from, model_of,
                                                               names):
    model = request.getfixturevalue(model_of)[0]
    with pytest.raises(pack.nodes.model_layers.ActError) as error:
        apply(pack, model, maps_by_family[maps_from])
    assert all(name in str(error.value) for name in names), str(error.value)


def test_sd_maps_are_refused_on_flux(pack, sd15, flux):
    maps = fit(pack, collect(pack, *sd15[:2], where="diffusion model")[0], "at once")
    with pytest.raises(pack.nodes.model_layers.ActError, match="SD1.x.*FLUX.1"):
        apply(pack, flux[0], maps)


@pytest.mark.parametrize("fixture, encoders", [("flux", {"clip_l", "t5xxl"}), ("sd3", {"clip_l", "clip_g"})])
def test_both_maps_every_norm_of_each_text_encoder_named_by_its_encoder(pack, request, both_by_family, fixture,
                                                                        encoders):
    model, clip, _ = request.getfixturevalue(fixture)
    _, maps = both_by_family[fixture]
    text = text_part(maps)
    assert {n.split(".", 1)[0] for n in text} == encoders
    modules = pack.nodes.model_layers.clip_modules(clip)
    norms = {n for n, m in modules.items() if type(m).__name__ in ("LayerNorm", "T5LayerNorm")}
    assert set(text) == norms
    if "t5xxl" in encoders:
        # T5's own RMS norm (comfy/text_encoders/t5.py), before attention, before the MLP and at the end.
        assert sum(type(modules[n]).__name__ == "T5LayerNorm" for n in text) == 5
    assert any(n.startswith("diffusion_model.") for n in maps)
    for name, layer in text.items():
        assert layer.kind == "token" and layer.dim == pack.nodes.model_layers.output_dim(modules[name])


@pytest.mark.parametrize("fixture", ["flux", "sd3"])
def test_text_encoder_maps_dial_the_conditioning_and_the_image(pack, request, both_by_family, fixture):
    model, clip, vae = request.getfixturevalue(fixture)
    _, maps = both_by_family[fixture]
    plain, plain_pooled = conditioning(clip)
    distances = []
    for strength in (0.0, 0.5, 1.0):
        cond, pooled = conditioning(apply(pack, model, text_part(maps), strength, clip)[1])
        if strength == 0.0:
            assert torch.equal(cond, plain) and torch.equal(pooled, plain_pooled)
        distances.append((cond - plain).pow(2).mean().sqrt().item())
    assert distances[0] == 0 < distances[1] < distances[2], distances
    # CLIP-L's pooled vector feeds both models' vector input: steered too.
    assert not torch.equal(conditioning(apply(pack, model, text_part(maps), 1.0, clip)[1])[1], plain_pooled)
    image = sample(model, clip, vae)
    assert torch.equal(sample(*apply(pack, model, maps, 0.0, clip), vae), image)
    assert not torch.equal(sample(*apply(pack, model, maps, 1.0, clip), vae), image)
    assert torch.equal(conditioning(clip)[0], plain)  # the CLIP that went in is untouched


@pytest.mark.parametrize("fixture", ["flux", "sd3"])
def test_fused_text_encoder_maps_equal_exact(pack, request, both_by_family, fixture):
    """Gaussian maps act on every element, so folding them into CLIP's LayerNorms changes nothing but the
    rounding of the fp16 weights the folded values are stored in; T5's norm has no bias to fold into
    and runs exactly."""
    model, clip, _ = request.getfixturevalue(fixture)
    activations, _ = both_by_family[fixture]
    maps = text_part(fit(pack, activations, "at once", method="gaussian", support="all"))
    exact_clip = apply(pack, model, maps, 0.7, clip)[1]
    fused_clip = apply(pack, model, maps, 0.7, clip, mode="fused")[1]
    assert fused_clip.patcher.patches  # something was folded
    plain, exact, fused = conditioning(clip), conditioning(exact_clip), conditioning(fused_clip)
    for which in (0, 1):  # token stream, pooled vector
        change = (exact[which] - plain[which]).abs().max().item()
        assert change > 0.1 and (fused[which] - exact[which]).abs().max().item() < 0.01 * change


def test_both_on_flux_equals_the_layer_by_layer_reference(pack, both_by_family):
    """The diffusion model's maps are fitted with the text-encoder maps already applied, as the
    reference's one pass per layer has them."""
    activations, maps = both_by_family["flux"]
    reference = activations.collector.incremental(activations, "linear", "q_0_100", blocks="layers")
    assert_same_maps(maps, reference, activations.order)


def test_text_encoder_only_maps_equal_the_text_part_of_both(pack, flux, both_by_family):
    """The text encoders come first: what 'both' fits there does not depend on the diffusion model."""
    activations = collect(pack, *flux[:2], where="text encoder", source=SOURCE, target=TARGET)[0]
    maps = fit(pack, activations)
    assert all(not n.startswith("diffusion_model.") for n in maps)
    assert_same_maps(maps, text_part(both_by_family["flux"][1]), activations.order)


def test_flux_text_encoder_maps_save_load_and_steer_alike(pack, flux, both_by_family):
    model, clip, _ = flux
    maps = both_by_family["flux"][1]
    path = pack.nodes.nodes_files.SaveTransportMaps.execute(maps, "test-families-flux-both", True).args[0]
    try:
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
        loaded = pack.nodes.nodes_files.LoadTransportMaps.execute("test-families-flux-both.safetensors").args[0]
    finally:
        import os
        os.remove(path)
    # Each key says which encoder (or the diffusion model) its layer belongs to.
    assert {k.split(".", 1)[0] for k in keys} == {"t5xxl", "clip_l", "diffusion_model"}, keys[:3]
    assert loaded.family == "FLUX.1" and list(loaded) == list(maps)
    assert torch.equal(conditioning(apply(pack, model, loaded, 1.0, clip)[1])[0],
                       conditioning(apply(pack, model, maps, 1.0, clip)[1])[0])


@pytest.mark.parametrize("fixture", ["flux", "sd3"])
def test_interrupting_collection_leaves_nothing_behind(pack, request, fixture):
    model, clip, _ = request.getfixturevalue(fixture)
    before = sample(model, clip)
    victim = random.Random(fixture).choice(list(layer_norms(pack, model).values()))

    def interrupt(*_):
        comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    handle = victim.register_forward_hook(interrupt)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            collect_small(pack, model, clip)
    finally:
        handle.remove()
        comfy.model_management.interrupt_current_processing(False)
    assert all_hooks(model.model, clip.cond_stage_model) == 0
    assert not model.object_patches and not model.patches
    assert torch.equal(sample(model, clip), before)


def test_interrupting_text_encoder_fitting_leaves_nothing_behind(pack, flux, both_by_family):
    """An interrupt in a text-encoder pass of the layer-by-layer fitting (FLUX's T5) stops it cleanly."""
    model, clip, _ = flux
    activations = both_by_family["flux"][0]
    before = conditioning(clip)
    patches_before = patch_state(model, clip)
    modules = pack.nodes.model_layers.clip_modules(clip)
    victim = modules[[n for n in activations.order if n.startswith("t5xxl.")][2]]
    calls = []

    def interrupt(*_):
        calls.append(1)
        if len(calls) > 3:  # in the middle of a sweep, after some prompts went through
            comfy.model_management.interrupt_current_processing(True)
            comfy.model_management.throw_exception_if_processing_interrupted()

    handle = victim.register_forward_hook(interrupt)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            fit(pack, activations)
    finally:
        handle.remove()
        comfy.model_management.interrupt_current_processing(False)
    assert all_hooks(model.model, clip.cond_stage_model) == 0
    assert patch_state(model, clip) == patches_before  # on 0.33 the CLIP starts with ComfyUI's manual_cast_dtype
    after = conditioning(clip)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_inspect_draws_the_chart_for_flux_maps(pack, maps_by_family):
    maps = maps_by_family["flux"]
    chart, summary = pack.nodes.nodes_view.InspectMaps.execute(maps).args
    assert chart.shape[-1] == 3 and chart.shape[1] > 100 and chart.std() > 0.05
    assert f"{len(maps)} layers" in summary


def test_flux_single_stream_block_outputs_can_be_chosen_by_pattern(pack, flux):
    model, clip, _ = flux
    activations = collect_small(pack, model, clip, layers="custom pattern", pattern=r"single_blocks\.\d+$")[0]
    assert activations.order == ["diffusion_model.single_blocks.0", "diffusion_model.single_blocks.1"]
    maps = fit(pack, activations)
    plain = sample(model, clip)
    assert torch.equal(sample(apply(pack, model, maps, 0.0)[0], clip), plain)
    assert not torch.equal(sample(apply(pack, model, maps, 1.0)[0], clip), plain)
