"""The example workflows: current with the node definitions, defaults that serve a real checkpoint, and
each SD one runs on the real server (at small sizes set through the API, as a user on a slow machine
would); the FLUX.1 and Z-Image ones, which need real weights, are checked up to their model files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import make_workflows  # noqa: E402
from conftest import COMFY_VERSION  # noqa: E402

pytestmark = pytest.mark.server
EXAMPLES = Path(__file__).resolve().parent.parent / "example_workflows"
USUAL_SAMPLERS = {"euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "uni_pc"}
# The SD templates run on the demo checkpoint; FLUX.1's and Z-Image's need real weights (see make_workflows).
SD_TEMPLATES = [title for title in make_workflows.SPECS if title not in make_workflows.REAL_WEIGHTS]


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def load(title: str) -> dict:
    return json.loads((EXAMPLES / f"{title}.json").read_text())


def widgets(workflow: dict, object_info: dict, node_type: str) -> list[dict]:
    """The widget values of every node of a type, by input name, as the editor would show them."""
    prompt = make_workflows.to_api_prompt(workflow, object_info)
    return [node["inputs"] for node in prompt.values() if node["class_type"] == node_type]


# The ComfyUI whose stock node definitions wrote the files: later hosts name some stock nodes differently
# (0.33 titles DualCLIPLoader "Load CLIP (Dual)") and give SaveImage and PreviewImage an IMAGE output.
TEMPLATES_WRITTEN_WITH = "0.3.75"


def as_queued(workflow: dict, object_info: dict) -> dict:
    """What a template means on a host: every node's inputs, links and widget values, the pack's nodes
    in full, and of a stock node the outputs that carry links (its title and unlinked outputs are what
    the host's version calls and gives it, not part of the graph)."""
    out = json.loads(json.dumps(workflow))
    for node in out["nodes"]:
        info = object_info.get(node["type"], {})
        if info.get("python_module", "").startswith("custom_nodes.") or node["type"] in make_workflows.VIRTUAL:
            continue
        node.pop("title", None)
        node["outputs"] = [o for o in node["outputs"] if o["links"]]
    return out


def test_examples_match_the_node_definitions(object_info, tmp_path):
    fresh = make_workflows.write_all(object_info, tmp_path)
    assert sorted(p.name for p in EXAMPLES.glob("*.json")) == sorted(p.name for p in fresh)
    exact = COMFY_VERSION == TEMPLATES_WRITTEN_WITH
    for path in fresh:
        shipped, built = json.loads((EXAMPLES / path.name).read_text()), json.loads(path.read_text())
        assert as_queued(shipped, object_info) == as_queued(built, object_info), (
            f"{path.name} is stale: run python tools/make_workflows.py with a current /object_info")
        if exact:  # the host that wrote them: byte for byte, titles and every output too
            assert shipped == built, f"{path.name} is stale: run python tools/make_workflows.py with a current /object_info"


def test_comfyui_lists_the_examples_as_templates_numbered_in_the_order_to_try_them(server):
    templates = server.get("/api/workflow_templates")
    assert sorted(templates["ComfyUI-ACT"]) == sorted(make_workflows.SPECS)
    # The browser shows them in the server's directory order: the numbers say where to start.
    assert [title.split(" - ")[0] for title in make_workflows.SPECS] == [f"ACT {i}" for i in range(len(make_workflows.SPECS))]
    assert "shapes demo" in min(make_workflows.SPECS) and "load saved maps" in sorted(make_workflows.SPECS)[6]
    # The other families come after every template for one's own SD checkpoint; the shapes demo models'
    # templates need nothing and may follow them (ACT 9, shapes-SDXL).
    order = sorted(make_workflows.SPECS, key=lambda t: int(t.split(" - ")[0].split()[1]))
    real = [order.index(t) for t in make_workflows.REAL_WEIGHTS]
    own = [i for i, t in enumerate(order) if t not in make_workflows.REAL_WEIGHTS and "shapes demo" not in t]
    assert max(own) < min(real), order


@pytest.mark.parametrize("title", list(make_workflows.SPECS))
def test_every_example_has_a_thumbnail_from_a_run(server, title):
    path = EXAMPLES / f"{title}.jpg"
    assert path.exists(), f"no thumbnail {path.name}: copy it from test-output/thumbnails after the browser tests"
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.width >= 300 and 0.5 < image.width / image.height < 2.5
        assert len(set(image.convert("L").resize((32, 32)).getdata())) > 20  # a picture, not a flat placeholder
    import urllib.parse
    import urllib.request
    url = f"{server.url}/api/workflow_templates/ComfyUI-ACT/{urllib.parse.quote(title)}.jpg"
    with urllib.request.urlopen(url, timeout=30) as reply:
        assert reply.status == 200 and reply.read() == path.read_bytes()


def test_every_node_type_exists_and_every_link_is_whole(object_info):
    for path in EXAMPLES.glob("*.json"):
        workflow = json.loads(path.read_text())
        ids = {n["id"] for n in workflow["nodes"]}
        for node in workflow["nodes"]:
            assert node["type"] in object_info or node["type"] in make_workflows.VIRTUAL, (path.name, node["type"])
        for link in workflow["links"]:
            assert link[1] in ids and link[3] in ids, (path.name, link)
        assert any(n["type"] == "Note" for n in workflow["nodes"]), f"{path.name} has no note for the user"
        # Without a saved view the frontend fits the whole graph into the window it opens in.
        assert "ds" not in workflow.get("extra", {}), path.name


# Every SD template but the two on the shapes demo model is set up for a real checkpoint.
FOR_REAL_CHECKPOINTS = [title for title in SD_TEMPLATES if "shapes demo" not in title]


@pytest.mark.parametrize("title", FOR_REAL_CHECKPOINTS)
def test_example_defaults_serve_a_real_checkpoint_on_a_gpu(object_info, title):
    workflow = load(title)
    for collect in widgets(workflow, object_info, "ACTCollectActivations"):
        assert collect["resolution"] == 0, "collect at the model's native size"
        assert collect["noise_levels"] == 1 and collect["batch_size"] >= 16
    for kind in ("ACTStylePrompts", "ACTConceptPrompts"):
        for builder in widgets(workflow, object_info, kind):
            assert builder["count"] >= 64, "the README's usable dial needs 32 to 64 prompts per side"
    (sampler,) = widgets(workflow, object_info, "KSampler")
    assert 20 <= sampler["steps"] <= 40 and 5.0 <= sampler["cfg"] <= 8.0
    assert sampler["sampler_name"] in USUAL_SAMPLERS and sampler["scheduler"] in {"normal", "karras"}
    (latent,) = widgets(workflow, object_info, "EmptyLatentImage")
    (checkpoint,) = widgets(workflow, object_info, "CheckpointLoaderSimple")
    assert checkpoint["ckpt_name"] == make_workflows.DEMO_CHECKPOINT  # detected as SD1.5: 512 px native
    assert (latent["width"], latent["height"], latent["batch_size"]) == (512, 512, 1)
    (note,) = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "Note"]
    slow = [p for p in note.split("\n\n") if p.startswith("Slow machine")]
    assert len(slow) == 1 and len(slow[0]) < 3 * 110, "two or three lines on what to change for a slow machine"


