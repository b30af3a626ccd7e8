"""ComfyUI's editor format for the example workflows: a compact graph spec laid out in columns
(`build`), the API format the server's /prompt takes, converted the way the frontend does when it
queues a graph (`to_api_prompt`), and widget values changed in a queued copy (`with_inputs`). Widget
order and socket types come from a running ComfyUI's /object_info. The specs are tools/make_workflows.py's.
"""
from __future__ import annotations

import json

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL = {"Note", "MarkdownNote"}


def _inputs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of a node's inputs in display order: required, then optional."""
    out = []
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, "COMBO" if isinstance(kind, list) else kind, options))
    return out


def _is_widget(kind: str, options: dict) -> bool:
    return kind in WIDGET_TYPES and not options.get("forceInput")


COLUMN, GAP, WIDTH = 360, 40, 320
PREVIEWS = {"SaveImage", "PreviewImage", "ACTStrengthGrid"}


def _height(info: dict, node_type: str) -> int:
    """Tall enough for the node's sockets, widgets (multiline text boxes taller) and image previews."""
    rows = 0
    widgets = 0
    for _name, kind, options in _inputs(info):
        if _is_widget(kind, options):
            widgets += 90 if options.get("multiline") else 26
        else:
            rows += 1
    rows = max(rows, len(info["output"]))
    return 46 + 22 * rows + widgets + (160 if node_type in PREVIEWS else 0)


def _note_height(text: str) -> int:
    """Room for the note's text at the editor's default font (about 45 characters a line, 14 px each)."""
    lines = sum(max(1, -(-len(paragraph) // 45)) for paragraph in text.split("\n"))
    return 40 + 14 * lines


def _stack_columns(nodes: list[dict], columns: list[int], rows: list[int], drops: list[int]) -> None:
    """Each column top to bottom in row order, with a gap between nodes; a node's `drop` moves it (and
    the rest of its column) further down."""
    tops: dict[int, int] = {}
    for node, col, _row, drop in sorted(zip(nodes, columns, rows, drops), key=lambda t: (t[1], t[2])):
        top = tops.get(col, 40) + drop
        node["pos"] = [40 + COLUMN * col, top]
        tops[col] = top + node["size"][1] + GAP


def build(spec: dict, object_info: dict) -> dict:
    """spec: {"nodes": {key: {"type", "col", "row", "widgets": {...}, "links": {input: [key, slot]},
    optional "title" and "drop" (pixels of extra space above it)}},
    "notes": [(text, col, row)]} -> editor-format workflow."""
    ids = {key: i + 1 for i, key in enumerate(spec["nodes"])}
    nodes, links = [], []
    outputs_links: dict[tuple[int, int], list[int]] = {}
    for key, node in spec["nodes"].items():
        info = object_info[node["type"]]
        inputs, widgets = [], []
        for name, kind, options in _inputs(info):
            link = node.get("links", {}).get(name)
            if link is not None:
                origin_key, origin_slot = link
                link_id = len(links) + 1
                links.append([link_id, ids[origin_key], origin_slot, ids[key], len(inputs),
                              object_info[spec["nodes"][origin_key]["type"]]["output"][origin_slot]])
                outputs_links.setdefault((ids[origin_key], origin_slot), []).append(link_id)
                entry = {"name": name, "type": kind, "link": link_id}
                if _is_widget(kind, options):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            elif not _is_widget(kind, options):
                if name not in info["input"].get("optional", {}):
                    raise ValueError(f"{key}.{name} ({kind}) needs a link")
                # An optional socket left unconnected: the editor lists it with no link.
                inputs.append({"name": name, "type": kind, "link": None})
            if _is_widget(kind, options):
                value = node.get("widgets", {}).get(name, options.get("default"))
                if value is None and kind == "COMBO":
                    value = (options.get("options") or [None])[0]
                widgets.append(value)
                if options.get("control_after_generate"):
                    widgets.append("fixed")
        nodes.append({"id": ids[key], "type": node["type"], "pos": [0, 0],
                      "size": [WIDTH, _height(info, node["type"])], "flags": {}, "order": len(nodes), "mode": 0,
                      "inputs": inputs,
                      "outputs": [], "properties": {"Node name for S&R": node["type"]}, "widgets_values": widgets,
                      "title": node.get("title", info.get("display_name", node["type"]))})
    specs = spec["nodes"].values()
    _stack_columns(nodes, [n["col"] for n in specs], [n["row"] for n in specs], [n.get("drop", 0) for n in specs])
    for node in nodes:
        info = object_info[node["type"]]
        node["outputs"] = [{"name": name, "type": kind, "links": outputs_links.get((node["id"], slot), []),
                            "slot_index": slot}
                           for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
    for i, (text, col, _row) in enumerate(spec.get("notes", [])):
        below = max((n["pos"][1] + n["size"][1] for n in nodes if n["pos"][0] == 40 + COLUMN * col), default=0)
        nodes.append({"id": len(ids) + i + 1, "type": "Note", "pos": [40 + COLUMN * col, below + GAP],
                      "size": [WIDTH, _note_height(text)], "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {"text": ""}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            # No saved view ("ds"): the frontend then fits the whole graph into the user's window.
            "config": {}, "extra": {}, "version": 0.4}


def to_api_prompt(workflow: dict, object_info: dict) -> dict:
    """Editor format -> API format, as the frontend does when it queues a workflow."""
    by_link = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL:
            continue
        linked = {entry["name"]: by_link[entry["link"]] for entry in node["inputs"] if entry.get("link") is not None}
        values = iter(node["widgets_values"])
        inputs = {}
        for name, kind, options in _inputs(object_info[node["type"]]):
            if _is_widget(kind, options):
                inputs[name] = next(values)
                if options.get("control_after_generate"):
                    next(values)
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt



def with_inputs(prompt: dict, changes: dict[str, dict]) -> dict:
    """An API-format prompt with widget values changed per node type ({class_type: {input: value}})."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        for name, value in changes.get(node["class_type"], {}).items():
            assert name in node["inputs"], (node["class_type"], name)
            node["inputs"][name] = value
    return out
