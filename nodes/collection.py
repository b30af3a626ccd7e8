"""The ComfyUI host of the collection protocol (act_core.schedules): every pass goes through ComfyUI.

Prompts are encoded by the CLIP's encode_from_tokens (a batch's prompts as chunks of one call; one
call per prompt where the CLIP joins several encoders' token streams), and the diffusion model is
called once through a CFGGuider at cfg 1 (only the conditional branch runs), with the model's other
patches loaded as for sampling. The schedules, the replay and the records live in act_core;
docs/how-it-works.md explains them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..act_core import LayerMap, TransportMaps
from ..act_core import schedules
from ..act_core.activations import Activations
from ..act_core.activations import NonFiniteActivations as _NonFinite
from ..act_core.modules import hooks_installed
from ..act_core.replay import PassComplete, WatchedModule
from ..act_core.schedules import MIN_PROMPTS, SCHEDULES, Estimation, fit_at_once, prompts_digest
from .errors import ActError
from .families import family_of, native_resolution
from .model_layers import WHERE, clip_modules, is_unet_layer, select_layers, text_encoder_names, unet_modules

__all__ = ["CollectSettings", "Collector", "NonFiniteActivations", "parse_prompts", "prompts_digest", "fit_maps",
           "fit_at_once", "MIN_PROMPTS", "SCHEDULES"]


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


class NonFiniteActivations(ActError, _NonFinite):
    """A layer's pooled activations hold NaN or infinity."""

    def __init__(self, layer: str):
        super().__init__(f"layer {layer} produced NaN or infinite activations; the model may be broken, "
                         "or run in a precision too low for it (try --force-fp32)")
        self.layer = layer


NonFiniteActivations.__module__ = ActError.__module__  # as ComfyUI shows the error's type to users