def test_flux_example_defaults_serve_flux_schnell_on_a_gpu(object_info):
    workflow = load(make_workflows.FLUX_TITLE)
    (collect,) = widgets(workflow, object_info, "ACTCollectActivations")
    assert collect["resolution"] == 0 and collect["where"] == "both" and collect["noise_levels"] == 1
    (builder,) = widgets(workflow, object_info, "ACTStylePrompts")
    assert builder["count"] >= 64
    (loader,) = widgets(workflow, object_info, "DualCLIPLoader")
    assert loader["type"] == "flux" and "clip_l" in loader["clip_name1"] and "t5xxl" in loader["clip_name2"]
    (unet,) = widgets(workflow, object_info, "UNETLoader")
    assert "schnell" in unet["unet_name"]
    (sampler,) = widgets(workflow, object_info, "KSampler")
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (4, 1.0, "euler", "simple")
    (latent,) = widgets(workflow, object_info, "EmptySD3LatentImage")  # FLUX's 16-channel latent
    assert (latent["width"], latent["height"], latent["batch_size"]) == (1024, 1024, 1)
    (guidance,) = widgets(workflow, object_info, "FluxGuidance")
    assert guidance["guidance"] == 3.5
    (note,) = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "Note"]
    assert "schnell" in note and "FLUX.1 dev" in note and all(
        name in note for files in make_workflows.FLUX_FILES.values() for name in files.values())


def test_zimage_example_defaults_serve_z_image_turbo_on_a_gpu(object_info):
    workflow = load(make_workflows.ZIMAGE_TITLE)
    (collect,) = widgets(workflow, object_info, "ACTCollectActivations")
    assert collect["resolution"] == 0 and collect["where"] == "both" and collect["noise_levels"] == 1
    (loader,) = widgets(workflow, object_info, "CLIPLoader")
    assert loader["type"] == "lumina2" and "qwen_3_4b" in loader["clip_name"]
    (sampler,) = widgets(workflow, object_info, "KSampler")
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (
        9, 1.0, "res_multistep", "simple")
    (shift,) = widgets(workflow, object_info, "ModelSamplingAuraFlow")
    assert shift["shift"] == 3.0
    prompt = make_workflows.to_api_prompt(workflow, object_info)
    (shift_id,) = [i for i, n in prompt.items() if n["class_type"] == "ModelSamplingAuraFlow"]
    (apply_id,) = [i for i, n in prompt.items() if n["class_type"] == "ACTApplyTransportMaps"]
    assert prompt[shift_id]["inputs"]["model"] == [apply_id, 0], "the shift goes after Apply, on the steered model"
    (note,) = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "Note"]
    assert all(name in note for files in make_workflows.ZIMAGE_FILES.values() for name in files.values())


