"""The small "shapes" text-to-image model, built from ComfyUI's own SD1.x classes.

Parts: a UNet (comfy.supported_models.SD15 with a small configuration), a CLIP text encoder
(ComfyUI's SD1 CLIP-L class, small, with the real CLIP tokenizer) and a VAE (ComfyUI's AutoencoderKL,
small). So ComfyUI's own CLIPTextEncode, KSampler and VAEDecode run it, and so do this pack's nodes.

Latents are 4 x 8 x 8 for 64 x 64 pixel images (EmptyLatentImage at 64 x 64). The latent is not
learned: channels 0-2 are the mean colour of each 8 x 8 pixel cell and channel 3 the mean shape code of
the objects covering it (see `encode_scene`). The VAE decoder is trained to draw the picture back; the UNet
and the text encoder are trained together, from scratch, on captions of procedural scenes
(demo/shapes.py). demo/train.py makes the weights; `load()` reads them.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from . import shapes

WEIGHTS = Path(__file__).resolve().parent / "shapes-sd1-tiny.safetensors"
PIXELS = 64  # ComfyUI image side; the scene itself is drawn at shapes.SIZE (32) and shown at 2x
LATENT_SCALE = 0.18215  # SD1.5's latent_format: the UNet sees latent * this
ENC_GAIN = 1.0 / LATENT_SCALE  # so the UNet sees cell values in about [-1, 1]
DECODER_LR = 2e-3
# The layer whose output the UNet reads as the prompt (Collect Activations' pattern): SD1 takes CLIP-L's
# last layer through its final LayerNorm, so the normalization layers include it.
HANDED_ON = r"clip_l\..*final_layer_norm$"

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
        "num_hidden_layers": 3, "projection_dim": 64}
UNET = {"in_channels": 4, "out_channels": 4, "use_checkpoint": False, "image_size": 8,
        "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
        "use_temporal_resblock": False, "model_channels": 64, "context_dim": TEXT["hidden_size"],
        "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
        "adm_in_channels": None, "use_linear_in_transformer": False}
VAE = {"params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": PIXELS, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


def import_comfy() -> None:
    """Put ComfyUI on sys.path (COMFYUI_PATH) and keep it on the CPU when there is no GPU.

    Inside a running ComfyUI (the demo loader node) nothing is changed: the server chose its device."""
    if "comfy.model_management" in sys.modules:
        return
    comfy_dir = os.environ.get("COMFYUI_PATH")
    if comfy_dir and comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True


def seeded_init(module: torch.nn.Module, seed: int) -> None:
    """comfy.ops layers start as uninitialised memory: give every parameter a seeded value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def seeded_vae_weights(seed: int) -> dict[str, torch.Tensor]:
    """A full state dict of seeded random VAE weights, in the layout of ComfyUI's AutoencoderKL."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    module = AutoencoderKL(**VAE["params"])
    seeded_init(module, seed)
    return module.state_dict()


def build(seed: int = 0, text_dtype=None, unet: dict | None = None,
          vae_weights: dict[str, torch.Tensor] | None = None):
    """(MODEL, CLIP, VAE) with seeded random weights, in ComfyUI's own classes.

    text_dtype: None keeps ComfyUI's choice (fp16 on CPU); training needs torch.float32.
    unet: changes to the UNet configuration (UNET), e.g. {"model_channels": 64}.
    vae_weights: the VAE's state dict (from the shipped file); None gives seeded random weights.
    """
    import_comfy()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    cfg = comfy.supported_models.SD15({**UNET, **(unet or {})})
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({}, "")
    seeded_init(base.diffusion_model, seed)
    # Zero the last conv so the untrained UNet predicts zero noise (a common, stable start).
    with torch.no_grad():
        for p in base.diffusion_model.out[-1].parameters():
            p.zero_()
    base.eval()
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    clip = comfy.sd.CLIP(cfg.clip_target(), model_options={"clip_l_model_config": dict(TEXT), "dtype": text_dtype})
    seeded_init(clip.cond_stage_model, seed + 1)
    with torch.no_grad():  # token and position embeddings small, as in CLIP
        emb = clip.cond_stage_model.clip_l.transformer.text_model.embeddings
        emb.token_embedding.weight.mul_(0.02 * np.sqrt(TEXT["hidden_size"]))
        emb.position_embedding.weight.mul_(0.01 * np.sqrt(TEXT["hidden_size"]))
    # ComfyUI's VAE warns about every key its state dict lacks (an empty one: a 6,000-character
    # "Missing VAE keys" line), so it is always handed a complete one.
    vae = comfy.sd.VAE(sd=seeded_vae_weights(seed + 2) if vae_weights is None else vae_weights, config=VAE)
    return model, clip, vae


def parts(model, clip, vae) -> dict[str, torch.nn.Module]:
    return {"unet": model.model.diffusion_model, "text": clip.cond_stage_model.clip_l.transformer,
            "vae": vae.first_stage_model}


def text_encoders(clip) -> list[torch.nn.Module]:
    return [clip.cond_stage_model.clip_l]


def token_tables(clip) -> list[torch.Tensor]:
    return [e.transformer.text_model.embeddings.token_embedding.weight for e in text_encoders(clip)]


def decoder_parameters(vae) -> list[torch.nn.Parameter]:
    ae = vae.first_stage_model
    return list(ae.decoder.parameters()) + list(ae.post_quant_conv.parameters())


def condition(model, clip, captions, tokens, rng) -> dict[str, torch.Tensor]:
    """The UNet's inputs beside the noise for a batch of captions: CLIP-L's last layer.
    tokens(caption) -> the tokenizer's output."""
    return {"context": clip.cond_stage_model.clip_l([[t for t, _ in tokens(c)["l"][0]] for c in captions])[0]}


