"""Collect -> fit on tiny SD1.5, SD2 (v-prediction) and SDXL models, through the real nodes and samplers."""
from __future__ import annotations

import contextlib

import pytest
import torch

import comfy.model_management
from conftest import patch_state, sample

SOURCE = "\n".join(f"a photo of {thing} with a pink elephant" for thing in
                   ["a house", "a dog", "a street", "a kitchen", "a beach", "a car", "a forest", "a market", "a bridge", "a cat"])
TARGET = "\n".join(f"a photo of {thing}" for thing in
                   ["a house", "a dog", "a street", "a kitchen", "a beach", "a car", "a forest", "a market", "a bridge", "a cat"])


def collect(pack, model, clip, where="both", batch_size=32, noise_levels=1, source=SOURCE, target=TARGET, **kw):
    node = pack.nodes.nodes_learn.CollectActivations
    args = dict(where=where, layers="normalization layers", resolution=64, noise_levels=noise_levels,
                batch_size=batch_size, seed=0)
    args.update(kw)
    return node.execute(model, clip, source, target, **args).args


def fit(pack, activations, estimation="incremental", method="linear", support="q_0_100"):
    """The layer maps (moves every token alike: these pairs take words out, so auto would fit the concept's words)."""
    return pack.nodes.nodes_learn.FitTransportMaps.execute(activations, method, support, estimation,
                                                           "every token alike (AcT)").args[0]


def norm_layers(modules):
    return {n: m for n, m in modules.items() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}


@pytest.mark.parametrize("family, fixture", [("SD1.x", "sd15"), ("SD2.x", "sd2"), ("SDXL", "sdxl")])
def test_collect_and_fit_give_maps_for_every_norm_layer(pack, request, family, fixture):
    model, clip, _vae = request.getfixturevalue(fixture)
    activations, summary = collect(pack, model, clip)
    assert summary.startswith(family)
    maps = fit(pack, activations)
    layers = pack.nodes.model_layers
    expected_unet = norm_layers(layers.unet_modules(model))
    # SD2's final_layer_norm runs twice per encode (hidden output and pooled output): left out.
    expected_text = {n: m for n, m in norm_layers(layers.clip_modules(clip)).items()
                     if not (family == "SD2.x" and n.endswith("final_layer_norm"))}
    assert {n for n in maps if n.startswith("diffusion_model.")} == set(expected_unet)
    assert {n for n in maps if not n.startswith("diffusion_model.")} == set(expected_text)
    for name, layer in maps.items():
        module = (expected_unet | expected_text)[name]
        assert layer.dim == layers.output_dim(module)
        assert layer.kind == ("conv" if isinstance(module, torch.nn.GroupNorm) else "token")
    assert maps.info["family"] == family and maps.info["source_prompts"] == 10
    assert activations.source[next(iter(maps))].shape[0] == 10


def test_sdxl_text_encoders_both_get_maps(pack, sdxl):
    model, clip, _ = sdxl
    maps = fit(pack, collect(pack, model, clip, where="text encoder")[0], "at once")
    assert {n.split(".")[0] for n in maps} == {"clip_l", "clip_g"}


def test_incremental_in_one_pass_equals_the_layer_by_layer_schedule(pack, sd15):
    model, clip, _ = sd15
    activations = collect(pack, model, clip)[0]
    collector = activations.collector
    collector.passes = 0
    one_pass = collector.incremental(activations, "linear", "q_0_100", blocks="auto")
    assert collector.passes == 1
    collector.passes = 0
    per_layer = collector.incremental(activations, "linear", "q_0_100", blocks="layers")
    assert collector.passes == len(activations.order)
    assert list(one_pass) == list(per_layer)
    for name in one_pass:
        for key in ("scale", "shift", "lo", "hi"):
            assert torch.allclose(getattr(one_pass[name], key), getattr(per_layer[name], key), atol=1e-4, rtol=1e-4), name


def test_incremental_differs_from_at_once_after_the_first_layer(pack, sd15):
    model, clip, _ = sd15
    activations = collect(pack, model, clip, where="diffusion model")[0]
    at_once, incremental = fit(pack, activations, "at once"), fit(pack, activations, "incremental")
    first = activations.order[0]
    assert torch.equal(at_once[first].scale, incremental[first].scale)
    assert any(not torch.allclose(at_once[n].shift, incremental[n].shift) for n in activations.order[1:])


