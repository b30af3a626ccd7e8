"""The record a collection pass hands to fitting, shared by the ComfyUI nodes and the diffusers bridge."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Activations", "NonFiniteActivations"]


@dataclass
class Activations:
    """Pooled activations of the source and target prompts, per layer, in model order.

    source[layer]: [source prompts x noise levels, neurons] float32; target likewise. `collector` is the
    host's object that made them, kept so that incremental fitting can run the model again.
    """

    source: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    kinds: dict[str, str]
    family: str
    info: dict
    collector: Any = field(repr=False)

    @property
    def order(self) -> list[str]:
        return list(self.source)

    def summary(self) -> str:
        neurons = sum(t.shape[1] for t in self.source.values())
        text = sum(1 for n in self.source if not n.startswith("diffusion_model."))
        first = next(iter(self.source.values()), None)
        samples = (first.shape[0], next(iter(self.target.values())).shape[0]) if first is not None else (0, 0)
        return (f"{self.family}: {len(self.source)} layers ({text} text encoder, {len(self.source) - text} "
                f"diffusion model), {neurons} neurons; {samples[0]} source and {samples[1]} target samples")


class NonFiniteActivations(Exception):
    """A layer's pooled activations hold NaN or infinity; each host raises its own subclass (an error
    of its kind, with the fix in its words) and sets `layer`."""
    layer: str
