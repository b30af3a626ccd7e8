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
from pack_loader import load_pack
from test_apply import apply
from test_learn import collect, fit

MODES = load_pack().nodes.steering.MODES


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
def linear_maps(pack, gaussian_maps):
    """Linear-AcT's maps on the same layers (scale 0.8, shift 0.1; the conv maps of the mean form):
    exact mode folds the GroupNorms' shifts into their biases and runs the mean's slope per step."""
    return type(gaussian_maps)({n: type(l)(torch.full_like(l.scale, 0.8), torch.full_like(l.shift, 0.1), l.lo, l.hi,
                                            l.kind, form="mean") for n, l in gaussian_maps.items()}, gaussian_maps.info)


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
    key = next(k for k, p in first.patches.items() if k.endswith(".weight") and p[0][1].slope.abs().max() > 1e-3)
    original = comfy.utils.get_attr(model.model, key).detach().clone()
    image = sample(first, clip)
    sample(apply(pack, model, gaussian_maps, 0.5, None, "fused")[0], clip)
    assert not torch.equal(comfy.utils.get_attr(model.model, key), original)  # the earlier run's patch is there
    again, _ = apply(pack, model, gaussian_maps, 1.0, None, "fused")
    for key, patches in first.patches.items():
        # Each patch is ComfyUI's (strength, adapter, ...) entry; the adapter holds slope and shift.
        assert all(torch.equal(p[1].slope, q[1].slope) and _same(p[1].shift, q[1].shift)
                   for p, q in zip(patches, again.patches[key])), key
    assert torch.equal(sample(again, clip), image)


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def test_chained_fused_nodes_compose_like_chained_exact_nodes(pack, sd15, gaussian_maps, strong_maps):
    model, clip, _ = sd15
    second = strong_maps
    e1, ec1 = apply(pack, model, gaussian_maps, 0.6, clip, "exact")
    exact = sample(*apply(pack, e1, second, 0.9, ec1, "exact"))
    m1, c1 = apply(pack, model, gaussian_maps, 0.6, clip, "fused")
    fused = sample(*apply(pack, m1, second, 0.9, c1, "fused"))
    only_second = sample(*apply(pack, model, second, 0.9, clip, "fused"))
    assert close(exact, fused) and not close(fused, only_second, 1e-2)


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)


def _unet_output(patcher, lowvram_memory: int, hooks: dict | None = None):
    """One diffusion-model call with the model loaded fully (0) or partially (the bytes it may hold),
    with plain forward hooks on named modules if given. Returns the output, whether ComfyUI loaded the
    model partially, how many weights it patches per call, and the mapped modules it casts per call."""
    comfy.model_management.unload_all_models()
    x, context = _inputs()
    patcher.patch_model(device_to=patcher.load_device, lowvram_model_memory=lowvram_memory)
    diffusion_model = patcher.model.diffusion_model
    handles = [diffusion_model.get_submodule(n.removeprefix("diffusion_model.")).register_forward_hook(h)
               for n, h in (hooks or {}).items()]
    try:
        partial = patcher.model.model_lowvram
        cast_per_call = patcher.lowvram_patch_counter()
        cast = {n for n, m in diffusion_model.named_modules() if getattr(m, "comfy_cast_weights", False)}
        with torch.no_grad():
            out = patcher.model.apply_model(x, torch.tensor([5.0, 5.0]), c_crossattn=context)
    finally:
        for handle in handles:
            handle.remove()
        patcher.unpatch_model(device_to=patcher.offload_device)
    return out, partial, cast_per_call, cast


def reference_output(model, maps, strength: float):
    """The unpatched model, fully loaded, with each map applied to its layer's output by the reference
    LayerMap.apply through plain forward hooks: shares nothing with the pack's patching or folding."""
    hooks = {n: (lambda _m, _i, out, layer=layer: layer.apply(out, strength))
             for n, layer in maps.items() if n.startswith("diffusion_model.")}
    out, partial, _, _ = _unet_output(model, 0, hooks)
    assert not partial
    return out


