#!/usr/bin/env python3
"""Write example_workflows/maps/ACT-demo-no-pink-elephant.safetensors: the maps the load example uses on
a fresh install, fitted on the demo checkpoint by the "remove a concept" example itself (at small sizes,
diffusion model only, so the file stays small).

    COMFYUI_PATH=<a ComfyUI folder> <the Python that runs it> tools/make_demo_maps.py

Run it again whenever the demo checkpoint changes: tests/test_examples.py runs the load example on the
demo checkpoint and fails when these maps no longer fit it.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(PACK_DIR / "tools"), str(PACK_DIR / "tests")]

import make_workflows  # noqa: E402
from host_server import start_server, stop_server  # noqa: E402

EXAMPLE = "ACT 3 - remove a concept (no pink elephant)"
TARGET = PACK_DIR / "example_workflows" / "maps" / make_workflows.DEMO_MAPS


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        checkpoint = make_demo_checkpoint(base / "checkpoints")
        server = start_server(base / "comfyui", checkpoint)
        try:
            workflow = json.loads((PACK_DIR / "example_workflows" / f"{EXAMPLE}.json").read_text())
            prompt = make_workflows.to_api_prompt(workflow, server.get("/object_info"))
            name = Path(make_workflows.DEMO_MAPS).stem
            prompt = make_workflows.with_inputs(prompt, make_workflows.SMALL_SIZES | {
                "ACTConceptPrompts": {"count": 16},
                "ACTCollectActivations": {"resolution": 64, "batch_size": 32, "where": "diffusion model"},
                "ACTSaveTransportMaps": {"name": name, "overwrite": True}})
            entry = server.run(prompt, timeout=900)
            if entry["status"]["status_str"] != "success":
                sys.exit(f"the example failed: {entry['status']['messages']}")
            TARGET.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(base / "comfyui" / "models" / "act" / make_workflows.DEMO_MAPS, TARGET)
        finally:
            stop_server(server)
    print(TARGET)
    return 0


def make_demo_checkpoint(folder: Path) -> Path:
    """The checkpoint tools/host.py run places on a fresh install, built the same way."""
    import subprocess
    subprocess.run([sys.executable, str(PACK_DIR / "tests" / "make_models.py"), "thin-sd15", str(folder)], check=True,
                   capture_output=True)
    return folder / make_workflows.DEMO_CHECKPOINT


if __name__ == "__main__":
    sys.exit(main())