class Collector:
    """The host for one MODEL/CLIP pair and one pair of prompt sets (schedules.Host)."""

    error = ActError
    non_finite = NonFiniteActivations
    split_batch_fix = "ComfyUI split the batch (low memory?): lower batch_size on Collect Activations"

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
        if not settings.pattern:
            stage, clip_layer = clip.cond_stage_model, getattr(clip, "layer_idx", None)
            self.text_layers = {n: m for n, m in self.text_layers.items() if self.spec.encoder(n).reaches_output(
                n, getattr(stage, n.split(".", 1)[0]), clip_layer)}
        self.unet_layers = (select_layers(unet_modules(model), settings.pattern, self.spec.default_layers)
                            if settings.where in ("diffusion model", "both") else {})
        if not self.text_layers and not self.unet_layers:
            raise ActError(f"no layer of the {settings.where} matches the pattern {settings.pattern!r}; "
                           "fix the 'pattern' input of Collect Activations")
        self.tokens = [self.clip.tokenize(p) for p in self.prompts]
        self.own_tokens = self._own_token_spans()
        self.resolution = settings.resolution or self._native_resolution()
        if self.resolution % 8:
            raise ActError(f"resolution {self.resolution} is not a multiple of 8; fix it on Collect Activations")
        self.prompts_per_batch = max(1, settings.batch_size // self.levels)
        self.n_prompts = len(self.prompts)
        self.batched_text = self.spec.batched_text
        self.estimation = Estimation(self)

    @property
    def passes(self) -> int:
        """Batch calls of the model so far (a text encoding, a sampler call), truncated ones included."""
        return self.estimation.passes

    @passes.setter
    def passes(self, value: int) -> None:
        self.estimation.passes = value

    def collect(self, progress=None) -> Activations:
        """One pass over all prompts, no maps applied: the activations "at once" fitting uses."""
        return self.estimation.collect(progress)

    def incremental(self, activations: Activations, method: str, support: str, blocks: str = "auto",
                    progress_factory=None) -> dict[str, LayerMap]:
        """Maps fitted in model order, each from activations with all earlier maps applied
        (schedules.Estimation.incremental)."""
        return self.estimation.incremental(activations, method, support, blocks, progress_factory)

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

    def _own_token_spans(self) -> list[dict[str, tuple[int, int]]]:
        """Per prompt, where its own tokens lie in each chat-template encoder's chunk: the tokens the
        prompt shares at its start and end with the template around an empty prompt are the template's."""
        keys = [e.tokens for e in self.spec.text_encoders if e.chat_template]
        bare = self.clip.tokenize("") if keys else {}
        spans = []
        for tokens in self.tokens:
            found = {}
            for key in keys:
                if key not in tokens or key not in bare:
                    continue
                ids, around = [t[0] for t in tokens[key][0]], [t[0] for t in bare[key][0]]
                start = next((i for i, (a, b) in enumerate(zip(ids, around)) if a != b), min(len(ids), len(around)))
                tail = min(len(ids), len(around)) - start
                end = len(ids) - next((i for i in range(tail) if ids[-1 - i] != around[-1 - i]), tail)
                found[key] = (start, end) if end > start else (0, len(ids))
            spans.append(found)
        return spans

    def encode(self, prompts: list[int], text_hooks: list, calls) -> tuple[list[torch.Tensor], list]:
        """Encode prompts in one text-encoder batch; returns per-prompt conds and pooled outputs."""
        if not self.spec.batched_text:
            return self._encode_one_by_one(prompts, text_hooks, calls)
        merged: dict[str, list] = {}
        for p in prompts:
            for key, chunks in self.tokens[p].items():
                merged.setdefault(key, []).extend(chunks)
        calls.begin(prompts)
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

    def _encode_one_by_one(self, prompts: list[int], text_hooks: list, calls) -> tuple[list[torch.Tensor], list]:
        """The CLIP joins several encoders' token streams (FLUX, SD3): one call per prompt keeps each
        prompt's tokens together, as ComfyUI encodes a prompt, and its own pooled output is the one
        the model expects. A pass truncated in the text encoder stops each prompt's call there."""
        conds, pooled, truncated = [], [], False
        for p in prompts:
            calls.begin([p])
            try:
                with hooks_installed(text_hooks):
                    cond, pool = self.clip.encode_from_tokens(self.tokens[p], return_pooled=True)
            except PassComplete:
                truncated = True
                continue
            conds.append(cond)
            pooled.append(pool.float().cpu() if pool is not None else None)
        if truncated:
            raise PassComplete()
        return conds, pooled

    def pool_text(self, name: str, output: torch.Tensor, prompts: list[int]) -> torch.Tensor:
        """Mean over each prompt's tokens (all its chunks) in the current text-encoder call ->
        [prompts, neurons] float32. The encoder's own chunks count: CLIP's 77-token chunks and T5's
        one long chunk differ; a last row beyond them is the empty prompt ComfyUI adds for weights.
        A language model in a chat template takes a prompt in one chunk: its own tokens count, not
        the template's."""
        key = self.spec.encoder(name).tokens
        spans = [self.own_tokens[p].get(key) for p in prompts]
        if spans and all(spans) and output.ndim == 3 and output.shape[0] >= len(prompts):
            return torch.stack([output[i, s:e].float().mean(0) for i, (s, e) in enumerate(spans)]).cpu()
        counts = torch.tensor([len(self.tokens[p].get(key, ())) for p in prompts])
        chunks = int(counts.sum())
        if output.ndim != 3 or output.shape[0] < chunks or not chunks:
            raise ActError(f"a text-encoder layer gave an output shaped {tuple(output.shape)}; choose layers "
                           "whose output is [batch, tokens, features] with the 'pattern' input")
        owners = torch.repeat_interleave(torch.arange(len(counts)), counts).to(output.device)
        means = output[:chunks].float().mean(1)
        sums = torch.zeros(len(counts), means.shape[1], device=means.device).index_add_(0, owners, means)
        return (sums / counts.to(means.device)[:, None]).cpu()

    def call_model(self, prompts: list[int], encoding: tuple, unet_hooks: list, inside=None) -> None:
        """One call of the diffusion model on this batch through ComfyUI's sampler path; with
        `inside`, that function runs in the sampler instead of the model call, with the model loaded
        and patched as for sampling."""
        import comfy.samplers
        conds, pooled = encoding
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
        latent_format = self.model.model.latent_format
        # A video-style latent (Qwen-Image's Wan 2.1 format) has a frame axis: one frame, as ComfyUI
        # gives an empty image latent for it (comfy.sample.fix_empty_latent_channels).
        frames = (1,) if getattr(latent_format, "latent_dimensions", 2) == 3 else ()
        shape = (samples, latent_format.latent_channels, *frames, self.resolution // 8, self.resolution // 8)
        per_sample = (-1,) + (1,) * (len(shape) - 1)
        # Source prompt i and target prompt i start from the same noise: their difference is the prompt.
        pairs = [p if p < self.n_source else p - self.n_source for p in prompts for _ in range(self.levels)]
        noise = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(self.settings.seed + p))
                             for p in pairs])
        sigma_vec = torch.tensor([sigmas[lv] for _ in prompts for lv in range(self.levels)])
        ms = self.model.get_model_object("model_sampling")
        sigma_max = float(ms.sigma_max)

        def one_model_call(model_fn, x, _sigmas, extra_args=None, callback=None, disable=None):
            s = sigma_vec.to(x.device, x.dtype)
            latent = torch.zeros_like(x)
            n = noise.to(x.device, x.dtype)
            first = (s >= sigma_max * (1 - 1e-5)).view(per_sample)
            x_in = torch.where(first, ms.noise_scaling(s.view(per_sample), n, latent, True),
                               ms.noise_scaling(s.view(per_sample), n, latent, False))
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

    # ----- what the protocol asks of the host besides the passes -----

    def watched_modules(self) -> list[WatchedModule]:
        """The chosen layers and every module above them: the calls the replay re-runs."""
        modules = {"diffusion_model": self.model.model.diffusion_model} | unet_modules(self.model) | clip_modules(self.clip)
        watched = {}
        for name in list(self.text_layers) + list(self.unet_layers):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules:
                    watched[prefix] = modules[prefix]
        return [WatchedModule(n, m, "unet" if is_unet_layer(n + ".") else "text") for n, m in watched.items()]

    def replay_blocker(self) -> str | None:
        """A patched forward or a diffusion-model wrapper: replaying a module alone would not reproduce
        what a pass does."""
        import comfy.patcher_extension
        patched = [k for k in {**self.model.object_patches, **self.clip.patcher.object_patches} if k.endswith("forward")]
        wrapped = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                           self.model.model_options, is_model_options=True)
        return (patched or ["a diffusion-model wrapper"])[0] if patched or wrapped else None

    def check_interrupt(self) -> None:
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()

    def free_device_memory(self) -> int:
        """Room on the card for replay records. ComfyUI 0.33+ asks the patcher, which adds what dynamic
        VRAM (comfy-aimdo) can still free by evicting weights; 0.3.75 has only the driver's figure."""
        import comfy.model_management
        device = self.model.load_device
        if device.type != "cuda":
            return 0
        patcher_room = getattr(self.model, "get_free_memory", None)
        return patcher_room(device) if patcher_room is not None else comfy.model_management.get_free_memory(device)

    def info(self) -> dict:
        source, target = self.prompts[:self.n_source], self.prompts[self.n_source:]
        return {"family": self.family, "where": self.settings.where,
                "layers": self.settings.pattern or "normalization layers",
                "resolution": self.resolution, "noise_levels": self.levels,
                "source_prompts": len(source), "target_prompts": len(target),
                "prompts_sha256": prompts_digest(source, target), "seed": self.settings.seed}


def fit_maps(activations: Activations, method: str, support: str, schedule: str, progress_factory=None,
             blocks: str = "auto") -> TransportMaps:
    return schedules.fit_maps(activations, method, support, schedule, progress_factory, blocks)
