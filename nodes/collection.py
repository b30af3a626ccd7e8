"""Collect pooled activations from a loaded ComfyUI model, and fit maps incrementally.

Every pass goes through ComfyUI's own code: prompts are encoded by the CLIP's encode_from_tokens
(all prompts of a batch as chunks of one call, one transformer batch), and the diffusion model is
called once through a CFGGuider at cfg 1 (so only the conditional branch runs), with the model's
other patches (LoRAs, other packs) loaded as for sampling. Only pooled activations are kept:
[samples, neurons] per layer, never feature maps.

Schedules for incremental estimation, where the map of layer l is fitted from activations recorded
with the maps of all earlier layers applied:
  * one pass, fitting inside the hooks, when every sample fits in one batch: a layer's hook sees
    the whole prompt set, fits the map there, transports its own output and hands it on, so later
    layers see exactly what a pass with all earlier maps applied would show them;
  * block by block otherwise (bounded memory): for each block of layers (a UNet input/output block,
    a text-encoder layer), one sweep over the batches truncated after that block, with the maps of
    all earlier blocks applied; layers inside a block are fitted from the same sweep. SDXL's ~280
    norm layers fall in ~25 blocks: an order of magnitude fewer model passes than one per layer.
Blocks of single layers give the reference's layer-by-layer schedule (used by bench/estimation).
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

import torch

from ..act_core import LayerMap, TransportMaps, fit_layer
from .model_layers import (WHERE, ActError, block_of, clip_modules, model_family, select_layers,
                           text_encoder_names, unet_modules)
from .steering import hooks_installed

log = logging.getLogger("comfyui_act")

MIN_PROMPTS = 8
SCHEDULES = ("incremental", "at once")


@dataclass(frozen=True)
class CollectSettings:
    where: str = "diffusion model"
    pattern: str = ""          # "" = normalisation layers (the paper's choice)
    resolution: int = 0        # 0 = the model's native resolution
    noise_levels: int = 1      # 1 = the first step of the model's own schedule, as the reference
    batch_size: int = 16       # samples per diffusion-model call
    seed: int = 0


def parse_prompts(text: str, side: str) -> list[str]:
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(prompts) < MIN_PROMPTS:
        raise ActError(f"{side} has {len(prompts)} prompts; at least {MIN_PROMPTS} are needed, one per line "
                       f"(connect a prompt builder or type more lines into '{side}')")
    return prompts


def prompts_digest(source: list[str], target: list[str]) -> str:
    return hashlib.sha256(("\n".join(source) + "\0" + "\n".join(target)).encode()).hexdigest()


class _PassComplete(Exception):
    """Raised by a hook once the last layer a truncated pass needs has run."""


@dataclass
class Activations:
    """Pooled activations of the source and target prompts, per layer, in model order.

    source[layer]: [source prompts x noise levels, neurons] float32; target likewise.
    """

    source: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    kinds: dict[str, str]
    family: str
    info: dict
    collector: "Collector" = field(repr=False)

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


class Collector:
    """Runs the passes over one MODEL/CLIP pair and one pair of prompt sets."""

    def __init__(self, model, clip, source: list[str], target: list[str], settings: CollectSettings):
        if settings.where not in WHERE:
            raise ActError(f"'where' must be one of {WHERE}, got {settings.where!r}")
        if clip is None:
            raise ActError("Collect Activations needs the CLIP of the model to encode the prompts: connect it")
        self.family = model_family(model)
        text_encoder_names(clip)
        self.model = model.clone()
        self.clip = clip.clone()
        self.settings = settings
        self.prompts = source + target
        self.n_source = len(source)
        self.levels = max(1, settings.noise_levels)
        self.text_layers = (select_layers(clip_modules(clip), settings.pattern)
                            if settings.where in ("text encoder", "both") else {})
        self.unet_layers = (select_layers(unet_modules(model), settings.pattern)
                            if settings.where in ("diffusion model", "both") else {})
        if not self.text_layers and not self.unet_layers:
            raise ActError(f"no layer of the {settings.where} matches the pattern {settings.pattern!r}; "
                           "fix the 'pattern' input of Collect Activations")
        self.tokens = [self.clip.tokenize(p) for p in self.prompts]
        self.resolution = settings.resolution or self._native_resolution()
        if self.resolution % 8:
            raise ActError(f"resolution {self.resolution} is not a multiple of 8; fix it on Collect Activations")
        self.prompts_per_batch = max(1, settings.batch_size // self.levels)
        self.passes = 0
        self._conds_cache: dict[int, tuple] = {}

    # ----- what the passes are made of -----

    def _native_resolution(self) -> int:
        import comfy.model_base
        if self.family == "SDXL":
            return 1024
        if self.family == "SD2.x" and self.model.model.model_type == comfy.model_base.ModelType.V_PREDICTION:
            return 768
        return 512

    def _sigmas(self) -> list[float]:
        """Noise levels: the first step of the model's schedule, then evenly spread percents."""
        ms = self.model.get_model_object("model_sampling")
        levels = [float(ms.sigma_max)]
        for i in range(1, self.levels):
            levels.append(float(ms.percent_to_sigma(i / self.levels)))
        return levels

    def batches(self) -> list[list[int]]:
        order = list(range(len(self.prompts)))
        return [order[i:i + self.prompts_per_batch] for i in range(0, len(order), self.prompts_per_batch)]

    def _rows(self, prompts: list[int]) -> torch.Tensor:
        """Global sample indices (prompt * levels + level) of a batch, in batch order."""
        return torch.tensor([p * self.levels + lv for p in prompts for lv in range(self.levels)])

    def _encode(self, prompts: list[int], text_hooks: list) -> tuple[list[torch.Tensor], list]:
        """Encode prompts in one text-encoder batch; returns per-prompt conds and pooled outputs."""
        merged: dict[str, list] = {}
        owners: list[int] = []
        for local, p in enumerate(prompts):
            tokens = self.tokens[p]
            counts = {len(v) for v in tokens.values()}
            for key, chunks in tokens.items():
                merged.setdefault(key, []).extend(chunks)
            owners.extend([local] * counts.pop())
        stage = self.clip.cond_stage_model
        pooled_from = getattr(stage, "clip_g", None) or getattr(stage, text_encoder_names(self.clip)[0])
        captured = {}

        def capture_pooled(_module, _inputs, output):
            if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
                captured["pooled"] = output[1]

        self._chunk_owner = torch.tensor(owners)
        self._chunk_prompts = len(prompts)
        with hooks_installed([(pooled_from, capture_pooled)] + text_hooks):
            cond, _ = self.clip.encode_from_tokens(merged, return_pooled=True)
        first_chunk = [owners.index(i) for i in range(len(prompts))]
        ends = first_chunk[1:] + [len(owners)]
        tokens_per_chunk = cond.shape[1] // len(owners)
        conds = [cond[:, s * tokens_per_chunk:e * tokens_per_chunk] for s, e in zip(first_chunk, ends)]
        pooled = captured.get("pooled")
        pooled_list = [pooled[s:s + 1].float().cpu() if pooled is not None else None for s in first_chunk]
        return conds, pooled_list

    def _pool_text(self, output: torch.Tensor) -> torch.Tensor:
        """Mean over each prompt's tokens (all its chunks) -> [prompts, neurons] float32."""
        chunks = self._chunk_owner.shape[0]
        if output.ndim != 3 or output.shape[0] < chunks:
            raise ActError(f"a text-encoder layer gave an output shaped {tuple(output.shape)}; choose layers "
                           "whose output is [batch, tokens, features] with the 'pattern' input")
        means = output[:chunks].float().mean(1)
        sums = torch.zeros(self._chunk_prompts, means.shape[1], device=means.device).index_add_(
            0, self._chunk_owner.to(means.device), means)
        counts = torch.bincount(self._chunk_owner, minlength=self._chunk_prompts).to(means.device)
        return (sums / counts[:, None]).cpu()

    def _unet_call(self, conds: list[torch.Tensor], pooled: list, unet_hooks: list) -> None:
        import comfy.samplers
        sigmas = self._sigmas()
        samples = len(conds) * self.levels
        length = math.lcm(*[c.shape[1] for c in conds])
        cond = torch.cat([c.repeat(1, length // c.shape[1], 1) for c in conds for _ in range(self.levels)])
        extra = {}
        if self.family == "SDXL":
            extra = {"pooled_output": torch.cat([p for p in pooled for _ in range(self.levels)]),
                     "width": self.resolution, "height": self.resolution, "crop_w": 0, "crop_h": 0,
                     "target_width": self.resolution, "target_height": self.resolution}
        positive = [[cond, extra]]
        channels = self.model.model.latent_format.latent_channels
        shape = (samples, channels, self.resolution // 8, self.resolution // 8)
        # Source prompt i and target prompt i start from the same noise: their difference is the prompt.
        pairs = [int(r) // self.levels for r in self._batch_rows]
        pairs = [p if p < self.n_source else p - self.n_source for p in pairs]
        noise = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(self.settings.seed + p))
                             for p in pairs])
        sigma_vec = torch.tensor([sigmas[int(r) % self.levels] for r in self._batch_rows])
        ms = self.model.get_model_object("model_sampling")
        sigma_max = float(ms.sigma_max)

        def one_model_call(model_fn, x, _sigmas, extra_args=None, callback=None, disable=None):
            s = sigma_vec.to(x.device, x.dtype)
            latent = torch.zeros_like(x)
            n = noise.to(x.device, x.dtype)
            first = (s >= sigma_max * (1 - 1e-5)).view(-1, 1, 1, 1)
            x_in = torch.where(first, ms.noise_scaling(s.view(-1, 1, 1, 1), n, latent, True),
                               ms.noise_scaling(s.view(-1, 1, 1, 1), n, latent, False))
            model_fn(x_in, s, **(extra_args or {}))
            return x

        guider = comfy.samplers.CFGGuider(self.model)
        guider.set_conds(positive, positive)
        guider.set_cfg(1.0)
        sampler = comfy.samplers.KSAMPLER(one_model_call)
        with hooks_installed(unet_hooks):
            guider.sample(torch.zeros(shape), torch.zeros(shape), sampler, torch.tensor([sigmas[0], 0.0]),
                          disable_pbar=True, seed=self.settings.seed)

    # ----- one sweep -----

    @torch.no_grad()  # ComfyUI runs nodes in inference mode; scripts and tests may not, and the pooled
    # rows must never hold on to a pass's autograd graph.
    def _sweep(self, batches: list[list[int]], record: set[str], apply_maps: dict[str, LayerMap],
               fit_args: tuple | None, stop_after: str | None, progress) -> dict:
        """Run batches through text encoder then diffusion model. Records pooled activations of the
        layers in `record`, applies `apply_maps`, fits maps in the hooks when fit_args is given, and
        stops each pass after layer `stop_after`. Returns {"samples": {layer: [rows, D]},
        "kinds": {...}, "order": [...], "maps": {...}}."""
        import comfy.model_management
        total = len(self.prompts) * self.levels
        result = {"samples": {}, "kinds": {}, "order": [], "maps": {}, "repeated": set()}
        need_unet = stop_after is None or stop_after in self.unet_layers
        for batch in batches:
            comfy.model_management.throw_exception_if_processing_interrupted()
            self._batch_rows = self._rows(batch)
            fired: set[str] = set()
            text_record = record & set(self.text_layers)
            text_apply = frozenset(n for n in self.text_layers if n in apply_maps)
            cache_key = (batch[0], text_apply)
            cacheable = not text_record and fit_args is None
            try:
                if cacheable and cache_key in self._conds_cache:
                    conds, pooled = self._conds_cache[cache_key]
                else:
                    text_hooks = [(m, self._hook(n, "text", record, apply_maps, fit_args, stop_after, result,
                                                 fired, total))
                                  for n, m in self.text_layers.items()
                                  if n in text_record or n in text_apply or fit_args]
                    conds, pooled = self._encode(batch, text_hooks)
                    if cacheable:
                        self._conds_cache[cache_key] = (conds, pooled)
                if need_unet and self.unet_layers and (record & set(self.unet_layers) or fit_args):
                    unet_hooks = [(m, self._hook(n, "unet", record, apply_maps, fit_args, stop_after, result,
                                                 fired, total))
                                  for n, m in self.unet_layers.items() if n in record or n in apply_maps or fit_args]
                    self._unet_call(conds, pooled, unet_hooks)
            except _PassComplete:
                pass
            self.passes += 1
            if progress is not None:
                progress.update(1)
        return result

    def _hook(self, name: str, part: str, record: set, apply_maps: dict, fit_args, stop_after, result, fired, total):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise ActError(f"layer {name} does not output a tensor; leave it out with the 'pattern' input")
            if name in fired:
                # One map cannot describe two calls with different inputs (SD2's final_layer_norm
                # runs on the hidden layer and again for the pooled output): such layers are left out.
                result["repeated"].add(name)
                return output
            fired.add(name)
            if part == "text":
                pooled = self._pool_text(output)
                rows = torch.tensor([p * self.levels for p in self._batch_prompts_from_rows()])
            else:
                pooled = (output.float().mean(dim=(2, 3)) if output.ndim == 4
                          else output.float().mean(1) if output.ndim == 3 else output.float()).cpu()
                rows = self._batch_rows
                if pooled.shape[0] != rows.shape[0]:
                    raise ActError(f"layer {name} saw {pooled.shape[0]} samples where {rows.shape[0]} were sent; "
                                   "ComfyUI split the batch (low memory?): lower batch_size on Collect Activations")
            if not torch.isfinite(pooled).all():
                raise ActError(f"layer {name} produced NaN or infinite activations; the model may be broken, "
                               "or run in a precision too low for it (try --force-fp32)")
            kind = "conv" if output.ndim == 4 else "token"
            result["kinds"][name] = kind
            if name not in result["order"]:
                result["order"].append(name)
            if name in record:
                store = result["samples"].get(name)
                if store is None:
                    store = result["samples"][name] = torch.full((total, pooled.shape[1]), math.nan)
                if part == "text":
                    for lv in range(self.levels):
                        store[rows + lv] = pooled
                else:
                    store[rows] = pooled
            layer_map = apply_maps.get(name)
            if fit_args is not None:
                samples = pooled if part == "unet" else pooled.repeat_interleave(self.levels, 0)
                is_source = (self._batch_rows // self.levels) < self.n_source
                layer_map = fit_layer(samples[is_source], samples[~is_source], *fit_args, kind=kind)
                result["maps"][name] = layer_map
            if layer_map is not None:
                output = layer_map.apply(output, 1.0)
            if name == stop_after:
                raise _PassComplete()
            return output
        return hook

    def _batch_prompts_from_rows(self) -> list[int]:
        return (self._batch_rows[::self.levels] // self.levels).tolist()

    def _split(self, samples: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        cut = self.n_source * self.levels
        return {n: t[:cut] for n, t in samples.items()}, {n: t[cut:] for n, t in samples.items()}

    # ----- the schedules -----

    def collect(self, progress=None) -> Activations:
        """One pass over all prompts, no maps applied: the activations "at once" fitting uses."""
        everything = set(self.text_layers) | set(self.unet_layers)
        result = self._sweep(self.batches(), everything, {}, None, None, progress)
        order = [n for n in result["order"] if n not in result["repeated"]]
        missing = everything - set(result["order"])
        if missing:
            log.info("ComfyUI-ACT: %d selected layers never ran and are left out (e.g. %s)", len(missing), min(missing))
        if result["repeated"]:
            log.info("ComfyUI-ACT: left out layers that run more than once per call: %s", sorted(result["repeated"]))
        self.text_layers = {n: m for n, m in self.text_layers.items() if n in order}
        self.unet_layers = {n: m for n, m in self.unet_layers.items() if n in order}
        source, target = self._split({n: result["samples"][n] for n in order})
        return Activations(source, target, {n: result["kinds"][n] for n in order}, self.family,
                           self._info(), self)

    def _info(self) -> dict:
        source, target = self.prompts[:self.n_source], self.prompts[self.n_source:]
        return {"family": self.family, "where": self.settings.where,
                "layers": self.settings.pattern or "normalization layers",
                "resolution": self.resolution, "noise_levels": self.levels,
                "source_prompts": len(source), "target_prompts": len(target),
                "prompts_sha256": prompts_digest(source, target), "seed": self.settings.seed}

    def incremental(self, activations: Activations, method: str, support: str, blocks: str = "auto",
                    progress_factory=None) -> dict[str, LayerMap]:
        """Maps fitted in model order, each from activations with all earlier maps applied.

        blocks: "auto" (one pass with fitting in the hooks when everything fits one batch, else block
        by block), "blocks" (block by block), "layers" (one sweep per layer, the reference's schedule).
        """
        order = activations.order
        batches = self.batches()
        if blocks == "auto" and len(batches) == 1:
            progress = progress_factory(1) if progress_factory else None
            result = self._sweep(batches, set(), {}, (method, support), order[-1], progress)
            return {n: result["maps"][n] for n in order}
        key_of = (lambda n: n) if blocks == "layers" else block_of
        groups: list[list[str]] = []
        for name in order:
            if groups and key_of(groups[-1][-1]) == key_of(name):
                groups[-1].append(name)
            else:
                groups.append([name])
        progress = progress_factory(len(groups) * len(batches)) if progress_factory else None
        maps: dict[str, LayerMap] = {}
        for group in groups:
            result = self._sweep(batches, set(group), dict(maps), None, group[-1], progress)
            source, target = self._split(result["samples"])
            for name in group:
                maps[name] = fit_layer(source[name], target[name], method, support, kind=activations.kinds[name])
        return maps


def fit_at_once(activations: Activations, method: str, support: str) -> dict[str, LayerMap]:
    return {n: fit_layer(activations.source[n], activations.target[n], method, support, kind=activations.kinds[n])
            for n in activations.order}


def fit_maps(activations: Activations, method: str, support: str, schedule: str, progress_factory=None,
             blocks: str = "auto") -> TransportMaps:
    if schedule not in SCHEDULES:
        raise ActError(f"estimation must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "at once":
        layers = fit_at_once(activations, method, support)
    else:
        layers = activations.collector.incremental(activations, method, support, blocks, progress_factory)
    info = dict(activations.info, method=method, support=support, estimation=schedule)
    return TransportMaps(layers, info)
