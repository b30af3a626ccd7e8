"""Random-weight Stable Diffusion models built with ComfyUI's own classes (nothing is downloaded).

    tiny_model("SD15" | "SD2" | "SDXL" | "SD3" | "FLUX" | "Chroma" | "Z-Image" | "Qwen-Image", seed)
                                                -> (MODEL, CLIP, VAE) small enough for CPU tests
    write_thin_sd15(folder)                     -> a checkpoint file that CheckpointLoaderSimple
                                                   detects as SD1.5: full-size CLIP-L and VAE, a UNet
                                                   with one level and one res block.

As a script (used by `tools/host.py run` to give a fresh install one checkpoint):
    python tests/make_models.py thin-sd15 ComfyUI/models/checkpoints

The weights are seeded random numbers: images show noise-like colour fields, not pictures.
Needs ComfyUI importable (COMFYUI_PATH on sys.path) and comfy.cli_args.args.cpu set before
comfy.model_management is imported when no GPU should be used.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

THIN_SD15_NAME = "ACT-demo-random-weights-sd15.safetensors"

TINY_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
             # SDXL's clip_l reads layer -2: three layers keep that meaningful.
             "num_hidden_layers": 3, "projection_dim": 64}

TINY_T5 = {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2}

# Qwen3-4B's layout (its 151,936-token vocabulary, heads of 128) at width 64; Z-Image reads the
# second-to-last layer's output: three layers keep that meaningful.
TINY_QWEN3 = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
              "num_key_value_heads": 1}

# Qwen2.5-VL-7B's layout (its 152,064-token vocabulary, heads of 128) at width 64; Qwen-Image reads the
# last layer. Its vision tower is built at full size whatever the config (see build_clip).
TINY_QWEN25 = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1}

TINY_VAE = {"params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}

FULL_VAE = {"params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}}


def _unet_base() -> dict:
    return {"in_channels": 4, "out_channels": 4, "use_checkpoint": False, "image_size": 32,
            "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
            "use_temporal_resblock": False}


def unet_config(family: str, thin: bool = False) -> dict:
    """UNet configurations: tiny ones for tests; `thin` is SD1.5-sized but shallow."""
    cfg = _unet_base()
    if family == "SD15" and thin:
        cfg.update(model_channels=320, context_dim=768, num_res_blocks=[1], channel_mult=[1],
                   transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
                   adm_in_channels=None, use_linear_in_transformer=False)
    elif family == "SD15":
        cfg.update(model_channels=32, context_dim=TINY_CLIP["hidden_size"], num_res_blocks=[1, 1],
                   channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                   transformer_depth_middle=1, adm_in_channels=None, use_linear_in_transformer=False)
    elif family == "SD2":
        # SD2 uses 64-channel heads: model_channels must be a multiple of 64.
        cfg.update(model_channels=64, context_dim=TINY_CLIP["hidden_size"], num_res_blocks=[1, 1],
                   channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                   transformer_depth_middle=1, adm_in_channels=None, use_linear_in_transformer=True)
    elif family == "SDXL":
        cfg.update(model_channels=64, context_dim=2 * TINY_CLIP["hidden_size"], num_res_blocks=[1, 1],
                   channel_mult=[1, 2], transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
                   transformer_depth_middle=1, use_linear_in_transformer=True, num_classes="sequential",
                   # pooled clip_g projection + 6 size/crop embeddings of 256
                   adm_in_channels=TINY_CLIP["projection_dim"] + 1536)
    elif family == "SD3":
        # MMDiT: hidden size is 64 x depth. Its context is 4096 wide: CLIP-L and CLIP-G outputs
        # side by side, zero-padded to T5's width (this CLIP has no T5, as with an SD3.5 checkpoint
        # loaded without one); the pooled vector is CLIP-L's and CLIP-G's joined.
        return {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2,
                "adm_in_channels": 2 * TINY_CLIP["hidden_size"], "pos_embed_max_size": 32, "num_patches": 32 * 32,
                "pos_embed_scaling_factor": None, "qk_norm": "rms",
                "context_embedder_config": {"target": "torch.nn.Linear",
                                            "params": {"in_features": 4096, "out_features": 128}}}
    elif family == "FLUX":
        return flux_config()
    elif family in DETECTED:
        return DETECTED[family]()
    else:
        raise ValueError(f"no test model for family {family!r}")
    return cfg


def detected_config(shapes: dict, image_model: str) -> dict:
    """What this host's own detection reads from a checkpoint with these keys and shapes (shapes
    without memory: only the keys detection looks at), so options that later ComfyUI versions added
    take the values the host gives a real file of the family."""
    import comfy.model_detection
    signature = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    cfg = comfy.model_detection.detect_unet_config(signature, "")
    if cfg is None or cfg.get("image_model") != image_model:
        raise RuntimeError(f"this ComfyUI does not detect a {image_model} checkpoint from its keys: {cfg}")
    return cfg


def _flux_block_keys(hidden: int, head_dim: int) -> dict:
    shapes = {"img_in.weight": (hidden, 16 * 2 * 2), "txt_in.weight": (hidden, TINY_T5["d_model"])}
    for i in range(2):
        shapes[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = (head_dim,)
        shapes[f"single_blocks.{i}.norm.key_norm.scale"] = (head_dim,)
    return shapes


def flux_config() -> dict:
    """A tiny FLUX.1: two double-stream and two single-stream blocks, hidden size 64.

    The context is T5's output, the vector input CLIP-L's pooled output (not projected, as ComfyUI's
    FLUX CLIP gives it). Detection hard-codes the full-size attention layout (24 heads of 128 over
    axes 16/56/56, MLP ratio 4), which the keys do not carry: that part is set here.
    """
    hidden, head_dim = 64, 32
    shapes = _flux_block_keys(hidden, head_dim)
    shapes.update({"vector_in.in_layer.weight": (hidden, TINY_CLIP["hidden_size"]),
                   "guidance_in.in_layer.weight": (hidden, 256)})
    cfg = detected_config(shapes, "flux")
    cfg.update(axes_dim=[8, 12, 12], num_heads=hidden // head_dim, mlp_ratio=2.0)
    return cfg


def chroma_config() -> dict:
    """A tiny Chroma: FLUX.1's tiny blocks, T5's context, and the small network that makes every
    block's modulation from the noise level (its 64 inputs are fixed; two layers of 32 here)."""
    hidden, head_dim = 64, 32
    shapes = _flux_block_keys(hidden, head_dim)
    shapes["distilled_guidance_layer.norms.0.scale"] = (32,)
    cfg = detected_config(shapes, "chroma")
    cfg.update(axes_dim=[8, 12, 12], num_heads=hidden // head_dim, mlp_ratio=2.0, hidden_dim=32, out_dim=hidden,
               n_layers=2)
    return cfg


