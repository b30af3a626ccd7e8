"""Transport maps for one layer and for a whole model, and how they act on activations.

Strength semantics (lambda, any finite real number):
    lambda = 0      the identity, bit for bit (the input tensor itself is returned);
    lambda in (0,1] z' = (1 - lambda) z + lambda T(z) = z + lambda ((scale - 1) z + shift);
    lambda > 1      extrapolates along the same line;
    lambda < 0      the inverse map T^-1(z) = (z - shift) / scale with strength |lambda|
                    ("take the learned change away").
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from .estimators import fit_affine, support_bounds

__all__ = ["LayerMap", "TransportMaps", "fit_layer", "default_support", "check_strength", "layer_movement",
           "LayerKind", "ConvForm", "CONV_FORMS", "DEFAULT_SUPPORTS"]

LayerKind = Literal["token", "conv"]
KINDS = ("token", "conv")
# How a map acts on a conv output [B, D, H, W] (the reference's choice per method):
#   "mean":  only the channel's spatial mean moves, the spatial detail is kept (Linear-AcT);
#   "pixel": every pixel is mapped, gated on the channel's spatial mean (Gaussian, mean-shift).
ConvForm = Literal["mean", "pixel"]
CONV_FORMS = ("mean", "pixel")
FORM_OF_METHOD: dict[str, ConvForm] = {"linear": "mean", "gaussian": "pixel", "mean": "pixel"}
# The reference's default support per method: Linear-AcT gates on the full source range, the
# Gaussian and mean-shift configurations move everything.
# Every method moves every value by default. The reference gates Linear-AcT to the source range
# (q_0_100), but that range comes from token means while the gate acts per token, and most tokens fall
# outside it: on the trained shapes model (bench/semantics, 64 held-out prompts) q_0_100 put a striped
# background in 19% of pictures at strength 1 and "all" in 100%, keeping more of the prompt (95% vs 88%).
DEFAULT_SUPPORTS = {"linear": "all", "gaussian": "all", "mean": "all"}
# Below this |scale| the affine map squeezes a neuron to (almost) a point and has no usable inverse.
_INVERTIBLE_SCALE_FLOOR = 1e-6
# A mean-form map folds its shift into the norm's bias divided by the mean's scale (1 + slope); below
# this |1 + slope| the folded shift would outgrow the map's own (see LayerMap.mean_shift_fold).
_MEAN_FOLD_FLOOR = 0.25


def check_strength(strength: float) -> float:
    strength = float(strength)
    if not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number, got {strength}")
    return strength


@dataclass(eq=False)
class LayerMap:
    """The per-neuron affine transport of one layer's output.

    scale, shift: [D] float32, T(z) = scale * z + shift.
    lo, hi:       [D] float32, inclusive support: the map acts where lo <= z <= hi
                  (-inf/+inf: everywhere).
    kind:         "token" for outputs shaped [..., D] (each element is mapped and gated on its own);
                  "conv" for outputs shaped [B, D, H, W], gated on each channel's spatial mean m.
    form:         for conv maps, what moves when the gate is open:
                  "mean"  out' = out + lambda ((scale - 1) m + shift): the mean moves, detail is kept;
                  "pixel" out' = out + lambda ((scale - 1) out + shift): every pixel is mapped.
                  Token maps ignore it.
    degenerate:   how many neurons were left as the identity when fitting.
    """

    scale: torch.Tensor
    shift: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    kind: LayerKind = "token"
    degenerate: int = 0
    form: ConvForm = "mean"
    _device_cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; expected one of {KINDS}")
        if self.form not in CONV_FORMS:
            raise ValueError(f"unknown conv form {self.form!r}; expected one of {CONV_FORMS}")
        dims = {tuple(t.shape) for t in (self.scale, self.shift, self.lo, self.hi)}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            raise ValueError(f"scale, shift, lo and hi must share one shape [D], got {sorted(dims)}")
        self.scale, self.shift, self.lo, self.hi = (
            t.detach().to(torch.float32).contiguous() for t in (self.scale, self.shift, self.lo, self.hi))

    @property
    def dim(self) -> int:
        return self.scale.shape[0]

    @property
    def gated(self) -> bool:
        """Whether any neuron has a finite support bound (the map cannot fold into weights then)."""
        return bool(torch.isfinite(self.lo).any() or torch.isfinite(self.hi).any())

    def inverse(self) -> "LayerMap":
        """T^-1(z) = (z - shift) / scale, acting on the image of the support under T.

        Neurons that T squeezes to a point (|scale| < 1e-6) have no inverse and stay unmoved.
        """
        invertible = self.scale.abs() >= _INVERTIBLE_SCALE_FLOOR
        safe_scale = torch.where(invertible, self.scale, torch.ones_like(self.scale))
        scale = torch.where(invertible, 1.0 / safe_scale, torch.ones_like(self.scale))
        shift = torch.where(invertible, -self.shift / safe_scale, torch.zeros_like(self.shift))
        with torch.no_grad():
            ends = torch.stack([self.scale * self.lo + self.shift, self.scale * self.hi + self.shift])
        # An infinite bound times scale stays infinite (scale is nonzero where invertible). The image
        # is widened by float32 rounding so that T(lo) and T(hi), as computed, still map back.
        slack = torch.where(torch.isfinite(ends), 1e-6 * (ends.abs() + 1.0), torch.zeros_like(ends))
        lo = torch.where(invertible, (ends - slack).amin(0), torch.full_like(self.lo, -math.inf))
        hi = torch.where(invertible, (ends + slack).amax(0), torch.full_like(self.hi, math.inf))
        lo = torch.where(torch.isnan(lo), torch.full_like(lo, -math.inf), lo)
        hi = torch.where(torch.isnan(hi), torch.full_like(hi, math.inf), hi)
        return LayerMap(scale, shift, lo, hi, self.kind, self.degenerate, self.form)

    @property
    def maps_every_element(self) -> bool:
        """Whether the map acts on each element on its own (token maps, and conv maps of the pixel
        form), so that, ungated, it folds exactly into the weights of the layer producing it."""
        return self.kind == "token" or self.form == "pixel"

    def mean_shift_fold(self, strength: float, dtype: torch.dtype = torch.float32
                        ) -> tuple[torch.Tensor, "LayerMap"] | None:
        """For an ungated conv map of the mean form: (c, rest) such that adding c [D] to the output of
        the layer (to a norm's bias) and then running `rest` at strength 1 is this map at `strength`.

        With a, b the map's slope and offset at this strength (`params`) and m the channel's spatial
        mean of the output y, the map gives y' = y + a m + b. Folding c = b / (1 + a) gives
        y_f = y + c, whose mean is m + c, and y_f + a mean(y_f) = y + a m + (1 + a) c = y': exactly the
        map, with only the mean's slope left to run (rest: slope a, no shift). None where this does
        not hold or costs precision: other kinds and forms, a support range, a channel with
        |1 + a| < 1/4 (c would grow beyond 4 |b|, and the folded bias carry the rounding of that), or
        a layer whose bias or output is rounded to fp16/bf16 (`dtype`: the less precise of the two).
        There the folded bias and the norm's output y + c are each rounded in that dtype, where per
        step only the map's result is: measured against float64 the fold was worse at every |1 + a|
        from 0.26 to 2 (fp16, shift 8: 0.022 against 0.005 at 0.26, 0.0095 against 0.0051 at 2), and
        on a GPU the per-step kernel moves the mean with or without the shift at the same cost."""
        strength = check_strength(strength)
        if strength == 0.0 or self.kind != "conv" or self.form != "mean":
            return None
        if dtype not in (torch.float32, torch.float64):
            return None
        source = self.inverse() if strength < 0 else self
        if source.gated:
            return None
        lam = abs(strength)
        slope = lam * (source.scale - 1.0)
        rest_scale = 1.0 + slope
        # rest runs with slope rest_scale - 1 (as float32 computes it): c is divided by that slope plus 1
        kept = (rest_scale - 1.0).double() + 1.0
        if bool((kept.abs() < _MEAN_FOLD_FLOOR).any()):
            return None
        shift = ((lam * source.shift).double() / kept).to(torch.float32)
        inf = torch.full_like(self.lo, math.inf)
        return shift, LayerMap(rest_scale, torch.zeros_like(self.shift), -inf, inf, "conv", self.degenerate, "mean")

    def params(self, device: torch.device, strength: float) -> tuple:
        """(a, b, lo, hi), float32 on `device`: the map at this strength, with the inverse taken for
        lambda < 0. Token maps: z' = a z + b with a = 1 + |lambda| (scale - 1), b = |lambda| shift.
        Conv maps keep the slope a = |lambda| (scale - 1) instead: the moved quantity (mean or pixel)
        changes by a v + b. lo/hi are None when ungated.
        Kept in float32 whatever the activations' dtype: the arithmetic runs in float32, and
        fp16/bf16 bounds would round the support. Cached per device and strength: a node applies
        one strength at every step, so after the first call nothing is computed or copied."""
        key = (torch.device(device), strength)
        cached = self._device_cache.get(key)
        if cached is None:
            source = self.inverse() if strength < 0 else self
            lam = abs(strength)
            gated = source.gated
            slope = lam * (source.scale - 1.0)
            cached = (
                (slope if self.kind == "conv" else 1.0 + slope).to(device).contiguous(),
                (lam * source.shift).to(device).contiguous(),
                source.lo.to(device).contiguous() if gated else None,
                source.hi.to(device).contiguous() if gated else None,
            )
            if len(self._device_cache) > 16:  # a sweep over many strengths must not grow it forever
                self._device_cache.clear()
            self._device_cache[key] = cached
        return cached

    def check_shape(self, x: torch.Tensor) -> None:
        if self.kind == "conv":
            if x.ndim < 3 or x.shape[-3] != self.dim:
                raise ValueError(f"conv map of {self.dim} channels cannot act on a tensor shaped {tuple(x.shape)}")
        elif x.shape[-1] != self.dim:
            raise ValueError(f"token map of {self.dim} neurons cannot act on a tensor shaped {tuple(x.shape)}")

    def apply(self, x: torch.Tensor, strength: float) -> torch.Tensor:
        """Transport activations x with the given strength; returns x's dtype and device.

        token: x [..., D]; conv: x [B, D, H, W] (or [D, H, W]). Computes in float32 at least, on
        x's device. This is the reference every faster path (act_core.kernels) is checked against.
        """
        strength = check_strength(strength)
        if strength == 0.0:
            return x
        self.check_shape(x)
        compute = x if x.dtype in (torch.float32, torch.float64) else x.float()
        a, b, lo, hi = (None if t is None else t.to(compute.dtype) for t in self.params(x.device, strength))
        if self.kind == "conv":
            mean = compute.mean(dim=(-2, -1))
            if self.form == "mean":
                # Only the channel mean m moves, to m + a m + b; the spatial detail x - m is kept.
                delta = torch.addcmul(b, a, mean)
                if lo is not None:
                    delta = delta * ((mean >= lo) & (mean <= hi))
                out = compute + delta[..., None, None]
            else:
                # Every pixel moves by a x + b, where the channel's mean lies in the support.
                delta = torch.addcmul(b[:, None, None], a[:, None, None], compute)
                if lo is not None:
                    delta = delta * ((mean >= lo) & (mean <= hi))[..., None, None]
                out = compute + delta
        else:
            out = torch.addcmul(b, a, compute)
            if lo is not None:
                out = torch.where((compute >= lo) & (compute <= hi), out, compute)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias differences that make a layer's affine output the transported one.

        For a norm (out = weight * n + bias, weight [D]) or a linear/conv layer (out = weight @ x + bias,
        weight [D, ...]), mapping every element of out with out + lambda ((scale - 1) out + shift)
        equals the same layer with
            weight' = weight + lambda * (scale - 1) * weight      (row d scaled by scale_d - 1)
            bias'   = bias   + lambda * ((scale - 1) * bias + shift),
        so the returned differences (for lambda = 1) scale linearly with the strength. The support is
        ignored (every element is moved). That is exact for ungated token maps and ungated conv maps
        of the pixel form; for conv maps of the mean form every pixel is scaled rather than only the
        channel mean moved.

        Computed in float32 on the weight's device (whatever the weight's dtype: fp8-stored weights
        included); the differences come back there, in float32.
        """
        if weight.ndim < 1 or weight.shape[0] != self.dim:
            raise ValueError(f"weight shaped {tuple(weight.shape)} does not match a map of {self.dim} neurons")
        w = weight.detach().to(torch.float32)
        b = (torch.zeros(self.dim, device=w.device) if bias is None
             else bias.detach().to(device=w.device, dtype=torch.float32))
        slope = (self.scale - 1.0).to(w.device)
        return w * slope.view(-1, *([1] * (w.ndim - 1))), b * slope + self.shift.to(w.device)


def default_support(method: str) -> str:
    """The support a method uses unless told: "all" (see DEFAULT_SUPPORTS for the evidence)."""
    if method not in DEFAULT_SUPPORTS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(DEFAULT_SUPPORTS)}")
    return DEFAULT_SUPPORTS[method]


