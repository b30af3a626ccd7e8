"""A server soak on loopback: many queued prompts mixing no maps, two maps files and several strengths
on the thin SD1.5 checkpoint; checks that each (maps, strength, seed) always gives the same pixels
and that the server's memory stays flat after warm-up. Used by tests (reduced) and bench/soak."""
from __future__ import annotations

import hashlib
import io
import random
import urllib.request

import psutil
from PIL import Image

from make_models import THIN_SD15_NAME

LEARN = {
    "A": ("a watercolor painting of", "a photo of"),
    "B": ("a pencil sketch of", "a photo of"),
}
SUBJECTS = ["a house", "a boat", "a tree", "a dog", "a road", "a lake", "a city", "a field", "a bridge", "a cat"]


def learn_graph(name: str) -> dict:
    source, target = LEARN[name]
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": THIN_SD15_NAME}},
        "collect": {"class_type": "ACTCollectActivations", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "where": "both", "layers": "normalization layers",
            "pattern": "", "resolution": 64, "noise_levels": 1, "batch_size": 32, "seed": 0,
            "source_prompts": "\n".join(f"{source} {s}" for s in SUBJECTS),
            "target_prompts": "\n".join(f"{target} {s}" for s in SUBJECTS)}},
        "fit": {"class_type": "ACTFitTransportMaps", "inputs": {
            "activations": ["collect", 0], "method": "linear", "support": "q_0_100", "estimation": "incremental"}},
        "save": {"class_type": "ACTSaveTransportMaps", "inputs": {
            "maps": ["fit", 0], "name": f"soak_{name}", "overwrite": True}},
    }


def sample_graph(maps: str | None, strength: float, seed: int, tag: int) -> dict:
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": THIN_SD15_NAME}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": seed, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a harbour at dawn"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": f"soak_{tag}"}},
    }
    if maps:
        graph["load"] = {"class_type": "ACTLoadTransportMaps", "inputs": {"maps_name": f"soak_{maps}.safetensors"}}
        graph["apply"] = {"class_type": "ACTApplyTransportMaps", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "maps": ["load", 0], "strength": strength,
            "start_percent": 0.0, "end_percent": 1.0, "branch": "conditional and unconditional", "mode": "exact"}}
        graph["sampler"]["inputs"]["model"] = ["apply", 0]
        graph["pos"]["inputs"]["clip"] = ["apply", 1]
        graph["neg"]["inputs"]["clip"] = ["apply", 1]
    return graph


def pixels(server, entry: dict) -> str:
    image = next(i for out in entry["outputs"].values() for i in out.get("images", []))
    url = f"{server.url}/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return hashlib.sha256(Image.open(io.BytesIO(r.read())).convert("RGB").tobytes()).hexdigest()


def soak(server, prompts: int, seed: int = 0) -> dict:
    for name in LEARN:
        entry = server.run(learn_graph(name), timeout=600)
        assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    rng = random.Random(seed)
    process = psutil.Process(server.process.pid)
    seen: dict[tuple, str] = {}
    mismatches, recomputed, rss = 0, 0, []
    warm_up = max(1, prompts // 5)
    for i in range(prompts):
        maps = rng.choice([None, "A", "B"])
        key = (maps, rng.choice([0.5, 1.0]) if maps else 0.0, rng.choice([1, 2]))
        entry = server.run(sample_graph(key[0], key[1], key[2], i))
        assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
        if "sampler" not in str([m for m in entry["status"]["messages"] if m[0] == "execution_cached"]):
            recomputed += 1
        digest = pixels(server, entry)
        if seen.setdefault(key, digest) != digest:
            mismatches += 1
        if i + 1 == warm_up or i + 1 == prompts:
            rss.append(process.memory_info().rss)
    return {"prompts": prompts, "distinct_settings": len(seen), "recomputed_samples": recomputed,
            "determinism_mismatches": mismatches, "rss_after_warmup_mb": round(rss[0] / 1e6, 1),
            "rss_at_end_mb": round(rss[-1] / 1e6, 1), "rss_growth_mb": round((rss[-1] - rss[0]) / 1e6, 1)}
