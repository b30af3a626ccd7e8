"""The trained shapes models (demo/): they follow prompts, the scorer reads pictures, steering works.

Pictures come from ComfyUI's real CLIPTextEncode -> KSampler -> VAEDecode; maps from this pack's
Collect Activations, Fit Transport Maps and Apply Transport Maps nodes. 32 held-out prompts per point.
Every test that takes `lab` runs on both shapes models: the SD1 one (one 3-layer CLIP-L) and
shapes-SDXL (CLIP-L and CLIP-G, 8 and 10 layers, a pooled vector in the UNet's ADM input).
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
from demo.models import MODELS  # noqa: E402
from demo.tasks import TASKS  # noqa: E402

N = 32


@pytest.fixture(scope="module", params=sorted(MODELS))
def lab(pack, request):
    return Lab(model=request.param)


# Goals shapes-SDXL misses where the SD1 model meets them, measured on the tests' own prompts and seeds.
STYLE_SDXL = ("the defaults (every token alike) at strength 1 on 32 prompts: striped in 97% of the pictures, but "
              "the prompted objects kept in none (bench/results/semantics-arena-sdxl-64.txt)")


def falls_short_on(request, lab, figures: dict[str, str]) -> None:
    """A goal one shapes model misses: a strict xfail on that model, with its measured figure."""
    if lab.kind in figures:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"shapes-{lab.kind}: {figures[lab.kind]}"))


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


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_training_script_is_deterministic(kind):
    def digest(seed):
        m, c, v = train.train(steps=2, decoder_steps=2, seed=seed, batch_size=4, log=lambda s: None,
                              decoder_batch=2, kind=MODELS[kind])
        return train.weights_digest(m, c, v, MODELS[kind])
    first = digest(0)
    assert digest(0) == first
    assert digest(1) != first


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_the_decoder_draws_what_a_latent_says(pack, kind):
    """The committed VAE turns the latent of a held-out scene back into a picture the scorer reads as
    that scene: shapes, colours, sizes, count and background (what prompt following is measured on)."""
    import torch
    from demo.tasks import follow_rates
    _, _, vae = MODELS[kind].load()
    scenes = shapes.held_out_scenes(64, seed=31)
    latents = torch.from_numpy(np.stack([MODELS[kind].encode_scene(s) for s in scenes]))
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
    import gc
    import torch
    import comfy.model_management as mm
    from safetensors.torch import load_file
    # ComfyUI reports a loaded entry whose patcher is gone while its model lives on ("memory leak with
    # model ...") at the next load, which would be this node's. Earlier tests' clones of the session's
    # models leave such entries (the fixtures keep the models): drop them first, so only the loader is heard.
    gc.collect()
    mm.current_loaded_models[:] = [m for m in mm.current_loaded_models if not m.is_dead()]
    mm.cleanup_models()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model, clip, vae = pack.nodes.nodes_demo.LoadShapesDemoModel.execute().args
    assert [r.getMessage()[:300] for r in caplog.records if r.levelno >= logging.WARNING] == []
    shipped = load_file(str(M.WEIGHTS))
    for prefix, module in M.parts(model, clip, vae).items():
        for name, value in module.state_dict().items():
            if "position_ids" not in name:
                assert torch.equal(value.float(), shipped[f"{prefix}.{name}"].float()), f"{prefix}.{name}"


def test_model_follows_held_out_prompts(lab, style_untouched, request):
    falls_short_on(request, lab, {"sdxl": "shapes as prompted in 81% of these 32 pictures (goal 85%); on the arena's "
                                          "64: 86%, the SD1 model 98% (docs/shapes-benchmark.md)"})
    scenes, found = style_untouched
    assert np.mean([f["background"] == "plain" for f in found]) >= 0.9  # no background named: plain
    assert np.mean([f["count"] == len(s["objects"]) for f, s in zip(found, scenes)]) >= 0.85
    for key in ("colour", "shape", "size"):
        rate = np.mean([sorted(o[key] for o in f["objects"]) == sorted(o[key] for o in s["objects"])
                        for f, s in zip(found, scenes)])
        assert rate >= 0.85, f"{key}s as prompted in {rate:.0%} of pictures"


def test_style_appears_with_strength_and_the_prompt_survives(lab, style_untouched, request):
    falls_short_on(request, lab, {"sdxl": STYLE_SDXL})
    task = TASKS["style"]
    scenes, found0 = style_untouched
    presence0, _ = task.measure(found0, scenes)
    maps = lab.fit(*task.fit_prompts(64))  # the nodes' defaults: auto picks Linear-AcT on every token (tags added)
    model, clip = lab.steer(maps, 1.0)
    presence, kept = task.measure(lab.score(lab.generate(task.prompts(scenes), model=model, clip=clip)), scenes)
    assert presence0 <= 0.2
    assert presence >= 0.8, f"striped in {presence:.0%} of pictures at strength 1"
    assert kept >= 0.8, f"the prompted objects kept in {kept:.0%} of pictures at strength 1"


def test_maps_fitted_on_identical_prompt_sets_leave_the_pictures_as_drawn(lab):
    """Negative control: source and target the same prompts, so there is nothing to transport; at
    strength 1 the pack's default maps must draw what the untouched model draws, seed for seed."""
    task = TASKS["remove_red"]
    source, _ = task.fit_prompts(32)
    model, clip = lab.steer(lab.fit(source, list(source)), 1.0)
    prompts = task.prompts(task.eval_scenes(16))
    untouched, steered = lab.generate(prompts, batch=True), lab.generate(prompts, model=model, clip=clip, batch=True)
    assert np.abs(steered - untouched).max() < 0.02, "pictures moved though the maps had nothing to learn"
    same = [shapes.content_matches(s, u, sizes=True) and s["background"] == u["background"]
            for s, u in zip(lab.score(steered), lab.score(untouched))]
    assert all(same), f"{sum(same)} of {len(same)} pictures scored as the untouched model's"


