"""The diffusion model's per-step layers: object patches on each mapped layer's forward that transport
its output, switched on and off per diffusion-model call by an object patch on the diffusion model's
forward (see nodes/steering.py for what runs where).

ComfyUI sets a clone's object patches on whichever copy of the model it runs, not only the one the
clone was made from: a clone it makes over a freshly loaded model (with dynamic VRAM, for conds that
carry hooks) or over another GPU's copy (multi-GPU, sampled in a thread of its own) gets the same patch
functions. So no patch is bound to the modules Apply saw: an APPLY_MODEL wrapper (copied with the
clone) records, per thread, the model being run, and each patch calls its layer in that model; the
per-call state is per thread too.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch

from .model_layers import ActError


class CallState:
    """Per thread: the model whose diffusion model is running (apply_model calls, innermost last), and
    whether the current diffusion-model call is steered, which batch rows (None: all) and, for a
    partial sampling window, a 0-dim bool tensor on the activations' device that says whether this
    call's sigma lies in it (None: every call). A call inside a call pushes its own state and restores
    the outer one. Outside any apply_model call (a
    caller running the diffusion model directly) the model Apply was given is the one that runs."""

    def __init__(self, base_model):
        self._local = threading.local()
        self._given = base_model
        self._layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {name: module}
        self._index_cache: dict = {}

    def _stacks(self) -> tuple[list, list]:
        local = self._local
        if not hasattr(local, "models"):
            local.models, local.calls = [], []
        return local.models, local.calls

    def enter_model(self, base_model) -> None:
        table = self._layers.get(base_model)
        if table is None:
            table = self._layers[base_model] = {}
        self._stacks()[0].append((base_model, table))

    def leave_model(self) -> None:
        self._stacks()[0].pop()

    def running(self):
        """The model (ComfyUI's BaseModel) whose diffusion model runs on this thread now."""
        models = self._stacks()[0]
        return models[-1][0] if models else self._given

    def layer(self, name: str) -> torch.nn.Module:
        """Module `name` ("diffusion_model.<path>") of the model running on this thread."""
        models = self._stacks()[0]
        base, table = models[-1] if models else (self._given, None)
        module = table.get(name) if table is not None else None
        if module is None:
            module = base
            for part in name.split("."):
                module = getattr(module, part)
            if table is not None:
                table[name] = module
        return module

    def enter(self, active: bool, rows: torch.Tensor | None, gate: torch.Tensor | None = None) -> None:
        self._stacks()[1].append((active, rows, gate))

    def leave(self) -> None:
        self._stacks()[1].pop()

    def current(self) -> tuple[bool, torch.Tensor | None, torch.Tensor | None]:
        calls = getattr(self._local, "calls", None)
        return calls[-1] if calls else (False, None, None)

    def conditional_rows(self, transformer_options: dict, batch: int, device: torch.device) -> torch.Tensor:
        """Rows of the batch that belong to the conditional branch (cond_or_uncond marks 0 = cond), as
        an index on the activations' device, built once per batch layout rather than once per call."""
        chunks = tuple(transformer_options.get("cond_or_uncond") or [0])
        key = (chunks, batch, device)
        rows = self._index_cache.get(key)
        if rows is None:
            size = batch // len(chunks)
            rows = torch.tensor([i for c, kind in enumerate(chunks) if kind == 0
                                 for i in range(c * size, (c + 1) * size)], dtype=torch.long, device=device)
            self._index_cache[key] = rows
        return rows


def running_model_wrapper(state: CallState):
    """The APPLY_MODEL wrapper that tells `state` which model runs (ComfyUI's executor.class_obj)."""
    def wrapper(executor, *args, **kwargs):
        state.enter_model(executor.class_obj)
        try:
            return executor(*args, **kwargs)
        finally:
            state.leave_model()
    return wrapper


def layer_call(name: str, earlier: Callable | None, state: CallState) -> Callable:
    """What an object patch on `name`.forward wraps: an earlier object patch on the same clone (which
    resolves its own module), else the forward of layer `name` in the model running now."""
    if earlier is not None:
        return earlier

    def call(*args, **kwargs):
        module = state.layer(name)
        return type(module).forward(module, *args, **kwargs)
    return call


def _tensor_output(output):
    if not isinstance(output, torch.Tensor):
        raise ActError(f"a mapped layer returned {type(output).__name__}, not a tensor; these maps do not fit "
                       "this model: fit maps on it with Fit Transport Maps")
    return output


def transported_forward(inner: Callable, move: Callable[[torch.Tensor], torch.Tensor], state: CallState):
    """A layer's forward that transports its output while `state` says the current call is steered.
    The window's gate is applied on the device (torch.where), never read on the host: reading it
    would make the CPU wait for the card at every diffusion-model call."""
    def forward(*args, **kwargs):
        output = inner(*args, **kwargs)
        active, rows, gate = state.current()
        if not active:
            return output
        output = _tensor_output(output)
        part = output if rows is None else output[rows]
        moved_part = move(part)
        if gate is not None:
            moved_part = torch.where(gate, moved_part, part)
        if rows is None:
            return moved_part
        moved = output.clone()
        moved[rows] = moved_part
        return moved
    return forward


def moved_forward(inner: Callable, move: Callable[[torch.Tensor], torch.Tensor]):
    """A layer's forward that transports its output at every call."""
    def forward(*args, **kwargs):
        return move(_tensor_output(inner(*args, **kwargs)))
    return forward


def call_scoped_forward(inner: Callable, call_state: Callable[[tuple, dict], tuple], state: CallState):
    """The diffusion model's forward, with the layers' state set for this call and the caller's state
    restored after it, so that the layers never move anything outside a call of this clone (an
    interrupt included) and a nested call leaves the outer call's steering as it was."""
    def forward(*args, **kwargs):
        state.enter(*call_state(args, kwargs))
        try:
            return inner(*args, **kwargs)
        finally:
            state.leave()
    return forward


class Window:
    """The sampling window as sigmas, from the model_sampling of the model being sampled, recomputed
    only when that object changes (a ModelSampling node after Apply replaces it)."""

    def __init__(self, start_percent: float, end_percent: float):
        self.start_percent, self.end_percent = start_percent, end_percent
        self._sampling = None
        self._sigmas = (0.0, 0.0)

    def _bounds(self, sampling) -> tuple[float, float]:
        if sampling is not self._sampling:
            self._sigmas = (float(sampling.percent_to_sigma(self.start_percent)),
                            float(sampling.percent_to_sigma(self.end_percent)))
            self._sampling = sampling
        return self._sigmas

    def contains(self, sigma: float, sampling) -> bool:
        sigma_start, sigma_end = self._bounds(sampling)
        return sigma_end <= sigma <= sigma_start

    def gate(self, sigmas: torch.Tensor, sampling) -> torch.Tensor:
        """Whether the call's sigma (the first of the batch's, as ComfyUI's own windows read it) lies in
        the window, as a 0-dim bool tensor on sigmas' device, computed without a host read."""
        sigma_start, sigma_end = self._bounds(sampling)
        sigma = sigmas.reshape(-1)[0]
        return (sigma >= sigma_end) & (sigma <= sigma_start)
