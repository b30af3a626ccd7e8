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
