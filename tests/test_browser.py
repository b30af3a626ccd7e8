"""The example workflows in the real frontend, driven in headless Chromium as a newcomer meets them: the
template browser lists them in order with their thumbnails; each opens framed (every node inside the
window), is shrunk for the CPU by changing widget values on the page, queued from the page, and finishes
with images (the FLUX.1 and Z-Image templates, which need real weights, name the files they miss instead). Screenshots (and thumbnail candidates) go to test-output/ for people to look at."""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import make_workflows  # noqa: E402
from conftest import COMFY_VERSION  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.browser]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = {"width": 1920, "height": 1080}  # a common desktop window
SMALL_WINDOW = {"width": 1280, "height": 800}  # a laptop
PACK = "ComfyUI-ACT"
# The template browser and error dialogs: a PrimeVue `.p-dialog` on 0.3.75's frontend (1.32), a plain
# element on 0.33's (1.49). Both carry the ARIA role a screen reader announces, which is what is found.
DIALOG = '[role="dialog"]'
# How the frontend reports a graph it refuses or a run that failed. 0.3.75's opens a dialog with the
# message. 0.33's checks the model files as soon as a graph opens, and reports in a notice over the
# graph's top right corner ("4 errors found", View details, Close) whose View details opens the Errors
# tab of the side panel. Other versions: whichever of the two appears.
ERRORS_REPORTED_IN = {"0.3.75": "dialog", "0.33.0": "notice"}.get(COMFY_VERSION)
NOTICE = '[data-testid="error-overlay"]'


