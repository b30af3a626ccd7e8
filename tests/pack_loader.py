"""Import this pack the way ComfyUI does: a package from its folder, relative imports inside."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
PACKAGE = "comfyui_act"


def load_pack():
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, PACK_DIR / "__init__.py",
                                                  submodule_search_locations=[str(PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    module.nodes.nodes_files.register_folder()  # what comfy_entrypoint does
    module.nodes.nodes_demo.register_shapes_sdxl()
    return module
