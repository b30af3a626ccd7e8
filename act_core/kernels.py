"""A fast path for applying a layer's map: one Triton kernel per layer and call, on CUDA tensors.

`LayerMap.apply` (act_core.maps) is the definition of correct; this module computes the same thing
in one pass over the activation, and falls back to it wherever the fast path cannot run (CPU, MPS,
no Triton, an unusual layout or dtype).

Why a kernel: written in PyTorch, the gated affine map costs about seven elementwise kernels per
layer (dtype casts, two comparisons, and, where, addcmul), each reading and writing the whole
activation. One kernel reads the activation once (conv rows longer than ONE_BLOCK_PIXELS twice,
the second read mostly served from the cache), loads fp16/bf16/fp32, computes in float32 and writes
once in the activation's dtype: the least traffic a separate pass can have.

Forms, per element x of the output (a, b: the map's slope/offset at this strength, see
`LayerMap.params`; gate: lo <= v <= hi, always open for ungated maps):
    token           x' = gate(x) ? a x + b : x
    conv, "mean"    x' = x + gate(m) (a m + b),  m = the channel's spatial mean
    conv, "pixel"   x' = x + gate(m) (a x + b)

Where the kernel cannot run, `transport` uses `reference_transport`: LayerMap.apply's arithmetic,
bit for bit, in the fewest PyTorch kernels it takes (casts folded into the arithmetic, the gate as a
clamp and a comparison, parameters settled once per device and dtype), for CPUs, MPS and GPUs without
Triton. A kernel that fails to compile or launch (Triton installed without a working compiler, an old
driver) switches its configuration to that path with one logged warning, never an error in sampling;
an out-of-memory error is not such a failure and reaches the caller.

With TRITON_INTERPRET=1 set before Triton is imported, the same kernels run on CPU tensors through
Triton's interpreter (slowly): that is how the tests check them against the reference without a GPU.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import torch

from .maps import LayerMap, check_strength

__all__ = ["available", "transport", "reference_transport", "fast_apply", "FastPath", "ENABLED"]

log = logging.getLogger("comfyui_act")

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs of torch come without Triton: the reference serves them
    triton = None

_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Conv rows up to this many pixels (128 x 128: SDXL's largest GroupNorm rows at 1024 px) are read
# once, held in registers for the channel mean and the move; longer rows are read twice.
ONE_BLOCK_PIXELS = 16384
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
    def _gate_on_mean(a, b, mean, lo_ptr, hi_ptr, channel):
        """A conv map acts on a channel only while the channel's mean lies in its support range."""
        open_gate = ((mean >= tl.load(lo_ptr + channel)) & (mean <= tl.load(hi_ptr + channel))).to(tl.float32)
        return a * open_gate, b * open_gate

    @triton.jit
    def _conv_kernel(x_ptr, out_ptr, a_ptr, b_ptr, lo_ptr, hi_ptr, channels, pixels,
                     GATED: tl.constexpr, PIXEL: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
        # One program per (sample, channel) row of `pixels` contiguous elements. ONE_BLOCK: the row
        # fits one block, is read once and kept in registers for the mean and the move. Otherwise the
        # row is walked twice with `while`, not `range(0, pixels, BLOCK)`: Triton 3.6's interpreter
        # cannot take a runtime bound in range() (it fails converting the bound to an int).
        row = tl.program_id(0).to(tl.int64)
        channel = row % channels
        base = row * pixels
        a = tl.load(a_ptr + channel)
        b = tl.load(b_ptr + channel)
        lanes = tl.arange(0, BLOCK)
        if ONE_BLOCK:
            mask = lanes < pixels
            x = tl.load(x_ptr + base + lanes, mask=mask, other=0.0).to(tl.float32)
            if GATED or not PIXEL:
                mean = tl.sum(x, axis=0) / pixels
                if GATED:
                    a, b = _gate_on_mean(a, b, mean, lo_ptr, hi_ptr, channel)
            if PIXEL:
                y = x + (a * x + b)
            else:
                y = x + (a * mean + b)
            tl.store(out_ptr + base + lanes, y.to(out_ptr.dtype.element_ty), mask=mask)
        elif GATED or not PIXEL:
            total = tl.zeros([BLOCK], dtype=tl.float32)
            start = tl.full([], 0, tl.int32)
            while start < pixels:
                index = start + lanes
                total += tl.load(x_ptr + base + index, mask=index < pixels, other=0.0).to(tl.float32)
                start += BLOCK
            mean = tl.sum(total, axis=0) / pixels
            if GATED:
                a, b = _gate_on_mean(a, b, mean, lo_ptr, hi_ptr, channel)
            if not PIXEL:
                delta = a * mean + b
        if not ONE_BLOCK:
            start = tl.full([], 0, tl.int32)
            while start < pixels:
                index = start + lanes
                mask = index < pixels
                x = tl.load(x_ptr + base + index, mask=mask, other=0.0).to(tl.float32)
                if PIXEL:
                    y = x + (a * x + b)
                else:
                    y = x + delta
                tl.store(out_ptr + base + index, y.to(out_ptr.dtype.element_ty), mask=mask)
                start += BLOCK


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
        one_block = pixels <= ONE_BLOCK_PIXELS
        block = max(128, triton.next_power_of_2(pixels)) if one_block else 2048
        # 32 values per thread at most in one block (16 warps of 32 threads for 16384 pixels)
        warps = max(4, min(16, block // 1024)) if one_block else 4
        _conv_kernel[(rows,)](x, out, a, b, lo if gated else a, hi if gated else a, layer.dim, pixels,
                              GATED=gated, PIXEL=layer.form == "pixel", BLOCK=block, ONE_BLOCK=one_block,
                              num_warps=warps)
    return out


def _device_guard(x: torch.Tensor):
    """Triton launches on the current CUDA device and its current stream: make that x's device, so a
    model on cuda:1 is not computed on (or read from) cuda:0."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch_on_device(layer: LayerMap, x: torch.Tensor, params: tuple) -> torch.Tensor:
    with _device_guard(x):
        return _launch(layer, x, params)


def _fast_ok(x: torch.Tensor) -> bool:
    return (x.dtype in _FAST_DTYPES and x.is_contiguous() and x.numel() > 0
            and (x.is_cuda or (_INTERPRETING and x.device.type == "cpu")))


class FastPath:
    """Which kernel configurations failed in this process, so each switches to the PyTorch path once.

    A compile or launch failure is a property of the installation (Triton without a compiler, a
    driver too old for the card), so it is remembered for as long as that installation is loaded: the
    module keeps one instance, `PATH`, for the process; tests make their own. The first failure is
    logged as a warning, later ones (other dtypes or forms failing the same way) at debug level."""

    def __init__(self) -> None:
        self.failed: set[tuple] = set()
        self.warned = False

    def fail(self, config: tuple, error: Exception) -> None:
        self.failed.add(config)
        if self.warned:
            log.debug("ComfyUI-ACT: the Triton kernel also failed for %s: %r", config, error)
            return
        self.warned = True
        log.warning("ComfyUI-ACT: the Triton kernel failed (%s: %s) on %s; exact mode runs this layer "
                    "type in PyTorch from now on (same result, slower). Set COMFYUI_ACT_KERNELS=0 to "
                    "skip the kernel from the start.", type(error).__name__, str(error).splitlines()[0]
                    if str(error) else "", config[0])


PATH = FastPath()


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
    return _launch_on_device(layer, x, layer.params(x.device, strength))


def reference_transport(layer: LayerMap, strength: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> layer.apply(x, strength), the same bits, in fewer PyTorch kernels per call.

    LayerMap.apply casts fp16/bf16 to float32, computes, and casts back; here the casts happen inside
    the arithmetic kernels (PyTorch computes in the promoted float32 and rounds once on store, as the
    explicit cast does), the gate is clamp + equality instead of two comparisons and an and, and a
    gated pixel-form map scales its slope and offset per channel (small tensors) instead of the
    whole moved activation. Per layer and call, on a [B, D, H, W] or [..., D] activation:
        token ungated: 1 kernel (3 for fp16 in apply); gated: 4 (7)
        conv mean form: mean + a small multiply-add + 1 add (5 for fp16); gated: + 3 small ones
        conv pixel form: 2 (5 for fp16); gated: mean + 4 small + 2 (8);
        conv mean form without a shift (what runs of a map whose shift is folded into the norm's bias,
        `LayerMap.mean_shift_fold`): mean + 1 multiply-add, x + a m in one kernel. That one rounds
        a m + x once (a fused multiply-add where the CPU or GPU has one) where apply rounds a m first:
        equal to apply within one float rounding, not bit for bit.
    float64 activations keep float64 arithmetic, as in apply."""
    strength = check_strength(strength)
    if strength == 0.0:
        return lambda x: x
    conv, pixel = layer.kind == "conv", layer.form == "pixel"
    no_shift = not bool(layer.shift.any())  # the inverse's shift, -shift / scale, is zero with it
    settled: dict[tuple, tuple] = {}

    def parameters(x: torch.Tensor) -> tuple:
        key = (x.device, x.dtype)
        found = settled.get(key)
        if found is None:
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            a, b, lo, hi = (None if t is None else t.to(compute) for t in layer.params(x.device, strength))
            if conv and pixel:
                a, b = a[:, None, None], b[:, None, None]
            found = settled[key] = (compute, a, b, lo, hi)
        return found

    if conv and not pixel and no_shift and not layer.gated:
        return _no_shift_move(layer, strength)

    def move(x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:  # out= takes no part in autograd: apply's arithmetic is differentiable
            return layer.apply(x, strength)
        layer.check_shape(x)
        compute, a, b, lo, hi = parameters(x)
        if not conv:
            if lo is None:
                return torch.addcmul(b, a, x, out=torch.empty_like(x))
            # Rounding the moved values to x's dtype before choosing is what apply's choose-then-round
            # gives: the values kept are x's own, exact in either order.
            moved = torch.addcmul(b, a, x, out=torch.empty_like(x))
            inside = torch.clamp(x, lo, hi) == x  # lo <= x <= hi; false for NaN, as in apply
            return torch.where(inside, moved, x, out=moved)
        if lo is not None or not pixel:  # an ungated pixel-form map needs no channel mean
            mean = x.mean((-2, -1), dtype=compute)
        if lo is not None:
            inside = torch.clamp(mean, lo, hi) == mean
        if not pixel:
            delta = torch.addcmul(b, a, mean)
            if lo is not None:
                delta = delta * inside
            return torch.add(x, delta[..., None, None], out=torch.empty_like(x))
        if lo is not None:
            inside = inside[..., None, None]
            # gate * (a x + b) = (gate a) x + (gate b) for a gate of 0 or 1, NaN and inf included.
            a, b = a * inside, b * inside
        return torch.add(x, torch.addcmul(b, a, x), out=torch.empty_like(x))

    return move


def _no_shift_move(layer: LayerMap, strength: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """reference_transport of an ungated mean-form map without a shift: x + a m, the channel mean taken
    with its dimensions kept (no reshaping per call) and the slope settled as [D, 1, 1] once per
    device and dtype; for a float32 (float64) x the multiply-add writes its own result, for fp16/bf16
    it rounds into x's dtype on store. The fewest Python steps per call: this runs at every step."""
    settled: dict[tuple, tuple] = {}

    def move(x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            return layer.apply(x, strength)
        layer.check_shape(x)
        found = settled.get((x.device, x.dtype))
        if found is None:
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            slope = layer.params(x.device, strength)[0].to(compute)[:, None, None]
            found = settled[x.device, x.dtype] = (compute, slope, x.dtype == compute)
        compute, slope, own = found
        mean = x.mean((-2, -1), dtype=compute, keepdim=True)
        return torch.addcmul(x, slope, mean) if own else torch.addcmul(x, slope, mean, out=torch.empty_like(x))

    return move


def transport(layer: LayerMap, strength: float, fast: bool = True,
              path: FastPath | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function x -> x transported at `strength`, for a hook that runs at every step.

    Everything that does not depend on x is settled once: the strength is checked, and the map's
    parameters are moved to each device the first time it is seen (float32, contiguous). Per call
    there remains a shape check, one dictionary lookup and one kernel launch under x's device (or the
    PyTorch path where the kernel cannot run, has failed, or with fast=False)."""
    strength = check_strength(strength)
    if strength == 0.0:
        return lambda x: x
    reference = reference_transport(layer, strength)
    if not (fast and ENABLED and triton is not None):
        return reference
    path = PATH if path is None else path
    gated = layer.gated  # a property that computes: settled here, not per call
    on_device: dict[torch.device, tuple] = {}

    def run(x: torch.Tensor) -> torch.Tensor:
        if _fast_ok(x):
            config = (x.device, x.dtype, layer.kind, layer.form, gated)
            if config not in path.failed:
                params = on_device.get(x.device)
                if params is None:
                    params = on_device[x.device] = layer.params(x.device, strength)
                layer.check_shape(x)
                try:
                    return _launch_on_device(layer, x, params)
                except torch.OutOfMemoryError:
                    # A full card, not a broken kernel: ComfyUI's own handling (free models, retry or
                    # tell the user) takes it, and the kernel stays on for the next call.
                    raise
                except Exception as error:  # noqa: BLE001  (any compile/launch failure: Triton's types vary)
                    path.fail(config, error)
        return reference(x)

    return run
