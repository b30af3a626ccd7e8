"""An independent reference for steering the diffusion model, written out by hand for the tests: plain
torch forward hooks on the UNet's layers, installed per diffusion-model call by a ComfyUI wrapper,
moving each layer's output by the Linear-AcT formulas below (none of the pack's folds, patches or
kernels). For ungated maps only, so that the inverse is the textbook one.

    strength l >= 0: z' = z + l (T(z) - z),          T(z) = scale z + shift
    strength l < 0:  z' = z + |l| (T^-1(z) - z),     T^-1(z) = (z - shift) / scale
    token maps move each element z; conv maps (mean form) move each channel's spatial mean m by the
    same amount for every pixel: z' = z + l (T(m) - m).
"""
from __future__ import annotations

import torch

import comfy.patcher_extension


def _move(output: torch.Tensor, layer, strength: float) -> torch.Tensor:
    assert not layer.gated, "the reference handles ungated maps only"
    scale, shift = layer.scale.to(output.device), layer.shift.to(output.device)
    conv = layer.kind == "conv"
    if conv:
        assert layer.form == "mean"
        scale, shift = scale[:, None, None], shift[:, None, None]
    z = output.to(torch.float64)
    v = z.mean((-2, -1), keepdim=True) if conv else z
    target = scale * v + shift if strength >= 0 else (v - shift) / scale
    return (z + abs(strength) * (target - v)).to(output.dtype)


def hooked(model, chain: list[tuple], start: float = 0.0, end: float = 1.0, conditional_only: bool = False):
    """A clone of MODEL steered by each (maps, strength) of `chain` in order, within the sampling
    window [start, end] (percent of the schedule) and, if asked, on the conditional rows only."""
    clone = model.clone()
    sampling = model.get_model_object("model_sampling")
    sigma_start, sigma_end = float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))

    def wrapper(executor, *args, **kwargs):
        # UNetModel._forward(x, timesteps, context, y, control, transformer_options, ...)
        options = kwargs["transformer_options"] if "transformer_options" in kwargs else args[5]
        if not sigma_end <= float(options["sigmas"][0]) <= sigma_start:
            return executor(*args, **kwargs)
        chunks = options.get("cond_or_uncond") or [0]
        batch = args[0].shape[0]
        size = batch // len(chunks)
        rows = [i for c, kind in enumerate(chunks) if kind == 0 or not conditional_only
                for i in range(c * size, (c + 1) * size)]
        handles = []
        for maps, strength in chain:
            for name, layer in maps.items():
                module = executor.class_obj.get_submodule(name[len("diffusion_model."):])

                def hook(_module, _inputs, output, layer=layer, strength=strength):
                    moved = output.clone()
                    moved[rows] = _move(output[rows], layer, strength)
                    return moved
                handles.append(module.register_forward_hook(hook))
        try:
            return executor(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "steering-reference", wrapper)
    return clone


def ungated(maps):
    """The same maps with no support range (every value moves)."""
    inf = float("inf")
    return type(maps)({n: type(l)(l.scale, l.shift, torch.full_like(l.lo, -inf), torch.full_like(l.hi, inf), l.kind,
                                  form=l.form) for n, l in maps.items() if n.startswith("diffusion_model.")}, maps.info)
