"""Kernels and bytes of what PyTorch dispatches: the cost model bench/cost runs on the meta device.

Each aten operation that is neither a view nor an allocation counts as one kernel; its bytes are the
sizes of the tensors it reads (inputs, an in-place self) plus those it writes (new outputs, an in-place
self, out= arguments): DRAM traffic with no cache, what a memory-bound GPU kernel moves.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Allocations and metadata: no kernel runs, no byte moves.
FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "sym_size",
        "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_local_scalar_dense"}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class StepCounter(TorchDispatchMode):
    """Kernels and bytes of the aten operations dispatched while active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.kernels = 0
        self.read = 0
        self.written = 0
        self.by_name: Counter = Counter()
        self.large = 0  # kernels that touch at least 1 MiB: the ones whose bytes matter on a GPU
        self.rereads = 0  # bytes a modelled Triton launch reads a second time (likely from L2)

    def record(self, name: str, read: int, written: int) -> None:
        self.kernels += 1
        self.read += read
        self.written += written
        self.by_name[name] += 1
        self.large += read + written >= 2 ** 20

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func._schema.name.split("::")[-1] in FREE:
            return out
        read = written = 0
        schema_args = func._schema.arguments
        values = {a.name: (args[i] if i < len(args) else kwargs.get(a.name, a.default_value if a.has_default_value()
                                                                       else None))
                  for i, a in enumerate(schema_args) if not a.kwarg_only}
        values.update({a.name: kwargs.get(a.name) for a in schema_args if a.kwarg_only})
        for argument in schema_args:
            size = sum(nbytes(t) for t in _tensors(values.get(argument.name)))
            alias = argument.alias_info
            if alias is not None and alias.is_write:
                written += size
                read += 0 if argument.kwarg_only else size  # an in-place self is read and written; out= only written
            else:
                read += size
        for returned, value in zip(func._schema.returns, out if isinstance(out, (tuple, list)) else (out,)):
            if returned.alias_info is None:
                written += sum(nbytes(t) for t in _tensors(value))
        self.record(func._schema.name.split("::")[-1], read, written)
        return out

    def figures(self) -> dict:
        return {"kernels": self.kernels, "large_kernels": self.large, "bytes": self.read + self.written}


class FlashAttention(TorchFunctionMode):
    """F.scaled_dot_product_attention as the one fused kernel a CUDA card runs (modelled)."""

    def __init__(self, counter: StepCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
            reads = sum(nbytes(t) for t in (q, k, v)) + (nbytes(mask) if isinstance(mask, torch.Tensor) else 0)
            self.counter.record("flash_attention (modelled)", reads, nbytes(out))
            return out
        return func(*args, **kwargs)
