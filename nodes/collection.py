"""Collect pooled activations from a loaded ComfyUI model, and fit maps incrementally.

Every pass goes through ComfyUI's own code: prompts are encoded by the CLIP's encode_from_tokens
(all prompts of a batch as chunks of one call, one transformer batch; one call per prompt where the
CLIP joins several encoders' token streams), and the diffusion model is
called once through a CFGGuider at cfg 1 (so only the conditional branch runs), with the model's
other patches (LoRAs, other packs) loaded as for sampling. Only pooled activations are kept:
[samples, neurons] per layer, never feature maps.

Schedules for incremental estimation, where the map of layer l is fitted from activations recorded
with the maps of all earlier layers applied (all give the same maps):
  * one pass, fitting inside the hooks, when every sample fits in one batch: a layer's hook sees
    the whole prompt set, fits the map there, transports its own output and hands it on, so later
    layers see exactly what a pass with all earlier maps applied would show them;
  * the replay of units otherwise (_Replay): the module calls that lead to the chosen layers,
    recorded during the collection, are run piece by piece from inputs recorded per batch; the
    model's working memory is that of one batch, the records use spare device memory (at most half
    of it) and then the CPU's; about 1.6 passes' worth of model work;
  * layer by layer, the reference's schedule: one sweep over the batches per layer, truncated after
    it. The yardstick of tests and bench/estimation, and the fallback when the model's module
    calls are patched (then replaying a module alone would not reproduce what a pass does). Also
    the schedule of the text encoders of families whose prompts are encoded one by one (FLUX, SD3;
    families.Family.batched_text): those passes stop inside the text encoders, so they cost text
    encoding only; the diffusion model then follows the schedules above.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import sys
import weakref
from collections import Counter
from dataclasses import dataclass

import torch

from ..act_core import LayerMap, TransportMaps, fit_layer
from ..act_core.activations import Activations
from .errors import ActError
from .families import family_of, native_resolution
from .model_layers import WHERE, clip_modules, is_unet_layer, select_layers, text_encoder_names, unet_modules
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


class Collector:
    """Runs the passes over one MODEL/CLIP pair and one pair of prompt sets."""

    def __init__(self, model, clip, source: list[str], target: list[str], settings: CollectSettings):
        if settings.where not in WHERE:
            raise ActError(f"'where' must be one of {WHERE}, got {settings.where!r}")
        if clip is None:
            raise ActError("Collect Activations needs the CLIP of the model to encode the prompts: connect it")
        self.spec = family_of(model, "Collect Activations")
        self.family = self.spec.name
        self._encoders = set(text_encoder_names(clip))
        self.model = model.clone()
        self.clip = clip.clone()
        self.settings = settings
        self.prompts = source + target
        self.n_source = len(source)
        self.levels = max(1, settings.noise_levels)
        self.text_layers = (select_layers(clip_modules(clip), settings.pattern, self.spec.default_text_layer)
                            if settings.where in ("text encoder", "both") else {})
        self.unet_layers = (select_layers(unet_modules(model), settings.pattern, self.spec.default_layers)
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
        self.call_tree: CallTree | None = None
        self._conds_cache: dict[int, tuple] = {}
        self._fired: set[str] = set()      # layers that ran in the current text-encoder or model call

    # ----- what the passes are made of -----

    def _native_resolution(self) -> int:
        return native_resolution(self.spec, self.model)

    def _sigmas(self) -> list[float]:
        """Noise levels: the first step of the model's schedule, then evenly spread percents."""
        ms = self.model.get_model_object("model_sampling")
        levels = [float(ms.sigma_max)]
        for i in range(1, self.levels):
            levels.append(float(ms.percent_to_sigma(i / self.levels)))
        return levels

    def batches(self) -> list[list[int]]:
        """Prompts in batches of at most prompts_per_batch; a batch holds only prompts whose text
        has the same token layout, so every prompt reaches the diffusion model at its own length,
        as when it is sampled alone. (FLUX's and SD3's joint attention would change the image stream
        if a shorter text were repeated to a common length; SD's cross-attention would not, but the
        common length of several prompts grows as their lcm.)"""
        groups: dict[tuple, list[int]] = {}
        for p in range(len(self.prompts)):
            groups.setdefault(self._token_layout(p), []).append(p)
        n = self.prompts_per_batch
        return [group[i:i + n] for group in groups.values() for i in range(0, len(group), n)]

    def _token_layout(self, prompt: int) -> tuple:
        """The chunk lengths of a prompt's tokens, for the encoders this CLIP carries: prompts of
        one layout give text of one length."""
        absent = {e.tokens for e in self.spec.text_encoders if e.attribute not in self._encoders}
        return tuple(sorted((key, tuple(len(chunk) for chunk in chunks))
                            for key, chunks in self.tokens[prompt].items()
                            if key not in absent and isinstance(chunks, (list, tuple))))

    def _rows(self, prompts: list[int]) -> torch.Tensor:
        """Global sample indices (prompt * levels + level) of a batch, in batch order."""
        return torch.tensor([p * self.levels + lv for p in prompts for lv in range(self.levels)])

    def _encode(self, prompts: list[int], text_hooks: list) -> tuple[list[torch.Tensor], list]:
        """Encode prompts in one text-encoder batch; returns per-prompt conds and pooled outputs."""
        if not self.spec.batched_text:
            return self._encode_one_by_one(prompts, text_hooks)
        merged: dict[str, list] = {}
        for p in prompts:
            for key, chunks in self.tokens[p].items():
                merged.setdefault(key, []).extend(chunks)
        self._call_prompts = list(prompts)
        owners = torch.tensor([local for local, p in enumerate(prompts)
                               for _ in range(len(next(iter(self.tokens[p].values()))))])
        stage = self.clip.cond_stage_model
        pooled_from = (getattr(stage, self.spec.pooled_from, None) if self.spec.pooled_from else None) or \
            getattr(stage, text_encoder_names(self.clip)[0])
        captured = {}

        def capture_pooled(_module, _inputs, output):
            if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
                captured["pooled"] = output[1]

        with hooks_installed([(pooled_from, capture_pooled)] + text_hooks):
            cond, _ = self.clip.encode_from_tokens(merged, return_pooled=True)
        owners = owners.tolist()
        first_chunk = [owners.index(i) for i in range(len(prompts))]
        ends = first_chunk[1:] + [len(owners)]
        tokens_per_chunk = cond.shape[1] // len(owners)
        conds = [cond[:, s * tokens_per_chunk:e * tokens_per_chunk] for s, e in zip(first_chunk, ends)]
        pooled = captured.get("pooled")
        pooled_list = [pooled[s:s + 1].float().cpu() if pooled is not None else None for s in first_chunk]
        return conds, pooled_list

    def _encode_one_by_one(self, prompts: list[int], text_hooks: list) -> tuple[list[torch.Tensor], list]:
        """The CLIP joins several encoders' token streams (FLUX, SD3): one call per prompt keeps each
        prompt's tokens together, as ComfyUI encodes a prompt, and its own pooled output is the one
        the model expects. A pass truncated in the text encoder stops each prompt's call there."""
        conds, pooled, truncated = [], [], False
        for p in prompts:
            self._call_prompts = [p]
            self._fired.clear()
            try:
                with hooks_installed(text_hooks):
                    cond, pool = self.clip.encode_from_tokens(self.tokens[p], return_pooled=True)
            except _PassComplete:
                truncated = True
                continue
            conds.append(cond)
            pooled.append(pool.float().cpu() if pool is not None else None)
        if truncated:
            raise _PassComplete()
        return conds, pooled

    def _pool_text(self, name: str, output: torch.Tensor) -> torch.Tensor:
        """Mean over each prompt's tokens (all its chunks) in the current text-encoder call ->
        [prompts, neurons] float32. The encoder's own chunks count: CLIP's 77-token chunks and T5's
        one long chunk differ; a last row beyond them is the empty prompt ComfyUI adds for weights."""
        key = self.spec.encoder(name).tokens
        counts = torch.tensor([len(self.tokens[p].get(key, ())) for p in self._call_prompts])
        chunks = int(counts.sum())
        if output.ndim != 3 or output.shape[0] < chunks or not chunks:
            raise ActError(f"a text-encoder layer gave an output shaped {tuple(output.shape)}; choose layers "
                           "whose output is [batch, tokens, features] with the 'pattern' input")
        owners = torch.repeat_interleave(torch.arange(len(counts)), counts).to(output.device)
        means = output[:chunks].float().mean(1)
        sums = torch.zeros(len(counts), means.shape[1], device=means.device).index_add_(0, owners, means)
        return (sums / counts.to(means.device)[:, None]).cpu()

    def _unet_call(self, conds: list[torch.Tensor], pooled: list, unet_hooks: list, inside=None) -> None:
        """One call of the diffusion model on this batch through ComfyUI's sampler path; with
        `inside`, that function runs in the sampler instead of the model call, with the model loaded
        and patched as for sampling."""
        import comfy.samplers
        sigmas = self._sigmas()
        samples = len(conds) * self.levels
        lengths = sorted({c.shape[1] for c in conds})
        if len(lengths) > 1:
            # batches() keeps prompts of one token layout together; an encoder that still gives them
            # texts of different lengths cannot share a call without changing what they compute.
            raise ActError(f"prompts of one batch gave texts of {lengths} tokens; "
                           "set batch_size to 1 on Collect Activations")
        cond = torch.cat([c for c in conds for _ in range(self.levels)])
        batch_pooled = (torch.cat([p for p in pooled for _ in range(self.levels)])
                        if pooled and all(p is not None for p in pooled) else None)
        extra = self.spec.extras(batch_pooled, self.resolution)
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
            if inside is not None:
                inside()
            else:
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
               fit_args: tuple | None, stop_after: str | None, progress, call_tree: "CallTree | None" = None) -> dict:
        """Run batches through text encoder then diffusion model. Records pooled activations of the
        layers in `record`, applies `apply_maps`, fits maps in the hooks when fit_args is given, and
        stops each pass after layer `stop_after`; records the module calls of the first batch into
        `call_tree` when given. Returns {"samples": {layer: [rows, D]},
        "kinds": {...}, "order": [...], "maps": {...}}."""
        import comfy.model_management
        total = len(self.prompts) * self.levels
        result = {"samples": {}, "kinds": {}, "order": [], "maps": {}, "repeated": set()}
        need_unet = stop_after is None or stop_after in self.unet_layers
        for index, batch in enumerate(batches):
            comfy.model_management.throw_exception_if_processing_interrupted()
            self._batch_rows = self._rows(batch)
            self._fired.clear()
            recording = call_tree.recording() if call_tree is not None and index == 0 else contextlib.nullcontext()
            text_record = record & set(self.text_layers)
            text_apply = frozenset(n for n in self.text_layers if n in apply_maps)
            cache_key = (batch[0], text_apply)
            cacheable = not text_record and fit_args is None
            try:
                with recording:
                    if cacheable and cache_key in self._conds_cache:
                        conds, pooled = self._conds_cache[cache_key]
                    else:
                        text_hooks = [(m, self._hook(n, "text", record, apply_maps, fit_args, stop_after, result,
                                                     total))
                                      for n, m in self.text_layers.items()
                                      if n in text_record or n in text_apply or fit_args]
                        conds, pooled = self._encode(batch, text_hooks)
                        if cacheable:
                            self._conds_cache[cache_key] = (conds, pooled)
                    if need_unet and self.unet_layers and (record & set(self.unet_layers) or fit_args):
                        unet_hooks = [(m, self._hook(n, "unet", record, apply_maps, fit_args, stop_after, result,
                                                     total))
                                      for n, m in self.unet_layers.items() if n in record or n in apply_maps or fit_args]
                        self._unet_call(conds, pooled, unet_hooks)
            except _PassComplete:
                pass
            self.passes += 1
            if progress is not None:
                progress.update(1)
        return result

    def _hook(self, name: str, part: str, record: set, apply_maps: dict, fit_args, stop_after, result, total):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise ActError(f"layer {name} does not output a tensor; leave it out with the 'pattern' input")
            if name in self._fired:
                # One map cannot describe two calls with different inputs (SD2's final_layer_norm
                # runs on the hidden layer and again for the pooled output): such layers are left out.
                result["repeated"].add(name)
                return output
            self._fired.add(name)
            pooled, rows = self._pool(name, part, output)
            kind = "conv" if output.ndim == 4 else "token"
            result["kinds"][name] = kind
            if name not in result["order"]:
                result["order"].append(name)
            if name in record:
                self._record(result["samples"], name, part, pooled, rows, total)
            layer_map = apply_maps.get(name)
            if layer_map is None and fit_args is not None:
                # Only where this call holds every sample: a batched text call or the one-batch model call.
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

    def _pool(self, name: str, part: str, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled activations [batch prompts (text) or samples (unet), neurons] on the CPU, and the
        rows of the sample table they belong to."""
        if part == "text":
            pooled = self._pool_text(name, output)
            rows = torch.tensor([p * self.levels for p in self._call_prompts])
        else:
            pooled = (output.float().mean(dim=(2, 3)) if output.ndim == 4
                      else output.float().mean(1) if output.ndim == 3 else output.float()).cpu()
            rows = self._batch_rows
            if pooled.shape[0] != rows.shape[0]:
                raise ActError(f"layer {name} saw {pooled.shape[0]} samples where {rows.shape[0]} were sent; "
                               "ComfyUI split the batch (low memory?): lower batch_size on Collect Activations")
        if not torch.isfinite(pooled).all():
            raise NonFiniteActivations(name)
        return pooled, rows

    def _record(self, samples: dict, name: str, part: str, pooled: torch.Tensor, rows: torch.Tensor,
                total: int) -> None:
        store = samples.get(name)
        if store is None:
            store = samples[name] = torch.full((total, pooled.shape[1]), math.nan)
        if part == "text":
            for lv in range(self.levels):
                store[rows + lv] = pooled
        else:
            store[rows] = pooled

    def _split(self, samples: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        cut = self.n_source * self.levels
        return {n: t[:cut] for n, t in samples.items()}, {n: t[cut:] for n, t in samples.items()}

    # ----- the schedules -----

    def collect(self, progress=None) -> Activations:
        """One pass over all prompts, no maps applied: the activations "at once" fitting uses."""
        everything = set(self.text_layers) | set(self.unet_layers)
        self.call_tree = CallTree(self._watched_modules())
        result = self._sweep(self.batches(), everything, {}, None, None, progress, self.call_tree)
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

    def _watched_modules(self) -> dict[str, torch.nn.Module]:
        """The chosen layers and every module above them: the calls the exact schedule replays."""
        modules = {"diffusion_model": self.model.model.diffusion_model} | unet_modules(self.model) | clip_modules(self.clip)
        watched = {}
        for name in list(self.text_layers) + list(self.unet_layers):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules:
                    watched[prefix] = modules[prefix]
        return watched

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

        blocks: "auto" (one pass with fitting in the hooks when everything fits one batch, else the
        replay of units from their recorded inputs; both exact), "layers" (one sweep per layer, the
        reference's schedule, kept as the yardstick and as the fallback).
        """
        if blocks not in ("auto", "layers"):
            raise ActError(f"blocks must be 'auto' or 'layers', got {blocks!r}")
        order = activations.order
        batches = self.batches()
        maps: dict[str, LayerMap] = {}
        if blocks == "auto" and not self.spec.batched_text:
            # Prompts go through these text encoders one by one: no call holds every sample at a
            # layer, so their layers are fitted one at a time (text-encoder passes only, truncated
            # after the layer); the diffusion model then follows the schedules below, those maps applied.
            text = [n for n in order if not is_unet_layer(n)]
            self._layer_by_layer(activations, text, maps, method, support, progress_factory)
            order = order[len(text):]
            if not order:
                return maps
        if blocks == "auto" and len(batches) == 1:
            progress = progress_factory(1) if progress_factory else None
            result = self._sweep(batches, set(), dict(maps), (method, support), order[-1], progress)
            return maps | {n: result["maps"][n] for n in order}
        if blocks == "auto":
            try:
                progress = progress_factory(len(order)) if progress_factory else None
                return maps | _Replay(self, activations, order, maps, method, support, progress).run()
            except _Unreplayable as why:
                log.warning("ComfyUI-ACT: %s; fitting layer by layer instead (exact, one pass per layer)", why)
        self._layer_by_layer(activations, order, maps, method, support, progress_factory)
        return maps

    def _layer_by_layer(self, activations: Activations, names: list[str], maps: dict, method: str, support: str,
                        progress_factory) -> None:
        """The reference's schedule: one sweep per layer, truncated after it, earlier maps applied."""
        batches = self.batches()
        progress = progress_factory(len(names) * len(batches)) if progress_factory and names else None
        for name in names:
            result = self._sweep(batches, {name}, dict(maps), None, name, progress)
            source, target = self._split(result["samples"])
            maps[name] = fit_layer(source[name], target[name], method, support, kind=activations.kinds[name])


class CallTree:
    """Who called whom during one pass (the first batch of the collection), for the modules on the
    path to a chosen layer: the structure that the exact schedule replays."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        self.calls: Counter = Counter()
        self.children: dict[str | None, list[str]] = {}

    @contextlib.contextmanager
    def recording(self):
        stack: list[str] = []

        def before(name):
            def hook(_module, _args):
                self.calls[name] += 1
                if self.calls[name] == 1:
                    self.children.setdefault(stack[-1] if stack else None, []).append(name)
                stack.append(name)
            return hook

        def after(name):
            def hook(_module, _args, _output):
                if stack and stack[-1] == name:
                    stack.pop()
            return hook

        handles = []
        try:
            for name, module in self.modules.items():
                handles.append(module.register_forward_pre_hook(before(name)))
                handles.append(module.register_forward_hook(after(name)))
            yield
        finally:
            for handle in handles:
                handle.remove()


class _Unreplayable(Exception):
    """The model's calls cannot be replayed unit by unit; the layer-by-layer schedule is used."""


class NonFiniteActivations(ActError):
    """A layer's pooled activations hold NaN or infinity."""

    def __init__(self, layer: str):
        super().__init__(f"layer {layer} produced NaN or infinite activations; the model may be broken, "
                         "or run in a precision too low for it (try --force-fp32)")
        self.layer = layer


NonFiniteActivations.__module__ = ActError.__module__  # as ComfyUI shows the error's type to users


@dataclass
class _Unit:
    """A module call on the path to chosen layers (or the root: the text encoding, the diffusion-model
    call through the sampler), with the unit calls it makes, in the order it makes them."""
    name: str
    module: torch.nn.Module | None
    part: str
    layer: bool
    children: list["_Unit"]


class _Stored:
    """A recorded tensor between replays, with the device it goes back to. It stays on the
    accelerator while `device_room` bytes allow (copies over the bus cost more than the model's
    own work there), else it moves to the CPU. The class counts the bytes held on the CPU
    (bench/estimation reports the peak)."""
    __slots__ = ("data", "device", "bytes", "on_device")
    device_room = 0
    held_bytes = 0
    peak_bytes = 0

    def __init__(self, data: torch.Tensor, device: torch.device):
        self.data, self.device = data, device
        self.bytes = 0 if data.device.type == "meta" else data.numel() * data.element_size()
        self.on_device = data.device.type not in ("cpu", "meta")
        if self.on_device:
            _Stored.device_room -= self.bytes
        else:
            _Stored.held_bytes += self.bytes
            _Stored.peak_bytes = max(_Stored.peak_bytes, _Stored.held_bytes)

    def __del__(self):
        if self.on_device:
            _Stored.device_room += self.bytes
        else:
            _Stored.held_bytes -= self.bytes

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "_Stored":
        size = tensor.numel() * tensor.element_size()
        if tensor.device.type != "cpu" and size <= cls.device_room:
            return cls(tensor.detach().clone(), tensor.device)
        return cls(tensor.detach().to("cpu", copy=True), tensor.device)

    def load(self) -> torch.Tensor:
        return self.data.to(self.device, copy=True)  # a copy: the model may change its inputs in place

    def hollow(self) -> "_Stored":
        return _Stored(torch.empty(self.data.shape, dtype=self.data.dtype, device="meta"), self.device)

    def blank(self) -> torch.Tensor:
        """Stands in for an output nothing reads any more; NaN, so that a wrong guess shows."""
        fill = math.nan if self.data.is_floating_point() else 0
        return torch.full(self.data.shape, fill, dtype=self.data.dtype, device=self.device)


def _map(fn, value, kind):
    """`value` with fn applied to each `kind` inside lists, tuples and dicts (rebuilt, so that the
    model may change what it is handed), everything else as it is. Lighter than torch's pytree for
    the option dicts that come with every UNet call."""
    if isinstance(value, kind):
        return fn(value)
    if type(value) is dict:
        return {k: _map(fn, v, kind) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_map(fn, v, kind) for v in value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map(fn, v, kind) for v in value))
    return value


