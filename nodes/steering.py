"""Put transport maps on a ComfyUI MODEL or CLIP, functionally: clone, patch the clone, return it.

Each mapped layer is either folded or run per step.
folded: the map becomes weight patches on the layer (nodes/folding.py, the same mechanism as a LoRA):
       no per-step cost, and ComfyUI applies them however it holds the model (fully on the GPU,
       offloaded, or partially loaded with weights cast per call), on top of the clone's earlier
       patches (LoRAs, earlier apply nodes). Each patch holds two per-neuron vectors.
       exact mode folds a layer where the fold is exactly the method: the map moves every element on
       its own (token maps, pixel-form conv maps) with no gate, the layer has a weight and a bias to
       fold into, steering covers the whole sampling window and both branches (the text encoders
       have neither), and no earlier object patch wraps the layer (its output is moved after that
       wrapper's, and a fold would move it before). For a conv map of the mean form (Linear-AcT) it
       folds the shift into the norm's bias and runs the rest, the mean's slope, per step
       (LayerMap.mean_shift_fold): one mean and one multiply-add. "fold all (approximate)" folds
       every map that has a weight and bias to fold into: conv maps of the mean form (Linear-AcT)
       then scale every pixel instead of moving the channel mean, and support ranges are ignored.
per step: diffusion model: an object patch on the .forward of each such layer (wrapping the layer's
       forward and transporting its output) and one on "diffusion_model.forward" that tells them,
       per call, whether this call is steered and which batch rows to move. The per-call state is
       a stack, so that a diffusion-model call made inside another (a patch that runs the model
       again) is steered on its own terms and the outer call resumes as it was. ComfyUI sets object
       patches when it loads this clone and restores the originals when another clone is loaded, so
       no other clone of the shared nn.Module is touched; per step the cost is one Python call and
       one kernel per layer, with nothing registered or removed.
       Text encoders (run once per prompt, not per step): one object patch on "clip_x.forward" that
       registers forward hooks on the mapped layers for that call and removes them in `finally`.
       Either way, when apply nodes are chained the inner (earlier) node's maps run first, as the
       graph reads. The transport runs one Triton kernel on CUDA (act_core.kernels), the PyTorch
       reference elsewhere.
The sampling window is read at each call from the model_sampling the sampled model holds then, so a
ModelSampling node placed after Apply moves the window with the schedule it sets.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..act_core import LayerMap, TransportMaps, check_strength, kernels
from ..act_core.modules import Hook, hooks_installed
from ..act_core.concept_words import is_concept_words
from .concept_words import steer_words
from .patching import original_or_patched
from .folding import HookFold, LaterPatchCheck, fold_patches, folds_exactly, has_weight_and_bias, shift_patch
from .model_layers import ActError, check_maps_fit, clip_modules, is_unet_layer, unet_modules

log = logging.getLogger("comfyui_act")

EXACT = "exact"
FOLD_ALL = "fold all (approximate)"
MODES = (EXACT, FOLD_ALL)
# Workflows saved before the rename say "fused": it still does what it did (fold every map).
LEGACY_MODES = {"fused": FOLD_ALL}
BRANCHES = ("conditional and unconditional", "conditional only")


def check_mode(mode: str) -> str:
    """The mode as this version names it; "fused" (older workflows) is "fold all (approximate)"."""
    if mode in MODES:
        return mode
    if mode in LEGACY_MODES:
        return LEGACY_MODES[mode]
    raise ActError(f"mode {mode!r} is unknown; choose one of {', '.join(MODES)} on Apply Transport Maps")


@dataclass
class Placement:
    """Where each mapped layer of one apply went: folded into weights, or run per step. shift_folded:
    the per-step layers (mean-form conv maps) whose shift is folded into the norm's bias, each with
    what is left to run per step (LayerMap.mean_shift_fold). no_weights: the per-step layers with no
    weight and bias to fold into (FLUX.1's and SD3's norms have none), which run per step in any mode."""

    folded: list[str] = field(default_factory=list)
    per_step: list[str] = field(default_factory=list)
    shift_folded: dict[str, LayerMap] = field(default_factory=dict)
    no_weights: list[str] = field(default_factory=list)

    def __iadd__(self, other: "Placement") -> "Placement":
        self.folded += other.folded
        self.per_step += other.per_step
        self.shift_folded.update(other.shift_folded)
        self.no_weights += other.no_weights
        return self

    def summary(self, part: str, when: str = "per step") -> str:
        line = f"{part}: {len(self.folded)} layers folded into weights, {len(self.per_step)} run {when}"
        notes = []
        if self.shift_folded:
            notes.append(f"{len(self.shift_folded)} of them with their shift folded into the norm's bias")
        if self.no_weights:
            notes.append(f"{len(self.no_weights)} of them with no weight and bias to fold into")
        return line + (f" ({'; '.join(notes)})" if notes else "")


def _map_hook(layer_map, strength: float) -> Hook:
    move = kernels.transport(layer_map, strength)

    def hook(_module, _inputs, output):
        return move(output)
    return hook


def _steered_forward(inner: Callable, hooks_for_call: Callable[[tuple, dict], list]):
    def forward(*args, **kwargs):
        hooks = hooks_for_call(args, kwargs)
        if not hooks:
            return inner(*args, **kwargs)
        with hooks_installed(hooks):
            return inner(*args, **kwargs)
    return forward


class _CallState:
    """Whether the current diffusion-model call is steered, and which batch rows (None: all). Entered
    and left once per call; a call inside a call pushes its own state and restores the outer one."""

    def __init__(self):
        self.active = False
        self.rows: torch.Tensor | None = None
        self._outer: list[tuple[bool, torch.Tensor | None]] = []
        self._index_cache: dict = {}

    def enter(self, active: bool, rows: torch.Tensor | None) -> None:
        self._outer.append((self.active, self.rows))
        self.active, self.rows = active, rows

    def leave(self) -> None:
        self.active, self.rows = self._outer.pop()

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


class _Window:
    """The sampling window as sigmas, from the model_sampling of the model being sampled, recomputed
    only when that object changes (a ModelSampling node after Apply replaces it)."""

    def __init__(self, base_model, start_percent: float, end_percent: float):
        self.base_model = base_model
        self.start_percent, self.end_percent = start_percent, end_percent
        self._sampling = None
        self._sigmas = (0.0, 0.0)

    def contains(self, sigma: float) -> bool:
        sampling = self.base_model.model_sampling
        if sampling is not self._sampling:
            self._sigmas = (float(sampling.percent_to_sigma(self.start_percent)),
                            float(sampling.percent_to_sigma(self.end_percent)))
            self._sampling = sampling
        sigma_start, sigma_end = self._sigmas
        return sigma_end <= sigma <= sigma_start


def steer_model(model, maps: TransportMaps, strength: float, start_percent: float = 0.0,
                end_percent: float = 1.0, branch: str = BRANCHES[0], mode: str = EXACT, fold: bool = True):
    """A clone of MODEL whose diffusion-model activations are transported with `strength`.
    fold=False runs every map per step (the reference the folds are checked against)."""
    return steer_model_placed(model, maps, strength, start_percent, end_percent, branch, mode, fold)[0]


def steer_model_placed(model, maps: TransportMaps, strength: float, start_percent: float = 0.0,
                       end_percent: float = 1.0, branch: str = BRANCHES[0], mode: str = EXACT,
                       fold: bool = True) -> tuple:
    """steer_model, and the Placement of its layers."""
    strength = check_strength(strength)
    mode = check_mode(mode)
    if branch not in BRANCHES:
        raise ActError(f"branch {branch!r} is unknown; choose one of {', '.join(BRANCHES)} on Apply Transport Maps")
    layers = {n: m for n, m in maps.items() if is_unet_layer(n)}
    check_maps_fit(TransportMaps(layers, maps.info), model=model)
    patched = model.clone()
    if strength == 0.0 or not layers:
        return patched, Placement()
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ActError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent}); "
                       "fix them on Apply Transport Maps")
    modules = unet_modules(model)
    whole_window = start_percent == 0.0 and end_percent == 1.0
    if whole_window and branch == BRANCHES[0]:
        placement = _fold(patched, layers, modules, strength, mode, fold, mean_shift=True)
    else:
        if mode == FOLD_ALL:
            log.warning("ComfyUI-ACT: folding cannot limit the sampling window or the branch; "
                        "the diffusion model is steered per step (exact)")
        placement = Placement(per_step=list(layers))
    for name, rest in placement.shift_folded.items():
        # The norm's bias now holds the shift, so this layer's output is only right with the rest run
        # on it: at every call of the layer, steered or not (the fold acts in every call too).
        key = f"{name}.forward"
        inner = original_or_patched(patched, key, modules[name], "forward")
        patched.add_object_patch(key, _moved_forward(inner, kernels.transport(rest, 1.0)))
    layers = {n: layers[n] for n in placement.per_step if n not in placement.shift_folded}
    if not layers:
        return patched, placement

    window = None if whole_window else _Window(model.model, start_percent, end_percent)
    state = _CallState()
    for name, layer in layers.items():
        key = f"{name}.forward"
        inner = original_or_patched(patched, key, modules[name], "forward")
        patched.add_object_patch(key, _transported_forward(inner, kernels.transport(layer, strength), state))

    def call_state(args: tuple, kwargs: dict) -> tuple[bool, torch.Tensor | None]:
        options = kwargs.get("transformer_options") or {}
        sigmas = options.get("sigmas")
        if window is not None and sigmas is not None and not window.contains(float(sigmas.flatten()[0])):
            return False, None
        if branch == BRANCHES[0]:
            return True, None
        x = args[0] if args else kwargs.get("x")
        rows = state.conditional_rows(options, x.shape[0], x.device)
        # A call that holds only unconditional rows is left alone: nothing to move, nothing to copy.
        return (True, rows) if rows.numel() else (False, None)

    key = "diffusion_model.forward"
    dm = model.model.diffusion_model
    inner = original_or_patched(patched, key, dm, "forward")
    patched.add_object_patch(key, _call_scoped_forward(inner, call_state, state))
    return patched, placement


def _transported_forward(inner: Callable, move: Callable[[torch.Tensor], torch.Tensor], state: _CallState):
    """A layer's forward that transports its output while `state` says the current call is steered."""
    def forward(*args, **kwargs):
        output = inner(*args, **kwargs)
        if not state.active:
            return output
        if not isinstance(output, torch.Tensor):
            raise ActError(f"a mapped layer returned {type(output).__name__}, not a tensor; these maps do not fit "
                           "this model: fit maps on it with Fit Transport Maps")
        rows = state.rows
        if rows is None:
            return move(output)
        moved = output.clone()
        moved[rows] = move(output[rows])
        return moved
    return forward


