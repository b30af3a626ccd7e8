"""Per-neuron transport estimators: from pooled source/target samples to affine maps.

Every estimator returns, per neuron d, an affine map T_d(z) = scale_d * z + shift_d that moves the
source distribution of that neuron onto the target one. All sums run in float64.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "METHODS",
    "SUPPORTS",
    "AffineFit",
    "quantile_pairing",
    "sorted_pairs",
    "fit_affine",
    "support_bounds",
    "wasserstein1",
]

METHODS = ("linear", "gaussian", "mean")

# Source-quantile ranges, in percent, in which the map acts ("all" = no gating). Linear-AcT's
# default is the full source range, q_0_100.
SUPPORTS: dict[str, tuple[float, float] | None] = {
    "all": None,
    "q_0_100": (0.0, 100.0),
    "q_0.5_99.5": (0.5, 99.5),
    "q_1_99": (1.0, 99.0),
    "q_2_98": (2.0, 98.0),
    "q_5_95": (5.0, 95.0),
    "q_10_90": (10.0, 90.0),
    "q_20_80": (20.0, 80.0),
    "q_30_70": (30.0, 70.0),
    "q_40_60": (40.0, 60.0),
}

# A neuron whose source spread is below this, relative to its magnitude, carries no information a
# slope could be fitted from (float32 activations hold about 7 significant digits).
_RELATIVE_SPREAD_FLOOR = 1e-6
# The reference leaves neurons alone in the Gaussian map when a standard deviation is below this.
_GAUSSIAN_STD_FLOOR = 1e-4


class AffineFit(NamedTuple):
    """Per-neuron affine map T(z) = scale * z + shift, each [D], float64.

    degenerate: bool [D], neurons left as the identity because the source gave no spread to fit.
    """

    scale: torch.Tensor
    shift: torch.Tensor
    degenerate: torch.Tensor


def quantile_pairing(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair the quantile functions of an n-sample and an m-sample measure at merged levels.

    The 1-D optimal coupling of two uniform empirical measures couples equal quantile levels. The
    source quantile function is constant on ((i-1)/n, i/n], the target one on ((j-1)/m, j/m]; over
    the union of those breakpoints both are constant, so each interval becomes one pair (i, j)
    carrying the interval's length as mass. With n == m this is the identity pairing with mass 1/n.

    Integer arithmetic on the common denominator n*m keeps the levels exact.

    Returns (source_rank [K], target_rank [K], mass [K] float64), ranks 0-based, K <= n + m - 1.
    """
    if n < 1 or m < 1:
        raise ValueError(f"quantile pairing needs at least one sample on each side, got {n} and {m}")
    levels = torch.unique(torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]))
    previous = torch.cat([torch.zeros(1, dtype=levels.dtype), levels[:-1]])
    source_rank = torch.div(levels + m - 1, m, rounding_mode="floor") - 1  # ceil(level / m) - 1
    target_rank = torch.div(levels + n - 1, n, rounding_mode="floor") - 1
    mass = (levels - previous).to(torch.float64) / float(n * m)
    return source_rank, target_rank, mass


