"""The pack inside the real ComfyUI server: loading, a whole learn -> save -> load -> apply graph on the
thin SD1.5 checkpoint, and the server's interrupt during collection."""
from __future__ import annotations

import hashlib
import io
import re
import time
import urllib.request

import pytest
from PIL import Image

from make_models import THIN_SD15_NAME

pytestmark = pytest.mark.server

OUR_NODES = {"ACTCollectActivations", "ACTFitTransportMaps", "ACTApplyTransportMaps",
             "ACTSaveTransportMaps", "ACTLoadTransportMaps"}
SOURCE = "\n".join(f"a watercolor painting of {t}" for t in
                   ["a house", "a boat", "a tree", "a dog", "a road", "a lake", "a city", "a field"])
TARGET = "\n".join(f"a photo of {t}" for t in
                   ["a house", "a boat", "a tree", "a dog", "a road", "a lake", "a city", "a field"])


def test_pack_loads_without_import_failure_and_lists_its_nodes(server):
    log = server.log()
    ours = [line for line in log.splitlines() if "ComfyUI-ACT" in line]
    assert not [line for line in ours if re.search(r"IMPORT FAILED|Cannot import", line)], ours
    info = server.get("/object_info")
    assert OUR_NODES <= set(info)
    apply_info = info["ACTApplyTransportMaps"]
    assert "strength" in apply_info["input"]["required"]
    assert "tooltip" in apply_info["input"]["required"]["strength"][1]


def sampling_graph(seed: int, strength_node: str | None = None, prefix: str = "act_test") -> dict:
    model_ref = [strength_node, 0] if strength_node else ["ckpt", 0]
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": THIN_SD15_NAME}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a house by a lake"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "seed": seed, "steps": 3, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def learn_nodes(prompts_source=SOURCE, prompts_target=TARGET, batch_size=16) -> dict:
    return {
        "collect": {"class_type": "ACTCollectActivations", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "source_prompts": prompts_source,
            "target_prompts": prompts_target, "where": "both", "layers": "normalization layers", "pattern": "",
            "resolution": 64, "noise_levels": 1, "batch_size": batch_size, "seed": 0}},
        "fit": {"class_type": "ACTFitTransportMaps", "inputs": {
            "activations": ["collect", 0], "method": "linear", "support": "q_0_100", "estimation": "incremental"}},
    }


def image_digests(server, entry: dict) -> list[str]:
    digests = []
    for output in entry["outputs"].values():
        for image in output.get("images", []):
            url = f"{server.url}/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}"
            with urllib.request.urlopen(url, timeout=30) as r:
                # Pixels only: the PNG also carries the graph as metadata, which differs per graph.
                pixels = Image.open(io.BytesIO(r.read())).convert("RGB").tobytes()
                digests.append(hashlib.sha256(pixels).hexdigest())
    return digests


def assert_success(entry: dict) -> None:
    status = entry.get("status", {})
    assert status.get("status_str") == "success", status.get("messages")


def test_learn_save_load_apply_through_the_server(server):
    graph = sampling_graph(1, "apply", "steered") | learn_nodes() | {
        "apply": {"class_type": "ACTApplyTransportMaps", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "maps": ["fit", 0], "strength": 1.0, "start_percent": 0.0,
            "end_percent": 1.0, "branch": "conditional and unconditional", "mode": "exact"}},
        "savemaps": {"class_type": "ACTSaveTransportMaps", "inputs": {
            "maps": ["fit", 0], "name": "watercolor_test", "overwrite": True}},
    }
    graph["pos"]["inputs"]["clip"] = ["apply", 1]
    graph["neg"]["inputs"]["clip"] = ["apply", 1]
    entry = server.run(graph)
    assert_success(entry)
    steered = image_digests(server, entry)
    assert len(steered) == 1
    assert (server.base / "models" / "act" / "watercolor_test.safetensors").exists()

    plain = server.run(sampling_graph(1, None, "plain"))
    assert_success(plain)
    assert image_digests(server, plain) != steered

    spec = server.get("/object_info/ACTLoadTransportMaps")["ACTLoadTransportMaps"]["input"]["required"]["maps_name"]
    assert "watercolor_test.safetensors" in spec[1]["options"]
    reloaded = sampling_graph(1, "apply", "reloaded") | {
        "load": {"class_type": "ACTLoadTransportMaps", "inputs": {"maps_name": "watercolor_test.safetensors"}},
        "apply": {"class_type": "ACTApplyTransportMaps", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "maps": ["load", 0], "strength": 1.0, "start_percent": 0.0,
            "end_percent": 1.0, "branch": "conditional and unconditional", "mode": "exact"}},
    }
    reloaded["pos"]["inputs"]["clip"] = ["apply", 1]
    reloaded["neg"]["inputs"]["clip"] = ["apply", 1]
    entry = server.run(reloaded)
    assert_success(entry)
    assert image_digests(server, entry) == steered


