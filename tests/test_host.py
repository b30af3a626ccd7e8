"""The host side of the pack, on whichever ComfyUI runs the suite: it refuses an older ComfyUI in one
line, tools/host.py hands pytest its options, and the models the tests and `tools/host.py run` build
are the ones this ComfyUI's own detection and loaders accept."""
from __future__ import annotations

import subprocess
import sys

import comfy.model_detection
import comfy.sd
import comfy.supported_models
import pytest

from conftest import COMFY_DIR, COMFY_VERSION, PACK_DIR, sample
from make_models import flux_config

sys.path.insert(0, str(PACK_DIR / "tools"))
import host  # noqa: E402

LOAD_THE_PACK = """
import asyncio, importlib.abc, logging, sys
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
if sys.argv[3] == "without-v3":
    # A ComfyUI from before the V3 node API: there is no comfy_api.latest to import.
    class NoV3(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "comfy_api.latest" or name.startswith("comfy_api.latest."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    for name in [m for m in sys.modules if m == "comfy_api.latest" or m.startswith("comfy_api.latest.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, NoV3())
before = set(nodes.NODE_CLASS_MAPPINGS)
loaded = asyncio.run(nodes.load_custom_node(sys.argv[2]))
print("RESULT", loaded, sorted(set(nodes.NODE_CLASS_MAPPINGS) - before))
"""


def load_the_pack(v3: str) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", LOAD_THE_PACK, str(COMFY_DIR), str(PACK_DIR), v3],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    return result, done.stdout.replace(result, "") + done.stderr


def test_a_comfyui_without_the_v3_node_api_gets_one_line_naming_the_version_needed():
    result, log = load_the_pack("without-v3")
    assert result == "RESULT True []", "nothing is registered, and the loader reports no failure of its own"
    ours = [line for line in log.splitlines() if "ComfyUI-ACT" in line or "comfy_api" in line]
    assert len(ours) == 1 and "ComfyUI 0.3.75 or newer" in ours[0] and "update ComfyUI" in ours[0], log
    assert "Traceback" not in log and "Cannot import" not in log and "IMPORT FAILED" not in log, log


def test_the_same_loader_with_the_v3_node_api_loads_all_nodes():
    """The control for the refusal above: the loader and the pack are the real ones."""
    result, log = load_the_pack("with-v3")
    assert result.startswith("RESULT True [") and result.count("'ACT") == 11, result
    assert "needs ComfyUI" not in log and "Traceback" not in log, log


def test_host_py_test_passes_pytest_options_through():
    """`tools/host.py test -q -k NAME` as its help promises (argparse used to stop at 'unrecognized
    arguments: -q -k'), on the ComfyUI this suite runs on."""
    name = "test_host_py_test_passes_pytest_options_through"
    done = subprocess.run([sys.executable, str(PACK_DIR / "tools" / "host.py"), "test", "-q", "--collect-only",
                           "-k", name, "tests/test_host.py"], capture_output=True, text=True, timeout=600,
                          cwd=PACK_DIR, env=dict(__import__("os").environ, COMFYUI_PATH=str(COMFY_DIR)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert collected == [f"tests/test_host.py::{name}"], done.stdout[-3000:]
    assert host.split_test_args(["--host", "current", "-x", "--", "--host", "pinned"]) == (
        "current", ["-x", "--host", "pinned"])


def test_the_tiny_flux_is_a_flux1_to_this_hosts_detection(flux):
    """What this ComfyUI reads from the tiny FLUX's own weights is the configuration it was built with,
    but for the attention layout that detection takes from full-size FLUX.1 (not in the keys)."""
    model, _, _ = flux
    state = model.model.diffusion_model.state_dict()
    detected = comfy.model_detection.detect_unet_config(state, "")
    built = flux_config()
    layout = {"axes_dim", "num_heads", "mlp_ratio"}
    assert {k: v for k, v in detected.items() if k not in layout} == {k: v for k, v in built.items() if k not in layout}
    found = comfy.model_detection.model_config_from_unet_config(detected, state)
    assert type(found) is comfy.supported_models.Flux


def test_the_demo_checkpoint_that_host_py_run_places_loads_here(tmp_path):
    """`tools/host.py run` builds the demo checkpoint with this command; ComfyUI's own checkpoint loader
    must detect it as SD1.5 (0.33 found no UNet in the first version of it: 'Could not detect model type')."""
    done = subprocess.run([sys.executable, str(PACK_DIR / "tests" / "make_models.py"), "thin-sd15", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=dict(__import__("os").environ,
                                                                                  COMFYUI_PATH=str(COMFY_DIR)))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (path,) = tmp_path.glob("*.safetensors")
    model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    assert type(model.model.model_config) is comfy.supported_models.SD15, COMFY_VERSION
    assert clip is not None and vae is not None
    image = sample(model, clip, vae, steps=1, size=64)
    assert image.shape == (1, 64, 64, 3) and image.isfinite().all()
