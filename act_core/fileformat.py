"""The maps file: safetensors (no pickle, no code) with JSON metadata.

Layout, format version 2:
    tensors   "<layer>/scale", "<layer>/shift", "<layer>/lo", "<layer>/hi", float32 [D] each
    metadata  "format":         "comfyui-act-maps"
              "format_version": "1" or "2"
              "layers":         JSON {layer: {"dim": D, "kind": "token"|"conv", "degenerate": n,
                                              "form": "mean"|"pixel"}}   (form: conv layers only)
              "info":           JSON object (see TransportMaps.info)
              "strength":       a sentence on lambda's meaning, for people reading the header

Version 3 adds an optional gated map of the final conditioning (act_core/token_transport.py):
tensors "conditioning/<field>" (float32, 1-D; anchors and moves flattened) and metadata
"conditioning": JSON {"dim", "form", "log_prior", "anchors"}. Only maps holding one are written as
version 3; everything else is written and read exactly as before.

Version 4 adds the conditioning map's nearest gate: tensor "conditioning/targets" (every target token,
flattened) and "gate": "nearest", "targets": M in its description. A conditioning map without them
(every version 3 file) keeps the Gaussian gate and acts as it did.

Version 5 holds the concept's words (act_core/concept_words.py) instead: "conditioning" JSON
{"kind": "concept words", "dim", "anchors", "targets"}, tensors "conditioning/anchors" and
"conditioning/targets" (float16, [count, dim]), "conditioning/extents" and "conditioning/replacements"
(int32) and "conditioning/words" and "conditioning/context" (int32, token ids). Files of versions 3 and 4
keep their gated token map and act as they did.

Version 2 added the conv form (version 1 files know only the mean form, and a conv layer without
"form" means "mean"). A file is written with the lowest version that expresses it: maps holding no
pixel-form layer stay version 1, readable by older releases; a pixel-form layer makes it version 2,
which older releases refuse by name instead of applying it in the wrong form.

Writing is atomic: a temporary file in the same folder, flushed to disk, then renamed over the
target, so a crash never leaves a half-written maps file. Reading checks the header by hand before
any tensor is built, so a truncated, corrupted, foreign or newer file fails with a MapsFileError
that names the file and the problem.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import struct
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .maps import CONV_FORMS, KINDS, LayerMap, TransportMaps

__all__ = ["FORMAT", "FORMAT_VERSION", "MapsFileError", "save_maps", "load_maps", "maps_to_bytes", "maps_from_bytes"]

FORMAT = "comfyui-act-maps"
FORMAT_VERSION = 5
STRENGTH_SEMANTICS = ("0 = untouched; 1 = activations moved onto the target distribution; in between = "
                      "linear interpolation; > 1 extrapolates; < 0 applies the inverse map")
FIELDS = ("scale", "shift", "lo", "hi")
CONDITIONING = "conditioning"  # tensor prefix of the final-conditioning map (never a layer name: no '.')
# A maps file holds a few floats per neuron: even every neuron of a large UNet stays far below this.
MAX_HEADER_BYTES = 64 * 1024 * 1024


class MapsFileError(ValueError):
    """A maps file that cannot be used; the message names the file and what is wrong."""


def _conditioning_version(conditioning) -> str:
    if conditioning.spec().get("kind") == "concept words":
        return "5"
    return "4" if getattr(conditioning, "targets", None) is not None else "3"


def maps_to_bytes(maps: TransportMaps) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, layer in maps.layers.items():
        if "/" in name:
            raise ValueError(f"layer name {name!r} may not contain '/'")
        for key in FIELDS:
            tensors[f"{name}/{key}"] = getattr(layer, key).contiguous()
        layers[name] = {"dim": layer.dim, "kind": layer.kind, "degenerate": int(layer.degenerate)}
        if layer.kind == "conv":
            layers[name]["form"] = layer.form
    pixel = any(spec.get("form") == "pixel" for spec in layers.values())
    conditioning = getattr(maps, "conditioning", None)
    metadata = {
        "format": FORMAT,
        "format_version": _conditioning_version(conditioning) if conditioning is not None else "2" if pixel else "1",
        "layers": json.dumps(layers),
        "info": json.dumps(maps.info, sort_keys=True),
        "strength": STRENGTH_SEMANTICS,
    }
    if conditioning is not None:
        tensors.update({f"{CONDITIONING}/{k}": v for k, v in conditioning.tensors().items()})
        metadata["conditioning"] = json.dumps(conditioning.spec())
    return save_safetensors_bytes(tensors, metadata=metadata)


def save_maps(maps: TransportMaps, path: str | os.PathLike) -> Path:
    """Write maps to path atomically (temporary file + rename). Returns the path written."""
    path = Path(path)
    data = maps_to_bytes(maps)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its file is readable by its owner only. Created with 0o666, the file gets
    # the mode the user's umask gives any new file, like other files ComfyUI writes.
    temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}.partial"
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_maps(path: str | os.PathLike) -> TransportMaps:
    """Read and validate a maps file. Raises MapsFileError naming the file and the problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MapsFileError(f"maps file {path} does not exist") from None
    except OSError as error:
        raise MapsFileError(f"maps file {path} cannot be read: {error.strerror or error}") from None
    return maps_from_bytes(data, source=str(path))


def _fail(source: str, problem: str) -> MapsFileError:
    return MapsFileError(f"{source} is not a usable ComfyUI-ACT maps file: {problem}")


