"""The pack inside the real ComfyUI server: loading, a whole learn -> save -> load -> apply graph on the
thin SD1.5 checkpoint, and the server's interrupt during collection."""
from __future__ import annotations

import os
import re
import stat
import time

import pytest

from graphs import image_digests, learn_nodes, sampled_again, sampled_anew, sampling_graph, steer

pytestmark = pytest.mark.server

OUR_NODES = {"ACTCollectActivations", "ACTFitTransportMaps", "ACTApplyTransportMaps",
             "ACTSaveTransportMaps", "ACTLoadTransportMaps"}
SOURCE = "\n".join(f"a watercolor painting of {t}" for t in
                   ["a house", "a boat", "a tree", "a dog", "a road", "a lake", "a city", "a field"])
TARGET = "\n".join(f"a photo of {t}" for t in
                   ["a house", "a boat", "a tree", "a dog", "a road", "a lake", "a city", "a field"])


def test_pack_loads_without_import_failure_and_lists_its_nodes(server):
    log = server.log()
    # The pack's own path in this server's custom_nodes: the folder holding the host may be named
    # ComfyUI-ACT as well, and the host's audio nodes, which fail without torchaudio, live there.
    ours = [line for line in log.splitlines() if str(server.base / "custom_nodes" / "ComfyUI-ACT") in line]
    assert ours, "the server log never names the pack's folder: the filter above would see nothing"
    assert not [line for line in ours if re.search(r"IMPORT FAILED|Cannot import", line)], ours
    info = server.get("/object_info")
    assert OUR_NODES <= set(info)
    apply_info = info["ACTApplyTransportMaps"]
    assert "strength" in apply_info["input"]["required"]
    assert "tooltip" in apply_info["input"]["required"]["strength"][1]


def assert_success(entry: dict) -> None:
    status = entry.get("status", {})
    assert status.get("status_str") == "success", status.get("messages")


def test_learn_save_load_apply_through_the_server(server):
    graph = steer(sampling_graph(1, "steered") | learn_nodes(SOURCE, TARGET), ["fit", 0])
    graph["savemaps"] = {"class_type": "ACTSaveTransportMaps", "inputs": {
        "maps": ["fit", 0], "name": "watercolor_test", "overwrite": True}}
    entry = server.run(graph)
    assert_success(entry)
    steered = image_digests(server, entry)
    assert len(steered) == 1
    assert (server.base / "models" / "act" / "watercolor_test.safetensors").exists()

    plain = server.run(sampling_graph(1, "plain"))
    assert_success(plain)
    assert image_digests(server, plain) != steered

    spec = server.get("/object_info/ACTLoadTransportMaps")["ACTLoadTransportMaps"]["input"]["required"]["maps_name"]
    assert "watercolor_test.safetensors" in spec[1]["options"]
    reloaded = sampling_graph(1, "reloaded")
    reloaded["load"] = {"class_type": "ACTLoadTransportMaps", "inputs": {"maps_name": "watercolor_test.safetensors"}}
    entry = server.run(steer(reloaded, ["load", 0]))
    assert_success(entry)
    assert image_digests(server, entry) == steered


def save_maps_node(name: str) -> dict:
    return {"class_type": "ACTSaveTransportMaps", "inputs": {"maps": ["fit", 0], "name": name, "overwrite": True}}


def test_bad_input_is_reported_and_the_server_stays_healthy(server):
    graph = learn_nodes("only one prompt", TARGET) | {"out": save_maps_node("x")}
    entry = server.run(graph)
    messages = str(entry["status"]["messages"])
    assert entry["status"]["status_str"] == "error"
    assert "source_prompts has 1 prompts; at least 8" in messages
    entry = server.run(learn_nodes(SOURCE, TARGET) | {"out": save_maps_node("../../escape")})
    assert entry["status"]["status_str"] == "error" and "not a usable file name" in str(entry["status"]["messages"])
    assert not list(server.base.rglob("escape*"))
    assert server.get("/system_stats")["system"]


def interrupt_while_running(server, graph: dict, after_seconds: float) -> dict:
    """Queue a graph, press the server's interrupt once it has run a while, return its history entry."""
    prompt_id = server.post("/prompt", {"prompt": graph})["prompt_id"]
    deadline = time.time() + 180
    while not server.get("/queue")["queue_running"] and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(after_seconds)
    server.post("/interrupt", {})
    while prompt_id not in server.get("/history") and time.time() < deadline:
        time.sleep(0.2)
    return server.get(f"/history/{prompt_id}")[prompt_id]


