"""Gated token transport: move a token's activation only where it looks like the source concept.

Linear-AcT as fitted from prompt means moves every token alike, so a concept bound to one word (a
colour, one object) is either missed or every token is pushed. Here each token is a sample:

- From paired source/target prompts (same captions with and without the concept), encoded to
  [N, T, D] token activations, the tokens the concept changed are those where source and target
  differ at the same position (the concept's words and, in a causal text encoder, the ones after).
- The map: per neuron, the 1-D transport (Linear-AcT: affine fit on sorted pairs) from the changed
  source tokens to the target tokens at the same positions.
- The gate: the posterior that a token belongs to the changed source tokens rather than to the target
  prompts' tokens, from a diagonal Gaussian fitted to each; tokens of a prompt that never had the
  concept look like the target's, so they stay as they are.

    z' = z + lambda * gate(z) * ((scale - 1) z + shift)

lambda = 0 is the identity; the dial is the pack's strength. Pure PyTorch, no ComfyUI import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .estimators import fit_affine
from .maps import check_strength

__all__ = ["GatedTokenMap", "changed_tokens", "fit_gated_tokens", "FORMS"]

# How a gated token moves: "nearest" as the nearest changed source token was moved by its pair (best
# on the shapes model's object-bound tasks, bench/semantics); "linear" by one per-neuron affine map.
FORMS = ("nearest", "linear")
_VECTORS = ("scale", "shift", "source_mean", "source_var", "target_mean", "target_var")

# Tokens whose source and target activations differ by less than this, relative to their size, are
# the same token in both prompts (float32 noise from batching stays far below it).
_CHANGED_TOLERANCE = 1e-3
# Variance floor of the gate's Gaussians, relative to the mean variance over neurons.
_VARIANCE_FLOOR = 1e-3


@dataclass(eq=False)
class GatedTokenMap:
    """Per-neuron affine map [D] with a per-token gate from two diagonal Gaussians [D]."""

    scale: torch.Tensor
    shift: torch.Tensor
    source_mean: torch.Tensor
    source_var: torch.Tensor
    target_mean: torch.Tensor
    target_var: torch.Tensor
    log_prior: float  # log(changed source tokens / target tokens)
    # "nearest" form: each changed source token [K, D] and how its pair moved it [K, D]; a token then
    # moves as its nearest changed source token did (the pairing extended to new tokens), not affinely.
    anchors: torch.Tensor | None = None
    moves: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self.scale.shape[0]

    @property
    def form(self) -> str:
        return "linear" if self.anchors is None else "nearest"

    def tensors(self) -> dict[str, torch.Tensor]:
        """float32 1-D tensors for the maps file (anchors and moves flattened)."""
        out = {k: getattr(self, k).float().contiguous() for k in _VECTORS}
        if self.anchors is not None:
            out["anchors"] = self.anchors.float().reshape(-1).contiguous()
            out["moves"] = self.moves.float().reshape(-1).contiguous()
        return out

    def spec(self) -> dict:
        return {"dim": self.dim, "form": self.form, "log_prior": self.log_prior,
                "anchors": 0 if self.anchors is None else int(self.anchors.shape[0])}

    @classmethod
    def from_tensors(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "GatedTokenMap":
        """Inverse of tensors()/spec(); raises ValueError naming what does not fit."""
        dim, count = spec.get("dim"), spec.get("anchors", 0)
        if not isinstance(dim, int) or not isinstance(count, int) or spec.get("form") not in FORMS:
            raise ValueError(f"malformed conditioning map description {spec!r}")
        names = set(_VECTORS) | ({"anchors", "moves"} if spec["form"] == "nearest" else set())
        if set(tensors) != names:
            raise ValueError(f"conditioning map tensors {sorted(tensors)} do not match its description")
        if any(tensors[k].shape != (dim,) for k in _VECTORS) or (
                spec["form"] == "nearest" and any(tensors[k].shape != (count * dim,) for k in ("anchors", "moves"))):
            raise ValueError("conditioning map tensors have the wrong sizes")
        if not all(torch.isfinite(t).all() for t in tensors.values()) or (tensors["source_var"] <= 0).any() \
                or (tensors["target_var"] <= 0).any():
            raise ValueError("conditioning map has NaN, infinite or non-positive variance values")
        extra = (tensors["anchors"].reshape(count, dim), tensors["moves"].reshape(count, dim)) \
            if spec["form"] == "nearest" else (None, None)
        return cls(*(tensors[k] for k in _VECTORS), float(spec.get("log_prior", 0.0)), *extra)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """P(changed source token | x) for each token of x [..., D]: [...] in [0, 1]."""
        x = x.float()

        def loglik(mean, var):
            return -0.5 * (((x - mean) ** 2) / var + torch.log(var)).sum(-1)
        p = [t.to(x.device) for t in (self.source_mean, self.source_var, self.target_mean, self.target_var)]
        return torch.sigmoid(loglik(p[0], p[1]) - loglik(p[2], p[3]) + self.log_prior)

    def apply(self, x: torch.Tensor, strength: float) -> torch.Tensor:
        strength = check_strength(strength)
        if strength == 0.0:
            return x
        if x.shape[-1] != self.scale.shape[0]:
            raise ValueError(f"gated token map of {self.scale.shape[0]} neurons cannot act on {tuple(x.shape)}")
        z = x.float()
        if self.anchors is not None:
            flat = z.reshape(-1, z.shape[-1])
            nearest = torch.cdist(flat, self.anchors.to(z.device)).argmin(-1)
            move = self.moves.to(z.device)[nearest].reshape(z.shape)
            return (z + strength * self.gate(z)[..., None] * move).to(x.dtype)
        scale, shift = self.scale.to(z.device), self.shift.to(z.device)
        if strength < 0:  # the inverse map, gated where the image looks like the target
            scale, shift = 1.0 / scale, -shift / scale
        move = (scale - 1.0) * z + shift
        out = z + abs(strength) * self.gate(z)[..., None] * move
        return out.to(x.dtype)


def changed_tokens(source: torch.Tensor, target: torch.Tensor, tolerance: float = _CHANGED_TOLERANCE) -> torch.Tensor:
    """[N, T] bool: where the paired prompts' token activations differ (source/target [N, T, D])."""
    if source.shape != target.shape or source.ndim != 3:
        raise ValueError(f"paired token activations must share one shape [N, T, D], got "
                         f"{tuple(source.shape)} and {tuple(target.shape)}")
    gap = (source.float() - target.float()).norm(dim=-1)
    size = 0.5 * (source.float().norm(dim=-1) + target.float().norm(dim=-1))
    return gap > tolerance * size.clamp_min(1e-12)


