"""The socket types ComfyUI-ACT adds to the graph."""
from comfy_api.latest import io

Activations = io.Custom("ACT_ACTIVATIONS")
Maps = io.Custom("ACT_MAPS")

CATEGORY = "conditioning/activation transport"
