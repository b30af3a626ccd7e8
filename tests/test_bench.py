"""Every benchmark in bench/ starts, finishes at its smallest size and prints its JSON last, on this
host: a change to the pack that breaks one fails here rather than on the day someone measures.

Each runs as people run it, a script in its own process. One thread each: these sizes gain nothing
from a second one, and a busy machine would stall its parallel regions. The figures at these sizes
mean little; what is checked is what a reader of the output looks for first.
bench/cost at full SDXL size runs in test_cost_model; here it runs FLUX, which that test leaves out.
bench/soak runs the reduced soak (30 prompts) on a server of its own.
"""
from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys

import pytest
import torch

from conftest import COMFY_DIR, PACK_DIR

BENCH = PACK_DIR / "bench"


# At these sizes no benchmark needs a fraction of this; one that starts filling real memory (a model
# meant to stay on the meta device) fails at once instead of taking the machine's memory from others.
MEMORY_CAP = 8 * 2 ** 30


def cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_CAP, MEMORY_CAP))


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COMFYUI_PATH=str(COMFY_DIR), COMFYUI_ACT_BENCH_HOST="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(BENCH / script), *args], env=env, capture_output=True, text=True,
                          timeout=900, preexec_fn=cap_memory)


def figures(script: str, *args: str) -> dict:
    done = run_bench(script, *args)
    assert done.returncode == 0, f"bench/{script} {' '.join(args)} failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fit_reports_time_and_peak_memory():
    found = figures("fit", "--prompts", "16", "--neurons", "2000")
    assert found["neurons"] >= 2000 and found["layers"] == 3 and found["prompts_per_side"] == 16
    assert found["fit_seconds"] >= 0 and found["peak_rss_gb"] > 0


def test_fidelity_reports_a_ratio_per_schedule():
    found = figures("fidelity", "--prompts", "8")
    for schedule in ("at_once", "incremental"):
        ratios = found[schedule]
        assert ratios["layers"] > 0, ratios
        for key in ("median_w1_ratio_vs_untouched_target", "median_w1_ratio_vs_steered_target"):
            assert math.isfinite(ratios[key]) and ratios[key] > 0, ratios


def test_estimation_fits_the_reference_maps_in_batches():
    found = figures("estimation", "--prompts", "8", "--batch-sizes", "8", "--where", "diffusion model",
                    "--resolution", "32")
    in_batches, whole = found["exact_by_batch_size"]["8"], found["exact_by_batch_size"]["16"]
    assert (in_batches["batches"], whole["batches"]) == (2, 1)
    assert max(in_batches["max_relative_map_difference"], whole["max_relative_map_difference"]) < 1e-2, found
    assert found["layer_by_layer"]["batch_passes"] > in_batches["batch_passes"]
    assert set(found["diffusers_by_batch_size"]) == {"8", "16"}, found["diffusers_by_batch_size"]


def test_estimation_on_the_tiny_sdxl_reports_learning_time_in_images():
    found = figures("estimation", "--gpu-sdxl", "--tiny")
    assert found["layers"] > 0 and found["learning_in_images"] > 0, found


def test_gpu_check_at_its_tiny_size_passes_every_check():
    found = figures("gpu-check", "--tiny", "--repeats", "1", "--steps", "2")
    failed = {name: check for name, check in found["checks"].items() if not check["ok"]}
    assert found["passed"] and not failed, failed
    assert set(found["ratios"]) >= {"exact", "fused"}


def test_overhead_reports_each_mode_against_the_unpatched_model():
    found = figures("overhead", "--repeats", "1", "--steps", "2", "--only", "tiny_SD15")
    ratios = found["tiny_SD15_64px"]
    assert ratios["step_seconds_unpatched"] > 0 and ratios["exact"] > 0 and ratios["fused"] > 0, ratios


def test_cost_counts_flux_kernels_and_bytes():
    found = figures("cost", "--models", "flux", "--size", "64")
    assert found["goals"] and all(k.startswith("flux ") for k in found["goals"]), found["goals"]
    assert all(v.startswith(("met", "not met")) for v in found["goals"].values()), found["goals"]


def test_semantics_arena_scores_a_task():
    found = figures("semantics", "--n", "2", "--tune", "2", "--fit", "8", "--tasks", "remove_red", "--spec", "",
                    "--families", "pack", "--variants", "", "--strengths", "1")
    assert [p["task"] for p in found["points"]] and {p["task"] for p in found["points"]} == {"remove_red"}
    assert "remove_red_pack_best" in found["goals"], found["goals"]


def test_soak_of_30_prompts_is_deterministic_and_flat_in_memory():
    """The reduced soak, on a server of its own: the same pixels for the same maps, strength and seed
    every time, and the server's memory flat after warm-up."""
    found = figures("soak", "--prompts", "30")
    assert found["determinism_mismatches"] == 0, found
    assert found["recomputed_samples"] >= 20, found
    assert found["rss_growth_mb"] < 200, found  # flat after warm-up, allowing allocator noise


GPU_ONLY = [("gpu-check",), ("estimation", "--gpu-sdxl"), ("overhead", "--gpu-sdxl")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a card these run at full size")
@pytest.mark.parametrize("command", GPU_ONLY, ids=[" ".join(c) for c in GPU_ONLY])
def test_a_gpu_only_run_on_a_cpu_says_so_and_what_to_run_instead(command):
    done = run_bench(*command)
    assert done.returncode == 1 and not done.stdout.strip(), done.stdout[-2000:]
    assert "no CUDA device" in done.stderr and "--tiny" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_encode_times_the_concepts_words_against_the_untouched_clip():
    found = figures("encode", "--repeats", "1", "--only", "shapes")
    shapes = found["shapes"]
    assert shapes["with the concept"]["ratio"] > 0 and shapes["without it"]["ratio"] > 0, shapes
    assert shapes["goal"] == "<= 1.1" and isinstance(shapes["met"], bool), shapes
