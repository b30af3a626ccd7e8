"""shapes-SDXL (demo/model_sdxl.py) is an SDXL model to ComfyUI: the stock Load Checkpoint reads the
committed file into SDXL's own classes, the pack steers it as SDXL, and its parts are built like SDXL's."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from demo import model_sdxl as X  # noqa: E402


@pytest.fixture(scope="module")
def loaded(pack):
    """The committed file through ComfyUI's own CheckpointLoaderSimple node, by the name it lists."""
    import folder_paths
    import nodes as comfy_nodes
    assert X.WEIGHTS.name in folder_paths.get_filename_list("checkpoints")
    return comfy_nodes.CheckpointLoaderSimple().load_checkpoint(X.WEIGHTS.name)[:3]


def test_the_stock_checkpoint_loader_reads_shapes_sdxl_as_sdxl(loaded):
    import comfy.model_base
    import comfy.sdxl_clip
    import comfy.supported_models
    from comfy.taesd.taesd import TAESD
    model, clip, vae = loaded
    assert isinstance(model.model, comfy.model_base.SDXL)
    assert isinstance(model.model.model_config, comfy.supported_models.SDXL)
    assert isinstance(clip.cond_stage_model, comfy.sdxl_clip.SDXLClipModel)
    assert isinstance(vae.first_stage_model, TAESD)
    depth = {name: len(getattr(clip.cond_stage_model, name).transformer.text_model.encoder.layers)
             for name in ("clip_l", "clip_g")}
    assert depth == {"clip_l": X.TEXT_L["num_hidden_layers"], "clip_g": X.TEXT_G["num_hidden_layers"]}
    assert depth["clip_l"] >= 8 and depth["clip_g"] > depth["clip_l"]
    # SDXL's conditioning: both encoders' penultimate states side by side, and the pooled CLIP-G vector.
    assert clip.cond_stage_model.clip_l.layer_idx == clip.cond_stage_model.clip_g.layer_idx == -2
    out = clip.encode_from_tokens(clip.tokenize("a large red circle"), return_dict=True)
    assert out["cond"].shape == (1, 77, X.TEXT_L["hidden_size"] + X.TEXT_G["hidden_size"])
    assert out["pooled_output"].shape == (1, X.TEXT_G["projection_dim"])


def test_the_loaded_parts_hold_the_committed_weights(loaded):
    """Value for value (the file's fp16 numbers), so no part is left at ComfyUI's uninitialised memory."""
    import comfy.utils
    model, clip, vae = loaded
    sd = comfy.utils.load_torch_file(str(X.WEIGHTS))
    checks = {
        "model.diffusion_model.label_emb.0.0.weight": model.model.diffusion_model.label_emb[0][0].weight,
        "model.diffusion_model.output_blocks.0.1.transformer_blocks.1.norm3.weight":
            model.model.diffusion_model.output_blocks[0][1].transformer_blocks[1].norm3.weight,
        "conditioner.embedders.0.transformer.text_model.encoder.layers.7.mlp.fc2.weight":
            clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[7].mlp.fc2.weight,
        "conditioner.embedders.1.model.text_projection": clip.cond_stage_model.clip_g.transformer.text_projection.weight.T,
        "first_stage_model.taesd_decoder.14.conv.4.weight": vae.first_stage_model.taesd_decoder[14].conv[4].weight,
    }
    for key, value in checks.items():
        assert torch.equal(value.detach().float().cpu(), sd[key].float()), key
    assert float(vae.first_stage_model.vae_scale) == pytest.approx(X.LATENT_SCALE)


def test_the_pack_steers_it_as_sdxl_at_its_own_size(pack, loaded):
    model, _, _ = loaded
    families = pack.nodes.families
    family = families.family_of(model, "Collect Activations")
    assert family.name == "SDXL"
    assert families.native_resolution(family, model) == X.PIXELS


def test_the_demo_loader_gives_the_same_model(pack, loaded):
    model, clip, vae = pack.nodes.nodes_demo.LoadShapesDemoModel.execute("SDXL").args
    assert type(model.model.model_config) is type(loaded[0].model.model_config)
    a = clip.cond_stage_model.clip_g.transformer.text_model.encoder.layers[9].mlp.fc1.weight
    b = loaded[1].cond_stage_model.clip_g.transformer.text_model.encoder.layers[9].mlp.fc1.weight
    assert torch.equal(a.float().cpu(), b.float().cpu())


def test_other_checkpoints_are_not_taken_for_shapes_sdxl(pack):
    """ComfyUI knows one shapes-SDXL class, however often the pack's file is imported, and it matches
    only shapes-SDXL's widths: a real SDXL UNet's detected configuration does not match it."""
    import comfy.supported_models as sm
    cls = pack.demo.model_sdxl.supported_model()
    assert [c for c in sm.models if issubclass(c, sm.SDXL) and c.__module__ != sm.__name__] == [cls]
    assert cls is X.supported_model()
    assert not cls.matches(dict(sm.SDXL.unet_config)) and not sm.SDXL.matches(dict(cls.unet_config))


def test_loading_it_prints_no_warning(pack, caplog):
    """A newcomer's console stays clean: no missing or unexpected keys, no unknown-model line."""
    import logging
    import nodes as comfy_nodes
    with caplog.at_level(logging.WARNING):
        comfy_nodes.CheckpointLoaderSimple().load_checkpoint(X.WEIGHTS.name)
    assert [r.getMessage()[:300] for r in caplog.records if r.levelno >= logging.WARNING] == []
