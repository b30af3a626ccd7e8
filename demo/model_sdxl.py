"""shapes-SDXL: the shapes world learned by a model built like SDXL, in ComfyUI's own SDXL classes.

What makes it SDXL (and not the SD1 shapes model with other widths):
- two CLIP text encoders with the real CLIP tokenizer and causal mask, CLIP-L 8 layers deep and CLIP-G
  10 layers deep, each handing on its penultimate layer's hidden states (ComfyUI's SDXLClipModel,
  joined along the width as SDXL's 2048 are);
- a pooled vector: CLIP-G's final layer at the end token, projected, which enters every block of the
  UNet through the ADM embedding together with SDXL's six size and crop numbers;
- an SDXL-shaped UNet (comfy.model_base.SDXL): three levels, linear transformer blocks with
  LayerNorms in the two lower ones, GroupNorms in the res blocks, SDXL's latent format;
- a checkpoint in SDXL's layout (model.diffusion_model., conditioner.embedders.0/1.,
  first_stage_model.), read by the stock Load Checkpoint node once the pack has told ComfyUI its
  widths (`register`); the VAE is ComfyUI's TAESD class, the one small VAE that loader recognises.

The latent is the SD1 shapes model's designed one (demo/model.py encode_scene), in SDXL's scale.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from . import model as sd1

# In a folder of its own, which the pack adds to ComfyUI's checkpoints: the stock Load Checkpoint lists
# it (the SD1 shapes model beside it is not a checkpoint that loader can read).
CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
WEIGHTS = CHECKPOINTS / "shapes-sdxl-tiny.safetensors"
PIXELS = sd1.PIXELS
LATENT_SCALE = 0.13025  # SDXL's latent_format
ENC_GAIN = 1.0 / LATENT_SCALE  # the UNet sees the designed cell values, as on the SD1 model
DECODER_LR = 5e-4  # TAESD's 40 convolutions diverge at the SD1 decoder's 2e-3

TEXT_L = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
          "num_hidden_layers": 8, "projection_dim": 64}
TEXT_G = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
          "num_hidden_layers": 10, "projection_dim": 64}
SIZE_NUMBERS = 6 * 256  # SDXL's ADM input beside the pooled vector: six numbers, 256 wide each
UNET = {"in_channels": 4, "out_channels": 4, "use_checkpoint": False, "image_size": 8,
        "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
        "use_temporal_resblock": False, "num_classes": "sequential",
        "model_channels": 32, "channel_mult": [1, 2, 4], "num_res_blocks": [1, 1, 1],
        "transformer_depth": [0, 1, 2], "transformer_depth_output": [0, 0, 1, 1, 2, 2],
        "transformer_depth_middle": 2, "use_linear_in_transformer": True,
        "context_dim": TEXT_L["hidden_size"] + TEXT_G["hidden_size"],
        "adm_in_channels": TEXT_G["projection_dim"] + SIZE_NUMBERS}
# What ComfyUI's checkpoint detection reads from the UNet's weights and compares, as for SDXL itself.
MATCHED = ("model_channels", "use_linear_in_transformer", "transformer_depth", "context_dim",
           "adm_in_channels", "use_temporal_attention")
# The layers whose outputs the UNet reads as the prompt (Collect Activations' pattern): SDXL takes each
# encoder's penultimate layer as it leaves the layer, through no LayerNorm, so no normalization layer
# moves it directly.
HANDED_ON = (rf"clip_l\..*encoder\.layers\.{TEXT_L['num_hidden_layers'] - 2}$"
             rf"|clip_g\..*encoder\.layers\.{TEXT_G['num_hidden_layers'] - 2}$")
CLIP_OPTIONS = {"clip_l_model_config": TEXT_L, "clip_g_model_config": TEXT_G}
# Sizes SDXL is told: the plain text encode leaves ComfyUI's 768, the SDXL encode node defaults to
# 1024, the pack's collection says the model's own 64. Training draws them all, so none matters.
TRAINING_SIZES = (64, 768, 1024)


def supported_model():
    """comfy.supported_models.SDXL at shapes-SDXL's widths: SDXL's model, latent, tokenizer and text
    encoder classes, with the text encoders built at this model's sizes. One class per ComfyUI, the
    registered one, though this file may be imported twice (as the pack's and as a script's module)."""
    sd1.import_comfy()
    import comfy.supported_models as sm
    return next((c for c in sm.models if getattr(c, "shapes_sdxl", False)), None) or _new_supported_model()


@functools.cache
def _new_supported_model():
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb

    def small_text_encoders(clip_class):
        def make(device="cpu", dtype=None, model_options={}, **kwargs):
            return clip_class(device=device, dtype=dtype, model_options={**CLIP_OPTIONS, **model_options}, **kwargs)
        return make

    class ShapesSDXL(sm.SDXL):
        shapes_sdxl = True
        unet_config = {k: UNET[k] for k in MATCHED}
        native_resolution = PIXELS  # what resolution 0 on Collect Activations means

        def clip_target(self, state_dict={}):
            target = super().clip_target(state_dict)
            return smb.ClipTarget(target.tokenizer, small_text_encoders(target.clip))

    return ShapesSDXL


def register() -> None:
    """Let ComfyUI's checkpoint loaders recognise shapes-SDXL files (idempotent). Nothing else matches
    these widths, so every other checkpoint loads as before."""
    import comfy.supported_models as sm
    cls = supported_model()
    if cls not in sm.models:
        sm.models.append(cls)


def seeded_vae_weights(seed: int) -> dict[str, torch.Tensor]:
    """ComfyUI's TAESD with seeded weights, told SDXL's latent scale (as the host's own VAE loader does)."""
    import comfy.taesd.taesd
    module = comfy.taesd.taesd.TAESD()  # its layers start as uninitialised memory (comfy.ops)
    sd1.seeded_init(module, seed)
    sd = module.state_dict()
    sd["vae_scale"] = torch.tensor(LATENT_SCALE)
    sd["vae_shift"] = torch.tensor(0.0)
    return sd


def build(seed: int = 0, text_dtype=None):
    """(MODEL, CLIP, VAE) with seeded random weights (for training)."""
    sd1.import_comfy()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    cfg = supported_model()(dict(UNET))
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({}, "")
    sd1.seeded_init(base.diffusion_model, seed)
    with torch.no_grad():  # the untrained UNet predicts zero noise
        for p in base.diffusion_model.out[-1].parameters():
            p.zero_()
    base.eval()
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    clip = comfy.sd.CLIP(cfg.clip_target(), model_options={"dtype": text_dtype})
    sd1.seeded_init(clip.cond_stage_model, seed + 1)
    with torch.no_grad():  # token and position embeddings small, as in CLIP
        for enc, cfg_ in ((clip.cond_stage_model.clip_l, TEXT_L), (clip.cond_stage_model.clip_g, TEXT_G)):
            emb = enc.transformer.text_model.embeddings
            emb.token_embedding.weight.mul_(0.02 * cfg_["hidden_size"] ** 0.5)
            emb.position_embedding.weight.mul_(0.01 * cfg_["hidden_size"] ** 0.5)
    vae = comfy.sd.VAE(sd=seeded_vae_weights(seed + 2))
    return model, clip, vae


def parts(model, clip, vae) -> dict[str, torch.nn.Module]:
    cm = clip.cond_stage_model
    return {"unet": model.model.diffusion_model, "text_l": cm.clip_l.transformer,
            "text_g": cm.clip_g.transformer, "vae": vae.first_stage_model}


def text_encoders(clip) -> list[torch.nn.Module]:
    return [clip.cond_stage_model.clip_l, clip.cond_stage_model.clip_g]


def token_tables(clip) -> list[torch.Tensor]:
    return [e.transformer.text_model.embeddings.token_embedding.weight for e in text_encoders(clip)]


def decoder_parameters(vae) -> list[torch.nn.Parameter]:
    return list(vae.first_stage_model.taesd_decoder.parameters())


def condition(model, clip, captions, tokens, rng) -> dict[str, torch.Tensor]:
    """The UNet's inputs beside the noise for a batch of captions, as sampling builds them: both
    encoders' penultimate states side by side, and the pooled CLIP-G vector with the size numbers.
    tokens(caption) -> the tokenizer's output."""
    cm = clip.cond_stage_model
    toks = [tokens(c) for c in captions]
    l_out = cm.clip_l([[t for t, _ in x["l"][0]] for x in toks])[0]
    g_out, pooled = cm.clip_g([[t for t, _ in x["g"][0]] for x in toks])[:2]
    size = int(TRAINING_SIZES[rng.integers(len(TRAINING_SIZES))])
    y = model.model.encode_adm(pooled_output=pooled, width=size, height=size, crop_w=0, crop_h=0,
                               target_width=size, target_height=size)
    return {"context": torch.cat([l_out, g_out], dim=-1), "y": y}


def encode_scene(scene: dict):
    return sd1.encode_scene(scene) * (ENC_GAIN / sd1.ENC_GAIN)


def save(path: str | os.PathLike, model, clip, vae, metadata: dict | None = None) -> None:
    """A checkpoint in SDXL's layout, written by ComfyUI's own conversion (as its save node does), in fp16."""
    from safetensors.torch import save_file
    sd = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd())
    sd = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous() for k, v in sd.items()}
    # The VAE's scale is SDXL's latent scale, a constant of the design (never trained): exact, in fp32.
    sd["first_stage_model.vae_scale"] = torch.tensor(LATENT_SCALE)
    sd["first_stage_model.vae_shift"] = torch.tensor(0.0)
    save_file(sd, str(path), metadata=metadata or {})


