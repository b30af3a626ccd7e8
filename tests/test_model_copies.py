"""Steering on a copy of the model that ComfyUI makes behind the user's back. ComfyUI 0.33 and later
copy a clone's object patches onto another copy of the model: a freshly loaded one for conds that
carry hooks when dynamic VRAM is on (`get_non_dynamic_delegate`), and one per extra GPU
(`deepclone_multigpu`, each sampled in a thread of its own); both build the copy with the host's own
`clone(model_override=...)`. The steered copy must sample what Apply on that model samples, never run
the modules of the model Apply was given. Real host, real nodes, real KSampler."""
from __future__ import annotations

import inspect
import threading

import pytest
import torch

import comfy.model_patcher
from make_models import build_model
from test_steering_correctness import encode, gated_maps, ksample

BOTH = "conditional and unconditional"


def mean_form_maps(pack, model, seed=1):
    """Ungated Linear-AcT maps on every GroupNorm: exact mode folds their shifts into the norms' biases
    and runs the mean's slope per step."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in pack.nodes.model_layers.unet_modules(model).items():
        if isinstance(module, torch.nn.GroupNorm):
            d = module.num_channels
            layers[name] = pack.act_core.LayerMap(0.7 + 0.2 * torch.rand(d, generator=g), 0.2 * torch.randn(d, generator=g),
                                                  torch.full((d,), -float("inf")), torch.full((d,), float("inf")), "conv")
    return pack.act_core.TransportMaps(layers, {"family": "SD1.x"})


@pytest.mark.skipif("model_override" not in inspect.signature(comfy.model_patcher.ModelPatcher.clone).parameters,
                    reason="this ComfyUI runs a clone's patches only on the model the clone was made from")
@pytest.mark.parametrize("maps_kind, start, end", [("gated", 0.0, 0.5), ("mean form", 0.0, 1.0)])
def test_a_clone_comfyui_makes_over_another_copy_of_the_model_steers_that_copy(pack, sd15, maps_kind, start, end):
    model, clip, _ = sd15
    # The same layout with other weights, twice: the copy ComfyUI would load (pristine, as its loader
    # gives it) and one to sample what Apply on it gives.
    other, fresh = build_model("SD15", seed=1)[0], build_model("SD15", seed=1)[0]
    maps = gated_maps(pack, model) if maps_kind == "gated" else mean_form_maps(pack, model)
    steer = pack.nodes.steering.steer_model
    positive, negative = encode(clip, "a house on a hill"), encode(clip, "blurry")
    plain = ksample(other, positive, negative)
    expected = ksample(steer(other, maps, 1.0, start, end, BOTH), positive, negative)
    steered = steer(model, maps, 1.0, start, end, BOTH)
    on_model = ksample(steered, positive, negative)
    copy = steered.clone(model_override=(fresh.model, ({}, {}, {}, set())))
    assert copy.model is fresh.model
    on_copy = ksample(copy, positive, negative)
    assert not torch.equal(expected, plain) and not torch.equal(expected, on_model)  # the maps act, the models differ
    assert torch.equal(on_copy, expected)


def test_the_steering_state_of_a_call_is_not_seen_by_another_thread(pack, sd15):
    """Multi-GPU sampling runs one diffusion-model call per GPU in threads of their own: a call being
    steered in one thread (or left alone) says nothing about a call in another."""
    model = sd15[0]
    state = pack.nodes.per_step.CallState(model.model)
    seen = {}

    def other_thread():
        seen["state"], seen["model"] = state.current(), state.running()
        state.enter_model(other := torch.nn.Module())
        seen["running"] = state.running() is other
        state.leave_model()

    state.enter_model(model.model)
    state.enter(True, None)
    try:
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert state.current() == (True, None, None) and state.running() is model.model
    finally:
        state.leave()
        state.leave_model()
    assert seen == {"state": (False, None, None), "model": model.model, "running": True}