def test_concept_words_take_the_concept_out_of_a_prompt_and_leave_other_prompts_bit_for_bit(lab, tmp_path):
    """Fit Transport Maps' 'the concept's words only' on pairs that drop a red object wherever the caption
    names it (pairs of different lengths), saved and loaded: a prompt naming a red object first reads, at
    strength 1, as the untouched encoder reads the same prompt without it (written by hand); the empty
    prompt and prompts without red come out bit for bit, pooled vector included."""
    import torch
    from act_core import load_maps, save_maps

    source, target = TASKS["drop_red"].fit_prompts(64)
    assert len({len(s.split()) - len(t.split()) for s, t in zip(source, target)} - {0}) >= 1
    maps = load_maps(save_maps(lab.fit(source, target, where="text encoder", moves="the concept's words only"),
                               tmp_path / "red.safetensors"))
    assert maps.conditioning is not None and len(maps) == 0
    _, clip = lab.steer(maps, 1.0)
    red, without = "a small red circle and a large blue square", "a large blue square"
    steered, untouched = lab.encode(red, clip)[0], lab.encode(without)[0]
    # 'a large blue square' sits at positions 6-9 of the prompt and 1-4 of the prompt written without red
    assert torch.allclose(steered[0][0, 6:10], untouched[0][0, 1:5], atol=1e-5)
    assert torch.allclose(steered[1]["pooled_output"], untouched[1]["pooled_output"], atol=1e-5)
    for plain in ("", "a small green circle and a large blue square", "a large blue square, " * 12):
        mine, theirs = lab.encode(plain, clip)[0], lab.encode(plain)[0]
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1]["pooled_output"], theirs[1]["pooled_output"])


def test_concept_words_on_identical_prompt_sets_is_refused(lab):
    """Negative control for 'the concept's words only': nothing differs, so nothing can be learned; the
    node says so rather than returning maps that move prompts."""
    source, _ = TASKS["remove_red"].fit_prompts(16)
    with pytest.raises(Exception, match="same words"):
        lab.fit(source, list(source), moves="the concept's words only")


# The arena's goals (bench/semantics; bench/results/semantics-arena-64-side-by-side.txt), checked on the arena's own
# 32 reported prompts and seeds (one batch per point). Met goals are asserted; goals not met are strict
# xfails with the measured figure, so that a fix turns them red until the bar is raised here.

def _removal(lab, name, **fit):
    task = TASKS[name]
    source, target = task.fit_prompts(64)
    scenes = task.eval_scenes(N)
    untouched = lab.score(lab.generate(task.prompts(scenes), batch=True))
    return task, source, target, scenes, untouched


def _measure(lab, task, scenes, untouched, **generate):
    found = lab.score(lab.generate(task.prompts(scenes), batch=True, **generate))
    presence, kept = task.measure(found, scenes)
    return presence, (task.kept_from(found, untouched) if task.kept_against == "untouched" else kept), found


