"""ComfyUI-ACT: Activation Transport (AcT / Linear-AcT) for Stable Diffusion in ComfyUI.

ComfyUI loads this folder from custom_nodes/ and calls comfy_entrypoint (V3 node API). No
NODE_CLASS_MAPPINGS on purpose: the loader would use it instead of the entry point.
"""
import logging

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]

# The oldest ComfyUI the pack is tested with; every node is declared with its V3 node API.
COMFYUI_NEEDED = "0.3.75"


def _has_v3_node_api() -> bool:
    try:
        import comfy_api.latest  # noqa: F401
    except ModuleNotFoundError as missing:
        if missing.name in ("comfy_api", "comfy_api.latest"):
            return False
        raise
    return True


# ComfyUI imports this folder as a package. pytest imports this file as well, and as a bare module
# when the folder's name is no Python identifier (a clone named ComfyUI-ACT): the relative import
# has no package to resolve against then, and the tests do not need the entry point from here.
if __package__:
    if _has_v3_node_api():
        from .nodes.extension import comfy_entrypoint

        # The page-side part: the saved path on Save Transport Maps, readable error titles.
        WEB_DIRECTORY = "./web"
    else:
        # An older ComfyUI: one line instead of an import traceback, and an empty node list so that
        # its loader adds nothing and says nothing more.
        logging.error(f"ComfyUI-ACT needs ComfyUI {COMFYUI_NEEDED} or newer (the V3 node API, comfy_api.latest, "
                      f"is missing here): update ComfyUI; the pack's nodes are not loaded.")
        NODE_CLASS_MAPPINGS: dict = {}
        __all__ = ["NODE_CLASS_MAPPINGS"]
