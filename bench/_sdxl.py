"""An SDXL UNet with seeded random weights, built where it runs (nothing is downloaded), and transport
maps for all its norm layers fitted on synthetic activations: what the GPU benchmarks time.

full size: SDXL's own layout (2.6 B parameters, 256 norm layers) in the given dtype;
tiny:      the test suite's tiny SDXL layout (runs on a CPU in seconds).
"""
from __future__ import annotations

import torch


def build_sdxl(device: str, dtype: torch.dtype, tiny: bool, size: int, load_device: str | None = None):
    """(ModelPatcher, SDXL-shaped conditioning [[cond, extras]]) for latents of size // 8.

    device: where the weights are made; load_device: where ComfyUI runs them (default: device).
    Made on the CPU and run on the GPU, ComfyUI moves only what fits in a partial load."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    from make_models import TINY_CLIP, randomize, unet_config
    if tiny:
        unet = unet_config("SDXL")
        context, pooled = 2 * TINY_CLIP["hidden_size"], TINY_CLIP["projection_dim"]
    else:
        unet = dict(sm.SDXL.unet_config, in_channels=4, out_channels=4, num_res_blocks=[2, 2, 2],
                    channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                    num_classes="sequential", use_checkpoint=False, image_size=32, use_spatial_transformer=True,
                    legacy=False)
        context, pooled = 2048, 1280
    cfg = sm.SDXL(unet)
    cfg.set_inference_dtype(dtype, None)
    base = cfg.get_model({}, "", device=device)
    randomize(base.diffusion_model, seed=0)
    base.eval()
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device(load_device or device),
                                               offload_device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    extras = {"pooled_output": torch.randn(1, pooled, generator=g), "width": size, "height": size,
              "crop_w": 0, "crop_h": 0, "target_width": size, "target_height": size}
    return model, [[torch.randn(1, 77, context, generator=g), extras]]


def synthetic_maps(model, method: str = "linear", support: str | None = None):
    """Maps for every GroupNorm/LayerNorm of the UNet, fitted on random activations (64 + 64 samples)."""
    from act_core import TransportMaps, fit_layer
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, module in model.model.diffusion_model.named_modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            conv = isinstance(module, torch.nn.GroupNorm)
            width = module.num_channels if conv else module.normalized_shape[-1]
            layers[f"diffusion_model.{name}"] = fit_layer(torch.randn(64, width, generator=g),
                                                          torch.randn(64, width, generator=g) * 1.1 + 0.05,
                                                          method, support, kind="conv" if conv else "token")
    return TransportMaps(layers, {"family": "SDXL", "method": method})
