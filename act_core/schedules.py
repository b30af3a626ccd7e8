"""The collection protocol and the estimation schedules, for any host that can run a model's passes.

A host (ComfyUI's nodes, a diffusers pipeline) implements `Host`: encode a batch of prompts, call
the diffusion model on it, pool a text-encoder layer's output per prompt, check for an interrupt,
say how much device memory is free. `Estimation` runs everything else: the collection pass, and the
incremental fit by one of four schedules (at once; one pass fitting inside the hooks; the replay of
module calls, act_core.replay; layer by layer, the reference). docs/how-it-works.md says why they
give the same maps.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol

import torch

from .activations import Activations, NonFiniteActivations
from .maps import LayerMap, TransportMaps, fit_layer
from .modules import Hook
from .replay import CallTree, PassComplete, Replay, Unreplayable, WatchedModule

__all__ = ["Host", "Estimation", "CallState", "SweepResult", "FitReport", "NonFiniteActivations", "MIN_PROMPTS",
           "SCHEDULES", "WHERE", "BLOCKS", "prompts_digest", "pool_spatial", "fit_at_once", "fit_maps"]

log = logging.getLogger("comfyui_act")

MIN_PROMPTS = 8
SCHEDULES = ("incremental", "at once")
WHERE = ("diffusion model", "text encoder", "both")
BLOCKS = ("auto", "layers")
Hooks = list[tuple[torch.nn.Module, Hook]]


class CallState:
    """Which batch the current model call carries, and which prompts the current text-encoder call
    does (a host that encodes prompts one by one begins one call per prompt)."""

    def __init__(self):
        self.prompts: list[int] = []
        self.rows = torch.zeros(0, dtype=torch.long)
        self.fired: set[str] = set()     # layers that ran in the current call

    def select(self, batch: list[int], rows: torch.Tensor) -> None:
        self.rows, self.prompts = rows, list(batch)
        self.fired.clear()

    def begin(self, prompts: list[int]) -> None:
        """A host's text-encoder call on these prompts starts."""
        self.prompts = list(prompts)
        self.fired.clear()


class Host(Protocol):
    """What a host does for the estimation; everything else is the protocol's."""
    family: str
    n_prompts: int                           # source prompts first, then target prompts
    n_source: int
    levels: int                              # noise levels per prompt
    batched_text: bool                       # whether one text-encoder call holds a whole batch
    text_layers: dict[str, torch.nn.Module]  # chosen layers, by the pack's names, in each part
    unet_layers: dict[str, torch.nn.Module]
    error: Callable[[str], Exception]        # the host's error for a problem the user can fix
    non_finite: Callable[[str], NonFiniteActivations]
    split_batch_fix: str                     # what to do when a layer saw fewer samples than were sent

    def batches(self) -> list[list[int]]: ...
    def encode(self, batch: list[int], hooks: Hooks, calls: CallState) -> Any: ...
    def call_model(self, batch: list[int], encoding: Any, hooks: Hooks, inside: Callable | None = None) -> None: ...
    def pool_text(self, name: str, output: torch.Tensor, prompts: list[int]) -> torch.Tensor: ...
    def watched_modules(self) -> list[WatchedModule]: ...
    def replay_blocker(self) -> str | None: ...
    def check_interrupt(self) -> None: ...
    def free_device_memory(self) -> int: ...
    def info(self) -> dict: ...


def prompts_digest(source: list[str], target: list[str]) -> str:
    return hashlib.sha256(("\n".join(source) + "\0" + "\n".join(target)).encode()).hexdigest()


def pool_spatial(output: torch.Tensor) -> torch.Tensor:
    """Mean over height and width (conv layers) or tokens, float32, on the CPU: [samples, neurons]."""
    return (output.float().mean(dim=(2, 3)) if output.ndim == 4
            else output.float().mean(1) if output.ndim == 3 else output.float()).cpu()


class Pooled(NamedTuple):
    values: torch.Tensor    # [call prompts (text) or batch samples (unet), neurons], float32 on the CPU
    rows: torch.Tensor      # the rows of the sample table they belong to


class Sides(NamedTuple):
    source: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]


@dataclass
class SweepResult:
    samples: dict[str, torch.Tensor] = field(default_factory=dict)   # layer -> [all samples, neurons]
    kinds: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    maps: dict[str, LayerMap] = field(default_factory=dict)          # fitted inside the hooks
    repeated: set[str] = field(default_factory=set)                  # layers that ran twice in one call


@dataclass
class FitReport:
    """How the last incremental fit ran: bench/estimation and the tests read it."""
    schedule: str           # "one pass", "replay", "layer by layer" (text encoders first, where so)
    passes: int
    cpu_peak_bytes: int = 0


