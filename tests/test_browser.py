"""The example workflows in the real frontend, driven in headless Chromium: each loads with no missing
node type or broken link, is queued from the page, and finishes with images. Screenshots go to
test-output/ for people to look at."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.server, pytest.mark.browser]
EXAMPLES = Path(__file__).resolve().parent.parent / "example_workflows"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page(server, output_dir):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: tools/host.py test installs Debian's chromium; see its output")
        pytest.skip("no Chromium on this machine (tools/host.py test installs it where apt-get works)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page(viewport={"width": 2400, "height": 1400})
        # A first visit opens the template browser over the graph; a returning user's setting skips it.
        server.post("/settings/Comfy.TutorialCompleted", True)
        page.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        page.wait_for_timeout(1500)
        dismiss_dialogs(page)
        yield page
        browser.close()


def dismiss_dialogs(page) -> None:
    """Close what a first visit opens (the template browser, banners) so screenshots show the graph."""
    for _ in range(3):
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)


def show_whole_graph(page) -> None:
    dismiss_dialogs(page)
    page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); }")
    page.wait_for_timeout(800)


def test_our_nodes_are_in_the_node_library(page, output_dir):
    types = page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)")
    assert {"ACTCollectActivations", "ACTApplyTransportMaps", "ACTStrengthGrid", "ACTConceptPrompts"} <= set(types)
    category = page.evaluate(
        "() => window.LiteGraph.registered_node_types['ACTApplyTransportMaps'].category")
    assert category == "conditioning/activation transport"
    page.screenshot(path=str(output_dir / "browser_start.png"))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json"), key=lambda p: "load saved" in p.name),
                         ids=lambda p: p.stem)
def test_example_loads_queues_and_finishes_in_the_browser(page, server, output_dir, path):
    workflow = json.loads(path.read_text())
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    loaded = page.evaluate("""() => {
        const g = window.app.graph;
        const nodes = g._nodes || g.nodes;
        return {types: nodes.map(n => n.type),
                missing: nodes.filter(n => !(n.type in window.LiteGraph.registered_node_types)).map(n => n.type),
                links: Object.keys(g.links instanceof Map ? Object.fromEntries(g.links) : g.links).length};
    }""")
    assert loaded["missing"] == []
    assert sorted(loaded["types"]) == sorted(n["type"] for n in workflow["nodes"])
    assert loaded["links"] == len(workflow["links"])
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
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    assert [i for out in entry["outputs"].values() for i in out.get("images", [])]
    show_whole_graph(page)  # and let the page draw the finished images
    page.screenshot(path=str(output_dir / f"browser_{path.stem.replace(' ', '_')}.png"))
