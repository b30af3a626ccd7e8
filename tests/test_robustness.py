"""Bad input, interruption at random points, damaged files, and scale, on the real host."""
from __future__ import annotations

import random
import resource
import time

import pytest
import torch

import comfy.model_management
import comfy.sample
from act_core import MapsFileError, maps_from_bytes, maps_to_bytes
from conftest import patch_state, sample
from test_apply import BOTH
from test_learn import SOURCE, all_hooks, collect, fit


def test_prompts_longer_than_the_text_window_are_pooled_over_all_their_tokens(pack, sdxl):
    model, clip, _ = sdxl
    long_tail = ", ".join(f"detail number {i}" for i in range(60))  # well past one 77-token window
    source = "\n".join(f"{line}, {long_tail}" for line in SOURCE.splitlines())
    activations = collect(pack, model, clip, where="both", source=source)[0]
    collector = activations.collector
    assert min(len(t["l"]) for t in collector.tokens[:10]) >= 2  # each source prompt spans several windows
    assert all(t.shape[0] == 10 for t in activations.source.values())
    maps = fit(pack, activations)
    assert len(maps) == len(activations.order)


def _steered(pack, model, clip, maps, mode="exact"):
    node = pack.nodes.nodes_apply.ApplyTransportMaps
    return node.execute(model, maps, 1.0, 0.0, 1.0, BOTH, mode, clip).args


@pytest.mark.parametrize("trial", range(4))
def test_interrupting_sampling_at_a_random_step_leaves_nothing_behind(pack, sd15, trial):
    model, clip, _ = sd15
    patches_before = patch_state(model, clip)
    maps = fit(pack, collect(pack, model, clip, where="both")[0], "at once")
    steered_model, steered_clip = _steered(pack, model, clip, maps, random.Random(trial).choice(["exact", "fused"]))
    plain_before, steered_before = sample(model, clip), sample(steered_model, steered_clip)
    stop_at = random.Random(trial).randrange(0, 4)
    (positive,) = pack_encode(steered_clip, "a house")
    latent = torch.zeros(1, 4, 8, 8)

    def callback(step, *_):
        if step == stop_at:
            comfy.model_management.interrupt_current_processing(True)
            comfy.model_management.throw_exception_if_processing_interrupted()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        comfy.sample.sample(steered_model, torch.randn(1, 4, 8, 8), 4, 5.0, "euler", "normal", positive, positive,
                            latent, callback=callback, disable_pbar=True, seed=1)
    comfy.model_management.interrupt_current_processing(False)
    assert all_hooks(model.model, clip.cond_stage_model) == 0
    assert patch_state(model, clip) == patches_before
    assert torch.equal(sample(model, clip), plain_before)
    assert torch.equal(sample(steered_model, steered_clip), steered_before)


def pack_encode(clip, text):
    import nodes as comfy_nodes
    return comfy_nodes.CLIPTextEncode().encode(clip, text)


@pytest.mark.parametrize("trial", range(3))
def test_interrupting_collection_at_a_random_layer_leaves_nothing_behind(pack, sd15, trial):
    model, clip, _ = sd15
    before = sample(model, clip)
    modules = pack.nodes.model_layers.unet_modules(model)
    norms = [m for m in modules.values() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    victim = random.Random(trial).choice(norms)

    def interrupt(*_):
        comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    handle = victim.register_forward_hook(interrupt)  # fires in the middle of a model call
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            collect(pack, model, clip, where="both")
    finally:
        handle.remove()
        comfy.model_management.interrupt_current_processing(False)
    assert all_hooks(model.model, clip.cond_stage_model) == 0
    assert torch.equal(sample(model, clip), before)


def _valid_file() -> bytes:
    from act_core import TransportMaps, fit_layer
    g = torch.Generator().manual_seed(0)
    layers = {"diffusion_model.input_blocks.1.0.in_layers.0": fit_layer(torch.randn(16, 8, generator=g),
                                                                        torch.randn(16, 8, generator=g), kind="conv"),
              "clip_l.transformer.text_model.encoder.layers.0.layer_norm1": fit_layer(
                  torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g), support="all")}
    return maps_to_bytes(TransportMaps(layers, {"family": "SD1.x", "method": "linear"}))


VALID = _valid_file()


def test_byte_flipped_files_load_validly_or_fail_cleanly():
    counts = {"cases": 400, "refused": 0, "loaded": 0}
    rng = random.Random(0)
    for _ in range(counts["cases"]):
        data = bytearray(VALID)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            maps = maps_from_bytes(bytes(data), source="flipped.safetensors")
        except MapsFileError as error:
            counts["refused"] += 1
            assert "flipped.safetensors" in str(error)
            continue
        counts["loaded"] += 1  # a flip inside tensor data: still a valid, finite file
        for layer in maps.values():
            assert torch.isfinite(layer.scale).all() and torch.isfinite(layer.shift).all()
    print(f"\nbyte-flip fuzz: {counts}")
    assert counts["refused"] > 0


def test_collection_over_2048_plus_2048_prompts_keeps_memory_to_prompts_times_neurons(pack, sd15):
    model, clip, _ = sd15
    source = "\n".join(f"a photo of scene {i} with a pink elephant" for i in range(2048))
    target = "\n".join(f"a photo of scene {i}" for i in range(2048))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    activations = collect(pack, model, clip, where="both", batch_size=512, source=source, target=target,
                          resolution=32)[0]
    seconds = time.perf_counter() - start
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    neurons = sum(t.shape[1] for t in activations.source.values())
    pooled_bytes = 4096 * neurons * 4
    assert all(t.shape[0] == 2048 for t in activations.source.values())
    assert sum(t.numel() * 4 for t in (*activations.source.values(), *activations.target.values())) == pooled_bytes
    print(f"\n2048+2048 prompts, {neurons} neurons: {seconds:.1f} s, pooled activations "
          f"{pooled_bytes / 1e6:.1f} MB, peak RSS growth {peak_growth / 1e6:.1f} MB")
    # Only pooled rows are kept: feature maps of 4096 samples would be hundreds of MB more.
    assert peak_growth < 1.5e9
