"""The folds under ComfyUI's per-call weight patching. With dynamic VRAM (on by default in ComfyUI 0.33
and later on NVIDIA cards) a module over 16 KB keeps its patches in a LowVramPatch that, per call,
sizes them (`memory_required`), copies their tensors into a device buffer and rebuilds each patch as
`type(patch)(patch.loaded_keys, copied weights)` (`prepare`), then patches the cast weight with the
copies. ComfyUI 0.3.75's LowVramPatch (partial loading) patches the cast weight from the patches as
they are. The tests call the host's own LowVramPatch on the patches Apply leaves on a tiny SD1.5, over
its norms and three kinds of Linear layers (a custom pattern), and compare with the weights ComfyUI
patches in place when the model is loaded whole."""
from __future__ import annotations

import pytest
import torch

import comfy.lora
import comfy.model_patcher

from act_core import LayerMap, TransportMaps
from act_core.modules import output_dim

LINEARS = ("attn1.to_out.0", "ff.net.2", "emb_layers.1")


@pytest.fixture(scope="module")
def norm_and_linear_maps(pack, sd15):
    """Random ungated maps on every norm (GroupNorms as Linear-AcT's mean form) and on the Linear
    layers a custom pattern would pick: attention output projections, feed-forward outputs and the
    ResBlocks' timestep projections."""
    model, _, _ = sd15
    modules = pack.nodes.model_layers.unet_modules(model)
    g = torch.Generator().manual_seed(3)
    layers = {}
    for name, module in modules.items():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or name.endswith(LINEARS):
            d = output_dim(module)
            kind = "conv" if isinstance(module, torch.nn.GroupNorm) else "token"
            layers[name] = LayerMap(1 + 0.2 * torch.randn(d, generator=g), 0.1 * torch.randn(d, generator=g),
                                    torch.full((d,), -float("inf")), torch.full((d,), float("inf")), kind)
    assert all(any(n.endswith(suffix) for n in layers) for suffix in LINEARS)
    return TransportMaps(layers, {"family": pack.nodes.model_layers.model_family(model)})


def prepared_per_call(key: str, patches: dict, weight: torch.Tensor) -> torch.Tensor:
    """`weight` patched as the host's LowVramPatch does it per call: on hosts with dynamic VRAM, from
    patches rebuilt over a buffer their tensors were copied into."""
    patch = comfy.model_patcher.LowVramPatch(key, patches)
    if hasattr(patch, "prepare"):
        size = patch.memory_required()
        buffer = torch.zeros(size, dtype=torch.uint8)
        prepared = patch.prepare(buffer, None, copy=True, commit=True)
        start, end = buffer.data_ptr(), buffer.data_ptr() + size
        copied = [t for entry in prepared for t in getattr(entry[1], "weights", ()) if isinstance(t, torch.Tensor)]
        assert copied and all(start <= t.data_ptr() < end for t in copied), key  # the copies are used
    return patch(weight.clone())


@pytest.mark.parametrize("mode", ["exact", "fold all (approximate)"])
def test_folded_weights_patched_per_call_equal_the_weights_patched_in_place(pack, sd15, norm_and_linear_maps, mode):
    model, _, _ = sd15
    steered, placement = pack.nodes.steering.steer_model_placed(model, norm_and_linear_maps, 0.8, mode=mode)
    assert any(n.endswith(LINEARS) for n in placement.folded)
    keys = [k for k in steered.patches if k not in model.patches]
    assert len(keys) >= 2 * len(placement.folded) > 0
    state = model.model.state_dict()
    for key in keys:
        weight = state[key].to(torch.float32)
        in_place = comfy.lora.calculate_weight(steered.patches[key], weight.clone(), key)
        assert not torch.equal(in_place, weight), key  # the fold moves this weight
        torch.testing.assert_close(prepared_per_call(key, steered.patches, weight), in_place, rtol=0, atol=0)


@pytest.mark.parametrize("per_call", [None, "weight_function", "weight_lowvram_function"])
def test_a_hooked_weight_patched_per_call_is_left_to_the_per_call_patch(pack, sd15, norm_and_linear_maps, per_call):
    """A hook LoRA changed a folded weight (ComfyUI kept the unhooked weight in hook_backup). Loaded
    whole, the fold's callback scales the hook's change by the map's slope; patched per call, the fold
    is computed on top of the hooked weight already and a second scaling would be wrong. ComfyUI puts
    the per-call patch in `weight_function` when partially loading and in `weight_lowvram_function`
    with dynamic VRAM."""
    import comfy.patcher_extension
    import comfy.utils
    model, _, _ = sd15
    steered, placement = pack.nodes.steering.steer_model_placed(model, norm_and_linear_maps, 0.8)
    name = next(n for n in placement.folded if n.endswith("attn1.to_out.0"))
    key, module = f"{name}.weight", comfy.utils.get_attr(steered.model, name)
    (fold_hooks,) = steered.get_all_callbacks(comfy.patcher_extension.CallbacksMP.ON_APPLY_HOOKS)
    unhooked = module.weight.detach().clone()
    hook_change = 0.01 * torch.ones_like(unhooked)
    saved = {attribute: getattr(module, attribute, None) for attribute in ("weight_function", "weight_lowvram_function")}
    try:
        steered.hook_backup[key] = (unhooked.clone(), unhooked.device)
        module.weight.data += hook_change
        if per_call is not None:
            setattr(module, per_call, comfy.model_patcher.LowVramPatch(key, steered.patches))
            if per_call == "weight_function":
                module.weight_function = [module.weight_function]
        fold_hooks(steered, None)
        slope = 1 + 0.8 * (norm_and_linear_maps[name].scale - 1)
        expected = unhooked + (hook_change if per_call else slope[:, None] * hook_change)
        torch.testing.assert_close(module.weight.detach(), expected)
    finally:
        steered.hook_backup.pop(key, None)
        module.weight.data.copy_(unhooked)
        for attribute, value in saved.items():
            setattr(module, attribute, value)
