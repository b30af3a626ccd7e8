"""Put transport maps on a ComfyUI MODEL or CLIP, functionally: clone, patch the clone, return it.

exact: diffusion model: an object patch on the .forward of each mapped layer (wrapping the layer's
       forward and transporting its output) and one on "diffusion_model.forward" that tells them,
       per call, whether this step is inside the sampling window and which batch rows to move.
       ComfyUI sets object patches when it loads this clone and restores the originals when another
       clone is loaded, so no other clone of the shared nn.Module is touched; per step the cost is
       one Python call and one kernel per layer, with nothing registered or removed (forward hooks,
       registered per call, cost as much as the arithmetic on a GPU).
       Text encoders (run once per prompt, not per step): one object patch on "clip_x.forward" that
       registers forward hooks on the mapped layers for that call and removes them in `finally`.
       Either way, when apply nodes are chained the inner (earlier) node's maps run first, as the
       graph reads. The transport runs one Triton kernel on CUDA (act_core.kernels), the PyTorch
       reference elsewhere.
fused: maps folded into the weights of the layer that produces the activation, as ComfyUI weight
       patches (the same mechanism as a LoRA): no per-step cost, and ComfyUI applies them however it
       holds the model (fully on the GPU, offloaded, or partially loaded with weights cast per call).
       The fold starts from the weights this clone would compute with (the original weights plus
       the clone's earlier patches: LoRAs, earlier apply nodes), never from whatever another clone
       left patched in the shared module, and the differences are kept in float32 where ComfyUI
       keeps patches (the offload device).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..act_core import TransportMaps, check_strength, kernels
from ..act_core.modules import Hook, hooks_installed  # noqa: F401  (collection uses it from here too)
from .model_layers import ActError, check_maps_fit, clip_modules, is_unet_layer, unet_modules

log = logging.getLogger("comfyui_act")

MODES = ("exact", "fused")
BRANCHES = ("conditional and unconditional", "conditional only")

def original_or_patched(patcher, key: str, owner: torch.nn.Module, attribute: str):
    """The callable an object patch on `key` must wrap: an earlier object patch on this clone, else the
    class's own method (never the instance attribute, which another loaded clone may have patched)."""
    earlier = patcher.object_patches.get(key)
    if earlier is not None:
        return earlier
    return getattr(type(owner), attribute).__get__(owner)


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
    """Whether the current diffusion-model call is steered, and which batch rows (None: all)."""

    def __init__(self):
        self.active = False
        self.rows: torch.Tensor | None = None
        self._index_cache: dict = {}

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


def steer_model(model, maps: TransportMaps, strength: float, start_percent: float = 0.0,
                end_percent: float = 1.0, branch: str = BRANCHES[0], mode: str = "exact"):
    """A clone of MODEL whose diffusion-model activations are transported with `strength`."""
    strength = check_strength(strength)
    layers = {n: m for n, m in maps.items() if is_unet_layer(n)}
    check_maps_fit(TransportMaps(layers, maps.info), model=model)
    patched = model.clone()
    if strength == 0.0 or not layers:
        return patched
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ActError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent}); "
                       "fix them on Apply Transport Maps")
    modules = unet_modules(model)
    whole_window = start_percent == 0.0 and end_percent == 1.0
    if mode == "fused":
        if whole_window and branch == BRANCHES[0]:
            layers = _fold(patched, layers, modules, strength)
        else:
            log.warning("ComfyUI-ACT: fused mode cannot limit the sampling window or the branch; "
                        "using exact mode for the diffusion model")
    if not layers:
        return patched

    model_sampling = model.get_model_object("model_sampling")
    sigma_start = float(model_sampling.percent_to_sigma(start_percent))
    sigma_end = float(model_sampling.percent_to_sigma(end_percent))
    state = _CallState()
    for name, layer in layers.items():
        key = f"{name}.forward"
        inner = original_or_patched(patched, key, modules[name], "forward")
        patched.add_object_patch(key, _transported_forward(inner, kernels.transport(layer, strength), state))

    def begin_call(args: tuple, kwargs: dict) -> None:
        options = kwargs.get("transformer_options") or {}
        sigmas = options.get("sigmas")
        if sigmas is not None and not whole_window:
            sigma = float(sigmas.flatten()[0])
            if sigma > sigma_start or sigma < sigma_end:
                state.active = False
                return
        x = args[0] if args else kwargs.get("x")
        state.rows = state.conditional_rows(options, x.shape[0], x.device) if branch == BRANCHES[1] else None
        state.active = True

    key = "diffusion_model.forward"
    dm = model.model.diffusion_model
    inner = original_or_patched(patched, key, dm, "forward")
    patched.add_object_patch(key, _call_scoped_forward(inner, begin_call, state))
    return patched


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