def _gaussian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    var = x.var(0, unbiased=True) if x.shape[0] > 1 else torch.zeros_like(mean)
    return mean, var


def fit_gated_tokens(source: torch.Tensor, target: torch.Tensor, method: str = "linear") -> GatedTokenMap:
    """Fit from paired token activations source/target [N, T, D] (prompt i of each side is one pair).
    method: "linear" / "gaussian" / "mean" (per-neuron affine, as act_core.estimators) or "nearest"."""
    changed = changed_tokens(source, target)
    if int(changed.sum()) < 2:
        raise ValueError("the source and target prompts give the same tokens: nothing to learn (they must "
                         "differ by the concept)")
    s = source.float()[changed].double()
    t = target.float()[changed].double()
    fit = fit_affine(s, t, "mean" if method == "nearest" else method)
    rest = target.float().reshape(-1, target.shape[-1]).double()
    sm, sv = _gaussian(s)
    tm, tv = _gaussian(rest)
    floor = _VARIANCE_FLOOR * float(torch.cat([sv, tv]).mean())
    return GatedTokenMap(fit.scale.float(), fit.shift.float(), sm.float(), (sv + floor).float(), tm.float(),
                         (tv + floor).float(), math.log(s.shape[0] / rest.shape[0]),
                         *((s.float(), (t - s).float()) if method == "nearest" else (None, None)))