@pytest.fixture(scope="module")
def red(lab):
    task, source, target, scenes, untouched = _removal(lab, "remove_red")
    maps = lab.fit(source, target, moves="the concept's words only")
    model, clip = lab.steer(maps, 1.0)
    left, kept, _ = _measure(lab, task, scenes, untouched, model=model, clip=clip)
    return dict(task=task, source=source, target=target, scenes=scenes, untouched=untouched, maps=maps,
                left=left, kept=kept)


def test_concept_words_remove_red_better_than_a_negative_prompt_or_the_delta(lab, red):
    """Goal: the pack's best at least as good as the best baseline in what is left, content within 3
    points. Baselines at the settings the arena chose on its tuning prompts (delta scale 2)."""
    task, source, target, scenes, untouched = (red[k] for k in ("task", "source", "target", "scenes", "untouched"))
    left, kept = red["left"], red["kept"]
    for name, generate in (("negative prompt", {"negative": "red"}),
                           ("conditioning delta", {"conditioning": lab.conditioning_delta(source, target, 2.0)})):
        b_left, b_kept, _ = _measure(lab, task, scenes, untouched, **generate)
        assert left <= b_left and kept >= b_kept - 0.03, (name, (left, kept), (b_left, b_kept))


def test_concept_words_remove_red_to_the_goal(red):
    """Goal: <= 10% red left with the shapes kept >= 80% (the nearest gate; the Gaussian gate of version 3
    maps files left 12.5% of these 32)."""
    assert red["left"] <= 0.10 and red["kept"] >= 0.80, (red["left"], red["kept"])


def test_default_maps_remove_red_as_well_as_the_best_baseline(lab, red):
    """The nodes' defaults at strength 1 (moves auto, which picks the concept's words for these recolouring
    pairs) leave at most as much red as the arena's best baseline there (the conditioning delta at scale 2)
    with the shapes kept within 3 points. With every token alike they left 100% red, 69% kept."""
    task, scenes, untouched = red["task"], red["scenes"], red["untouched"]
    model, clip = lab.steer(lab.fit(red["source"], red["target"]), 1.0)
    left, kept, _ = _measure(lab, task, scenes, untouched, model=model, clip=clip)
    b_left, b_kept, _ = _measure(lab, task, scenes, untouched,
                                 conditioning=lab.conditioning_delta(red["source"], red["target"], 2.0))
    assert left <= b_left and kept >= b_kept - 0.03, ((left, kept), (b_left, b_kept))


def _specificity(lab, maps_or_none, strength=1.0, name="spec_red"):
    """Share of 32 held-out prompts without the concept drawn as the untouched model draws them."""
    from demo.tasks import SPECIFICITY
    spec = SPECIFICITY[name]
    prompts = spec.prompts(spec.eval_scenes(N))
    untouched = lab.score(lab.generate(prompts, batch=True))
    model, clip = lab.steer(maps_or_none, strength)
    return spec.kept_from(lab.score(lab.generate(prompts, model=model, clip=clip, batch=True)), untouched)


def test_concept_words_leave_prompts_without_red_as_drawn(lab, red):
    """Goal: on prompts that never had the concept, >= 90% of the pictures keep what the untouched model drew."""
    kept = _specificity(lab, red["maps"])
    assert kept >= 0.9, f"{kept:.0%} of the pictures without red kept"


def test_default_maps_leave_prompts_without_red_as_drawn(lab, red):
    """Specificity goal >= 90% for the nodes' defaults (every token alike kept 53% at strength 1)."""
    assert _specificity(lab, lab.fit(red["source"], red["target"])) >= 0.9


def _concept_words_at_1(lab, task_name: str, maps: list | None = None) -> tuple:
    """(presence, kept) of a task's held-out prompts, steered at strength 1 by 'the concept's words
    only' maps fitted on its 64 fitting pairs (appended to `maps` when given)."""
    task = TASKS[task_name]
    source, target = task.fit_prompts(64)
    scenes = task.eval_scenes(N)
    fitted = lab.fit(source, target, moves="the concept's words only")
    if maps is not None:
        maps.append(fitted)
    model, clip = lab.steer(fitted, 1.0)
    return task.measure(lab.score(lab.generate(task.prompts(scenes), model=model, clip=clip, batch=True)), scenes)


def test_concept_words_edit_one_objects_colour_to_the_goal(lab):
    """Goal: >= 80% of the pictures with the one red object drawn blue, the rest kept >= 80% (the prompt is
    read again with 'blue' where it said 'red', so an orange neighbour no longer turns blue too)."""
    edited, kept = _concept_words_at_1(lab, "edit_red_blue")
    assert edited >= 0.8 and kept >= 0.8, (edited, kept)


