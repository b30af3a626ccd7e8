"""Save and load maps in ComfyUI's models/act folder."""
from __future__ import annotations

import os
import re

import folder_paths
from comfy_api.latest import io, ui

from ..act_core import MapsFileError, load_maps, save_maps
from .types import CATEGORY, Maps

FOLDER = "act"
# Maps shipped with the pack for its example workflows (fitted on the demo checkpoint), listed after
# the user's own models/act so that a fresh install can run the load example.
DEMO_MAPS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows", "maps")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.()+-]{0,120}$")


def register_folder() -> None:
    """models/act, listed in extra_model_paths.yaml under 'act' like any other model folder."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})
    folder_paths.add_model_folder_path(FOLDER, DEMO_MAPS_DIR, is_default=False)


def maps_path_for(name: str) -> str:
    """The file a save request may write: a plain name inside the first models/act folder."""
    stem = name.strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not _SAFE_NAME.match(stem) or ".." in stem:
        raise ValueError(f"'{name}' is not a usable file name: use letters, digits, spaces and _ . ( ) + - only, "
                         "no folders (fix 'name' on Save Transport Maps)")
    folder = folder_paths.get_folder_paths(FOLDER)[0]
    return os.path.join(folder, stem + ".safetensors")


class SaveTransportMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ACTSaveTransportMaps",
            display_name="Save Transport Maps (AcT)",
            category=CATEGORY,
            description="Writes the maps to models/act/<name>.safetensors so Load Transport Maps lists them.",
            inputs=[
                Maps.Input("maps"),
                io.String.Input("name", default="my_maps", tooltip="File name, without folder or extension."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a file of that name. Off: an existing file is an error."),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,  # runs without a consumer, and shows the path it wrote on the node
        )

    @classmethod
    def execute(cls, maps, name, overwrite) -> io.NodeOutput:
        path = maps_path_for(name)
        if os.path.exists(path) and not overwrite:
            raise ValueError(f"{os.path.basename(path)} already exists in models/act; choose another name or "
                             "turn on 'overwrite' on Save Transport Maps")
        save_maps(maps, path)
        shown = f"Saved {holds(maps)} to {path}\nPick {os.path.basename(path)} in Load Transport Maps."
        return io.NodeOutput(path, ui=ui.PreviewText(shown))


def holds(maps) -> str:
    """What a maps object holds, in the words the save and load summaries use: per-layer maps and/or the
    map of the concept's words (which has no layers: "0 layers" would read as an empty file)."""
    parts = [f"{len(maps)} layers"] if len(maps) or maps.conditioning is None else []
    if maps.conditioning is not None:
        parts.append("the map of the concept's words")
    return " and ".join(parts)


class LoadTransportMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ACTLoadTransportMaps",
            display_name="Load Transport Maps (AcT)",
            category=CATEGORY,
            description="Reads maps saved in models/act. They work on the kind of model they were fitted on.",
            inputs=[io.Combo.Input("maps_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="Files in ComfyUI/models/act.")],
            outputs=[Maps.Output(display_name="maps"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, maps_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, maps_name)
        if path is None:
            raise ValueError(f"{maps_name} is not in models/act; refresh the node list or pick another file")
        try:
            maps = load_maps(path)
        except MapsFileError as error:
            raise ValueError(f"Load Transport Maps: {error}") from None
        info = maps.info
        summary = (f"{holds(maps)} for {info.get('family', 'an unknown model')}, {info.get('method')} / "
                   f"{info.get('support')} / {info.get('estimation')}, from {info.get('source_prompts')} + "
                   f"{info.get('target_prompts')} prompts")
        return io.NodeOutput(maps, summary)