@pytest.fixture(scope="module")
def sd15_fp16_stored(sd15):
    """The tiny SD1.5 UNet with its weights stored in fp16 and computed in float32 (ComfyUI's manual
    cast, as a fp16 checkpoint on a card without fast fp16 runs): every layer casts its weights on each
    call, and a partial load adds the weight patches of the layers left out to that cast."""
    import comfy.model_management as mm
    cfg = _model_config("SD15", unet_config("SD15"))
    cfg.set_inference_dtype(torch.float16, torch.float32)
    base = cfg.get_model({}, "")
    randomize(base.diffusion_model, 0)
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    assert norm_weight(patcher).dtype == torch.float16 and base.manual_cast_dtype == torch.float32
    return patcher


def rms(t: torch.Tensor) -> float:
    return t.float().pow(2).mean().sqrt().item()


@pytest.mark.parametrize("stored", ["float32", "float16"])
@pytest.mark.parametrize("mode, maps_name", [(mode, "gaussian_maps") for mode in MODES] + [("exact", "linear_maps")])
def test_partially_loaded_model_gives_the_unfolded_reference(pack, request, sd15, mode, maps_name, stored):
    """Half the model loaded (ComfyUI's lowvram_model_memory): the layers left out have their weights
    cast and their weight patches applied on every call (LowVramPatch), the others are patched in place.
    Either way the output must be the reference's: the unpatched, fully loaded model with the maps
    applied by LayerMap.apply through plain forward hooks.

    With fp16-stored weights every layer also casts fp16 -> float32 per call, and folded weights
    are rounded to fp16 where ComfyUI patches them in place (not where it patches per call), so the
    folded result is held to the rounding that fp16 storage itself costs: the float32 model's
    output against the same model stored in fp16.

    What a CPU cannot exercise: here the load and offload devices are the same, so ComfyUI's copy of
    weights and patches from the offload device to the card on each call is not run (bench/gpu-check
    runs the same comparison on a card)."""
    model = sd15[0] if stored == "float32" else request.getfixturevalue("sd15_fp16_stored")
    gaussian_maps = request.getfixturevalue(maps_name)
    steered, _ = apply(pack, model, gaussian_maps, 0.8, None, mode)
    if mode != "exact" or maps_name == "linear_maps":
        assert steered.patches  # this mode folds: the maps are weight patches (GroupNorm biases for linear)
    half = steered.model_size() // 2
    partial, partial_flag, cast_per_call, cast = _unet_output(steered, half)
    assert partial_flag and cast
    if steered.patches:
        assert cast_per_call > 0  # some folded weights are patched per call, not in place
    mapped = {n.removeprefix("diffusion_model.") for n in gaussian_maps if n.startswith("diffusion_model.")}
    assert mapped & cast  # some mapped layers are among those ComfyUI casts (and patches) per call
    if stored == "float16":
        assert mapped <= cast  # every mapped layer casts its fp16 weights to float32 on each call
    reference = reference_output(model, gaussian_maps, 0.8)
    plain = _unet_output(model, half)[0]
    assert partial.dtype == reference.dtype == torch.float32
    assert rms(reference - plain) > 0.01 * rms(plain)  # the maps move the output
    if stored == "float32":
        assert close(partial, reference, 1e-5)
    else:
        unrounded = _unet_output(sd15[0], 0)[0]  # the same weights before fp16 rounded them
        assert rms(partial - reference) <= rms(plain - unrounded)
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
    # The reference: every map run per step on its layer's output, nothing folded.
    reference = sample(pack.nodes.steering.steer_model(model, unet_maps, 0.8, fold=False), clip)
    assert torch.isfinite(steered).all() and not close(steered, plain, 1e-2)
    # Both modes round the folded weights to bf16: a difference far below what steering changes.
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(steered - reference) < 0.1 * rms(reference - plain)
