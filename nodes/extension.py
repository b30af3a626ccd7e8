"""The node list ComfyUI loads through comfy_entrypoint."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .nodes_apply import ApplyTransportMaps
from .nodes_demo import LoadShapesDemoModel, register_shapes_sdxl
from .nodes_files import LoadTransportMaps, SaveTransportMaps, register_folder
from .nodes_learn import CollectActivations, FitTransportMaps
from .nodes_prompts import ConceptPrompts, StylePrompts
from .nodes_view import InspectMaps, StrengthGrid, StrengthSweep


class ActivationTransportExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ConceptPrompts, StylePrompts, CollectActivations, FitTransportMaps, ApplyTransportMaps,
                StrengthSweep, StrengthGrid, InspectMaps, SaveTransportMaps, LoadTransportMaps,
                LoadShapesDemoModel]


async def comfy_entrypoint() -> ActivationTransportExtension:
    register_folder()
    register_shapes_sdxl()
    return ActivationTransportExtension()
