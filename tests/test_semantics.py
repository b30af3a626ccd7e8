"""The trained shapes model (demo/): it follows prompts, its scorer reads pictures, steering works.

Pictures come from ComfyUI's real CLIPTextEncode -> KSampler -> VAEDecode; maps from this pack's
Collect Activations, Fit Transport Maps and Apply Transport Maps nodes. 32 held-out prompts per point.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from demo import model as M, shapes, train  # noqa: E402
from demo.api import Lab  # noqa: E402
from demo.tasks import TASKS  # noqa: E402

N = 32


@pytest.fixture(scope="module")
def lab(pack):
    return Lab()


@pytest.fixture(scope="module")
def style_untouched(lab):
    """The 32 held-out style prompts (no background named) on the untouched model, scored."""
    task = TASKS["style"]
    scenes = task.eval_scenes(N)
    return scenes, lab.score(lab.generate(task.prompts(scenes)))


def test_scorer_reads_data_set_images():
    rng = np.random.default_rng(99)
    scenes = [shapes.random_scene(rng) for _ in range(300)]
    found = [shapes.score(shapes.render(s)[0]) for s in scenes]
    assert np.mean([f["background"] == s["background"] for f, s in zip(found, scenes)]) >= 0.98
    assert np.mean([shapes.content_matches(f, s, sizes=True) for f, s in zip(found, scenes)]) >= 0.98


def test_scorer_sees_a_wrong_picture_as_wrong():
    rng = np.random.default_rng(5)
    scene = shapes.random_scene(rng, count=2, bg="plain")
    other = dict(scene, objects=[dict(o, colour="red" if o["colour"] != "red" else "blue") for o in scene["objects"]],
                 background="striped")
    found = shapes.score(shapes.render(other)[0])
    assert not shapes.content_matches(found, scene) and found["background"] == "striped"


def test_training_script_is_deterministic():
    def digest(seed):
        m, c, v = train.train(steps=2, decoder_steps=2, seed=seed, batch_size=4, log=lambda s: None)
        return train.weights_digest(m, c, v)
    first = digest(0)
    assert digest(0) == first
    assert digest(1) != first


def test_the_decoder_draws_what_a_latent_says():
    """The committed VAE turns the latent of a held-out scene back into a picture the scorer reads as
    that scene: shapes, colours, sizes, count and background (what prompt following is measured on)."""
    import torch
    from demo.tasks import follow_rates
    _, _, vae = M.load()
    scenes = shapes.held_out_scenes(64, seed=31)
    latents = torch.from_numpy(np.stack([M.encode_scene(s) for s in scenes]))
    with torch.no_grad():
        pictures = ((vae.first_stage_model.decode(latents).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    rates = follow_rates([shapes.score(M.to_scene(p)) for p in pictures], scenes)
    assert rates["all"] >= 0.9 and min(rates.values()) >= 0.9, rates


def test_committed_weights_are_small_and_load_in_comfyui_classes():
    assert M.WEIGHTS.stat().st_size <= 25 * 2**20
    model, clip, vae = M.load()
    assert type(model.model.model_config).__name__ == "SD15"


# Floors are the goals of the benchmark at 32 prompts (bench/semantics measures them on 64: prompt
# following 95-100% per attribute; style 0% at strength 0, 100% at 1, 95% of the prompted objects kept).

def test_the_demo_loader_node_prints_no_warning_and_gives_the_shipped_weights(pack, caplog):
    """Load Shapes Demo Model is the first node a newcomer runs (template ACT 0): the console stays free
    of warnings (ComfyUI listed 176 VAE keys as missing when the VAE was made empty), and every part
    holds the weights the file ships, value for value."""
    import torch
    from safetensors.torch import load_file
    with caplog.at_level(logging.WARNING):
        model, clip, vae = pack.nodes.nodes_demo.LoadShapesDemoModel.execute().args
    assert [r.getMessage()[:300] for r in caplog.records if r.levelno >= logging.WARNING] == []
    shipped = load_file(str(M.WEIGHTS))
    for prefix, module in M.parts(model, clip, vae).items():
        for name, value in module.state_dict().items():
            if "position_ids" not in name:
                assert torch.equal(value.float(), shipped[f"{prefix}.{name}"].float()), f"{prefix}.{name}"


def test_model_follows_held_out_prompts(style_untouched):
    scenes, found = style_untouched
    assert np.mean([f["background"] == "plain" for f in found]) >= 0.9  # no background named: plain
    assert np.mean([f["count"] == len(s["objects"]) for f, s in zip(found, scenes)]) >= 0.85
    for key in ("colour", "shape", "size"):
        rate = np.mean([sorted(o[key] for o in f["objects"]) == sorted(o[key] for o in s["objects"])
                        for f, s in zip(found, scenes)])
        assert rate >= 0.85, f"{key}s as prompted in {rate:.0%} of pictures"


def test_style_appears_with_strength_and_the_prompt_survives(lab, style_untouched):
    task = TASKS["style"]
    scenes, found0 = style_untouched
    presence0, _ = task.measure(found0, scenes)
    maps = lab.fit(*task.fit_prompts(64))  # the nodes' defaults: Linear-AcT, incremental, support all
    model, clip = lab.steer(maps, 1.0)
    presence, kept = task.measure(lab.score(lab.generate(task.prompts(scenes), model=model, clip=clip)), scenes)
    assert presence0 <= 0.2
    assert presence >= 0.8, f"striped in {presence:.0%} of pictures at strength 1"
    assert kept >= 0.8, f"the prompted objects kept in {kept:.0%} of pictures at strength 1"
