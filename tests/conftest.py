"""Fixtures shared by the suite: the real ComfyUI (never a mock), tiny models, a thin checkpoint, a server.

The host comes from tools/host.py, which sets COMFYUI_PATH (the ComfyUI this pack is installed in, one
named by the user, or the pinned 0.3.75 it provisioned).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parent.parent
COMFY_DIR = Path(os.environ.get("COMFYUI_PATH", PACK_DIR / ".host" / "ComfyUI")).resolve()
CACHE_DIR = PACK_DIR / ".host" / "cache"
OUTPUT_DIR = PACK_DIR / "test-output"

if not (COMFY_DIR / "main.py").exists():
    raise SystemExit(f"No ComfyUI at {COMFY_DIR}. Run the tests with: python3 tools/host.py test")
sys.path.insert(0, str(COMFY_DIR))

import comfy.cli_args  # noqa: E402
import comfyui_version  # noqa: E402

# Where the hosts differ, tests name the version they expect a behaviour from.
COMFY_VERSION = comfyui_version.__version__

comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: tests are CPU-only
import torch  # noqa: E402

# One thread: the tiny models' operations are too small to gain from a second, and on a machine whose
# cores are busy with anything else (the server, the browser, another job) every parallel region waits
# for a descheduled thread: on 2 shared cores a tiny model's step took 30 times as long with 2 threads.
torch.set_num_threads(1)
import comfy.model_management  # noqa: E402,F401
import nodes as comfy_nodes  # noqa: E402  (ComfyUI's nodes.py, not this pack's nodes/)

from make_models import tiny_model, write_thin_sd15  # noqa: E402
from pack_loader import load_pack  # noqa: E402
from host_server import start_server, stop_server  # noqa: E402


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(autouse=True)
def no_clone_left_loaded():
    """After each test, ComfyUI unloads the models when a clone is among them (ComfyUI's own
    unload_all_models, as its server does on request). The session's fixtures keep every tiny model
    alive for the whole run, so a clone of a clone that a test loaded (Apply's, a collector's) would
    later be collected while loaded: ComfyUI then can neither unload nor forget that entry, and runs a
    full gc.collect at every model load for the rest of the run (on ComfyUI 0.33: 945 collections of
    0.19 s, the FLUX.1 and SD3 tests 30x slower). A graph in ComfyUI replaces its cached outputs, and
    each new clone's parent is alive, which a test session cannot promise."""
    yield
    import comfy.model_management as mm
    if any(m.model is not None and m.model.parent is not None for m in mm.current_loaded_models):
        mm.unload_all_models()


@pytest.fixture(scope="session")
def sd15():
    return tiny_model("SD15", seed=0)


@pytest.fixture(scope="session")
def sdxl():
    return tiny_model("SDXL", seed=0)


@pytest.fixture(scope="session")
def sd2():
    return tiny_model("SD2", seed=0)


@pytest.fixture(scope="session")
def sd3():
    return tiny_model("SD3", seed=0)


@pytest.fixture(scope="session")
def flux():
    return tiny_model("FLUX", seed=0)


@pytest.fixture(scope="session")
def thin_checkpoint() -> Path:
    return write_thin_sd15(CACHE_DIR)


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT_DIR.mkdir(exist_ok=True)
    return OUTPUT_DIR


def sample(model, clip, vae=None, prompt="a house on a hill", seed=7, steps=4, size=64, cfg=5.0,
           negative="blurry"):
    """Real CLIPTextEncode -> KSampler (-> VAEDecode). Returns the latent, or the image with a VAE."""
    (positive,) = comfy_nodes.CLIPTextEncode().encode(clip, prompt)
    (neg,) = comfy_nodes.CLIPTextEncode().encode(clip, negative)
    (latent,) = comfy_nodes.EmptyLatentImage().generate(size, size, 1)
    (out,) = comfy_nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", positive, neg, latent)
    if vae is None:
        return out["samples"]
    (image,) = comfy_nodes.VAEDecode().decode(vae, out)
    return image


def patch_state(model, clip) -> dict:
    """What the pack must leave as it found it on a MODEL and a CLIP: their object patches (by name and
    object) and weight patches. Tests compare it with the state before a node ran, not with nothing: a
    CLIP from ComfyUI 0.33 carries ComfyUI's own object patch `manual_cast_dtype` from the start (0.3.75's
    carries none)."""
    return {"model object patches": {k: id(v) for k, v in model.object_patches.items()},
            "clip object patches": {k: id(v) for k, v in clip.patcher.object_patches.items()},
            "model weight patches": sorted(model.patches), "clip weight patches": sorted(clip.patcher.patches)}


@pytest.fixture(scope="session")
def server(tmp_path_factory, thin_checkpoint, output_dir):
    base = tmp_path_factory.mktemp("comfyui-base")
    srv = start_server(base, thin_checkpoint)
    yield srv
    stop_server(srv)
    shutil.copy(srv.log_path, output_dir / "server.log")  # for people reading a failed run