def _leaves(value, kind) -> list:
    found = []
    _map(found.append, value, kind)
    return found


def _store(tree):
    return _map(_Stored.of, tree, torch.Tensor)


def _load(tree, blank: bool = False):
    return _map(_Stored.blank if blank else _Stored.load, tree, _Stored)


def _hollow(tree):
    return _map(_Stored.hollow, tree, _Stored)


def _has_nan(tree) -> bool:
    tensors = [x.data if isinstance(x, _Stored) else x for x in _leaves(tree, (torch.Tensor, _Stored))]
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta"
               and bool(torch.isnan(t).any()) for t in tensors)


def _live_tensors(until) -> list[torch.Tensor]:
    """Tensors held by the local variables of the calling frames, up to the frame running `until`
    (a code object): what the code being replayed can still read."""
    found: list[torch.Tensor] = []

    def collect(value, depth):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif depth and isinstance(value, (list, tuple)):
            for item in value:
                collect(item, depth - 1)
        elif depth and isinstance(value, dict):
            for item in value.values():
                collect(item, depth - 1)

    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not until:
        for value in frame.f_locals.values():
            collect(value, 3)
        frame = frame.f_back
    return found


_ABSENT = object()


@contextlib.contextmanager
def _answered(answers: dict[torch.nn.Module, object], stop: torch.nn.Module | None, on_stop):
    """For a with-block: the modules in `answers` return a recorded output instead of computing
    (an instance `forward` attribute, as ComfyUI's object patches), and `stop` hands its inputs to
    on_stop before it runs. Everything is put back as it was, an exception included."""
    saved, handle = [], None
    try:
        for module, forward in answers.items():
            saved.append((module, module.__dict__.get("forward", _ABSENT)))
            module.forward = forward
        if stop is not None:
            handle = stop.register_forward_pre_hook(on_stop, with_kwargs=True, prepend=True)
        yield
    finally:
        if handle is not None:
            handle.remove()
        for module, before in reversed(saved):
            if before is _ABSENT:
                module.__dict__.pop("forward", None)
            else:
                module.forward = before