def _read_header(data: bytes, source: str) -> tuple[dict, int]:
    """The header's JSON object and its length in bytes."""
    if len(data) < 8:
        raise _fail(source, f"it is {len(data)} bytes long, too short for a safetensors header (truncated?)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(data) - 8:
        raise _fail(source, f"its header claims {header_len} bytes but the file holds {len(data) - 8} after the "
                            "length field (truncated, or not a safetensors file)")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
    except UnicodeDecodeError:
        raise _fail(source, "its header is not UTF-8 text (corrupted, or not a safetensors file)") from None
    except json.JSONDecodeError as error:
        raise _fail(source, f"its header is not valid JSON ({error.msg}; corrupted or truncated)") from None
    if not isinstance(header, dict):
        raise _fail(source, "its header is not a JSON object")
    return header, header_len


def _check_tensor_entries(header: dict, payload: int, source: str) -> None:
    """Every tensor must be float32 [D] with offsets inside the file, before safetensors reads it."""
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise _fail(source, f"tensor {key!r} has a malformed entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        # The concept's words (version 5) keep float16 token activations and int32 ids, [rows, width].
        words = key.startswith(CONDITIONING + "/")
        if dtype != "F32" and not (words and dtype in ("F16", "I32")):
            raise _fail(source, f"tensor {key!r} is {dtype}, expected F32")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= (2 if words else 1)
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise _fail(source, f"tensor {key!r} has shape {shape!r}, expected [neurons]")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise _fail(source, f"tensor {key!r} has malformed data offsets")
        begin, end = offsets
        size = (2 if dtype == "F16" else 4) * math.prod(shape)
        if not 0 <= begin <= end <= payload or end - begin != size:
            raise _fail(source, f"tensor {key!r} points outside the file or has the wrong size (truncated?)")


def _metadata(header: dict, source: str) -> dict:
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise _fail(source, "it carries no 'format: comfyui-act-maps' metadata (is it a model, LoRA or "
                            "embedding file? Load those with ComfyUI's own loaders)")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise _fail(source, f"its format_version {metadata.get('format_version')!r} is not a number") from None
    if version > FORMAT_VERSION:
        raise _fail(source, f"it was written in format version {version}, newer than this ComfyUI-ACT reads "
                            f"({FORMAT_VERSION}); update the ComfyUI-ACT node pack")
    if version < 1:
        raise _fail(source, f"its format_version {version} is not valid")
    return metadata


def _json_field(metadata: dict, key: str, source: str) -> dict:
    try:
        value = json.loads(metadata.get(key, ""))
    except (json.JSONDecodeError, TypeError):
        raise _fail(source, f"its '{key}' metadata is not valid JSON") from None
    if not isinstance(value, dict):
        raise _fail(source, f"its '{key}' metadata is not a JSON object")
    return value


def maps_from_bytes(data: bytes, source: str = "<bytes>") -> TransportMaps:
    header, header_len = _read_header(data, source)
    metadata = _metadata(header, source)
    layer_specs = _json_field(metadata, "layers", source)
    info = _json_field(metadata, "info", source)
    _check_tensor_entries(header, len(data) - 8 - header_len, source)

    expected = {f"{name}/{key}" for name in layer_specs for key in FIELDS}
    present = set(header) - {"__metadata__"}
    conditioning_keys = {k for k in present if k.startswith(CONDITIONING + "/")}
    present -= conditioning_keys
    if present != expected:
        missing, extra = sorted(expected - present)[:3], sorted(present - expected)[:3]
        raise _fail(source, f"its tensors do not match its layer list (missing {missing}, unexpected {extra})")
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as error:  # the safetensors parser's own errors are of several types
        raise _fail(source, f"safetensors could not read it ({error})") from None

    layers: dict[str, LayerMap] = {}
    for name, spec in layer_specs.items():
        if not isinstance(spec, dict) or spec.get("kind") not in KINDS or not isinstance(spec.get("dim"), int):
            raise _fail(source, f"layer {name!r} has a malformed description {spec!r}")
        values = {key: tensors[f"{name}/{key}"] for key in FIELDS}
        if any(v.shape != (spec["dim"],) for v in values.values()):
            raise _fail(source, f"layer {name!r} declares {spec['dim']} neurons but its tensors have "
                                f"{sorted({tuple(v.shape) for v in values.values()})}")
        if not (torch.isfinite(values["scale"]).all() and torch.isfinite(values["shift"]).all()):
            raise _fail(source, f"layer {name!r} has NaN or infinite scale/shift values")
        if torch.isnan(values["lo"]).any() or torch.isnan(values["hi"]).any() or (values["lo"] > values["hi"]).any():
            raise _fail(source, f"layer {name!r} has an invalid support range (NaN, or lo > hi)")
        form = spec.get("form", "mean")  # version 1 knew only the mean form
        if form not in CONV_FORMS:
            raise _fail(source, f"layer {name!r} has an unknown form {form!r} (expected one of {CONV_FORMS})")
        degenerate = spec.get("degenerate", 0)
        layers[name] = LayerMap(**values, kind=spec["kind"],
                                degenerate=degenerate if isinstance(degenerate, int) else 0, form=form)
    conditioning = None
    if conditioning_keys or "conditioning" in metadata:
        from .concept_words import ConceptWords
        from .token_transport import GatedTokenMap
        spec = _json_field(metadata, "conditioning", source)
        kind = ConceptWords if isinstance(spec, dict) and spec.get("kind") == "concept words" else GatedTokenMap
        try:
            conditioning = kind.from_tensors(spec, {k.split("/", 1)[1]: tensors[k] for k in conditioning_keys})
        except ValueError as error:
            raise _fail(source, f"its conditioning map is unusable ({error})") from None
    return TransportMaps(layers, info, conditioning=conditioning)

