"""The replay of module calls: incremental estimation at any batch size in about 1.6 passes.

The module calls on the path to the chosen layers are recorded once (CallTree, during the
collection); the replay re-runs them unit by unit from inputs recorded per batch, fitting each
layer's map from all batches before anything later sees its output. Torch modules only: the host
(schedules.Host) encodes, calls the diffusion model, checks for interrupts and says how much device
memory is free. docs/how-it-works.md explains the schedule and why its maps are the reference's.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .activations import NonFiniteActivations
from .maps import LayerMap, fit_layer
from .records import Record, RecordStore, has_nan, leaves, live_tensors, load_all, shapes_only

__all__ = ["PassComplete", "Unreplayable", "WatchedModule", "CallTree", "Replay"]


class PassComplete(Exception):
    """Raised by a hook once the last layer a truncated pass needs has run."""


class Unreplayable(Exception):
    """The model's calls cannot be replayed unit by unit; the layer-by-layer schedule is used."""


class WatchedModule(NamedTuple):
    name: str                  # the pack's layer name for a chosen layer; any unique name otherwise
    module: torch.nn.Module
    part: str                  # "text" or "unet"


class CallTree:
    """Who called whom during one pass (the first batch of the collection), for the modules on the
    path to a chosen layer: the structure that the replay re-runs."""

    def __init__(self, watched: list[WatchedModule]):
        self.modules = {w.name: w.module for w in watched}
        self.parts = {w.name: w.part for w in watched}
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


@dataclass
class Unit:
    """A module call on the path to chosen layers (or the root: the text encoding, the diffusion-model
    call), with the unit calls it makes, in the order it makes them."""
    name: str
    module: torch.nn.Module | None
    part: str
    layer: bool
    children: list["Unit"]


@dataclass
class UnitRun:
    """What one replay of a unit on one batch gave."""
    output: Any = None
    finished: bool = False          # ran to the end (no stop), so `output` is its output
    stop_input: Any = None          # the recorded (args, kwargs) of the child it stopped at
    still_held: set | None = None   # answered children whose outputs the code still held at the stop
    nan: bool = False               # with a probe: a stand-in reached something readable


@dataclass
class DropState:
    """Which children's recorded outputs are dropped (shape only) or kept for good, across runs."""
    dropped: set = field(default_factory=set)
    kept: set = field(default_factory=set)
    still_held: set | None = None


_ABSENT = object()


@contextlib.contextmanager
def modules_answering(answers: dict[torch.nn.Module, object], stop: torch.nn.Module | None, on_stop):
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