def zimage_config() -> dict:
    """A tiny Z-Image: one joint block, one noise and one caption refiner block, width 256 (its
    timestep embedding is 256 wide, so no narrower), heads of 32. Detection knows Z-Image by its
    full width (3840) only: the host's settings for a full-size file are taken, then narrowed."""
    full = {"cap_embedder.1.weight": (3840, 2560), "noise_refiner.0.attention.k_norm.weight": (128,),
            "layers.0.ffn_norm1.weight": (3840,), "cap_pad_token": (1, 3840)}
    cfg = detected_config(full, "lumina2")
    cfg.update(dim=256, cap_feat_dim=TINY_QWEN3["hidden_size"], n_heads=8, n_kv_heads=8, axes_dims=[8, 12, 12],
               n_refiner_layers=1, ffn_dim_multiplier=1.0, multiple_of=32)  # an MLP of 704, not 2048
    return cfg


def qwen_image_config() -> dict:
    """A tiny Qwen-Image: two blocks of width 64 (two heads of 32) reading the tiny Qwen2.5-VL's output.
    Detection reads the input width and the block count from the keys; the heads, their rotary axes and
    the text width are the transformer's full-size defaults, set here."""
    hidden = 64
    shapes = {"txt_norm.weight": (TINY_QWEN25["hidden_size"],), "img_in.weight": (hidden, 16 * 2 * 2),
              "proj_out.weight": (16 * 2 * 2, hidden)}
    for i in range(2):
        shapes[f"transformer_blocks.{i}.img_mod.1.weight"] = (6 * hidden, hidden)
    cfg = detected_config(shapes, "qwen_image")
    cfg.update(attention_head_dim=32, num_attention_heads=hidden // 32, joint_attention_dim=TINY_QWEN25["hidden_size"],
               axes_dims_rope=(8, 12, 12))
    return cfg


# Families whose tiny configuration comes from the host's detection, and so does their config class
# (for Z-Image, detection's choice for the full-size file).
DETECTED = {"Chroma": chroma_config, "Z-Image": zimage_config, "Qwen-Image": qwen_image_config}