def _moved_forward(inner: Callable, move: Callable[[torch.Tensor], torch.Tensor]):
    """A layer's forward that transports its output at every call."""
    def forward(*args, **kwargs):
        output = inner(*args, **kwargs)
        if not isinstance(output, torch.Tensor):
            raise ActError(f"a mapped layer returned {type(output).__name__}, not a tensor; these maps do not fit "
                           "this model: fit maps on it with Fit Transport Maps")
        return move(output)
    return forward


def _call_scoped_forward(inner: Callable, call_state: Callable[[tuple, dict], tuple], state: _CallState):
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


def steer_clip(clip, maps: TransportMaps, strength: float, mode: str = EXACT, fold: bool = True):
    """A clone of CLIP whose text-encoder activations are transported with `strength`."""
    return steer_clip_placed(clip, maps, strength, mode, fold)[0]


def steer_clip_placed(clip, maps: TransportMaps, strength: float, mode: str = EXACT, fold: bool = True,
                      remembered=None) -> tuple:
    """remembered: where the concept's words keep what they moved, for the diffusion model to give back
    (nodes/concept_words.py), when the branch or the window is partial."""
    strength = check_strength(strength)
    mode = check_mode(mode)
    layers = {n: m for n, m in maps.items() if not is_unet_layer(n)}
    check_maps_fit(TransportMaps(layers, {}), clip=clip)
    patched = clip.clone()
    conditioning = getattr(maps, "conditioning", None)
    if strength != 0.0 and is_concept_words(conditioning):
        steer_words(patched, clip, conditioning, strength, remembered)
    elif strength != 0.0 and conditioning is not None:  # a gated token map of a version 3 or 4 file
        _steer_conditioning(patched, clip, conditioning, strength)
    if strength == 0.0 or not layers:
        return patched, Placement()
    modules = clip_modules(clip)
    placement = _fold(patched.patcher, layers, modules, strength, mode, fold)
    by_encoder: dict[str, list] = {}
    for name in placement.per_step:
        by_encoder.setdefault(name.split(".", 1)[0], []).append((modules[name], _map_hook(layers[name], strength)))
    stage = clip.cond_stage_model
    for encoder, hooks in by_encoder.items():
        key = f"{encoder}.forward"
        inner = original_or_patched(patched.patcher, key, getattr(stage, encoder), "forward")
        patched.patcher.add_object_patch(key, _steered_forward(inner, lambda _args, _kwargs, h=hooks: h))
    return patched, placement


