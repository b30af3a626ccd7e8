"""ComfyUI-ACT: Activation Transport (AcT / Linear-AcT) for Stable Diffusion in ComfyUI.

ComfyUI loads this folder from custom_nodes/ and calls comfy_entrypoint (V3 node API). No
NODE_CLASS_MAPPINGS on purpose: the loader would use it instead of the entry point.
"""
# ComfyUI imports this folder as a package. pytest imports this file as well, and as a bare module
# when the folder's name is no Python identifier (a clone named ComfyUI-ACT): the relative import
# has no package to resolve against then, and the tests do not need the entry point from here.
if __package__:
    from .nodes.extension import comfy_entrypoint

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]

# The page-side part: the saved path on Save Transport Maps, readable error titles.
WEB_DIRECTORY = "./web"