def save(path: str | os.PathLike, model, clip, vae, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    sd = {}
    for prefix, module in parts(model, clip, vae).items():
        for k, v in module.state_dict().items():
            sd[f"{prefix}.{k}"] = v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
    save_file(sd, str(path), metadata=metadata or {})


def config(unet: dict | None = None) -> dict:
    """What a weights file records of the model's shape (its `config` metadata)."""
    return {"unet": {**UNET, **(unet or {})}, "text": TEXT, "vae": VAE}


def load_into(path: str | os.PathLike, model, clip, vae, only: str | None = None) -> None:
    """Copy a file's weights (every part, or `only` one of unet/text/vae) into built modules."""
    from safetensors.torch import load_file
    sd = load_file(str(path))
    for prefix, module in parts(model, clip, vae).items():
        if only in (None, prefix):
            module.load_state_dict({k[len(prefix) + 1:]: v.float() for k, v in sd.items()
                                    if k.startswith(prefix + ".")}, strict=False)


def load(path: str | os.PathLike = WEIGHTS):
    """(MODEL, CLIP, VAE) of the trained shapes model, ready for ComfyUI's nodes."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not Path(path).exists():
        raise FileNotFoundError(f"no shapes model at {path}; make it with: python demo/train.py")
    with safe_open(str(path), "pt") as f:
        config = json.loads((f.metadata() or {}).get("config", "{}"))
    sd = load_file(str(path))
    weights = {prefix: {k[len(prefix) + 1:]: v.float() for k, v in sd.items() if k.startswith(prefix + ".")}
               for prefix in ("unet", "text", "vae")}
    model, clip, vae = build(0, unet=config.get("unet"), vae_weights=weights["vae"])
    model.model.model_config.native_resolution = PIXELS  # what resolution 0 on Collect Activations means
    for prefix, module in parts(model, clip, vae).items():
        missing, unexpected = module.load_state_dict(weights[prefix], strict=False)
        missing = [k for k in missing if "position_ids" not in k]
        if missing or unexpected:
            raise ValueError(f"{path} does not fit the shapes model ({prefix}): missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        module.requires_grad_(False)
    return model, clip, vae


# Channel 3 of the latent: each object pixel carries its shape's code, the background 0. Codes are
# evenly spread over [-2, 2] so that a cell's mean (coverage x code) still tells the decoder which shape
# to draw, with margins the UNet can hit: with [-1, 1] and uneven codes it drew squares as circles.
SHAPE_CODES = {"circle": 2.0, "square": 2 / 3, "triangle": -2 / 3, "cross": -2.0}


def encode_scene(scene: dict) -> np.ndarray:
    """The fixed encoder: (4, 8, 8) latent of a scene, per 4 x 4 pixel cell of the 32 px drawing.

    Channels 0-2: the cell's mean colour (objects, background style); channel 3: the cell's mean
    shape code (coverage x code). Cell means alone lose the shapes of 8 px objects: a small circle and
    a small square cover 2 x 2 cells alike. The code keeps them apart, so the decoder can draw them."""
    image, labels = shapes.render_labels(scene)
    codes = np.array([SHAPE_CODES[s] for s in shapes.SHAPES] + [0.0], np.float32)[labels]
    cell = shapes.SIZE // 8
    x = np.concatenate([image * 2 - 1, codes[:, :, None]], axis=2)
    x = x.reshape(8, cell, 8, cell, 4).mean(axis=(1, 3))
    return (x.transpose(2, 0, 1) * ENC_GAIN).astype(np.float32)


def to_pixels(image32: np.ndarray) -> np.ndarray:
    """A 32 px scene drawn at ComfyUI's 64 px (each pixel a 2 x 2 block)."""
    return np.repeat(np.repeat(image32, 2, axis=0), 2, axis=1)


def to_scene(image64) -> np.ndarray:
    """A 64 px picture back at the scorer's 32 px (2 x 2 means)."""
    x = np.asarray(image64, np.float32)
    return x.reshape(shapes.SIZE, 2, shapes.SIZE, 2, 3).mean(axis=(1, 3))