def sorted_pairs(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimal 1-D coupling of every neuron: source [N, D], target [M, D] ->
    (paired source values [K, D], paired target values [K, D], mass [K]), float64."""
    a = torch.sort(source.to(torch.float64), dim=0).values
    b = torch.sort(target.to(torch.float64), dim=0).values
    ia, ib, mass = quantile_pairing(a.shape[0], b.shape[0])
    if a.shape[0] == b.shape[0]:
        return a, b, mass
    return a[ia], b[ib], mass


def _check_samples(source: torch.Tensor, target: torch.Tensor) -> None:
    if source.ndim != 2 or target.ndim != 2:
        raise ValueError(f"samples must be [prompts, neurons], got {tuple(source.shape)} and {tuple(target.shape)}")
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"source has {source.shape[1]} neurons but target has {target.shape[1]}")
    if source.shape[0] < 2 or target.shape[0] < 2:
        raise ValueError("at least two samples per side are needed to fit a map")
    for name, x in (("source", source), ("target", target)):
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).any(dim=0).nonzero().flatten()[:5].tolist()
            raise ValueError(f"{name} samples hold NaN or infinite values (neurons {bad}...)")


def fit_affine(source: torch.Tensor, target: torch.Tensor, method: str = "linear") -> AffineFit:
    """Fit per-neuron affine transport maps from source [N, D] to target [M, D].

    linear   (Linear-AcT): least squares on the optimal 1-D coupling,
             scale = sum p (a - mean_a)(b - mean_b) / sum p (a - mean_a)^2,
             shift = mean_b - scale * mean_a, with p the pair masses of `quantile_pairing`.
             Both sides are sorted, so scale >= 0.
    gaussian scale = std_b / std_a, shift = mean_b - scale * mean_a (population moments).
    mean     scale = 1, shift = mean_b - mean_a (a steering vector).

    Neurons whose source spread is too small to fit a slope keep the identity (linear, gaussian).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    _check_samples(source, target)
    dims = source.shape[1]
    if method == "mean":
        shift = target.to(torch.float64).mean(0) - source.to(torch.float64).mean(0)
        return AffineFit(torch.ones(dims, dtype=torch.float64), shift, torch.zeros(dims, dtype=torch.bool))

    if method == "linear":
        a, b, mass = sorted_pairs(source, target)
        p = mass[:, None]
        mean_a = (p * a).sum(0)
        mean_b = (p * b).sum(0)
        da = a - mean_a
        var_a = (p * da * da).sum(0)
        cov = (p * da * (b - mean_b)).sum(0)
        spread = var_a.sqrt()
        magnitude = a.abs().amax(0)
        degenerate = spread <= _RELATIVE_SPREAD_FLOOR * (1.0 + magnitude)
        scale = cov / torch.where(degenerate, torch.ones_like(var_a), var_a)
    else:
        a = source.to(torch.float64)
        b = target.to(torch.float64)
        mean_a, mean_b = a.mean(0), b.mean(0)
        std_a, std_b = a.std(0, correction=0), b.std(0, correction=0)
        degenerate = (std_a < _GAUSSIAN_STD_FLOOR) | (std_b < _GAUSSIAN_STD_FLOOR)
        scale = std_b / torch.where(degenerate, torch.ones_like(std_a), std_a)

    shift = mean_b - scale * mean_a
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    shift = torch.where(degenerate, torch.zeros_like(shift), shift)
    return AffineFit(scale, shift, degenerate)


def support_bounds(source: torch.Tensor, support: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron interval [lo, hi] of source quantiles where the map acts; bounds are inclusive.

    Inclusive so that every source sample the map was fitted on lies inside the full range q_0_100
    (the reference excludes the minimum and maximum themselves). "all" gives (-inf, +inf).
    Quantiles interpolate linearly between order statistics. Returns two float64 [D] tensors.
    """
    if support not in SUPPORTS:
        raise ValueError(f"unknown support {support!r}; choose one of {', '.join(SUPPORTS)}")
    dims = source.shape[1]
    bounds = SUPPORTS[support]
    if bounds is None:
        return (torch.full((dims,), -math.inf, dtype=torch.float64),
                torch.full((dims,), math.inf, dtype=torch.float64))
    levels = torch.tensor([bounds[0] / 100.0, bounds[1] / 100.0], dtype=torch.float64)
    q = torch.quantile(source.to(torch.float64), levels, dim=0)
    return q[0], q[1]


def wasserstein1(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-neuron Wasserstein-1 distance between samples [N, D] and [M, D] -> [D] float64.

    W1 = sum_k p_k |a_k - b_k| over the optimal 1-D coupling of `sorted_pairs`.
    """
    a, b, mass = sorted_pairs(source, target)
    return (mass[:, None] * (a - b).abs()).sum(0)
