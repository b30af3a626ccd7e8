"""The artist's nodes: prompt builders, strength sweep grid, inspection, save/load by name."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

import folder_paths
from conftest import sample
from test_learn import collect, fit


def test_caption_bank_is_large_and_varied(pack):
    prompts = pack.nodes.prompts
    bank = prompts.caption_bank()
    assert len(bank) >= 300 and len(set(bank)) == len(bank)
    assert len(prompts.CONCEPT_TEMPLATES) >= 10
    assert {"anime", "watercolor", "cyberpunk", "impressionism", "art nouveau", "sketch", "pixel art",
            "photorealistic"} <= set(prompts.STYLES)


def test_concept_prompts_pair_the_same_captions_with_and_without_the_concept(pack):
    node = pack.nodes.nodes_prompts.ConceptPrompts
    source, target = node.execute("a pink elephant", "remove", 40, 3).args
    source, target = source.splitlines(), target.splitlines()
    assert len(source) == len(target) == 40
    assert all("a pink elephant" in s and "a pink elephant" not in t and t in s for s, t in zip(source, target))
    assert len({s.replace(t, "") for s, t in zip(source, target)}) > 5  # varied phrasings
    added = node.execute("more trees", "add", 40, 3).args
    assert added[0].splitlines() == target and all("more trees" in t for t in added[1].splitlines())
    assert node.execute("a pink elephant", "remove", 40, 3).args == (("\n".join(source)), "\n".join(target))
    own = node.execute("a cat", "remove", 10, 0, "a red door\na blue car").args[1].splitlines()
    assert set(own) == {"a red door", "a blue car"}
    with pytest.raises(ValueError, match="concept is empty"):
        node.execute("  ", "remove", 10, 0)


def test_style_prompts_append_style_tags(pack):
    node = pack.nodes.nodes_prompts.StylePrompts
    source, target = (s.splitlines() for s in node.execute("watercolor", 20, 1).args)
    assert all(t.startswith(s + ", ") and "watercolor" in t for s, t in zip(source, target))
    custom = node.execute("anime", 10, 1, "my own tag").args[1].splitlines()
    assert all(t.endswith(", my own tag") for t in custom)


def test_strength_sweep_grid_labels_every_tile_and_animates(pack, sd15, output_dir):
    model, clip, vae = sd15
    maps = fit(pack, collect(pack, model, clip, where="both")[0])
    view = pack.nodes.nodes_view
    (strengths,) = view.StrengthSweep.execute("0, 0.5, 1, 1.5").args
    assert strengths == [0.0, 0.5, 1.0, 1.5]
    apply = pack.nodes.nodes_apply.ApplyTransportMaps
    images = [sample(*apply.execute(model, maps, s, 0.0, 1.0, "conditional and unconditional", "exact", clip).args[:1],
                     clip, vae) for s in strengths]
    result = view.StrengthGrid.execute(images, strengths, [0], [0.5])
    (grid,) = result.args
    assert grid.shape[0] == 1 and grid.shape[2] == 4 * images[0].shape[2] and grid.shape[1] > images[0].shape[1]
    tile_width = images[0].shape[2]
    assert torch.allclose(grid[0, :64, :tile_width], images[0][0].detach(), atol=0.6 / 255)  # the strength-0 image, in 8 bits
    label_strip = grid[0, 64:, :tile_width]
    assert (label_strip > 0.5).any()  # a label is drawn under the tile
    animation = os.path.join(folder_paths.get_temp_directory(), result.ui["images"][0]["filename"])
    with Image.open(animation) as webp:
        assert webp.n_frames == 4
    Image.fromarray((grid[0].detach().numpy() * 255).astype("uint8")).save(output_dir / "strength_grid_tiny_sd15.png")
    with pytest.raises(ValueError, match="2 images but 3 strengths"):
        view.StrengthGrid.execute(images[:2], strengths[:3], [0], [0.5])
    with pytest.raises(ValueError, match="numbers separated by commas"):
        view.StrengthSweep.execute("0, lots")


def test_inspect_draws_a_chart_and_summary(pack, sdxl, output_dir):
    model, clip, _ = sdxl
    maps = fit(pack, collect(pack, model, clip, where="both")[0])
    chart, summary = pack.nodes.nodes_view.InspectMaps.execute(maps).args
    assert chart.shape[-1] == 3 and chart.shape[1] > 100 and chart.std() > 0.05
    assert f"{len(maps)} layers" in summary and "text encoder" in summary and "SDXL" not in summary.splitlines()[0]
    Image.fromarray((chart[0].detach().numpy() * 255).astype("uint8")).save(output_dir / "inspect_tiny_sdxl.png")


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/b", "..", "a\\b", "", " ", "x" * 200, "con\x00",
                                  "ünïcode/..", ".hidden"])
def test_save_refuses_path_like_names(pack, sd15, name):
    files = pack.nodes.nodes_files
    with pytest.raises(ValueError, match="not a usable file name"):
        files.maps_path_for(name)


def test_save_never_overwrites_silently_and_load_lists_the_file(pack, sd15, tmp_path, monkeypatch):
    model, clip, _ = sd15
    maps = fit(pack, collect(pack, model, clip, where="diffusion model")[0], "at once")
    files = pack.nodes.nodes_files
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "act", ([str(tmp_path)], {".safetensors"}))
    (path,) = files.SaveTransportMaps.execute(maps, "my maps", False).args
    assert path == str(tmp_path / "my maps.safetensors")
    with pytest.raises(ValueError, match="already exists"):
        files.SaveTransportMaps.execute(maps, "my maps", False)
    files.SaveTransportMaps.execute(maps, "my maps.safetensors", True)
    assert "my maps.safetensors" in folder_paths.get_filename_list("act")
    loaded, summary = files.LoadTransportMaps.execute("my maps.safetensors").args
    assert list(loaded) == list(maps) and "SD1.x" in summary
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="Load Transport Maps: .*broken.safetensors"):
        files.LoadTransportMaps.execute("broken.safetensors")


def test_save_and_load_summaries_name_a_concept_words_map_not_zero_layers(pack, tmp_path, monkeypatch):
    """Maps of 'the concept's words only' hold no per-layer map: the summaries say what they hold."""
    from act_core import TransportMaps
    from act_core.token_transport import fit_gated_tokens
    g = torch.Generator().manual_seed(0)
    target = torch.randn(8, 6, 4, generator=g)
    source = target.clone()
    source[:, 3:] += 2.0  # the concept's words and the tokens after them
    maps = TransportMaps({}, {"family": "SD1.x", "method": "concept words"},
                         conditioning=fit_gated_tokens(source, target, "nearest"))
    files = pack.nodes.nodes_files
    assert files.holds(maps) == "the map of the concept's words"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "act", ([str(tmp_path)], {".safetensors"}))
    files.SaveTransportMaps.execute(maps, "words", False)
    _, summary = files.LoadTransportMaps.execute("words.safetensors").args
    assert summary.startswith("the map of the concept's words for SD1.x"), summary