@pytest.mark.parametrize("source, side", [("a\nb\nc", "source_prompts"), ("\n\n  \n", "source_prompts")])
def test_too_few_prompts_name_the_input(pack, sd15, source, side):
    model, clip, _ = sd15
    with pytest.raises(ValueError, match=f"{side} has .* prompts; at least 8"):
        collect(pack, model, clip, source=source)


def test_bad_pattern_is_named(pack, sd15):
    model, clip, _ = sd15
    with pytest.raises(ValueError, match="pattern"):
        collect(pack, model, clip, layers="custom pattern", pattern="no_such_layer_anywhere")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        collect(pack, model, clip, layers="custom pattern", pattern="([")


def test_custom_pattern_selects_matching_layers(pack, sd15):
    model, clip, _ = sd15
    activations = collect(pack, model, clip, where="diffusion model", layers="custom pattern",
                          pattern=r"transformer_blocks\.0\.norm[123]$")[0]
    assert activations.order and all(n.endswith(("norm1", "norm2", "norm3")) for n in activations.order)


def all_hooks(*roots):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for r in roots for m in r.modules())


@contextlib.contextmanager
def interrupt_on_call(module, n: int):
    """Ask for an interrupt when `module` starts its n-th call, as a user pressing Cancel mid-pass
    would; the pack's next interrupt check must then stop the work. (A progress-bar hook cannot time
    it: ComfyUI 0.33 sends progress at most every 100 ms, so on a fast machine a whole fit may report
    only its first and last step.) Yields the running call count."""
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1
        if calls["n"] == n:
            comfy.model_management.interrupt_current_processing(True)

    handle = module.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()
        comfy.model_management.interrupt_current_processing(False)


def test_interrupting_collection_leaves_the_model_as_it_was(pack, sd15):
    model, clip, vae = sd15
    before, patches_before = sample(model, clip), patch_state(model, clip)
    with interrupt_on_call(model.model.diffusion_model, 2) as calls:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            collect(pack, model, clip, batch_size=4)
    # Stopped at the next check: the second batch's pass ran, no third began.
    assert calls["n"] == 2
    assert all_hooks(model.model, clip.cond_stage_model) == 0
    assert patch_state(model, clip) == patches_before
    assert torch.equal(sample(model, clip), before)


def test_non_finite_activations_are_reported_with_the_layer(pack, sd15):
    model, clip, _ = sd15
    broken = model.clone()
    name = "diffusion_model.input_blocks.1.0.in_layers.0"
    weight = pack.nodes.model_layers.unet_modules(model)[name].weight
    broken.add_patches({f"{name}.weight": (torch.full_like(weight, float("nan")),)}, 1.0)
    with pytest.raises(ValueError, match="in_layers.0 produced NaN"):
        collect(pack, broken, clip, where="diffusion model")
    assert all_hooks(model.model) == 0


def test_other_model_families_are_named_as_not_supported(pack, sd15):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm
    from make_models import _unet_base
    _model, clip, _ = sd15
    unet = _unet_base() | dict(model_channels=64, context_dim=64, num_res_blocks=[1, 1], channel_mult=[1, 2],
                               transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
                               transformer_depth_middle=1, use_linear_in_transformer=True,
                               num_classes="sequential", adm_in_channels=2560)
    config = sm.SDXLRefiner(unet)
    config.set_inference_dtype(torch.float32, None)
    refiner = comfy.model_patcher.ModelPatcher(config.get_model({}, ""), load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="SDXLRefiner model, which ComfyUI-ACT does not support yet"):
        collect(pack, refiner, clip)
    maps = fit(pack, collect(pack, *sd15[:2], where="diffusion model")[0], "at once")
    with pytest.raises(ValueError, match="SDXLRefiner model, which ComfyUI-ACT does not support yet"):
        pack.nodes.nodes_apply.ApplyTransportMaps.execute(refiner, maps, 1.0, 0.0, 1.0,
                                                          "conditional and unconditional", "exact", None)