def config(unet: dict | None = None) -> dict:
    """What a weights file records of the model's shape (its `config` metadata)."""
    return {"unet": UNET, "text_l": TEXT_L, "text_g": TEXT_G, "vae": "TAESD"}


def load_into(path: str | os.PathLike, model, clip, vae, only: str | None = None) -> None:
    """Copy a checkpoint's weights (every part, or `only` one of unet/text/vae) into built modules."""
    import comfy.utils
    sd = comfy.utils.load_torch_file(str(path))
    cfg = model.model.model_config
    if only in (None, "unet"):
        model.model.load_model_weights(sd, "model.diffusion_model.")
    if only in (None, "text"):
        clip.load_sd(cfg.process_clip_state_dict(sd), full_model=True)
    if only in (None, "vae"):
        vae_sd = comfy.utils.state_dict_prefix_replace(sd, {"first_stage_model.": ""}, filter_keys=True)
        vae.first_stage_model.load_state_dict({k: v.float() for k, v in vae_sd.items()})


def load(path: str | os.PathLike = WEIGHTS):
    """(MODEL, CLIP, VAE) of the trained shapes-SDXL, read by the stock checkpoint loader."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no shapes-SDXL model at {path}; make it with: python demo/train.py --model sdxl")
    sd1.import_comfy()
    import comfy.sd
    register()
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    return model, clip, vae