@pytest.mark.parametrize("title", list(make_workflows.REAL_WEIGHTS))
def test_real_weights_example_queues_and_is_refused_only_for_its_missing_model_files(server, object_info, title):
    """On an install without the family's weights, ComfyUI checks the whole graph when it is queued: every
    value but the model file names is valid, and the refusal names those files, as a user sees it."""
    import urllib.error
    files = make_workflows.REAL_WEIGHTS[title]
    prompt = make_workflows.to_api_prompt(load(title), object_info)
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.post("/prompt", {"prompt": prompt})
    reply = json.loads(refused.value.read())
    problems = {(prompt[node]["class_type"], error["extra_info"]["input_name"])
                for node, found in reply["node_errors"].items() for error in found["errors"]}
    assert problems == {(loader, name) for loader, names in files.items() for name in names}
    assert all("not in list" in e["message"].lower() or "value not in list" in e["details"].lower()
               for found in reply["node_errors"].values() for e in found["errors"]), reply["node_errors"]


@pytest.mark.parametrize("title", SD_TEMPLATES)
def test_example_runs_to_images_at_small_sizes(server, object_info, title):
    prompt = make_workflows.with_inputs(make_workflows.to_api_prompt(load(title), object_info),
                                        make_workflows.SMALL_SIZES)
    entry = server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert images


def run_shapes_template(server, object_info, words: str) -> tuple:
    """Queue the shapes template whose title holds `words` exactly as the file is (no shrinking), with a
    second output that keeps each strength's picture. Returns (prompt, history entry, {strength: the
    scorer's reading of that picture}), and a reader for any other saved image."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from demo import shapes
    (title,) = [t for t in make_workflows.SPECS if words in t]
    prompt = make_workflows.to_api_prompt(load(title), object_info)
    (scale_id,) = [i for i, node in prompt.items() if node["class_type"] == "ImageScale"]
    prompt["frames"] = {"class_type": "SaveImage", "inputs": {"images": [scale_id, 0], "filename_prefix": "act_test_frames"}}
    entry = server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]

    def read(image_entry) -> dict:
        with Image.open(server.output_file(image_entry)) as image:
            pixels = np.asarray(image.convert("RGB").resize((shapes.SIZE, shapes.SIZE), Image.BOX), np.float32) / 255
        return shapes.score(pixels)
    frames = entry["outputs"]["frames"]["images"]
    (sweep,) = [node for node in prompt.values() if node["class_type"] == "ACTStrengthSweep"]
    strengths = [float(s) for s in sweep["inputs"]["strengths"].split(",")]
    assert len(frames) == len(strengths)
    return prompt, entry, {strength: read(frame) for strength, frame in zip(strengths, frames)}, read


def test_the_shapes_demo_template_shows_stripes_appear_as_it_ships(server, object_info):
    """The strength 0 picture has no stripes, the picture at 1 and 1.5 has them, as the scorer reads the pixels."""
    _, _, found, _ = run_shapes_template(server, object_info, "try it in seconds")
    styles = {strength: f["background"] for strength, f in found.items()}
    assert styles[0.0] != "striped" and styles[1.0] == styles[1.5] == "striped", styles


def check_shapes_removal_template(server, object_info, words: str, negative_prefix: str) -> None:
    """At strength 0 the model draws the large red square and the small blue circle; from 0.5 the red
    square is gone and the circle stays, as the scorer reads the pixels. The picture beside it (no maps,
    the concept as negative prompt) still has the red square, as its note says."""
    prompt, entry, found, read = run_shapes_template(server, object_info, words)

    def objects(reading: dict) -> list[tuple]:
        return sorted((o["size"], o["colour"], o["shape"]) for o in reading["objects"])
    drawn = {strength: objects(f) for strength, f in found.items()}
    square, circle = ("large", "red", "square"), ("small", "blue", "circle")
    assert drawn[0.0] == sorted([square, circle]), drawn
    assert all(drawn[s] == [circle] for s in drawn if s >= 0.5), drawn
    (baseline_id,) = [i for i, node in prompt.items() if node["class_type"] == "SaveImage"
                      and node["inputs"]["filename_prefix"] == negative_prefix]
    (baseline,) = entry["outputs"][baseline_id]["images"]
    assert square in objects(read(baseline))


def test_the_shapes_removal_template_removes_the_red_square_and_keeps_the_circle_as_it_ships(server, object_info):
    check_shapes_removal_template(server, object_info, "remove a concept in seconds", "act_shapes_negative_prompt")


def test_the_shapes_sdxl_template_removes_the_red_square_through_the_stock_sdxl_nodes(server, object_info):
    """ACT 9: shapes-SDXL read by the stock Load Checkpoint, prompts encoded by CLIPTextEncodeSDXL, Fit's
    'moves' at its default (auto): the same dial as ACT 1."""
    check_shapes_removal_template(server, object_info, "on an SDXL model", "act_shapes_sdxl_negative_prompt")
