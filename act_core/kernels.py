"""A fast path for applying a layer's map: one Triton kernel per layer and call, on CUDA tensors.

`LayerMap.apply` (act_core.maps) is the definition of correct; this module computes the same thing
in one pass over the activation, and falls back to it wherever the fast path cannot run (CPU, MPS,
no Triton, an unusual layout or dtype).

Why a kernel: written in PyTorch, the gated affine map costs about seven elementwise kernels per
layer (dtype casts, two comparisons, and, where, addcmul), each reading and writing the whole
activation. One kernel reads the activation once (twice per channel for conv maps, whose second
read is served from the cache), loads fp16/bf16/fp32, computes in float32 and writes once in the
activation's dtype: the least traffic a separate pass can have.

Forms, per element x of the output (a, b: the map's slope/offset at this strength, see
`LayerMap.params`; gate: lo <= v <= hi, always open for ungated maps):
    token           x' = gate(x) ? a x + b : x
    conv, "mean"    x' = x + gate(m) (a m + b),  m = the channel's spatial mean
    conv, "pixel"   x' = x + gate(m) (a x + b)

With TRITON_INTERPRET=1 set before Triton is imported, the same kernels run on CPU tensors through
Triton's interpreter (slowly): that is how the tests check them against the reference without a GPU.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .maps import LayerMap, check_strength

__all__ = ["available", "transport", "fast_apply", "ENABLED"]

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs of torch come without Triton: the reference serves them
    triton = None

_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# COMFYUI_ACT_KERNELS=0 turns the fast path off (the reference runs everywhere): a way out should a
# driver or Triton build misbehave, and how bench/gpu-check times the reference on the same card.
# Read when a transport function is made, so it can also be switched between steer calls.
ENABLED = os.environ.get("COMFYUI_ACT_KERNELS", "1") != "0"


def available() -> bool:
    """Whether the kernels can run at all here (CUDA tensors, or CPU tensors under the interpreter)."""
    return triton is not None and (_INTERPRETING or torch.cuda.is_available())


if triton is not None:
    @triton.jit
    def _token_kernel(x_ptr, out_ptr, a_ptr, b_ptr, lo_ptr, hi_ptr, n, dim,
                      GATED: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        column = offsets % dim
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + column, mask=mask, other=1.0)
        b = tl.load(b_ptr + column, mask=mask, other=0.0)
        y = a * x + b
        if GATED:
            lo = tl.load(lo_ptr + column, mask=mask, other=0.0)
            hi = tl.load(hi_ptr + column, mask=mask, other=0.0)
            y = tl.where((x >= lo) & (x <= hi), y, x)
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _conv_kernel(x_ptr, out_ptr, a_ptr, b_ptr, lo_ptr, hi_ptr, channels, pixels,
                     GATED: tl.constexpr, PIXEL: tl.constexpr, BLOCK: tl.constexpr):
        # One program per (sample, channel) row of `pixels` contiguous elements.
        row = tl.program_id(0).to(tl.int64)
        channel = row % channels
        base = row * pixels
        a = tl.load(a_ptr + channel)
        b = tl.load(b_ptr + channel)
        lanes = tl.arange(0, BLOCK)
        if GATED or not PIXEL:
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, pixels, BLOCK):
                index = start + lanes
                total += tl.load(x_ptr + base + index, mask=index < pixels, other=0.0).to(tl.float32)
            mean = tl.sum(total, axis=0) / pixels
            if GATED:
                lo = tl.load(lo_ptr + channel)
                hi = tl.load(hi_ptr + channel)
                open_gate = ((mean >= lo) & (mean <= hi)).to(tl.float32)
                a = a * open_gate
                b = b * open_gate
            if not PIXEL:
                delta = a * mean + b
        for start in range(0, pixels, BLOCK):
            index = start + lanes
            mask = index < pixels
            x = tl.load(x_ptr + base + index, mask=mask, other=0.0).to(tl.float32)
            if PIXEL:
                y = x + (a * x + b)
            else:
                y = x + delta
            tl.store(out_ptr + base + index, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(layer: LayerMap, x: torch.Tensor, params: tuple) -> torch.Tensor:
    a, b, lo, hi = params
    gated = lo is not None
    out = torch.empty_like(x)
    if layer.kind == "token":
        n = x.numel()
        block = 1024
        _token_kernel[(triton.cdiv(n, block),)](x, out, a, b, lo if gated else a, hi if gated else a, n, layer.dim,
                                                GATED=gated, BLOCK=block, num_warps=4)
    else:
        pixels = x.shape[-1] * x.shape[-2]
        rows = x.numel() // pixels
        block = min(2048, max(128, triton.next_power_of_2(pixels)))
        _conv_kernel[(rows,)](x, out, a, b, lo if gated else a, hi if gated else a, layer.dim, pixels,
                              GATED=gated, PIXEL=layer.form == "pixel", BLOCK=block, num_warps=4)
    return out


def _fast_ok(x: torch.Tensor) -> bool:
    return (x.dtype in _FAST_DTYPES and x.is_contiguous() and x.numel() > 0
            and (x.is_cuda or (_INTERPRETING and x.device.type == "cpu")))


def fast_apply(layer: LayerMap, x: torch.Tensor, strength: float) -> torch.Tensor:
    """The kernel path alone (no fallback): same result as layer.apply(x, strength) within float
    rounding. Raises where it cannot run; `transport` is what callers use."""
    strength = check_strength(strength)
    if strength == 0.0:
        return x
    layer.check_shape(x)
    if triton is None or not _fast_ok(x):
        raise ValueError(f"the fast path cannot run on a {x.dtype} tensor on {x.device} "
                         f"(contiguous: {x.is_contiguous()}, Triton: {triton is not None})")
    return _launch(layer, x, layer.params(x.device, strength))


def transport(layer: LayerMap, strength: float, fast: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function x -> x transported at `strength`, for a hook that runs at every step.

    Everything that does not depend on x is settled once: the strength is checked, and the map's
    parameters are moved to each device the first time it is seen (float32, contiguous). Per call
    there remains a shape check, one dictionary lookup and one kernel launch (or the reference
    where the kernel cannot run, or with fast=False)."""
    strength = check_strength(strength)
    if strength == 0.0:
        return lambda x: x
    use_kernel = fast and ENABLED and triton is not None
    on_device: dict[torch.device, tuple] = {}

    def run(x: torch.Tensor) -> torch.Tensor:
        if use_kernel and _fast_ok(x):
            params = on_device.get(x.device)
            if params is None:
                params = on_device[x.device] = layer.params(x.device, strength)
            layer.check_shape(x)
            return _launch(layer, x, params)
        return layer.apply(x, strength)

    return run
