"""The same maps in diffusers pipelines: steering, and the diffusers host of the collection protocol.

Optional: needs the packages of the `diffusers` extra (diffusers, transformers); nothing else in
act_core imports them, and this module imports them only when a pipeline is handed to it.

    from act_core import load_maps, save_maps
    from act_core.diffusers import collect_activations, fit_maps, steer

    maps = fit_maps(collect_activations(pipe, source_prompts, target_prompts))
    save_maps(maps, "watercolor.safetensors")         # the file ComfyUI's Load Transport Maps reads
    with steer(pipe, load_maps("watercolor.safetensors"), strength=0.8):
        image = pipe("a house by a lake").images[0]

Layer names are the pack's (act_core.diffusers_names translates them); collection and fitting run
act_core.schedules, as in ComfyUI, so the same prompts give the same maps file at any batch size.
docs/diffusers.md says what is the same and what differs.
"""
from __future__ import annotations

import contextlib
import logging
import re

import torch

from . import schedules
from .activations import Activations
from .activations import NonFiniteActivations as _NonFinite
from .diffusers_names import (_SD2_DROPPED, DiffusersSupportError, PipelineLayers, TranslationError,
                              _is_dropped_sd2_layer, to_diffusers_names, to_pack_names)
from .maps import LayerMap, TransportMaps, check_strength, default_support
from .modules import hooks_installed, output_dim
from .replay import WatchedModule
from .schedules import MIN_PROMPTS, SCHEDULES, WHERE, Estimation, pool_spatial, prompts_digest

__all__ = ["DiffusersSupportError", "TranslationError", "PipelineLayers", "to_diffusers_names", "to_pack_names",
           "steer", "collect_activations", "fit_maps", "Activations", "SCHEDULES", "MIN_PROMPTS"]

log = logging.getLogger("comfyui_act")

NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm)


# ----- steering -----

def _steering_hook(name: str, layer_map: LayerMap, strength: float):
    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            raise DiffusersSupportError(f"layer {name} does not output a tensor in diffusers; it cannot be steered")
        return layer_map.apply(output, strength)
    return hook


