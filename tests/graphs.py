"""API-format graphs on the thin SD1.5 checkpoint, and what tests read back from the server."""
from __future__ import annotations

import hashlib
import io
import urllib.request

from PIL import Image

from make_models import THIN_SD15_NAME

CHECKPOINT = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": THIN_SD15_NAME}}


def sampling_graph(seed: int, prefix: str, steps: int = 3, size: int = 64, text: str = "a house by a lake") -> dict:
    return {
        "ckpt": CHECKPOINT,
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": text}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def sampled_anew(graph: dict) -> dict:
    """The same graph with the sampler's latent passed through LatentMultiply x 1 (the same zeros), so
    that ComfyUI runs the sampler again while it keeps the loaded checkpoint. ComfyUI 0.33's default
    RAM-pressure cache keeps an earlier run's sampler output however many prompts ran in between;
    0.3.75's classic cache keeps only the last prompt's, so there the plain graph re-samples too."""
    graph["fresh"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["latent", 0], "multiplier": 1.0}}
    graph["sampler"]["inputs"]["latent_image"] = ["fresh", 0]
    return graph


def learn_nodes(source: str, target: str, batch_size: int = 16) -> dict:
    """Collect (text encoder and UNet, 64 px) -> incremental Linear-AcT fit, as nodes "collect" and "fit"."""
    return {
        "ckpt": CHECKPOINT,
        "collect": {"class_type": "ACTCollectActivations", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "source_prompts": source, "target_prompts": target,
            "where": "both", "layers": "normalization layers", "pattern": "", "resolution": 64, "noise_levels": 1,
            "batch_size": batch_size, "seed": 0}},
        "fit": {"class_type": "ACTFitTransportMaps", "inputs": {
            "activations": ["collect", 0], "method": "linear", "support": "q_0_100", "estimation": "incremental",
            "moves": "every token alike (AcT)"}},
    }


def steer(graph: dict, maps: list, strength: float = 1.0) -> dict:
    """Put an Apply Transport Maps node between the checkpoint and the sampler and text encoders."""
    graph["apply"] = {"class_type": "ACTApplyTransportMaps", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "maps": maps, "strength": strength, "start_percent": 0.0,
        "end_percent": 1.0, "branch": "conditional and unconditional", "mode": "exact"}}
    graph["sampler"]["inputs"]["model"] = ["apply", 0]
    graph["pos"]["inputs"]["clip"] = ["apply", 1]
    graph["neg"]["inputs"]["clip"] = ["apply", 1]
    return graph


def image_digests(server, entry: dict) -> list[str]:
    """Hashes of the pixels of every image a finished prompt produced (not of the PNG files, which also
    carry the graph as metadata)."""
    digests = []
    for output in entry["outputs"].values():
        for image in output.get("images", []):
            url = f"{server.url}/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}"
            with urllib.request.urlopen(url, timeout=30) as r:
                digests.append(hashlib.sha256(Image.open(io.BytesIO(r.read())).convert("RGB").tobytes()).hexdigest())
    return digests


def sampled_again(entry: dict) -> bool:
    """Whether the sampler really ran, rather than ComfyUI serving its cached output."""
    return "sampler" not in str([m for m in entry["status"]["messages"] if m[0] == "execution_cached"])
