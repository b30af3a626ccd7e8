"""What act_core needs from torch modules, whichever host built them: a layer's output width, and
forward hooks that never outlive a with-block."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch

__all__ = ["Hook", "hooks_installed", "output_dim"]

Hook = Callable[[torch.nn.Module, tuple, object], object]


@contextlib.contextmanager
def hooks_installed(hooks: Iterable[tuple[torch.nn.Module, Hook]]):
    """Register forward hooks for the duration of a with-block; always removes them.

    Prepended, so that when hooks are nested the inner (earlier installed) ones run first."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def output_dim(module: torch.nn.Module) -> int | None:
    """The width of a module's output features when its type tells it, else None."""
    if isinstance(module, torch.nn.GroupNorm):
        return module.num_channels
    if isinstance(module, torch.nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, torch.nn.Linear):
        return module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.out_channels
    if type(module).__name__.endswith("Norm") and isinstance(getattr(module, "weight", None), torch.Tensor) \
            and module.weight.ndim == 1:
        return module.weight.shape[0]  # RMS-style norms of other classes (T5LayerNorm, RMSNorm): a scale per feature
    return None
