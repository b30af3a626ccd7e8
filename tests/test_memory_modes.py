"""Apply Transport Maps under ComfyUI's ways of holding a model: weights patched in place by an earlier
run, partially loaded (weights cast per call), offloaded and reloaded, chained apply nodes, a bf16
model. Tiny SD1.5 on the CPU; the same checks on a GPU are in bench/gpu-check."""
from __future__ import annotations

import pytest
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.utils
from conftest import sample
from make_models import _model_config, randomize, unet_config
from test_apply import apply
from test_learn import collect, fit


@pytest.fixture(scope="module")
def gaussian_maps(pack, sd15):
    """Gaussian maps with the method's default support (none): every map acts on each element,
    ungated, so fused mode folds it exactly and fused must equal exact."""
    model, clip, _ = sd15
    maps = fit(pack, collect(pack, model, clip, where="both")[0], method="gaussian", support="method default")
    assert maps.info["support"] == "all"
    assert all(l.maps_every_element and not l.gated for l in maps.values())
    assert any(l.kind == "conv" and l.form == "pixel" for l in maps.values())
    return maps


@pytest.fixture(scope="module")
def strong_maps(gaussian_maps):
    """Ungated maps on the same layers that move every element a long way (scale 0.8, shift 0.1)."""
    return type(gaussian_maps)({n: type(l)(torch.full_like(l.scale, 0.8), torch.full_like(l.shift, 0.1), l.lo, l.hi,
                                            l.kind, form=l.form) for n, l in gaussian_maps.items()}, gaussian_maps.info)


def close(a, b, tolerance=1e-3):
    return torch.allclose(a, b, atol=tolerance, rtol=tolerance)


def test_fused_equals_exact_for_gaussian_maps_on_every_layer(pack, sd15, gaussian_maps):
    model, clip, _ = sd15
    plain = sample(model, clip)
    exact = sample(*apply(pack, model, gaussian_maps, 0.7, clip, "exact"))
    fused = sample(*apply(pack, model, gaussian_maps, 0.7, clip, "fused"))
    assert not close(exact, plain, 1e-2)
    assert close(exact, fused)


def norm_weight(model):
    return model.model.diffusion_model.input_blocks[1][0].in_layers[0].weight


def test_moving_the_dial_again_folds_from_the_original_weights(pack, sd15, gaussian_maps):
    """After a fused run ComfyUI leaves the shared modules patched in place; the next fused node must
    still fold from the original weights, not from what the earlier run left there."""
    model, clip, _ = sd15
    comfy.model_management.unload_all_models()
    first, _ = apply(pack, model, gaussian_maps, 1.0, None, "fused")
    key = next(k for k, p in first.patches.items() if k.endswith(".weight") and p[0][1][0].abs().max() > 1e-3)
    original = comfy.utils.get_attr(model.model, key).detach().clone()
    image = sample(first, clip)
    sample(apply(pack, model, gaussian_maps, 0.5, None, "fused")[0], clip)
    assert not torch.equal(comfy.utils.get_attr(model.model, key), original)  # the earlier run's patch is there
    again, _ = apply(pack, model, gaussian_maps, 1.0, None, "fused")
    for key, patches in first.patches.items():
        assert all(torch.equal(p[1][0], q[1][0]) for p, q in zip(patches, again.patches[key])), key
    assert torch.equal(sample(again, clip), image)


def test_chained_fused_nodes_compose_like_chained_exact_nodes(pack, sd15, gaussian_maps, strong_maps):
    model, clip, _ = sd15
    second = strong_maps
    e1, ec1 = apply(pack, model, gaussian_maps, 0.6, clip, "exact")
    exact = sample(*apply(pack, e1, second, 0.9, ec1, "exact"))
    m1, c1 = apply(pack, model, gaussian_maps, 0.6, clip, "fused")
    fused = sample(*apply(pack, m1, second, 0.9, c1, "fused"))
    only_second = sample(*apply(pack, model, second, 0.9, clip, "fused"))
    assert close(exact, fused) and not close(fused, only_second, 1e-2)


def _unet_output(patcher, lowvram_memory: int):
    """One diffusion-model call with the model loaded fully (0) or partially (the bytes it may hold)."""
    comfy.model_management.unload_all_models()
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    patcher.patch_model(device_to=patcher.load_device, lowvram_model_memory=lowvram_memory)
    try:
        partial = patcher.model.model_lowvram
        cast_per_call = patcher.lowvram_patch_counter()
        with torch.no_grad():
            out = patcher.model.apply_model(x, torch.tensor([5.0, 5.0]), c_crossattn=context)
    finally:
        patcher.unpatch_model(device_to=patcher.offload_device)
    return out, partial, cast_per_call


@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_partially_loaded_model_gives_what_the_fully_loaded_one_gives(pack, sd15, gaussian_maps, mode):
    model, _, _ = sd15
    steered, _ = apply(pack, model, gaussian_maps, 0.8, None, mode)
    full, partial_flag, _ = _unet_output(steered, 0)
    assert not partial_flag
    half = steered.model_size() // 2
    partial, partial_flag, cast_per_call = _unet_output(steered, half)
    assert partial_flag
    if mode == "fused":
        assert cast_per_call > 0  # some folded weights are patched per call, not in place
    plain, _, _ = _unet_output(model, half)
    assert not close(partial, plain, 1e-2)
    assert close(partial, full, 1e-5)
    assert not any(m._forward_hooks for m in model.model.modules())  # no hook outlives a call


@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_offloaded_and_reloaded_model_samples_the_same(pack, sd15, gaussian_maps, mode):
    model, clip, _ = sd15
    steered, steered_clip = apply(pack, model, gaussian_maps, 0.8, clip, mode)
    first = sample(steered, steered_clip)
    comfy.model_management.unload_all_models()
    sample(model, clip)  # another clone of the same model loaded in between
    comfy.model_management.unload_all_models()
    assert torch.equal(sample(steered, steered_clip), first)


@pytest.fixture(scope="module")
def sd15_bf16(sd15):
    """The tiny SD1.5 UNet stored and run in bf16 (as --bf16-unet would), sharing the float32 CLIP."""
    import comfy.model_management as mm
    cfg = _model_config("SD15", unet_config("SD15"))
    cfg.set_inference_dtype(torch.bfloat16, None)
    base = cfg.get_model({}, "")
    randomize(base.diffusion_model, 0)
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    assert norm_weight(patcher).dtype == torch.bfloat16
    return patcher, sd15[1]


@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_a_bf16_model_is_steered_in_its_own_dtype(pack, sd15_bf16, strong_maps, mode):
    model, clip = sd15_bf16
    unet_maps = type(strong_maps)({n: l for n, l in strong_maps.items() if n.startswith("diffusion_model.")},
                                  strong_maps.info)
    plain = sample(model, clip)
    assert torch.equal(sample(apply(pack, model, unet_maps, 0.0, None, mode)[0], clip), plain)
    steered = sample(apply(pack, model, unet_maps, 0.8, None, mode)[0], clip)
    exact = sample(apply(pack, model, unet_maps, 0.8, None, "exact")[0], clip)
    assert torch.isfinite(steered).all() and not close(steered, plain, 1e-2)
    # Fused rounds the folded weights to bf16: a difference far below what steering changes.
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(steered - exact) < 0.1 * rms(exact - plain)