def test_interrupting_collection_leaves_the_model_sampling_as_before(server):
    before = server.run(sampling_graph(5, "before"))
    assert_success(before)
    many = 150
    source = "\n".join(f"a watercolor painting of object number {i}" for i in range(many))
    target = "\n".join(f"a photo of object number {i}" for i in range(many))
    entry = interrupt_while_running(server, learn_nodes(source, target, batch_size=2) | {"out": save_maps_node("never")},
                                    after_seconds=1.5)
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in str(entry["status"]["messages"])
    after = server.run(sampled_anew(sampling_graph(5, "after")))
    assert_success(after)
    assert sampled_again(after)  # really sampled again with the model the collection used
    assert image_digests(server, after) == image_digests(server, before)


def steered_graph(seed: int, steps: int, size: int, prefix: str) -> dict:
    return steer(sampling_graph(seed, prefix, steps=steps, size=size) | learn_nodes(SOURCE, TARGET), ["fit", 0])


def test_interrupting_steered_sampling_leaves_both_models_as_before(server):
    steered_before = server.run(steered_graph(9, 3, 64, "steered_before"))
    plain_before = server.run(sampling_graph(9, "plain_before"))
    assert_success(steered_before)
    assert_success(plain_before)
    entry = interrupt_while_running(server, steered_graph(9, 400, 128, "long"), after_seconds=2.0)  # within 400 steps
    assert "execution_interrupted" in str(entry["status"]["messages"])
    steered_after = server.run(steered_graph(9, 3, 64, "steered_after"))
    plain_after = server.run(sampling_graph(9, "plain_after"))
    for entry in (steered_after, plain_after):
        assert_success(entry)
        assert sampled_again(entry)
    assert image_digests(server, steered_after) == image_digests(server, steered_before)
    assert image_digests(server, plain_after) == image_digests(server, plain_before)


def queue_expecting_refusal(server, graph: dict) -> str:
    """POST a prompt that validation must refuse; returns the node errors as text."""
    import urllib.error
    try:
        server.post("/prompt", {"prompt": graph})
    except urllib.error.HTTPError as error:
        assert error.code == 400
        return error.read().decode()
    raise AssertionError("the server accepted a prompt it should have refused")


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), -float("inf"), 10.5])
def test_a_strength_that_is_not_a_usable_number_is_refused_before_anything_runs(server, strength):
    before = len(server.get("/history"))
    graph = steer(sampling_graph(1, "never") | learn_nodes(SOURCE, TARGET), ["fit", 0], strength=strength)
    refusal = queue_expecting_refusal(server, graph)
    assert "fix 'strength' on Apply Transport Maps" in refusal and "-10 to 10" in refusal
    assert len(server.get("/history")) == before  # nothing was queued, nothing collected


def test_a_strength_list_with_a_typo_is_refused_before_anything_runs(server):
    graph = steer(sampling_graph(1, "never") | learn_nodes(SOURCE, TARGET), ["fit", 0])
    graph["sweep"] = {"class_type": "ACTStrengthSweep", "inputs": {"strengths": "0, 0.5, one"}}
    graph["apply"]["inputs"]["strength"] = ["sweep", 0]
    refusal = queue_expecting_refusal(server, graph)
    assert "strengths must be numbers separated by commas" in refusal and "Strength Sweep" in refusal


def test_saving_maps_shows_the_path_on_the_node_and_writes_a_file_others_can_read(server):
    graph = learn_nodes(SOURCE, TARGET) | {"out": save_maps_node("shared_with_others")}
    entry = server.run(graph)
    assert_success(entry)
    written = server.base / "models" / "act" / "shared_with_others.safetensors"
    (shown,) = entry["outputs"]["out"]["text"]
    assert str(written) in shown and "Load Transport Maps" in shown
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask


def test_errors_name_their_type_readably(server):
    graph = learn_nodes(SOURCE, TARGET) | {"out": save_maps_node("never")}
    graph["collect"]["inputs"].update(layers="custom pattern", pattern="norm[")
    entry = server.run(graph)
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["exception_type"] == "ComfyUI-ACT.ActError"
    assert "fix the 'pattern' input of Collect Activations" in error["exception_message"]