def _call_scoped_forward(inner: Callable, begin_call: Callable[[tuple, dict], None], state: _CallState):
    """The diffusion model's forward, with the layers' state set for this call and cleared after it,
    so that the layers never move anything outside a call of this clone (an interrupt included)."""
    def forward(*args, **kwargs):
        begin_call(args, kwargs)
        try:
            return inner(*args, **kwargs)
        finally:
            state.active = False
    return forward


def steer_clip(clip, maps: TransportMaps, strength: float, mode: str = "exact"):
    """A clone of CLIP whose text-encoder activations are transported with `strength`."""
    strength = check_strength(strength)
    layers = {n: m for n, m in maps.items() if not is_unet_layer(n)}
    check_maps_fit(TransportMaps(layers, {}), clip=clip)
    patched = clip.clone()
    conditioning = getattr(maps, "conditioning", None)
    if strength != 0.0 and conditioning is not None:
        _steer_conditioning(patched, clip, conditioning, strength)
    if strength == 0.0 or not layers:
        return patched
    modules = clip_modules(clip)
    if mode == "fused":
        layers = _fold(patched.patcher, layers, modules, strength)
    by_encoder: dict[str, list] = {}
    for name, layer in layers.items():
        by_encoder.setdefault(name.split(".", 1)[0], []).append((modules[name], _map_hook(layer, strength)))
    stage = clip.cond_stage_model
    for encoder, hooks in by_encoder.items():
        key = f"{encoder}.forward"
        inner = original_or_patched(patched.patcher, key, getattr(stage, encoder), "forward")
        patched.patcher.add_object_patch(key, _steered_forward(inner, lambda _args, _kwargs, h=hooks: h))
    return patched


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


def _weight_as_patched(patcher, key: str) -> torch.Tensor:
    """The float32 weight `key` as this clone computes with it: the original weight (ComfyUI's backup
    when another load patched the shared module in place), dequantised where stored quantised, plus
    the clone's own earlier patches. On the device the weight is on now."""
    import comfy.lora
    import comfy.model_patcher
    weight, _set, convert = comfy.model_patcher.get_key_weight(patcher.model, key)
    backup = patcher.backup.get(key)
    if backup is not None:
        weight = backup.weight
    weight = weight.detach().to(torch.float32, copy=True)
    if convert is not None:
        weight = convert(weight, inplace=True)
    earlier = patcher.patches.get(key)
    return comfy.lora.calculate_weight(earlier, weight, key) if earlier else weight


def _fold(patcher, layers: dict, modules: dict, strength: float) -> dict:
    """Fold what can be folded into weight patches on `patcher`; return the layers left for exact hooks."""
    left = {}
    patches = {}
    keep = getattr(patcher, "offload_device", None) or torch.device("cpu")
    for name, layer in layers.items():
        module = modules[name]
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or not isinstance(
                getattr(module, "bias", None), torch.Tensor):
            left[name] = layer
            continue
        source = layer.inverse() if strength < 0 else layer
        d_weight, d_bias = source.fold(_weight_as_patched(patcher, f"{name}.weight"),
                                       _weight_as_patched(patcher, f"{name}.bias"))
        patches[f"{name}.weight"] = (d_weight.to(keep),)
        patches[f"{name}.bias"] = (d_bias.to(keep),)
    if patches:
        accepted = set(patcher.add_patches(patches, abs(strength)))
        missing = sorted(set(patches) - accepted)
        if missing:
            raise ActError(f"ComfyUI refused weight patches for {len(missing)} layers (e.g. {missing[0]}); "
                           "use mode 'exact' on Apply Transport Maps")
    if left:
        log.info("ComfyUI-ACT fused mode: %d layers have no weight and bias to fold into and run exactly", len(left))
    return left
