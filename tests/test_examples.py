"""The example workflows: current with the node definitions, and each one runs on the real server."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import make_workflows  # noqa: E402

pytestmark = pytest.mark.server
EXAMPLES = Path(__file__).resolve().parent.parent / "example_workflows"


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def test_examples_match_the_node_definitions(object_info, tmp_path):
    fresh = make_workflows.write_all(object_info, tmp_path)
    assert sorted(p.name for p in EXAMPLES.glob("*.json")) == sorted(p.name for p in fresh)
    for path in fresh:
        assert json.loads((EXAMPLES / path.name).read_text()) == json.loads(path.read_text()), (
            f"{path.name} is stale: run python tools/make_workflows.py with a current /object_info")


def test_comfyui_lists_the_examples_as_templates(server):
    templates = server.get("/api/workflow_templates")
    assert sorted(templates["ComfyUI-ACT"]) == sorted(make_workflows.SPECS)


def test_every_node_type_exists_and_every_link_is_whole(object_info):
    for path in EXAMPLES.glob("*.json"):
        workflow = json.loads(path.read_text())
        ids = {n["id"] for n in workflow["nodes"]}
        for node in workflow["nodes"]:
            assert node["type"] in object_info or node["type"] in make_workflows.VIRTUAL, (path.name, node["type"])
        for link in workflow["links"]:
            assert link[1] in ids and link[3] in ids, (path.name, link)
        assert any(n["type"] == "Note" for n in workflow["nodes"]), f"{path.name} has no note for the user"


@pytest.mark.parametrize("title", list(make_workflows.SPECS))  # in order: saving maps comes before loading them
def test_example_runs_to_images(server, object_info, title):
    workflow = json.loads((EXAMPLES / f"{title}.json").read_text())
    entry = server.run(make_workflows.to_api_prompt(workflow, object_info), timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert images
