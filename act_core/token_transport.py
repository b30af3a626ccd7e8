"""Gated token transport: move a token's activation only where it looks like the source concept.

Linear-AcT as fitted from prompt means moves every token alike, so a concept bound to one word (a
colour, one object) is either missed or every token is pushed. Here each token is a sample:

- From paired source/target prompts (same captions with and without the concept), encoded to
  [N, T, D] token activations, the tokens the concept changed are those where source and target
  differ at the same position (the concept's words and, in a causal text encoder, the ones after).
- The map: per neuron, the 1-D transport (Linear-AcT: affine fit on sorted pairs) from the changed
  source tokens to the target tokens at the same positions.
- The gate: whether a token looks like the changed source tokens rather than like the target prompts'
  tokens. The "nearest" gate (what Fit Transport Maps fits): the token's nearest neighbour among the
  changed source tokens and every target token is a source token. The "gaussian" gate (maps files of
  format version 3): the posterior from a diagonal Gaussian fitted to each side. Tokens of a prompt
  that never had the concept look like the target's, so they stay as they are.

  Why the nearest gate: in a causal text encoder the concept changes every later token a little (the
  padding by about 5%), so nearly all of a prompt's tokens count as changed and the two Gaussians
  overlap: the Gaussian gate opens halfway on most tokens of any prompt. The nearest neighbour tells
  the contexts apart (on the shapes model's tuning prompts: red left 22% -> 0%, a small object made
  large 31% -> 94%; bench/semantics).

    z' = z + lambda * gate(z) * ((scale - 1) z + shift)

lambda = 0 is the identity; the dial is the pack's strength. Pure PyTorch, no ComfyUI import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .estimators import fit_affine
from .maps import check_strength

__all__ = ["GatedTokenMap", "changed_tokens", "fit_gated_tokens", "FORMS", "GATES"]

# How a gated token moves: "nearest" as the nearest changed source token was moved by its pair (best
# on the shapes model's object-bound tasks, bench/semantics); "linear" by one per-neuron affine map.
FORMS = ("nearest", "linear")
# Which tokens the map moves (see the module docstring); "nearest" needs the "nearest" form's anchors.
GATES = ("nearest", "gaussian")
_VECTORS = ("scale", "shift", "source_mean", "source_var", "target_mean", "target_var")

# Tokens whose source and target activations differ by less than this, relative to their size, are
# the same token in both prompts (float32 noise from batching stays far below it).
_CHANGED_TOLERANCE = 1e-3
# Variance floor of the gate's Gaussians, relative to the mean variance over neurons.
_VARIANCE_FLOOR = 1e-3
# Tokens per distance computation: a batch of long prompts against thousands of stored tokens stays small.
_CHUNK = 1024


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
    # "nearest" gate: every target token [M, D]; a token moves where its nearest neighbour among the
    # anchors and these is an anchor. None: the Gaussian gate (maps files of format version 3).
    targets: torch.Tensor | None = None

    def __post_init__(self):
        if self.targets is not None and self.anchors is None:
            raise ValueError("the nearest gate needs the nearest form's anchors")

    @property
    def dim(self) -> int:
        return self.scale.shape[0]

    @property
    def form(self) -> str:
        return "linear" if self.anchors is None else "nearest"

    @property
    def gate_kind(self) -> str:
        return "gaussian" if self.targets is None else "nearest"

    def tensors(self) -> dict[str, torch.Tensor]:
        """float32 1-D tensors for the maps file (anchors and moves flattened)."""
        out = {k: getattr(self, k).float().contiguous() for k in _VECTORS}
        if self.anchors is not None:
            out["anchors"] = self.anchors.float().reshape(-1).contiguous()
            out["moves"] = self.moves.float().reshape(-1).contiguous()
        if self.targets is not None:
            out["targets"] = self.targets.float().reshape(-1).contiguous()
        return out

    def spec(self) -> dict:
        out = {"dim": self.dim, "form": self.form, "log_prior": self.log_prior,
               "anchors": 0 if self.anchors is None else int(self.anchors.shape[0])}
        if self.targets is not None:  # absent: the Gaussian gate, as version 3 files describe it
            out.update(gate="nearest", targets=int(self.targets.shape[0]))
        return out

    @classmethod
    def from_tensors(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "GatedTokenMap":
        """Inverse of tensors()/spec(); raises ValueError naming what does not fit."""
        dim, count = spec.get("dim"), spec.get("anchors", 0)
        gate, targets = spec.get("gate", "gaussian"), spec.get("targets", 0)
        if not isinstance(dim, int) or not isinstance(count, int) or spec.get("form") not in FORMS \
                or gate not in GATES or not isinstance(targets, int) or (gate == "nearest") != (targets > 0) \
                or (gate == "nearest" and spec["form"] != "nearest"):
            raise ValueError(f"malformed conditioning map description {spec!r}")
        names = set(_VECTORS) | ({"anchors", "moves"} if spec["form"] == "nearest" else set()) \
            | ({"targets"} if gate == "nearest" else set())
        if set(tensors) != names:
            raise ValueError(f"conditioning map tensors {sorted(tensors)} do not match its description")
        if any(tensors[k].shape != (dim,) for k in _VECTORS) or (
                spec["form"] == "nearest" and any(tensors[k].shape != (count * dim,) for k in ("anchors", "moves"))) \
                or (gate == "nearest" and tensors["targets"].shape != (targets * dim,)):
            raise ValueError("conditioning map tensors have the wrong sizes")
        if not all(torch.isfinite(t).all() for t in tensors.values()) or (tensors["source_var"] <= 0).any() \
                or (tensors["target_var"] <= 0).any():
            raise ValueError("conditioning map has NaN, infinite or non-positive variance values")
        extra = (tensors["anchors"].reshape(count, dim), tensors["moves"].reshape(count, dim)) \
            if spec["form"] == "nearest" else (None, None)
        near = tensors["targets"].reshape(targets, dim) if gate == "nearest" else None
        return cls(*(tensors[k] for k in _VECTORS), float(spec.get("log_prior", 0.0)), *extra, near)

    def _nearest(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For tokens [R, D]: (index of the nearest anchor [R], whether it is nearer than every target [R])."""
        anchors = self.anchors.to(flat.device)
        targets = None if self.targets is None else self.targets.to(flat.device)
        index, nearer = [], []
        for rows in flat.split(_CHUNK):
            to_anchor = torch.cdist(rows, anchors).min(-1)
            index.append(to_anchor.indices)
            if targets is not None:
                nearer.append(to_anchor.values < torch.cdist(rows, targets).min(-1).values)
        return torch.cat(index), (torch.cat(nearer) if nearer else None)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Whether (nearest gate: 0 or 1) or how likely (Gaussian gate: P(changed source token | x)) each
        token of x [..., D] is the concept's: [...] in [0, 1]."""
        x = x.float()
        if self.targets is not None:
            return self._nearest(x.reshape(-1, x.shape[-1]))[1].float().reshape(x.shape[:-1])

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
            nearest, nearer = self._nearest(z.reshape(-1, z.shape[-1]))
            move = self.moves.to(z.device)[nearest].reshape(z.shape)
            gate = self.gate(z) if nearer is None else nearer.float().reshape(z.shape[:-1])
            return (z + strength * gate[..., None] * move).to(x.dtype)
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


def fit_gated_tokens(source: torch.Tensor, target: torch.Tensor, method: str = "linear",
                     gate: str | None = None) -> GatedTokenMap:
    """Fit from paired token activations source/target [N, T, D] (prompt i of each side is one pair).
    method: "linear" / "gaussian" / "mean" (per-neuron affine, as act_core.estimators) or "nearest".
    gate: "nearest" (the default for the nearest form) or "gaussian" (the default for the others)."""
    gate = gate or ("nearest" if method == "nearest" else "gaussian")
    if gate not in GATES or (gate == "nearest" and method != "nearest"):
        raise ValueError(f"gate {gate!r} is not one of {GATES} for method {method!r} (the nearest gate needs "
                         "the nearest form)")
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
                         *((s.float(), (t - s).float()) if method == "nearest" else (None, None)),
                         rest.float() if gate == "nearest" else None)