class Replay:
    """Exact incremental estimation for any batch size, with memory bounded by the batch.

    For each child unit in call order: replay the unit per batch, the children already done
    answering with their recorded outputs, and stop at the child's call to record its inputs;
    process the child (recursively); then run the unit once more per batch for its output. A
    layer's map is fitted from its output over all batches and applied before anything later sees
    it. Recorded outputs the replayed code no longer holds are tried as NaN stand-ins on the first
    batch and dropped when nothing readable sees them (docs/how-it-works.md).
    """

    def __init__(self, estimation, order: list[str], fitted: dict, method: str, support: str, progress):
        host = estimation.host
        if estimation.call_tree is None:
            raise Unreplayable("no module calls were recorded during the collection")
        blocker = host.replay_blocker()
        if blocker:
            raise Unreplayable(f"the model's calls are patched ({blocker})")
        self.est, self.host, self.fit_args, self.progress = estimation, host, (method, support), progress
        self.kinds = estimation.kinds
        self.order = order
        self.fitted = fitted        # maps of earlier text-encoder layers, applied when encoding
        self.batches = host.batches()
        self.total = estimation.total
        self.records = RecordStore()
        self.maps: dict[str, LayerMap] = {}
        self.encodings: list = []
        self.failed_probes: set = set()
        self.stand_in_given = False  # whether a NaN stand-in was handed to the model outside a probe
        self.roots = {}
        for part in ("text", "unet"):
            layers = [n for n in self.order if estimation.part_of(n) == part]
            if layers:
                self.roots[part] = self._tree(part, layers)

    def _tree(self, part: str, layers: list[str]) -> Unit:
        tree, wanted = self.est.call_tree, set(layers)

        def build(name: str) -> Unit | None:
            kids = [u for u in (build(k) for k in tree.children.get(name, [])) if u is not None]
            if not kids and name not in wanted:
                return None
            if tree.calls[name] != 1:
                raise Unreplayable(f"{name} runs {tree.calls[name]} times per call")
            return Unit(name, tree.modules[name], part, name in wanted, kids)

        in_part = [n for n in tree.children.get(None, []) if tree.parts[n] == part]
        root = Unit(part, None, part, False, [u for u in map(build, in_part) if u is not None])
        fitted: list[str] = []

        def walk(unit: Unit) -> None:
            for kid in unit.children:
                walk(kid)
            if unit.layer:
                fitted.append(unit.name)
        walk(root)
        if fitted != layers:
            raise Unreplayable("the layers do not run in the order of their module calls")
        return root

    @torch.no_grad()  # as the sweeps: a script's pipeline may hold weights that require gradients
    def run(self) -> dict[str, LayerMap]:
        # Half of what is free beside the loaded model and one batch's work (the collection ran
        # just before): recorded activations use it first, the rest goes to the CPU.
        self.records.device_room = self.host.free_device_memory() // 2
        try:
            return self._run_all()
        except NonFiniteActivations as error:
            # A stand-in for a dropped record was read on a batch that the first batch's probe did
            # not speak for (or the model itself overflowed: the layer-by-layer schedule, which
            # drops nothing, then says so).
            if not self.stand_in_given:
                raise
            raise Unreplayable(f"{error.layer} read a record that the replay had dropped as unused") from None

    def _run_all(self) -> dict[str, LayerMap]:
        none = [None] * len(self.batches)
        if "text" in self.roots:
            self.encodings = self._fit(self.roots["text"], none, need_output="unet" in self.roots)
        if "unet" in self.roots:
            if not self.encodings:
                hooks = [(self.est.text_layers[n], lambda _m, _i, out, m=m: m.apply(out, 1.0))
                         for n, m in self.fitted.items()]
                self.encodings = [self.records.keep_all(self.est.encode(batch, hooks)) for batch in self.batches]
            self._fit(self.roots["unet"], none, need_output=False)
        return {n: self.maps[n] for n in self.order}

    def _call(self, unit: Unit, b: int, inputs: list):
        if unit.module is not None:
            args, kwargs = load_all(inputs[b])
            return unit.module(*args, **kwargs)
        self.est.passes += 1
        if unit.part == "text":
            return self.est.encode(self.batches[b], [])
        self.host.call_model(self.batches[b], load_all(self.encodings[b]), [])
        return None

    def _run(self, unit: Unit, b: int, inputs: list, outputs: dict, stand_ins: set, upto: int,
             probe: bool = False) -> UnitRun:
        """Replay `unit` on batch b, its first `upto` children answering from `outputs` (NaN for
        those in `stand_ins`); stop at child `upto` (recording its inputs and which answers are
        still held), or run to the end. With probe, `nan` tells whether a stand-in reached anything
        that later code can read: the recorded inputs, the output, or any tensor the replayed
        frames still hold."""
        self.host.check_interrupt()
        self.est.calls.select(self.batches[b], self.est.rows(self.batches[b]))
        kids = unit.children
        handed: dict[str, list] = {}
        run = UnitRun()

        def answer(kid: Unit):
            def forward(*_args, **_kwargs):
                if kid.name in stand_ins and not probe:
                    self.stand_in_given = True
                value = load_all(outputs[kid.name][b], stand_in=kid.name in stand_ins)
                handed[kid.name] = [weakref.ref(t) for t in leaves(value, torch.Tensor)]
                return value
            return forward

        def stop(_module, args, kwargs):
            run.still_held = {n for n, refs in handed.items() if any(r() is not None for r in refs)}
            run.stop_input = self.records.keep_all((args, kwargs))
            if probe:
                run.nan = has_nan((args, kwargs)) or has_nan(live_tensors(Replay._call.__code__))
            raise PassComplete()

        with modules_answering({k.module: answer(k) for k in kids[:upto]},
                               kids[upto].module if upto < len(kids) else None, stop):
            try:
                run.output = self._call(unit, b, inputs)
                run.finished = True
            except PassComplete:
                pass
        if upto < len(kids) and run.stop_input is None:
            raise Unreplayable(f"{kids[upto].name} did not run when {unit.name} was replayed")
        if probe and run.finished:
            run.nan = has_nan(run.output)
        return run

    def _fit(self, unit: Unit, inputs: list, need_output: bool) -> list | None:
        """Fit every layer inside `unit` (inputs recorded per batch); returns its recorded outputs
        per batch (maps applied) when need_output."""
        kids = unit.children
        outputs: dict[str, list] = {}
        state = DropState()
        for j, kid in enumerate(kids):
            captured = [run.stop_input for run in self._runs(unit, inputs, outputs, state, j)]
            needed = j + 1 < len(kids) or need_output or unit.layer
            if unit.module is None and unit.part == "unet":
                outputs[kid.name] = self._inside_model_call(lambda: self._fit(kid, captured, needed))
            else:
                outputs[kid.name] = self._fit(kid, captured, needed)
            del captured
        if not (need_output or unit.layer):
            return None
        results, table = [], {}
        for run in self._runs(unit, inputs, outputs, state, len(kids)):
            output, run.output = run.output, None
            if unit.layer:
                if not isinstance(output, torch.Tensor):
                    raise self.host.error(f"layer {unit.name} does not output a tensor; leave it out with the "
                                          "'pattern' input")
                self.est.record(table, unit.name, unit.part, *self.est.pool(unit.name, unit.part, output))
            results.append(self.records.keep_all(output))
            del output
        if not unit.layer:
            return results
        source, target = self.est.split(table)
        layer_map = fit_layer(source[unit.name], target[unit.name], *self.fit_args, kind=self.kinds[unit.name])
        self.maps[unit.name] = layer_map
        if self.progress is not None:
            self.progress.update(1)
        if not need_output:
            return None
        return [self.records.keep_all(layer_map.apply(load_all(r), 1.0)) for r in results]

    def _runs(self, unit: Unit, inputs: list, outputs: dict, state: DropState, upto: int):
        """The replays of `unit` over all batches up to child `upto` (or to the end). Recorded
        outputs of earlier children that the replayed code no longer held at the previous child's
        call are tried as NaN stand-ins on the first batch; when no NaN reaches anything readable,
        their records are dropped (only live state, e.g. skip connections, is kept); otherwise they
        are kept for good."""
        kids = unit.children
        # Only children answered in the previous run can be known to be let go (the previous child was
        # that run's stop, and its output is the next one's input more often than not).
        answered_last_run = {k.name for k in kids[:max(0, upto - 1)]}
        trial = set() if state.still_held is None else answered_last_run - state.still_held - state.dropped - state.kept
        # Only outputs made of floating tensors are tried: an integer has no NaN to show a wrong guess.
        trial = {name for name in trial if all(r.data.is_floating_point() for r in leaves(outputs[name][0], Record))}
        # A failed probe costs a second run of the first batch; units of one class fail alike
        # (a residual sum that reads the answer), so a failure is remembered for the class.
        known = (type(unit.module) if unit.module is not None else unit.name, upto,
                 tuple(i for i, k in enumerate(kids) if k.name in trial))
        if trial and known in self.failed_probes:
            state.kept |= trial
            trial = set()
        for b in range(len(self.batches)):
            if b == 0 and trial:
                run = self._run(unit, b, inputs, outputs, state.dropped | trial, upto, probe=True)
                if run.nan:
                    self.failed_probes.add(known)
                    state.kept |= trial
                    run = self._run(unit, b, inputs, outputs, state.dropped, upto)
                else:
                    state.dropped |= trial
                    for name in trial:
                        outputs[name] = [shapes_only(o) for o in outputs[name]]
            else:
                run = self._run(unit, b, inputs, outputs, state.dropped, upto)
            if b == 0 and run.still_held is not None:
                state.still_held = run.still_held
            yield run

    def _inside_model_call(self, work):
        """Run `work` inside one call of the diffusion model (for ComfyUI: inside its sampler, so that
        the model is loaded and patched as for sampling while its units are replayed)."""
        done = {}
        self.est.calls.select(self.batches[0], self.est.rows(self.batches[0]))
        self.host.call_model(self.batches[0], load_all(self.encodings[0]), [],
                             inside=lambda: done.setdefault("value", work()))
        self.est.passes += 1
        return done["value"]