def _wrapped(patcher, name: str) -> bool:
    """Whether an earlier object patch may move this layer's output: one on the layer's forward, or
    on its text encoder's forward (how text-encoder maps run per encode). The diffusion model's own
    forward patch only sets per-call state."""
    encoder = name.split(".", 1)[0]
    return f"{name}.forward" in patcher.object_patches or (
        encoder != "diffusion_model" and f"{encoder}.forward" in patcher.object_patches)


def _steer_conditioning(patched, clip, conditioning, strength: float) -> None:
    """Move the final conditioning (what CLIPTextEncode outputs) with the gated token map: only the
    tokens that look like the concept's move (act_core/token_transport.py)."""
    stage = clip.cond_stage_model
    width = conditioning.dim
    inner = original_or_patched(patched.patcher, "encode_token_weights", stage, "encode_token_weights")

    def encode(*args, **kwargs):
        out = inner(*args, **kwargs)
        if out[0].shape[-1] != width:
            raise ActError(f"these maps' conditioning map is {width} wide but this CLIP's conditioning is "
                           f"{out[0].shape[-1]}: fit the maps on this model (Fit Transport Maps)")
        return (conditioning.apply(out[0], strength), *out[1:])
    patched.patcher.add_object_patch("encode_token_weights", encode)


def _fold(patcher, layers: dict, modules: dict, strength: float, mode: str, fold: bool,
          mean_shift: bool = False) -> Placement:
    """Fold into weight patches on `patcher` what the mode folds; the rest is left to run per step.
    mean_shift: in exact mode, fold the shift of mean-form conv maps into the norm's bias too (only
    where every call of the layer is steered: the whole window, both branches)."""
    import comfy.patcher_extension
    placement = Placement()
    patches: dict = {}
    shifts: dict = {}
    rows: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        keys = (f"{name}.weight", f"{name}.bias")
        can = fold and has_weight_and_bias(modules[name], layer.dim)
        if fold and not can:
            placement.no_weights.append(name)
        if can and mode == EXACT:
            # A fold moves the layer's output before an earlier object patch's change, which the method
            # moves after it: only layers nothing else wraps fold.
            clear = not _wrapped(patcher, name) and not any(k in patcher.weight_wrapper_patches for k in keys)
            split = layer.mean_shift_fold(strength) if clear and mean_shift else None
            if split is not None:
                shifts.update(shift_patch(name, split[0]))
                placement.shift_folded[name] = split[1]
            can = clear and folds_exactly(layer, strength)
        if not can:
            placement.per_step.append(name)
            continue
        placement.folded.append(name)
        layer_patches = fold_patches(layer, name, strength)
        patches.update(layer_patches)
        for key, patch in layer_patches.items():
            rows[key] = 1.0 + abs(strength) * patch.slope
    # A shift folded into a bias adds to whatever the bias is (LoRAs and hooks before or after it):
    # no hook correction and no order check are needed for it.
    if shifts:
        missing = sorted(set(shifts) - set(patcher.add_patches(shifts, 1.0)))
        if missing:
            raise ActError(f"ComfyUI refused bias patches for {len(missing)} layers (e.g. {missing[0]}); "
                           "report the model")
    if patches:
        accepted = set(patcher.add_patches(patches, abs(strength)))
        missing = sorted(set(patches) - accepted)
        if missing:
            raise ActError(f"ComfyUI refused weight patches for {len(missing)} layers (e.g. {missing[0]}); "
                           "set mode 'exact' on Apply Transport Maps and report the model")
        patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_APPLY_HOOKS, HookFold(rows))
        patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD, LaterPatchCheck(patches))
    return placement
