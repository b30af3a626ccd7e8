"""Object patches that wrap what an earlier patch, or the class itself, put there."""
from __future__ import annotations

import torch


def original_or_patched(patcher, key: str, owner: torch.nn.Module, attribute: str):
    """The callable an object patch on `key` must wrap: an earlier object patch on this clone, else the
    class's own method (never the instance attribute, which another loaded clone may have patched)."""
    earlier = patcher.object_patches.get(key)
    if earlier is not None:
        return earlier
    return getattr(type(owner), attribute).__get__(owner)