class Estimation:
    """The passes over one host's model and one pair of prompt sets."""

    def __init__(self, host: Host):
        self.host = host
        self.levels = host.levels
        self.total = host.n_prompts * host.levels
        self.text_layers, self.unet_layers = dict(host.text_layers), dict(host.unet_layers)
        self.kinds: dict[str, str] = {}
        self.passes = 0
        self.call_tree: CallTree | None = None
        self.calls = CallState()
        self.last_fit: FitReport | None = None
        self._encodings: dict[tuple, Any] = {}

    def part_of(self, name: str) -> str:
        return "unet" if name in self.unet_layers else "text"

    def rows(self, batch: list[int]) -> torch.Tensor:
        """Sample indices (prompt * levels + level) of a batch, in batch order."""
        return torch.tensor([p * self.levels + lv for p in batch for lv in range(self.levels)])

    def encode(self, batch: list[int], hooks: Hooks) -> Any:
        self.calls.begin(batch)
        return self.host.encode(batch, hooks, self.calls)

    # ----- one sweep -----

    @torch.no_grad()  # ComfyUI runs nodes in inference mode; scripts and tests may not, and the pooled
    # rows must never hold on to a pass's autograd graph.
    def sweep(self, batches: list[list[int]], record: set[str], apply_maps: dict[str, LayerMap],
              fit_args: tuple | None, stop_after: str | None, progress=None, call_tree: CallTree | None = None
              ) -> SweepResult:
        """Run batches through text encoder then diffusion model: record the pooled activations of
        the layers in `record`, apply `apply_maps`, fit maps in the hooks when fit_args is given, and
        stop each pass after layer `stop_after`; record the first batch's module calls into `call_tree`."""
        result = SweepResult()
        need_unet = stop_after is None or stop_after in self.unet_layers
        for index, batch in enumerate(batches):
            self.host.check_interrupt()
            self.calls.select(batch, self.rows(batch))
            recording = call_tree.recording() if call_tree is not None and index == 0 else contextlib.nullcontext()
            text_record = record & set(self.text_layers)
            text_apply = frozenset(n for n in self.text_layers if n in apply_maps)
            cache_key = (batch[0], text_apply)
            cacheable = not text_record and fit_args is None
            try:
                with recording:
                    if cacheable and cache_key in self._encodings:
                        encoding = self._encodings[cache_key]
                    else:
                        text_hooks = [(m, self._hook(n, "text", record, apply_maps, fit_args, stop_after, result))
                                      for n, m in self.text_layers.items()
                                      if n in text_record or n in text_apply or fit_args]
                        encoding = self.encode(batch, text_hooks)
                        if cacheable:
                            self._encodings[cache_key] = encoding
                    if need_unet and self.unet_layers and (record & set(self.unet_layers) or fit_args):
                        self.calls.select(batch, self.calls.rows)
                        unet_hooks = [(m, self._hook(n, "unet", record, apply_maps, fit_args, stop_after, result))
                                      for n, m in self.unet_layers.items() if n in record or n in apply_maps or fit_args]
                        self.host.call_model(batch, encoding, unet_hooks)
            except PassComplete:
                pass
            self.passes += 1
            if progress is not None:
                progress.update(1)
        return result

    def _hook(self, name: str, part: str, record: set, apply_maps: dict, fit_args, stop_after, result: SweepResult):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise self.host.error(f"layer {name} does not output a tensor; leave it out with the 'pattern' input")
            if name in self.calls.fired:
                # One map cannot describe two calls with different inputs (SD2's final_layer_norm
                # runs on the hidden layer and again for the pooled output): such layers are left out.
                result.repeated.add(name)
                return output
            self.calls.fired.add(name)
            pooled, rows = self.pool(name, part, output)
            kind = "conv" if output.ndim == 4 else "token"
            result.kinds[name] = kind
            if name not in result.order:
                result.order.append(name)
            if name in record:
                self.record(result.samples, name, part, pooled, rows)
            layer_map = apply_maps.get(name)
            if layer_map is None and fit_args is not None:
                # Only where this call holds every sample: a batched text call or the one-batch model call.
                samples = pooled if part == "unet" else pooled.repeat_interleave(self.levels, 0)
                is_source = (self.calls.rows // self.levels) < self.host.n_source
                layer_map = fit_layer(samples[is_source], samples[~is_source], *fit_args, kind=kind)
                result.maps[name] = layer_map
            if layer_map is not None:
                output = layer_map.apply(output, 1.0)
            if name == stop_after:
                raise PassComplete()
            return output
        return hook

    def pool(self, name: str, part: str, output: torch.Tensor) -> Pooled:
        if part == "text":
            pooled = self.host.pool_text(name, output, self.calls.prompts)
            rows = torch.tensor([p * self.levels for p in self.calls.prompts])
        else:
            pooled, rows = pool_spatial(output), self.calls.rows
        if pooled.shape[0] != rows.shape[0]:
            raise self.host.error(f"layer {name} saw {pooled.shape[0]} samples where {rows.shape[0]} were sent; "
                                  + self.host.split_batch_fix)
        if not torch.isfinite(pooled).all():
            raise self.host.non_finite(name)
        return Pooled(pooled, rows)

    def record(self, samples: dict, name: str, part: str, pooled: torch.Tensor, rows: torch.Tensor) -> None:
        store = samples.get(name)
        if store is None:
            store = samples[name] = torch.full((self.total, pooled.shape[1]), math.nan)
        if part == "text":
            for lv in range(self.levels):
                store[rows + lv] = pooled
        else:
            store[rows] = pooled

    def split(self, samples: dict[str, torch.Tensor]) -> Sides:
        cut = self.host.n_source * self.levels
        return Sides({n: t[:cut] for n, t in samples.items()}, {n: t[cut:] for n, t in samples.items()})

    # ----- the schedules -----

    def collect(self, progress=None) -> Activations:
        """One pass over all prompts, no maps applied: the activations "at once" fitting uses."""
        everything = set(self.text_layers) | set(self.unet_layers)
        self.call_tree = CallTree(self.host.watched_modules())
        result = self.sweep(self.host.batches(), everything, {}, None, None, progress, self.call_tree)
        order = [n for n in result.order if n not in result.repeated]
        missing = everything - set(result.order)
        if missing:
            log.info("ComfyUI-ACT: %d selected layers never ran and are left out (e.g. %s)", len(missing), min(missing))
        if result.repeated:
            log.info("ComfyUI-ACT: left out layers that run more than once per call: %s", sorted(result.repeated))
        self.text_layers = {n: m for n, m in self.text_layers.items() if n in order}
        self.unet_layers = {n: m for n, m in self.unet_layers.items() if n in order}
        self.kinds = {n: result.kinds[n] for n in order}
        source, target = self.split({n: result.samples[n] for n in order})
        return Activations(source, target, dict(self.kinds), self.host.family, self.host.info(), self.host)

    def incremental(self, activations: Activations, method: str, support: str, blocks: str = "auto",
                    progress_factory=None) -> dict[str, LayerMap]:
        """Maps fitted in model order, each from activations with all earlier maps applied.

        blocks: "auto" (one pass with fitting in the hooks when everything fits one batch, else the
        replay of module calls; both exact), "layers" (one sweep per layer, the reference's schedule,
        kept as the yardstick and as the fallback)."""
        if blocks not in BLOCKS:
            raise self.host.error(f"blocks must be 'auto' or 'layers', got {blocks!r}")
        self.kinds = dict(activations.kinds)
        order, batches, start = activations.order, self.host.batches(), self.passes
        maps: dict[str, LayerMap] = {}
        schedule: list[str] = []

        def report(name: str, peak: int = 0) -> dict[str, LayerMap]:
            self.last_fit = FitReport(" + ".join(s for s in schedule + [name] if s), self.passes - start, peak)
            return maps
        if blocks == "auto" and not self.host.batched_text:
            # Prompts go through these text encoders one by one: no call holds every sample at a
            # layer, so their layers are fitted one at a time (text-encoder passes only, truncated
            # after the layer); the diffusion model then follows the schedules below, those maps applied.
            text = [n for n in order if self.part_of(n) == "text"]
            self._layer_by_layer(text, maps, method, support, progress_factory)
            order = order[len(text):]
            if text:
                schedule.append("text encoders layer by layer")
            if not order:
                return report("")
        if blocks == "auto" and len(batches) == 1:
            progress = progress_factory(1) if progress_factory else None
            result = self.sweep(batches, set(), dict(maps), (method, support), order[-1], progress)
            maps.update({n: result.maps[n] for n in order})
            return report("one pass")
        if blocks == "auto":
            try:
                progress = progress_factory(len(order)) if progress_factory else None
                replay = Replay(self, order, maps, method, support, progress)
                maps.update(replay.run())
                return report("replay", replay.records.cpu_peak_bytes)
            except Unreplayable as why:
                log.warning("ComfyUI-ACT: %s; fitting layer by layer instead (exact, one pass per layer)", why)
        self._layer_by_layer(order, maps, method, support, progress_factory)
        return report("layer by layer")

    def _layer_by_layer(self, names: list[str], maps: dict, method: str, support: str, progress_factory) -> None:
        """The reference's schedule: one sweep per layer, truncated after it, earlier maps applied."""
        batches = self.host.batches()
        progress = progress_factory(len(names) * len(batches)) if progress_factory and names else None
        for name in names:
            result = self.sweep(batches, {name}, dict(maps), None, name, progress)
            source, target = self.split(result.samples)
            maps[name] = fit_layer(source[name], target[name], method, support, kind=self.kinds[name])


def fit_at_once(activations: Activations, method: str, support: str) -> dict[str, LayerMap]:
    return {n: fit_layer(activations.source[n], activations.target[n], method, support, kind=activations.kinds[n])
            for n in activations.order}


def fit_maps(activations: Activations, method: str, support: str, schedule: str, progress_factory=None,
             blocks: str = "auto") -> TransportMaps:
    """Maps keyed by the pack's layer names, with the collection's info; `activations.collector` is
    the host (its `estimation` runs the incremental schedules)."""
    if schedule not in SCHEDULES:
        raise activations.collector.error(f"estimation must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "at once":
        layers = fit_at_once(activations, method, support)
    else:
        layers = activations.collector.estimation.incremental(activations, method, support, blocks, progress_factory)
    return TransportMaps(layers, dict(activations.info, method=method, support=support, estimation=schedule))