class _Replay:
    """Exact incremental estimation for any batch size, with memory bounded by the batch.

    The model runs as a tree of units: module calls on the path to the chosen layers (CLIP's text
    encoders, their transformer layers, the norms; the UNet, its ResBlocks, SpatialTransformers,
    transformer blocks, norms), as recorded during the collection. A unit is processed with its
    inputs recorded for every batch (see _Stored), computed with the final maps of everything before:
      for each child unit in call order: replay this unit per batch, the children already done
      answering with their recorded outputs, and stop at the child's call to record its inputs;
      process the child (recursively); then run the unit once more per batch to get its output.
    A chosen layer's map is fitted from its output over all batches and applied to that output
    before anything later sees it, as in the reference's pass per layer; so the maps are the
    reference's. Every piece of the model runs about once per batch for its own output, plus the
    cheap code between unit calls once per child (skip connections, residual sums). Recorded
    outputs that the replayed code no longer holds when the next child is called are dropped and
    later answered with NaN stand-ins, so that only live state (e.g. the UNet's skip connections)
    is kept. The guess is tried on the first batch (a record whose stand-in reaches anything that
    later code can read is kept); a stand-in that still reaches a layer on a later batch (code that
    reads an output only for some batches) makes that layer NaN, and the layer-by-layer schedule
    takes over, while a NaN of the model's own, with no stand-in handed out, is reported as such.
    """

    def __init__(self, collector: "Collector", activations: Activations, order: list[str], fitted: dict,
                 method: str, support: str, progress):
        import comfy.patcher_extension
        c = collector
        if c.call_tree is None:
            raise _Unreplayable("no module calls were recorded during the collection")
        patched = [k for k in {**c.model.object_patches, **c.clip.patcher.object_patches} if k.endswith("forward")]
        wrapped = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                           c.model.model_options, is_model_options=True)
        if patched or wrapped:
            raise _Unreplayable(f"the model's calls are patched ({(patched or ['a diffusion-model wrapper'])[0]})")
        self.c, self.kinds, self.fit_args, self.progress = c, activations.kinds, (method, support), progress
        self.order = order
        self.fitted = fitted        # maps of earlier text-encoder layers, applied when encoding
        self.batches = c.batches()
        self.total = len(c.prompts) * c.levels
        self.maps: dict[str, LayerMap] = {}
        self.conds: list = []
        self.failed_probes: set = set()
        self.blanked = False        # whether a NaN stand-in was handed to the model outside a probe
        self.selections: dict[int, tuple] = {}
        self.roots = {}
        for part in ("text", "unet"):
            layers = [n for n in self.order if is_unet_layer(n) == (part == "unet")]
            if layers:
                self.roots[part] = self._tree(part, layers)

    def _tree(self, part: str, layers: list[str]) -> _Unit:
        tree, wanted = self.c.call_tree, set(layers)

        def build(name: str) -> _Unit | None:
            kids = [u for u in (build(k) for k in tree.children.get(name, [])) if u is not None]
            if not kids and name not in wanted:
                return None
            if tree.calls[name] != 1:
                raise _Unreplayable(f"{name} runs {tree.calls[name]} times per call")
            return _Unit(name, tree.modules[name], part, name in wanted, kids)

        in_part = [n for n in tree.children.get(None, []) if is_unet_layer(n + ".") == (part == "unet")]
        tops = [u for u in map(build, in_part) if u is not None]
        root = _Unit(part, None, part, False, tops)
        fitted: list[str] = []

        def walk(unit: _Unit) -> None:
            for kid in unit.children:
                walk(kid)
            if unit.layer:
                fitted.append(unit.name)
        walk(root)
        if fitted != layers:
            raise _Unreplayable("the layers do not run in the order of their module calls")
        return root

    def run(self) -> dict[str, LayerMap]:
        import comfy.model_management
        device = self.c.model.load_device
        # Half of what is free beside the loaded model and one batch's work (the collection ran
        # just before): recorded activations use it first, the rest goes to the CPU.
        room = comfy.model_management.get_free_memory(device) // 2 if device.type == "cuda" else 0
        _Stored.device_room += room
        try:
            return self._run_all()
        except NonFiniteActivations as error:
            # A stand-in for a dropped record was read on a batch that the first batch's probe did
            # not speak for (or the model itself overflowed: the layer-by-layer schedule, which
            # drops nothing, then says so).
            if not self.blanked:
                raise
            raise _Unreplayable(f"{error.layer} read a record that the replay had dropped as unused") from None
        finally:
            _Stored.device_room -= room

    def _run_all(self) -> dict[str, LayerMap]:
        c = self.c
        none = [None] * len(self.batches)
        if "text" in self.roots:
            self.conds = self._fit(self.roots["text"], none, need_output="unet" in self.roots)
        if "unet" in self.roots:
            if not self.conds:
                modules = clip_modules(c.clip)
                hooks = [(modules[n], lambda _m, _i, out, m=m: m.apply(out, 1.0)) for n, m in self.fitted.items()]
                self.conds = [_store(c._encode(batch, hooks)) for batch in self.batches]
            self._fit(self.roots["unet"], none, need_output=False)
        return {n: self.maps[n] for n in self.order}

    def _select(self, b: int) -> None:
        """Make batch b the one that pooling refers to."""
        if b not in self.selections:
            self.selections[b] = self.c._rows(self.batches[b])
        self.c._batch_rows, self.c._call_prompts = self.selections[b], list(self.batches[b])

    def _call(self, unit: _Unit, b: int, inputs: list):
        if unit.module is not None:
            args, kwargs = _load(inputs[b])
            return unit.module(*args, **kwargs)
        self.c.passes += 1
        if unit.part == "text":
            return self.c._encode(self.batches[b], [])
        conds, pooled = _load(self.conds[b])
        self.c._unet_call(conds, pooled, [])
        return None

    def _run(self, unit: _Unit, b: int, inputs: list, outputs: dict, blanks: set, upto: int,
             probe: bool = False) -> dict:
        """Replay `unit` on batch b, its first `upto` children answering from `outputs` (NaN for
        those in `blanks`); stop at child `upto` (recording its inputs and which answers are still
        held), or run to the end. With probe, found["nan"] tells whether a blank reached anything
        that later code can read: the recorded inputs, the output, or any tensor the replayed
        frames still hold."""
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()
        self._select(b)
        kids = unit.children
        held: dict[str, list] = {}
        found: dict = {}

        def answer(kid: _Unit):
            def forward(*_args, **_kwargs):
                if kid.name in blanks and not probe:
                    self.blanked = True
                value = _load(outputs[kid.name][b], blank=kid.name in blanks)
                held[kid.name] = [weakref.ref(t) for t in _leaves(value, torch.Tensor)]
                return value
            return forward

        def stop(_module, args, kwargs):
            found["held"] = {n for n, refs in held.items() if any(r() is not None for r in refs)}
            found["input"] = _store((args, kwargs))
            if probe:
                found["nan"] = _has_nan((args, kwargs)) or _has_nan(_live_tensors(_Replay._call.__code__))
            raise _PassComplete()

        with _answered({k.module: answer(k) for k in kids[:upto]}, kids[upto].module if upto < len(kids) else None,
                       stop):
            try:
                found["output"] = self._call(unit, b, inputs)
            except _PassComplete:
                pass
        if upto < len(kids) and "input" not in found:
            raise _Unreplayable(f"{kids[upto].name} did not run when {unit.name} was replayed")
        if probe and "output" in found:
            found["nan"] = _has_nan(found["output"])
        return found

    def _fit(self, unit: _Unit, inputs: list, need_output: bool) -> list | None:
        """Fit every layer inside `unit` (inputs recorded per batch); returns its recorded outputs
        per batch (maps applied) when need_output."""
        kids = unit.children
        outputs: dict[str, list] = {}
        state = {"dropped": set(), "kept": set(), "held": None}
        for j, kid in enumerate(kids):
            captured = [found["input"] for found in self._runs(unit, inputs, outputs, state, j)]
            needed = j + 1 < len(kids) or need_output or unit.layer
            if unit.module is None and unit.part == "unet":
                outputs[kid.name] = self._inside_sampling(lambda: self._fit(kid, captured, needed))
            else:
                outputs[kid.name] = self._fit(kid, captured, needed)
            del captured
        if not (need_output or unit.layer):
            return None
        results, table = [], {}
        for found in self._runs(unit, inputs, outputs, state, len(kids)):
            output = found.pop("output")
            if unit.layer:
                if not isinstance(output, torch.Tensor):
                    raise ActError(f"layer {unit.name} does not output a tensor; leave it out with the 'pattern' input")
                pooled, rows = self.c._pool(unit.name, unit.part, output)
                self.c._record(table, unit.name, unit.part, pooled, rows, self.total)
            results.append(_store(output))
            del output
        if not unit.layer:
            return results
        source, target = self.c._split(table)
        layer_map = fit_layer(source[unit.name], target[unit.name], *self.fit_args, kind=self.kinds[unit.name])
        self.maps[unit.name] = layer_map
        if self.progress is not None:
            self.progress.update(1)
        if not need_output:
            return None
        return [_store(layer_map.apply(_load(r), 1.0)) for r in results]

    def _runs(self, unit: _Unit, inputs: list, outputs: dict, state: dict, upto: int):
        """The replays of `unit` over all batches up to child `upto` (or to the end), yielding what
        each found. Recorded outputs of earlier children that the replayed code no longer held at
        the previous child's call are tried as NaN blanks on the first batch; when no NaN reaches
        anything readable, their records are dropped (only live state, e.g. skip connections, is
        kept); otherwise they are kept for good."""
        kids = unit.children
        held = state["held"]
        # Only children answered in the previous run can be known to be let go (the previous child was
        # that run's stop, and its output is the next one's input more often than not).
        answered = {k.name for k in kids[:max(0, upto - 1)]}
        trial = set() if held is None else answered - held - state["dropped"] - state["kept"]
        # A failed probe costs a second run of the first batch; units of one class fail alike
        # (a residual sum that reads the answer), so a failure is remembered for the class.
        known = (type(unit.module) if unit.module is not None else unit.name, upto,
                 tuple(i for i, k in enumerate(kids) if k.name in trial))
        if trial and known in self.failed_probes:
            state["kept"] |= trial
            trial = set()
        for b in range(len(self.batches)):
            if b == 0 and trial:
                found = self._run(unit, b, inputs, outputs, state["dropped"] | trial, upto, probe=True)
                if found["nan"]:
                    self.failed_probes.add(known)
                    state["kept"] |= trial
                    found = self._run(unit, b, inputs, outputs, state["dropped"], upto)
                else:
                    state["dropped"] |= trial
                    for name in trial:
                        outputs[name] = [_hollow(o) for o in outputs[name]]
            else:
                found = self._run(unit, b, inputs, outputs, state["dropped"], upto)
            if b == 0 and "held" in found:
                state["held"] = found["held"]
            yield found

    def _inside_sampling(self, work):
        """Run `work` inside one diffusion-model call of ComfyUI's sampler, so that the model is
        loaded and patched as for sampling while its units are replayed."""
        done = {}
        self._select(0)
        conds, pooled = _load(self.conds[0])
        self.c._unet_call(conds, pooled, [], inside=lambda: done.setdefault("value", work()))
        self.c.passes += 1
        return done["value"]


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