def fit_layer(source: torch.Tensor, target: torch.Tensor, method: str = "linear",
              support: str | None = None, kind: LayerKind = "token") -> LayerMap:
    """Fit the transport map of one layer from pooled activations source [N, D] and target [M, D].

    method: "linear" (Linear-AcT), "gaussian" (mean + std) or "mean" (shift only); it also picks
            the conv form, as the reference: "mean" for linear, "pixel" for gaussian and mean;
    support: a key of `act_core.SUPPORTS`, the source-quantile range in which the map acts;
             None = the method's default (`default_support`).
    """
    fit = fit_affine(source, target, method)
    lo, hi = support_bounds(source, default_support(method) if support is None else support)
    return LayerMap(fit.scale, fit.shift, lo, hi, kind, int(fit.degenerate.sum()), FORM_OF_METHOD[method])


class TransportMaps(Mapping):
    """Layer name -> LayerMap, with metadata about how the maps were made.

    Layer names are module paths as ComfyUI knows them: "diffusion_model.<module>" for the UNet
    (relative to the MODEL's BaseModel) and "clip_l.<module>", "clip_g.<module>", "clip_h.<module>"
    for the text encoders (relative to the CLIP's cond_stage_model).

    info holds JSON-serialisable metadata, by convention:
        family (str), method, support, estimation ("incremental" / "at_once"),
        source_prompts, target_prompts (counts), prompts_sha256.
    """

    def __init__(self, layers: Mapping[str, LayerMap] | None = None, info: dict | None = None,
                 conditioning=None):
        self.layers: dict[str, LayerMap] = dict(layers or {})
        self.info: dict = dict(info or {})
        # Optional act_core.token_transport.GatedTokenMap on the text encoders' final conditioning (the
        # "the concept's words" choice of Fit Transport Maps); None for the paper's per-layer maps.
        self.conditioning = conditioning

    def __getitem__(self, name: str) -> LayerMap:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def family(self) -> str | None:
        return self.info.get("family")

    def neurons(self) -> int:
        return sum(m.dim for m in self.layers.values())

    def __repr__(self) -> str:
        return (f"TransportMaps({len(self)} layers, {self.neurons()} neurons, family={self.family!r}, "
                f"method={self.info.get('method')!r}"
                + (f", conditioning map of {self.conditioning.dim}" if self.conditioning is not None else "") + ")")


def layer_movement(layer: LayerMap) -> float:
    """How far a layer moves activations at strength 1, as one number for charts.

    Where the support is finite: the mean over neurons of |T(c) - c| / (hi - lo) at the support's
    centre c, i.e. the displacement in units of the source range. Without a support: the mean of
    |scale - 1| + |shift|, in activation units.
    """
    finite = torch.isfinite(layer.lo) & torch.isfinite(layer.hi) & (layer.hi > layer.lo)
    centre = torch.where(finite, (layer.lo + layer.hi) / 2, torch.zeros_like(layer.lo))
    width = torch.where(finite, layer.hi - layer.lo, torch.ones_like(layer.lo))
    displacement = ((layer.scale - 1.0) * centre + layer.shift).abs() / width
    unbounded = (layer.scale - 1.0).abs() + layer.shift.abs()
    return float(torch.where(finite, displacement, unbounded).mean())