def randomize(module: torch.nn.Module, seed: int, skip: str | None = None) -> None:
    """Fill every parameter with seeded values (those under `skip` left out); comfy.ops layers start
    as uninitialised memory."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if skip and name.startswith(skip):
                continue
            if p.ndim >= 2:
                fan_in = p[0].numel()
                values = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
            elif name.endswith("weight") and "norm" in name:
                values = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            else:
                values = 0.05 * torch.randn(p.shape, generator=gen)
            p.copy_(values.to(p.dtype))


def _model_config(family: str, unet: dict):
    import comfy.supported_models as sm
    import comfy.model_detection
    if family == "Z-Image":
        cfg = type(comfy.model_detection.model_config_from_unet_config(dict(unet, dim=3840)))(unet)
    elif family in DETECTED:
        # The host's own choice of config class for these settings, as when it loads a file.
        cfg = comfy.model_detection.model_config_from_unet_config(unet)
    else:
        cls = {"SD15": sm.SD15, "SD2": sm.SD20, "SDXL": sm.SDXL, "SD3": sm.SD3, "FLUX": sm.Flux}[family]
        cfg = cls(unet)
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def build_model(family: str, seed: int, thin: bool = False):
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    cfg = _model_config(family, unet_config(family, thin))
    if family == "SD2":
        # SD2.x 768 models are v-prediction; the detector reads that from weights we do not have.
        base = comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.V_PREDICTION)
    else:
        base = cfg.get_model({}, "")
    randomize(base.diffusion_model, seed)
    if family == "SD3":
        # MMDiT's position table is a buffer (created empty, filled from checkpoints): fill it too.
        with torch.no_grad():
            table = base.diffusion_model.pos_embed
            table.copy_(0.1 * torch.randn(table.shape, generator=torch.Generator().manual_seed(seed + 3)))
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, cfg


def build_clip(cfg, family: str, seed: int, full_size: bool = False):
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.sd3_clip
    target = cfg.clip_target()
    if full_size:
        options = {}
    elif family == "SD2":
        options = {"model_name": "clip_h", "clip_h_model_config": dict(TINY_CLIP)}
    else:
        options = {"clip_l_model_config": dict(TINY_CLIP), "clip_g_model_config": dict(TINY_CLIP),
                   "t5xxl_model_config": dict(TINY_T5), "qwen3_4b_model_config": dict(TINY_QWEN3),
                   "qwen25_7b_model_config": dict(TINY_QWEN25)}
    if family == "SD3":
        # The SD3 config reads which encoders exist from a checkpoint's keys; name them here.
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer,
                                                        comfy.text_encoders.sd3_clip.sd3_clip(t5=False))
    clip = comfy.sd.CLIP(target, model_options=options)
    # Qwen2.5-VL's vision tower has a fixed size (658 M weights, seconds to fill) and only encodes
    # pictures given with a prompt; no test gives one, so it is left unfilled and never runs.
    randomize(clip.cond_stage_model, seed + 1, skip="qwen25_7b.transformer.visual." if family == "Qwen-Image" else None)
    return clip


def build_vae(seed: int, full_size: bool = False, channels: int = 4):
    import comfy.sd
    config = FULL_VAE if full_size else TINY_VAE
    if channels != 4:
        config = {"params": {"embed_dim": channels,
                             "ddconfig": dict(config["params"]["ddconfig"], z_channels=channels)}}
    vae = comfy.sd.VAE(sd={}, config=config)
    randomize(vae.first_stage_model, seed + 2)
    return vae


def tiny_model(family: str = "SD15", seed: int = 0):
    """(MODEL, CLIP, VAE) for a tiny random-weight model of the family. The VAE is a 2D one with the
    family's latent channels: it does not decode Qwen-Image's latents, which have a frame axis."""
    model, cfg = build_model(family, seed)
    return model, build_clip(cfg, family, seed), build_vae(seed, channels=cfg.latent_format.latent_channels)


def checkpoint_state_dict(model, clip, vae) -> dict:
    """The keys and tensors of a full checkpoint (UNet, CLIP, VAE) as this ComfyUI saves one.

    ComfyUI 0.3.75 builds it on the model (`BaseModel.state_dict_for_saving(clip_sd, vae_sd, ...)`);
    later versions moved that to the ModelPatcher and made the model's method take the UNet's state
    dict first, so the old call silently writes a checkpoint without a UNet. Use whichever this host has,
    as its own CheckpointSave does, and return plain CPU tensors (newer hosts hand out lazily cast ones).
    """
    if hasattr(model, "state_dict_for_saving"):
        # As the host's comfy.sd.save_checkpoint: both loaded first (an unloaded model's weights may be
        # lazily cast stand-ins on a newer host).
        import comfy.model_management
        comfy.model_management.load_models_gpu([model, clip.load_model()])
        clip_sd = clip.state_dict_for_saving() if hasattr(clip, "state_dict_for_saving") else clip.get_sd()
        sd = model.state_dict_for_saving(clip_sd, vae.get_sd(), None)
    else:
        sd = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    return {k: v.to("cpu").detach().clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}


def write_thin_sd15(folder: str | os.PathLike, seed: int = 0, name: str = THIN_SD15_NAME) -> Path:
    """Write (once) a fp16 SD1.5-detected checkpoint with random weights; returns its path."""
    import comfy.utils
    folder = Path(folder)
    path = folder / name
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    model, cfg = build_model("SD15", seed, thin=True)
    clip = build_clip(cfg, "SD15", seed, full_size=True)
    vae = build_vae(seed, full_size=True)
    sd = checkpoint_state_dict(model, clip, vae)
    sd = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in sd.items()}
    partial = path.with_suffix(".partial")
    comfy.utils.save_torch_file(sd, str(partial), metadata={"comfyui_act": "random weights, for demos and tests"})
    # safetensors writes owner-only files; give the checkpoint the mode the user's umask gives new files.
    mask = os.umask(0o022)
    os.umask(mask)
    partial.chmod(0o666 & ~mask)
    partial.replace(path)
    return path


def _import_comfy() -> None:
    comfy_dir = os.environ.get("COMFYUI_PATH")
    if comfy_dir and comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "thin-sd15":
        sys.exit("usage: make_models.py thin-sd15 FOLDER")
    _import_comfy()
    print(write_thin_sd15(sys.argv[2]))
