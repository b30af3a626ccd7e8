"""Per-step steering where sampling is not a plain loop: calls without conditional rows, diffusion-model
calls nested in others, and a ModelSampling node placed after Apply. Real host, real nodes, real KSampler."""
from __future__ import annotations

import pytest
import torch

import comfy.model_management
import nodes as comfy_nodes
from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

from act_core import LayerMap, TransportMaps

BOTH, COND = "conditional and unconditional", "conditional only"


def gated_maps(pack, model, seed=0) -> TransportMaps:
    """A map on every norm layer of the UNet, with a support range (so nothing folds: every map runs per step)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in pack.nodes.model_layers.unet_modules(model).items():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            conv = isinstance(module, torch.nn.GroupNorm)
            d = module.num_channels if conv else module.normalized_shape[-1]
            layers[name] = LayerMap(1.0 + 0.3 * torch.rand(d, generator=g), 0.2 * torch.randn(d, generator=g),
                                    torch.full((d,), -50.0), torch.full((d,), 50.0), "conv" if conv else "token")
    return TransportMaps(layers, {"family": "SD1.x"})


@pytest.fixture(scope="module")
def maps(pack, sd15):
    return gated_maps(pack, sd15[0])


def apply(pack, model, maps, strength=1.0, start=0.0, end=1.0, branch=BOTH):
    node = pack.nodes.nodes_apply.ApplyTransportMaps
    return node.execute(model, maps, strength, start, end, branch, "exact", None).args[0]


def encode(clip, text):
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def ksample(model, positive, negative, steps=4, seed=7, cfg=5.0):
    (latent,) = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)
    return comfy_nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


class MoveCounter:
    """Counts transports run (every per-step map goes through kernels.transport's function)."""

    def __init__(self, pack, monkeypatch):
        self.moves = 0
        real = pack.nodes.steering.kernels.transport

        def counting(layer, strength, *args, **kwargs):
            move = real(layer, strength, *args, **kwargs)

            def run(x):
                self.moves += 1
                return move(x)
            return run
        monkeypatch.setattr(pack.nodes.steering.kernels, "transport", counting)


class EffectCounter:
    """Counts layer calls whose output differs from the layer's own forward on the same inputs: what the
    maps changed, whatever work they did to get there (a partial window computes the move at every call
    and keeps it only inside the window, so counting transports would not tell)."""

    def __init__(self, pack, model, maps):
        self.moves = 0
        modules = pack.nodes.model_layers.unet_modules(model)
        self.handles = [modules[name].register_forward_hook(self._seen) for name in maps.layers]

    def _seen(self, module, inputs, output):
        self.moves += int(not torch.equal(output, type(module).forward(module, *inputs)))

    def close(self):
        for handle in self.handles:
            handle.remove()


def test_conditional_only_does_no_work_in_calls_without_conditional_rows(pack, sd15, maps, monkeypatch):
    model, clip, _ = sd15
    counter = MoveCounter(pack, monkeypatch)
    steered = apply(pack, model, maps, branch=COND)
    positive, negative = encode(clip, "a house on a hill"), encode(clip, "blurry")
    # The positive prompt is never in its timestep range: every model call holds only unconditional rows.
    (never,) = comfy_nodes.ConditioningSetTimestepRange().set_range(positive, 1.0, 1.0)
    plain = ksample(model, never, negative)
    assert torch.equal(ksample(steered, never, negative), plain)
    assert counter.moves == 0
    # With the prompt in play the same clone does move the conditional rows (the counter sees them).
    assert not torch.equal(ksample(steered, positive, negative), ksample(model, positive, negative))
    assert counter.moves > 0


def inner_call_args(clip, sigma: float) -> tuple[tuple, dict]:
    """A fixed diffusion-model call (one conditional row at noise level `sigma`)."""
    g = torch.Generator().manual_seed(3)
    context = encode(clip, "a red square")[0][0]
    x = torch.randn(1, 4, 8, 8, generator=g)
    options = {"sigmas": torch.tensor([sigma]), "cond_or_uncond": [0]}
    return (x, torch.tensor([500.0])), {"context": context, "transformer_options": options}


def with_nested_call(model, args: tuple, kwargs: dict, outputs: list):
    """A clone of MODEL whose middle block runs the whole diffusion model once more inside every call
    (as patches that re-run the model do), keeping that inner call's output and discarding it."""
    clone = model.clone()
    dm = model.model.diffusion_model
    key = "diffusion_model.middle_block.1.forward"
    layer = dm.middle_block[1]
    original = type(layer).forward.__get__(layer)
    depth = [0]

    def forward(*a, **k):
        if depth[0] == 0:
            depth[0] += 1
            try:
                outputs.append(dm.forward(*args, **kwargs))  # the patched forward of the loaded clone
            finally:
                depth[0] -= 1
        return original(*a, **k)
    clone.add_object_patch(key, forward)
    return clone


def direct_call(patcher, args, kwargs):
    comfy.model_management.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.diffusion_model.forward(*args, **kwargs)


@pytest.mark.parametrize("inner_sigma, inner_steered", [(0.1, False), (14.0, True)])
def test_a_nested_diffusion_model_call_is_steered_on_its_own_and_the_outer_call_resumes(
        pack, sd15, maps, inner_sigma, inner_steered):
    """Window: the first half of sampling (sigma above ~1.4). The inner call at sigma 0.1 is outside it,
    at 14 inside; either way the outer calls must give what they give with no inner call."""
    model, clip, _ = sd15
    args, kwargs = inner_call_args(clip, inner_sigma)
    positive, negative = encode(clip, "a house on a hill"), encode(clip, "blurry")
    steered = apply(pack, model, maps, start=0.0, end=0.5)
    expected = ksample(steered, positive, negative)
    inner = []
    nested = apply(pack, with_nested_call(model, args, kwargs, inner), maps, start=0.0, end=0.5)
    assert torch.equal(ksample(nested, positive, negative), expected)
    assert len(inner) == 4  # one inner call per step
    alone = direct_call(steered if inner_steered else model, args, kwargs)
    plain = direct_call(model, args, kwargs)
    assert inner_steered == (not torch.equal(alone, plain))  # the inner call's sigma decides, as meant
    for output in inner:
        assert torch.equal(output, alone)


class StepRecorder:
    """Wraps the sampled clone's diffusion-model forward (on top of every other patch) and records, per
    call, the noise level and whether any map moved something in it."""

    def __init__(self, pack, model, counter: EffectCounter):
        self.calls: list[tuple[float, bool]] = []
        self.model = model.clone()
        key = "diffusion_model.forward"
        inner = pack.nodes.steering.original_or_patched(self.model, key, model.model.diffusion_model, "forward")

        def forward(*args, **kwargs):
            before = counter.moves
            out = inner(*args, **kwargs)
            self.calls.append((float(kwargs["transformer_options"]["sigmas"][0]), counter.moves > before))
            return out
        self.model.add_object_patch(key, forward)


def test_the_sampling_window_follows_a_model_sampling_node_placed_after_apply(pack, sd15, maps):
    model, clip, _ = sd15
    counter = EffectCounter(pack, model, maps)
    positive, negative = encode(clip, "a house on a hill"), encode(clip, "blurry")
    start, end, steps = 0.3, 0.7, 10
    zsnr = ModelSamplingDiscrete()

    try:
        after = StepRecorder(pack, zsnr.patch(apply(pack, model, maps, start=start, end=end), "eps", True)[0], counter)
        before = StepRecorder(pack, apply(pack, zsnr.patch(model, "eps", True)[0], maps, start=start, end=end), counter)
        latent_after = ksample(after.model, positive, negative, steps)
        latent_before = ksample(before.model, positive, negative, steps)
    finally:
        counter.close()

    # The normal scheduler puts step i at percent i / (steps - 1) of the schedule it samples with.
    expected = [start <= i / (steps - 1) <= end for i in range(steps)]
    assert [moved for _, moved in after.calls] == expected, after.calls
    assert [moved for _, moved in before.calls] == expected, before.calls
    assert torch.equal(latent_after, latent_before)
    # The schedule really changed: the first step is at zsnr's huge sigma, and the window's steps differ
    # from the ones the unpatched schedule's sigmas would pick.
    assert after.calls[0][0] > 1000
    sampling = model.get_model_object("model_sampling")
    frozen = [sampling.percent_to_sigma(end) <= s <= sampling.percent_to_sigma(start) for s, _ in after.calls]
    assert frozen != expected


HOST_READS = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "cpu"}