@pytest.fixture(scope="module")
def browser(server):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: tools/host.py test installs Debian's chromium; see its output")
        pytest.skip("no Chromium on this machine (tools/host.py test installs it where apt-get works)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    # A first visit opens the template browser over the graph; a returning user's setting skips it.
    server.post("/settings/Comfy.TutorialCompleted", True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        yield browser
        browser.close()


def open_page(browser, server, window: dict):
    page = browser.new_page(viewport=window)
    page.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
    page.wait_for_timeout(1500)
    for _ in range(3):  # whatever a first visit opens
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)
    return page


@pytest.fixture(scope="module")
def page(browser, server):
    page = open_page(browser, server, WINDOW)
    yield page
    page.close()


def open_template_browser(page) -> None:
    page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    page.get_by_role("button", name=PACK).click()
    for title in make_workflows.SPECS:
        page.locator(DIALOG).get_by_text(title, exact=True).first.wait_for(timeout=30_000)
    page.wait_for_timeout(1000)


def open_template(page, title: str) -> None:
    """Open a template the way a user does: Templates, the pack's group, a click on the card. A frontend
    that checks the model files on opening (0.33's) names a real-weights template's missing ones in a notice
    over the graph: that is read and closed, as a user does; an SD template opens without one."""
    open_template_browser(page)
    page.locator(DIALOG).get_by_text(title, exact=True).first.click()
    page.wait_for_function("(n) => (window.app.graph.nodes || window.app.graph._nodes).length === n",
                           arg=_node_count(title), timeout=30_000)
    page.wait_for_timeout(1500)  # the view is fitted on the next animation frame
    notice = page.locator(NOTICE)
    if title in make_workflows.REAL_WEIGHTS and ERRORS_REPORTED_IN == "notice":
        notice.wait_for(timeout=30_000)
        assert f"{_missing_file_count(title)} errors found" in notice.inner_text()
        notice.get_by_test_id("error-overlay-dismiss").click()
        notice.wait_for(state="detached", timeout=10_000)
    assert notice.count() == 0, notice.all_inner_texts()


def _missing_file_count(title: str) -> int:
    return sum(len(files) for files in make_workflows.REAL_WEIGHTS[title].values())


def error_report(page) -> str:
    """The text a user reads about a refused or failed run: the dialog's, or the notice's and then the
    side panel's Errors tab that its View details opens (see ERRORS_REPORTED_IN)."""
    shown = page.locator(f"{DIALOG}:visible, {NOTICE}:visible").last
    shown.wait_for(timeout=30_000)
    if shown.get_attribute("data-testid") != "error-overlay":
        assert ERRORS_REPORTED_IN in (None, "dialog"), f"ComfyUI {COMFY_VERSION} reports in a notice, not a dialog"
        return shown.inner_text()
    assert ERRORS_REPORTED_IN in (None, "notice"), f"ComfyUI {COMFY_VERSION} reports in a dialog, not a notice"
    text = shown.inner_text()
    shown.get_by_test_id("error-overlay-see-errors").click()
    panel = page.get_by_test_id("properties-panel")
    panel.get_by_test_id("errors-summary-hero").wait_for(timeout=30_000)
    page.wait_for_timeout(500)  # the lists under the summary
    return text + "\n" + panel.inner_text()


def _node_count(title: str) -> int:
    spec = make_workflows.SPECS[title]
    return len(spec["nodes"]) + len(spec.get("notes", []))


def hidden_nodes(page) -> list[str]:
    """Nodes (title bar included) not wholly visible: outside the canvas or under the page's menus."""
    return page.evaluate("""() => {
        const canvas = window.app.canvas, ds = canvas.ds, el = canvas.canvas;
        const titleHeight = window.LiteGraph.NODE_TITLE_HEIGHT;
        const box = el.getBoundingClientRect();
        const visible = (x, y) => {
            if (x < box.left || y < box.top || x >= box.right || y >= box.bottom) return false;
            return document.elementFromPoint(x, y) === el;
        };
        const hidden = [];
        for (const node of window.app.graph.nodes) {
            const left = box.left + (node.pos[0] + ds.offset[0]) * ds.scale;
            const top = box.top + (node.pos[1] - titleHeight + ds.offset[1]) * ds.scale;
            const right = box.left + (node.pos[0] + node.size[0] + ds.offset[0]) * ds.scale;
            const bottom = box.top + (node.pos[1] + node.size[1] + ds.offset[1]) * ds.scale;
            // Corners, just inside: a widget drawn on the canvas is still the canvas element.
            const corners = [[left + 2, top + 2], [right - 2, top + 2], [left + 2, bottom - 2], [right - 2, bottom - 2]];
            if (!corners.every(([x, y]) => visible(x, y))) hidden.push(node.title);
        }
        return hidden;
    }""")


def set_widgets(page, changes: dict) -> None:
    """Change widget values on the open graph, as a user on a slow machine would before pressing Run."""
    missing = page.evaluate("""(changes) => {
        const missing = [];
        for (const node of window.app.graph.nodes) {
            for (const [name, value] of Object.entries(changes[node.type] || {})) {
                const widget = (node.widgets || []).find(w => w.name === name);
                if (!widget) { missing.push(node.type + '.' + name); continue; }
                widget.value = value;
                widget.callback?.(value);
            }
        }
        window.app.graph.setDirtyCanvas(true, true);
        return missing;
    }""", changes)
    assert missing == []


def queue_and_wait(page, server) -> dict:
    before = set(server.get("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.time() + 600
    entry = None
    while time.time() < deadline:
        new = set(server.get("/history")) - before
        if new:
            entry = server.get("/history")[new.pop()]
            if entry.get("status", {}).get("completed") is not None or entry["status"].get("status_str") == "error":
                break
        time.sleep(0.5)
    assert entry is not None, "the page queued nothing"
    return entry


def save_thumbnail(page, output_dir: Path, title: str) -> None:
    """The finished graph, cropped to its nodes and fitted into the template browser's 4:3 card (512 x 384),
    for example_workflows/<title>.jpg."""
    folder = output_dir / "thumbnails"
    folder.mkdir(exist_ok=True)
    full = folder / f"{title}.png"
    page.screenshot(path=str(full))
    box = page.evaluate("""() => {
        const canvas = window.app.canvas, ds = canvas.ds, titleHeight = window.LiteGraph.NODE_TITLE_HEIGHT;
        const r = canvas.canvas.getBoundingClientRect(), nodes = window.app.graph.nodes;
        const x = v => r.left + (v + ds.offset[0]) * ds.scale, y = v => r.top + (v + ds.offset[1]) * ds.scale;
        return [Math.min(...nodes.map(n => x(n.pos[0]))), Math.min(...nodes.map(n => y(n.pos[1] - titleHeight))),
                Math.max(...nodes.map(n => x(n.pos[0] + n.size[0]))), Math.max(...nodes.map(n => y(n.pos[1] + n.size[1])))];
    }""")
    with Image.open(full) as shot:
        left, top, right, bottom = (int(v) for v in box)
        pad = 16
        graph = shot.convert("RGB").crop((left - pad, top - pad, right + pad, bottom + pad))
        graph.thumbnail((512, 384), Image.LANCZOS)
        card = Image.new("RGB", (512, 384), graph.getpixel((2, 2)))
        card.paste(graph, ((512 - graph.width) // 2, (384 - graph.height) // 2))
        card.save(folder / f"{title}.jpg", quality=90)
    full.unlink()


def test_our_nodes_are_in_the_node_library(page, output_dir):
    types = page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)")
    assert {"ACTCollectActivations", "ACTApplyTransportMaps", "ACTStrengthGrid", "ACTConceptPrompts"} <= set(types)
    category = page.evaluate(
        "() => window.LiteGraph.registered_node_types['ACTApplyTransportMaps'].category")
    assert category == "conditioning/activation transport"


def test_the_template_browser_shows_our_templates_with_their_thumbnails(page, output_dir):
    open_template_browser(page)
    card_images = """(titles) => titles.map(title => {
        const label = [...document.querySelectorAll('[role="dialog"] *')].find(e => e.children.length === 0 &&
                                                                          e.textContent.trim() === title);
        let card = label;
        while (card && !card.querySelector('img')) card = card.parentElement;
        const img = card && card.querySelector('img');
        return img && img.complete ? img.naturalWidth : 0;
    })"""
    titles = list(make_workflows.SPECS)
    # Thumbnails arrive as blobs fetched from /api/workflow_templates/ComfyUI-ACT/<name>.jpg; a missing
    # one shows the browser's 224 px placeholder instead.
    page.wait_for_function(f"(titles) => ({card_images})(titles).every(w => w > 0)", arg=titles, timeout=30_000)
    widths = page.evaluate(card_images, titles)
    page.screenshot(path=str(output_dir / "browser_templates.png"))
    page.keyboard.press("Escape")
    assert widths == [512] * len(titles), "a thumbnail did not load (the browser shows its placeholder)"


@pytest.mark.parametrize("title", list(make_workflows.SPECS))
def test_template_opens_framed_in_a_laptop_window(browser, server, output_dir, title):
    page = open_page(browser, server, SMALL_WINDOW)
    try:
        open_template(page, title)
        page.screenshot(path=str(output_dir / f"browser_laptop_{title.replace(' ', '_')}.png"))
        assert hidden_nodes(page) == []
    finally:
        page.close()


@pytest.mark.parametrize("title", [t for t in make_workflows.SPECS if t not in make_workflows.REAL_WEIGHTS])
def test_template_opens_framed_shrinks_queues_and_finishes_in_the_browser(page, server, output_dir, title):
    open_template(page, title)
    page.screenshot(path=str(output_dir / f"browser_opened_{title.replace(' ', '_')}.png"))
    assert hidden_nodes(page) == []
    assert page.evaluate("() => window.app.canvas.ds.scale") >= 0.6, "fitted, but too small to read"
    loaded = page.evaluate("""() => ({
        missing: window.app.graph.nodes.filter(n => !(n.type in window.LiteGraph.registered_node_types)).map(n => n.type),
        links: Object.keys(window.app.graph.links instanceof Map ? Object.fromEntries(window.app.graph.links)
                                                                : window.app.graph.links).length})""")
    assert loaded["missing"] == []
    set_widgets(page, make_workflows.SMALL_SIZES)
    entry = queue_and_wait(page, server)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    assert [i for out in entry["outputs"].values() for i in out.get("images", [])]
    prompt = entry["prompt"][2]
    assert {n["inputs"]["resolution"] for n in prompt.values() if n["class_type"] == "ACTCollectActivations"} <= {64}
    page.wait_for_timeout(1500)  # let the page draw the finished images
    if "ACTSaveTransportMaps" in {n["class_type"] for n in prompt.values()}:
        saved = page.evaluate("""() => window.app.graph.nodes.filter(n => n.type === 'ACTSaveTransportMaps')
            .map(n => (n.widgets || []).find(w => w.name === 'saved')?.element?.value)""")
        assert saved and all("no_pink_elephant.safetensors" in (s or "") for s in saved), saved
    page.screenshot(path=str(output_dir / f"browser_{title.replace(' ', '_')}.png"))
    save_thumbnail(page, output_dir, title)


@pytest.mark.parametrize("title", list(make_workflows.REAL_WEIGHTS))
def test_real_weights_template_opens_framed_and_run_names_the_model_files_to_get(browser, server, output_dir, title):
    """Without the family's weights (none small enough for CI load through ComfyUI's loaders) the FLUX.1
    and Z-Image templates open whole, and Run tells the user which model files the loaders miss; nothing
    is queued. On 0.33 reading the errors opens the side panel, a setting the server keeps: the test
    closes it again, on a page of its own, so that the next template does not open under it."""
    page = open_page(browser, server, WINDOW)
    try:
        open_template(page, title)
        page.screenshot(path=str(output_dir / f"browser_opened_{title.replace(' ', '_')}.png"))
        assert hidden_nodes(page) == []
        assert page.evaluate("() => window.app.canvas.ds.scale") >= 0.6, "fitted, but too small to read"
        assert page.evaluate("""() => window.app.graph.nodes
            .filter(n => !(n.type in window.LiteGraph.registered_node_types)).map(n => n.type)""") == []
        save_thumbnail(page, output_dir, title)
        before = set(server.get("/history"))
        page.evaluate("async () => { try { await window.app.queuePrompt(0, 1); } catch (e) {} }")
        text = error_report(page)
        page.screenshot(path=str(output_dir / f"browser_{title.replace(' ', '_')}.png"))
        page.keyboard.press("Escape")
        assert set(server.get("/history")) == before
        for files in make_workflows.REAL_WEIGHTS[title].values():
            for name in files.values():
                assert name in text, (name, text[:500])
    finally:
        page.close()
        server.post("/settings/Comfy.RightSidePanel.IsOpen", False)


def test_an_error_dialog_is_titled_with_the_node_name_people_see(page, server, output_dir):
    title = next(iter(make_workflows.SPECS))
    open_template(page, title)
    set_widgets(page, make_workflows.SMALL_SIZES | {
        "ACTCollectActivations": {"layers": "custom pattern", "pattern": "norm[", "resolution": 64}})
    entry = queue_and_wait(page, server)
    assert entry["status"]["status_str"] == "error"
    text = error_report(page)
    page.screenshot(path=str(output_dir / "browser_error_dialog.png"))
    page.keyboard.press("Escape")
    assert "Collect Activations (AcT)" in text and "ACTCollectActivations" not in text
    assert "fix the 'pattern' input of Collect Activations" in text