def test_concept_words_edit_one_objects_size_to_the_goal(lab):
    """Goal: >= 80% of the pictures with the one small object drawn large, the rest kept >= 80%."""
    edited, kept = _concept_words_at_1(lab, "edit_small_large")
    assert edited >= 0.8 and kept >= 0.8, (edited, kept)


def test_concept_words_remove_crosses_to_the_goal_and_leave_prompts_without_crosses_as_drawn(lab):
    """Goals: <= 10% crosses left at strength <= 1.5 with the colours kept >= 90%; on prompts that never
    had a cross, >= 90% of the pictures keep what the untouched model drew."""
    maps = []
    left, kept = _concept_words_at_1(lab, "remove_cross", maps)
    assert left <= 0.10 and kept >= 0.90, (left, kept)
    spec = _specificity(lab, maps[0], name="spec_cross")
    assert spec >= 0.9, f"{spec:.0%} of the pictures without a cross kept"


@pytest.mark.parametrize("task_name", [
    pytest.param("drop_red", marks=pytest.mark.xfail(strict=True, reason=(
        "fitted on pairs that drop the red object, at strength 1 on 32 prompts: SD1 0% red left, the other objects "
        "kept in 88% (48 prompts at 0.5: 2% / 92%, where the goal is met); shapes-SDXL 0% / 72%"))),
    pytest.param("append_red", marks=pytest.mark.xfail(strict=True, reason=(
        "fitted on 'captions and the concept' with the concept last, at strength 1 on 32 prompts: SD1 0% red left "
        "but the other objects kept in 72% (48 prompts at 0.5: 4% / 81%), a concept named first leaves its "
        "joining word behind; shapes-SDXL 44% / 72%"))),
    pytest.param("concept_prompts_red", marks=pytest.mark.xfail(strict=True, reason=(
        "fitted on Concept Prompts 'remove' (twelve phrasings), at strength 1 on 32 prompts: SD1 16% red left, 62% "
        "kept (48 prompts at 1.5: 6% / 54%), the learned runs hold the phrasings' words, not the shapes "
        "captions'; shapes-SDXL 3% / 47%"))),
])
def test_concept_words_remove_a_red_object_named_anywhere_with_the_pairs_users_write(lab, task_name):
    """Goal: fitted on pairs that add or drop words (a red object dropped wherever it was; the concept
    appended last; Concept Prompts 'remove'), at
    strength 1 on prompts naming a red object first, in the middle or last: <= 10% red left and the other
    objects of the strength-0 picture kept in >= 90% of the pictures."""
    task, source, target, scenes, untouched = _removal(lab, task_name)
    model, clip = lab.steer(lab.fit(source, target, where="text encoder", moves="the concept's words only"), 1.0)
    left, kept, _ = _measure(lab, task, scenes, untouched, model=model, clip=clip)
    assert left <= 0.10 and kept >= 0.90, (left, kept)


def test_concept_words_remove_the_concept_from_a_prompt_of_two_chunks(lab, request):
    """A long prompt (past CLIP's 75 words: two chunks) that names the red object again and again, as
    prompts that repeat themselves do: fitted on pairs that drop it, strength 1 leaves <= 10% red with the
    other objects of the strength-0 picture kept in >= 80% (the one-chunk goal of the recolouring pairs).
    The gate alone found only the first namings (44% red left): a causal encoder reads a repeated naming
    differently, so once a word is found, its other occurrences go too."""
    falls_short_on(request, lab, {"sdxl": "0% red left, the other objects kept in 75% (goal 80%)"})
    task, source, target, scenes, _ = _removal(lab, "drop_red")

    def two_chunks(prompt: str) -> str:
        long = prompt
        while len(lab.clip.tokenize(long)["l"]) < 2:
            long = f"{long}. {prompt}"
        return long
    prompts = [two_chunks(p) for p in task.prompts(scenes)]
    untouched = lab.score(lab.generate(prompts, batch=True))
    model, clip = lab.steer(lab.fit(source, target, where="text encoder", moves="the concept's words only"), 1.0)
    found = lab.score(lab.generate(prompts, model=model, clip=clip, batch=True))
    left, kept = task.measure(found, scenes)[0], task.kept_from(found, untouched)
    assert left <= 0.10 and kept >= 0.80, (left, kept)