def test_bad_input_is_reported_and_the_server_stays_healthy(server):
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": THIN_SD15_NAME}}} | learn_nodes(
        "only one prompt", TARGET)
    graph["out"] = {"class_type": "ACTSaveTransportMaps", "inputs": {"maps": ["fit", 0], "name": "x", "overwrite": True}}
    entry = server.run(graph)
    messages = str(entry["status"]["messages"])
    assert entry["status"]["status_str"] == "error"
    assert "source_prompts has 1 prompts; at least 8" in messages
    escape = {"ckpt": graph["ckpt"]} | learn_nodes() | {"out": {"class_type": "ACTSaveTransportMaps", "inputs": {
        "maps": ["fit", 0], "name": "../../escape", "overwrite": True}}}
    entry = server.run(escape)
    assert entry["status"]["status_str"] == "error" and "not a usable file name" in str(entry["status"]["messages"])
    assert not list(server.base.rglob("escape*"))
    assert server.get("/system_stats")["system"]


def test_interrupting_collection_leaves_the_model_sampling_as_before(server):
    before = server.run(sampling_graph(5, None, "before"))
    assert_success(before)
    many = 150
    source = "\n".join(f"a watercolor painting of object number {i}" for i in range(many))
    target = "\n".join(f"a photo of object number {i}" for i in range(many))
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": THIN_SD15_NAME}}} | learn_nodes(
        source, target, batch_size=2)
    graph["out"] = {"class_type": "ACTSaveTransportMaps", "inputs": {"maps": ["fit", 0], "name": "never", "overwrite": True}}
    prompt_id = server.post("/prompt", {"prompt": graph})["prompt_id"]
    deadline = time.time() + 60
    while not server.get("/queue")["queue_running"] and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)
    server.post("/interrupt", {})
    while prompt_id not in server.get("/history") and time.time() < deadline + 120:
        time.sleep(0.2)
    entry = server.get(f"/history/{prompt_id}")[prompt_id]
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in str(entry["status"]["messages"])
    after = server.run(sampling_graph(5, None, "after"))
    assert_success(after)
    executed = [m for m in after["status"]["messages"] if m[0] == "execution_cached"]
    assert "sampler" not in str(executed)  # really sampled again with the model the collection used
    assert image_digests(server, after) == image_digests(server, before)


def test_soak_reduced(server):
    from soak import soak
    figures = soak(server, prompts=30)
    print(f"\nsoak: {figures}")
    assert figures["determinism_mismatches"] == 0
    assert figures["recomputed_samples"] >= 20
    assert figures["rss_growth_mb"] < 200  # flat after warm-up, allowing allocator noise


def steered_graph(seed: int, steps: int, size: int, prefix: str) -> dict:
    graph = sampling_graph(seed, "apply", prefix) | learn_nodes() | {
        "apply": {"class_type": "ACTApplyTransportMaps", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "maps": ["fit", 0], "strength": 1.0, "start_percent": 0.0,
            "end_percent": 1.0, "branch": "conditional and unconditional", "mode": "exact"}}}
    graph["pos"]["inputs"]["clip"] = ["apply", 1]
    graph["neg"]["inputs"]["clip"] = ["apply", 1]
    graph["sampler"]["inputs"]["steps"] = steps
    graph["latent"]["inputs"].update(width=size, height=size)
    return graph


def test_interrupting_steered_sampling_leaves_both_models_as_before(server):
    steered_before = server.run(steered_graph(9, 3, 64, "steered_before"))
    plain_before = server.run(sampling_graph(9, None, "plain_before"))
    assert_success(steered_before)
    assert_success(plain_before)
    prompt_id = server.post("/prompt", {"prompt": steered_graph(9, 400, 128, "long")})["prompt_id"]
    deadline = time.time() + 120
    while not server.get("/queue")["queue_running"] and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)  # well inside the 400 steps
    server.post("/interrupt", {})
    while prompt_id not in server.get("/history") and time.time() < deadline:
        time.sleep(0.2)
    assert "execution_interrupted" in str(server.get(f"/history/{prompt_id}")[prompt_id]["status"]["messages"])
    steered_after = server.run(steered_graph(9, 3, 64, "steered_after"))
    plain_after = server.run(sampling_graph(9, None, "plain_after"))
    for entry in (steered_after, plain_after):
        assert_success(entry)
        assert "sampler" not in str([m for m in entry["status"]["messages"] if m[0] == "execution_cached"])
    assert image_digests(server, steered_after) == image_digests(server, steered_before)
    assert image_digests(server, plain_after) == image_digests(server, plain_before)