@contextlib.contextmanager
def steer(pipe, maps: TransportMaps, strength: float = 1.0):
    """Transport the pipeline's activations with `maps` inside the with-block (exact mode, as Apply
    Transport Maps: support ranges, the spatial-mean form on conv layers, both CFG branches).

    strength: 0 = untouched, 1 = moved onto the target prompts' distribution, > 1 extrapolates,
    < 0 applies the inverse map. The hooks are removed when the block ends, an exception included.
    """
    strength = check_strength(strength)
    layers = PipelineLayers(pipe)
    if maps.family and maps.family != layers.family:
        raise DiffusersSupportError(f"these maps were fitted on an {maps.family} model but the pipeline is "
                                    f"{layers.family}; use maps made for this kind of model")
    names = [n for n in maps if not _dropped(layers, n)]
    dropped = len(maps) - len(names)
    if dropped:
        log.info("ComfyUI-ACT: %d SD2.x text-encoder layers left out: %s", dropped, _SD2_DROPPED)
    translated = layers.to_diffusers(names)
    problems = []
    for name, target in translated.items():
        width = output_dim(layers.module(target))
        if width is not None and width != maps[name].dim:
            problems.append(f"{name} ({target}): {maps[name].dim} neurons in the maps, {width} in the pipeline")
    if problems:
        raise DiffusersSupportError(f"the maps do not match this pipeline's layers: {'; '.join(problems[:5])}"
                                    + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
    hooks = [] if strength == 0.0 else [
        (layers.module(target), _steering_hook(name, maps[name], strength)) for name, target in translated.items()]
    with hooks_installed(hooks):
        yield pipe


def _dropped(layers: PipelineLayers, name: str) -> bool:
    if layers.family != "SD2.x" or name.startswith("diffusion_model."):
        return False
    encoder, _, rest = name.partition(".")
    model = layers.encoders.get(encoder, (None, None))[1]
    return model is not None and _is_dropped_sd2_layer(rest, model)


# ----- the diffusers host of the collection protocol -----

class NonFiniteActivations(DiffusersSupportError, _NonFinite):
    def __init__(self, layer: str):
        super().__init__(f"layer {layer} produced NaN or infinite activations; run the pipeline in a higher "
                         "precision (float32)")
        self.layer = layer


class PipelineHost:
    """One pipeline and one pair of prompt sets (schedules.Host): the pipeline's encode_prompt, one UNet
    call per batch at the first, noisiest step, conditional branch only."""

    error = DiffusersSupportError
    non_finite = NonFiniteActivations
    split_batch_fix = "lower batch_size"
    levels = 1
    batched_text = True

    def __init__(self, pipe, source: list[str], target: list[str], where: str, pattern: str, resolution: int,
                 batch_size: int, seed: int):
        if where not in WHERE:
            raise DiffusersSupportError(f"where must be one of {WHERE}, got {where!r}")
        for side, prompts in (("source", source), ("target", target)):
            if len(prompts) < MIN_PROMPTS:
                raise DiffusersSupportError(f"{len(prompts)} {side} prompts; at least {MIN_PROMPTS} are needed")
        self.pipe = pipe
        self.layers = PipelineLayers(pipe)
        self.family = self.layers.family
        candidates = self.layers.modules(where)
        if pattern:
            try:
                regex = re.compile(pattern)
            except re.error as error:
                raise DiffusersSupportError(f"the layer pattern {pattern!r} is not a valid regular expression ({error})") from None
            chosen = {n: m for n, m in candidates.items() if regex.search(n)}
        else:
            chosen = {n: m for n, m in candidates.items() if isinstance(m, NORM_TYPES)}
        if not chosen:
            raise DiffusersSupportError(f"no layer of the {where} matches the pattern {pattern!r}")
        self.text_layers = {n: m for n, m in chosen.items() if not n.startswith("diffusion_model.")}
        self.unet_layers = {n: m for n, m in chosen.items() if n.startswith("diffusion_model.")}
        self.where, self.pattern, self.seed = where, pattern, seed
        self.prompts = list(source) + list(target)
        self.n_prompts, self.n_source = len(self.prompts), len(source)
        scale = getattr(pipe, "vae_scale_factor", 8)
        self.resolution = resolution or pipe.unet.config.sample_size * scale
        if self.resolution % scale:
            raise DiffusersSupportError(f"resolution {self.resolution} is not a multiple of {scale}")
        self.latent = self.resolution // scale
        self.batch_size = max(1, batch_size)
        self.estimation = Estimation(self)

    @property
    def passes(self) -> int:
        return self.estimation.passes

    def batches(self) -> list[list[int]]:
        order = list(range(len(self.prompts)))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def info(self) -> dict:
        source, target = self.prompts[:self.n_source], self.prompts[self.n_source:]
        return {"family": self.family, "where": self.where, "layers": self.pattern or "normalization layers",
                "resolution": self.resolution, "noise_levels": 1, "source_prompts": len(source),
                "target_prompts": len(target), "prompts_sha256": prompts_digest(source, target), "seed": self.seed}

    def encode(self, batch: list[int], hooks: list, calls) -> tuple:
        unet, prompts = self.pipe.unet, [self.prompts[p] for p in batch]
        with hooks_installed(hooks):
            if self.family == "SDXL":
                cond, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, device=unet.device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=False)
                return cond, pooled
            cond, _ = self.pipe.encode_prompt(prompts, unet.device, 1, False)
            return cond, None

    def pool_text(self, name: str, output: torch.Tensor, prompts: list[int]) -> torch.Tensor:
        return pool_spatial(output)  # diffusers truncates every prompt to one 77-token window

    def call_model(self, batch: list[int], encoding: tuple, hooks: list, inside=None) -> None:
        if inside is not None:
            inside()  # nothing to load or patch around a diffusers UNet's units
            return
        cond, pooled = encoding
        unet = self.pipe.unet
        pairs = [p if p < self.n_source else p - self.n_source for p in batch]
        shape = (unet.config.in_channels, self.latent, self.latent)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(self.seed + p)) for p in pairs])
        timestep = torch.tensor([self.pipe.scheduler.config.num_train_timesteps - 1] * len(batch), dtype=torch.float32)
        kwargs = {}
        if self.family == "SDXL":
            r = float(self.resolution)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled,
                                           "time_ids": torch.tensor([[r, r, 0.0, 0.0, r, r]] * len(batch),
                                                                    device=unet.device, dtype=pooled.dtype)}
        with hooks_installed(hooks):
            unet(noise.to(unet.device, unet.dtype), timestep.to(unet.device), encoder_hidden_states=cond, **kwargs)

    def watched_modules(self) -> list[WatchedModule]:
        """The chosen layers (by the pack's names) and every module above them (by diffusers' names)."""
        chosen = {**self.text_layers, **self.unet_layers}
        pack = {d: p for p, d in self.layers.to_diffusers(list(chosen)).items()}
        watched = {}
        for name in pack:
            component, _, inner = name.partition(".")
            parts = inner.split(".")
            for i in range(len(parts) + 1):
                path = ".".join([component] + parts[:i])
                name = pack.get(path, path)
                watched.setdefault(name, WatchedModule(name, self.layers.module(path),
                                                       "unet" if component == "unet" else "text"))
        return list(watched.values())

    def replay_blocker(self) -> str | None:
        """Offload hooks (accelerate's) replace a module's forward: a unit replayed alone would not be
        moved to the device as in a pass."""
        for w in self.watched_modules():
            if "forward" in w.module.__dict__:
                return f"{w.name}.forward"
        return None

    def check_interrupt(self) -> None:
        pass  # a script stops with KeyboardInterrupt; hooks and answers are removed on the way out

    def free_device_memory(self) -> int:
        device = self.pipe.unet.device
        return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0

    def incremental(self, activations: Activations, method: str, support: str, blocks: str = "auto") -> dict[str, LayerMap]:
        return self.estimation.incremental(activations, method, support, blocks)


def collect_activations(pipe, source_prompts: list[str], target_prompts: list[str], where: str = "diffusion model",
                        pattern: str = "", resolution: int = 0, batch_size: int = 16, seed: int = 0) -> Activations:
    """Pooled activations of the source and target prompts, as Collect Activations records them in ComfyUI.

    where: "diffusion model", "text encoder" or "both"; pattern: "" = normalisation layers, else a regular
    expression over the pack's layer names (of the layers with a diffusers counterpart); resolution: 0 =
    the pipeline's default size; batch_size: prompts per model call (all in one batch: incremental
    fitting costs one more pass; fewer: the replay of module calls, about 1.6 passes more).
    """
    host = PipelineHost(pipe, list(source_prompts), list(target_prompts), where, pattern, resolution, batch_size, seed)
    return host.estimation.collect()


def fit_maps(activations: Activations, method: str = "linear", support: str | None = None,
             estimation: str = "incremental") -> TransportMaps:
    """Maps keyed by the pack's layer names, with the pack's info: save_maps writes the file ComfyUI loads.

    support: None = the method's default, as Fit Transport Maps' "method default"."""
    support = default_support(method) if support is None else support
    return schedules.fit_maps(activations, method, support, estimation)