class HostReads(torch.Tensor):
    """A tensor that records the reads that bring its value (or a value computed from it) to the host:
    on a card each one makes the CPU wait for the work queued before it."""
    seen: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            cls.seen.append(name)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("branch", [BOTH, COND])
def test_a_partial_window_never_reads_the_noise_level_on_the_host(pack, sd15, maps, branch):
    """The window is decided per diffusion-model call; reading the call's sigma with float() would stop
    the CPU until the card finished the work queued before the call, at every call."""
    model, clip, _ = sd15
    steered = apply(pack, model, maps, start=0.3, end=0.7, branch=branch).clone()
    key = "diffusion_model.forward"
    inner = pack.nodes.steering.original_or_patched(steered, key, model.model.diffusion_model, "forward")

    def forward(*args, **kwargs):
        options = dict(kwargs["transformer_options"])
        options["sigmas"] = options["sigmas"].as_subclass(HostReads)
        return inner(*args, **dict(kwargs, transformer_options=options)).as_subclass(torch.Tensor)
    steered.add_object_patch(key, forward)
    positive, negative = encode(clip, "a house on a hill"), encode(clip, "blurry")
    HostReads.seen.clear()
    latent = ksample(steered, positive, negative, steps=6)
    assert HostReads.seen == []
    # The recording wrapper changes nothing: the picture of the same Apply without it (which steps the
    # window steers is test_the_sampling_window_follows_a_model_sampling_node_placed_after_apply's).
    assert torch.equal(latent, ksample(apply(pack, model, maps, start=0.3, end=0.7, branch=branch), positive,
                                       negative, steps=6))
