"""The same maps in diffusers pipelines: layer names, steering, collecting and fitting.

Optional: needs the packages of the `diffusers` extra (diffusers, transformers); nothing else in
act_core imports them, and this module imports them only when a pipeline is handed to it.

    from act_core import load_maps, save_maps
    from act_core.diffusers import collect_activations, fit_maps, steer

    maps = fit_maps(collect_activations(pipe, source_prompts, target_prompts))
    save_maps(maps, "watercolor.safetensors")         # the file ComfyUI's Load Transport Maps reads
    with steer(pipe, load_maps("watercolor.safetensors"), strength=0.8):
        image = pipe("a house by a lake").images[0]

Layer names in maps are always the pack's (ComfyUI module paths, see TransportMaps), so one file
serves both hosts. In a pipeline they are "<component>.<module path>": "unet.down_blocks.0.resnets.0.norm1",
"text_encoder.encoder.layers.0.layer_norm1", "text_encoder_2.text_model.final_layer_norm".
The correspondence is derived from the pipeline's own block structure (block counts, which blocks
carry transformers), as ComfyUI's and diffusers' key converters do, for SD1.x, SD2.x and SDXL:

    ComfyUI (diffusion_model.)          diffusers (unet.)
    input_blocks.0.0                    conv_in
    input_blocks.N.0 / .N.1             down_blocks.L.resnets.i / down_blocks.L.attentions.i
    input_blocks.N.0 (after a level)    down_blocks.L.downsamplers.0   (op -> conv)
    middle_block.0 / .1 / .2            mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.N.0 / .N.1 / .N.2     up_blocks.L.resnets.i / attentions.i / upsamplers.0
    out.0 / out.2                       conv_norm_out / conv_out
    ResBlock in_layers.0 / .2, emb_layers.1, out_layers.0 / .3, skip_connection
                                        norm1 / conv1, time_emb_proj, norm2 / conv2, conv_shortcut
    clip_l / clip_h (SD1.x, SD2.x)      text_encoder;  clip_l, clip_g (SDXL): text_encoder, text_encoder_2
    clip_x.transformer.text_model.M     text_encoder.[text_model.]M (transformers may flatten text_model)

Names whose modules do not compute the same thing in both hosts are refused, naming them: whole
spatial transformers and attention blocks (diffusers returns output objects or tuples), activation
functions (diffusers shares one module per ResNet block), the position embedding (ComfyUI never calls it).

Collection follows the pack's protocol (nodes/collection.py) so that the same prompts give the same
maps file: one UNet call per prompt at the first, noisiest step of the schedule (the last training
timestep, the latent being pure noise), conditional branch only; source prompt i and target prompt i
share the noise drawn from torch.Generator().manual_seed(seed + i); SDXL's size conditioning is the
collection resolution, uncropped. Pooling: mean over tokens (text encoders, token layers), mean over
height and width (conv layers), in float32. Prompts are encoded by the pipeline's own encode_prompt,
which truncates at the 77-token window where ComfyUI would split a long prompt into chunks.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re

import torch

from .activations import Activations
from .maps import LayerMap, TransportMaps, check_strength, default_support, fit_layer
from .modules import hooks_installed, output_dim

__all__ = ["DiffusersSupportError", "TranslationError", "PipelineLayers", "to_diffusers_names", "to_pack_names",
           "steer", "collect_activations", "fit_maps", "Activations", "SCHEDULES", "MIN_PROMPTS"]

log = logging.getLogger("comfyui_act")

EXTRA = "diffusers"
SCHEDULES = ("incremental", "at once")
WHERE = ("diffusion model", "text encoder", "both")
MIN_PROMPTS = 8
NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm)


class DiffusersSupportError(ValueError):
    """A pipeline, a setting or a map that this module cannot work with; the message says why."""


class TranslationError(DiffusersSupportError):
    """Layer names with no counterpart in the other host; `names` lists them."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


def _require_diffusers():
    try:
        import diffusers
        import transformers
    except ImportError as error:
        raise ImportError(f"act_core.diffusers needs the optional packages diffusers and transformers "
                          f"({error.name} is missing): install the pack's '{EXTRA}' extra, e.g. "
                          f"pip install 'diffusers>=0.30' transformers") from None
    return diffusers, transformers


# ----- names -----

# Relative module names inside one block, ComfyUI -> diffusers. Only modules that compute the same
# tensor from the same input in both implementations.
_RESNET = {"": "", "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.2": "dropout", "out_layers.3": "conv2",
           "skip_connection": "conv_shortcut"}
_TRANSFORMER_BLOCK = {n: n for n in (
    "", "norm1", "norm2", "norm3", "attn1", "attn2", "ff", "ff.net.0", "ff.net.0.proj", "ff.net.2",
    *(f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")))}
_SPATIAL_TRANSFORMER = {"norm": "norm", "proj_in": "proj_in", "proj_out": "proj_out",
                        **{f"transformer_blocks.#.{k}".rstrip("."): f"transformer_blocks.#.{v}".rstrip(".")
                           for k, v in _TRANSFORMER_BLOCK.items()}}
_DOWNSAMPLE = {"": "", "op": "conv"}
_UPSAMPLE = {"": "", "conv": "conv"}
_LEAF = {"": ""}
_KINDS = {"resnet": _RESNET, "transformer": _SPATIAL_TRANSFORMER, "downsample": _DOWNSAMPLE,
          "upsample": _UPSAMPLE, "leaf": _LEAF}
_TEXT = re.compile(r"(embeddings(\.token_embedding)?|final_layer_norm|encoder\.layers\.\d+"
                   r"(\.(layer_norm1|layer_norm2|mlp|mlp\.fc1|mlp\.fc2|self_attn\.(q|k|v|out)_proj))?)")
_ENCODERS = {"SD1.x": {"clip_l": "text_encoder"}, "SD2.x": {"clip_h": "text_encoder"},
             "SDXL": {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}}


def _numbered(rel: str) -> tuple[str, str | None]:
    """'transformer_blocks.3.norm1' -> ('transformer_blocks.#.norm1', '3'): depth-independent table keys."""
    match = re.match(r"transformer_blocks\.(\d+)(\.|$)", rel)
    if not match:
        return rel, None
    return "transformer_blocks.#" + rel[len(match.group(0)) - len(match.group(2)):], match.group(1)


def _translate_rel(rel: str, table: dict[str, str]) -> str | None:
    key, number = _numbered(rel)
    out = table.get(key)
    if out is None:
        return None
    return out.replace("#", number) if number is not None else out


def _unet_blocks(unet) -> list[tuple[str, str, str]]:
    """(ComfyUI prefix, diffusers prefix, block kind) for every block of a UNet2DConditionModel, from its
    structure: ComfyUI numbers input/output blocks consecutively over the levels, diffusers per level."""
    blocks = [("input_blocks.0.0", "conv_in", "leaf"), ("time_embed.0", "time_embedding.linear_1", "leaf"),
              ("time_embed.2", "time_embedding.linear_2", "leaf"), ("out.0", "conv_norm_out", "leaf"),
              ("out.2", "conv_out", "leaf")]
    if getattr(unet, "add_embedding", None) is not None:
        blocks += [("label_emb.0.0", "add_embedding.linear_1", "leaf"), ("label_emb.0.2", "add_embedding.linear_2", "leaf")]
    n = 1
    for level, down in enumerate(unet.down_blocks):
        attentions = getattr(down, "attentions", None)
        for i in range(len(down.resnets)):
            blocks.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{i}", "resnet"))
            if attentions is not None:
                blocks.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{i}", "transformer"))
            n += 1
        if getattr(down, "downsamplers", None) is not None:
            blocks.append((f"input_blocks.{n}.0", f"down_blocks.{level}.downsamplers.0", "downsample"))
            n += 1
    mid = unet.mid_block
    blocks.append(("middle_block.0", "mid_block.resnets.0", "resnet"))
    if getattr(mid, "attentions", None) is not None:
        blocks += [("middle_block.1", "mid_block.attentions.0", "transformer"),
                   ("middle_block.2", "mid_block.resnets.1", "resnet")]
    n = 0
    for level, up in enumerate(unet.up_blocks):
        attentions = getattr(up, "attentions", None)
        for i in range(len(up.resnets)):
            blocks.append((f"output_blocks.{n}.0", f"up_blocks.{level}.resnets.{i}", "resnet"))
            position = 1
            if attentions is not None:
                blocks.append((f"output_blocks.{n}.1", f"up_blocks.{level}.attentions.{i}", "transformer"))
                position = 2
            if i == len(up.resnets) - 1 and getattr(up, "upsamplers", None) is not None:
                blocks.append((f"output_blocks.{n}.{position}", f"up_blocks.{level}.upsamplers.0", "upsample"))
            n += 1
    return blocks


def _split_prefix(name: str, prefixes: list[tuple[str, int]]) -> tuple[int, str] | None:
    """The block whose prefix is the longest one `name` starts with, and the rest of the name."""
    best = None
    for prefix, index in prefixes:
        if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, index)
    if best is None:
        return None
    return best[1], name[len(best[0]) + 1:]


class PipelineLayers:
    """Where the pack's layer names live in one diffusers pipeline, and back.

    family: "SD1.x", "SD2.x" or "SDXL", read from the pipeline: a second text encoder makes it SDXL;
    linear projections in the UNet's transformers (SD2's layout) make it SD2.x; otherwise SD1.x.
    """

    def __init__(self, pipe):
        diffusers, transformers = _require_diffusers()
        unet = getattr(pipe, "unet", None)
        if not isinstance(unet, diffusers.UNet2DConditionModel):
            raise DiffusersSupportError(f"{type(pipe).__name__} has no UNet2DConditionModel 'unet'; ComfyUI-ACT's maps "
                                        "work with Stable Diffusion 1.x, 2.x and SDXL pipelines")
        self.pipe = pipe
        self.unet = unet
        encoders = {c: getattr(pipe, c, None) for c in ("text_encoder", "text_encoder_2")}
        clip_types = (transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection)
        for component, encoder in encoders.items():
            if encoder is not None and not isinstance(encoder, clip_types):
                raise DiffusersSupportError(f"the pipeline's {component} is a {type(encoder).__name__}; ComfyUI-ACT "
                                            "translates CLIP text encoders only")
        if encoders["text_encoder_2"] is not None and encoders["text_encoder"] is not None:
            self.family = "SDXL"
        elif encoders["text_encoder"] is not None and unet.config.addition_embed_type is None:
            self.family = "SD2.x" if unet.config.use_linear_projection else "SD1.x"
        else:
            raise DiffusersSupportError(f"{type(pipe).__name__} is not a Stable Diffusion 1.x, 2.x or SDXL text-to-image "
                                        "pipeline (an SDXL refiner has only the second text encoder); ComfyUI-ACT "
                                        "cannot translate its layers")
        self.encoders = {clip: (component, encoders[component]) for clip, component in _ENCODERS[self.family].items()}
        self._blocks = _unet_blocks(unet)
        self._modules = {"unet": dict(unet.named_modules())}
        for component, encoder in self.encoders.values():
            self._modules[component] = dict(encoder.named_modules())

    # -- one name each way --

    def _to_diffusers(self, name: str) -> tuple[str | None, str]:
        """(diffusers name, "") or (None, why not)."""
        if name.startswith("diffusion_model."):
            found = _split_prefix(name[len("diffusion_model."):], [(c, i) for i, (c, _, _) in enumerate(self._blocks)])
            if found is None:
                return None, "not part of any UNet block"
            index, rel = found
            _, prefix, kind = self._blocks[index]
            out = _translate_rel(rel, _KINDS[kind])
            if out is None:
                return None, f"this module of a {kind} block has no counterpart computing the same tensor"
            full = f"{prefix}.{out}".rstrip(".")
            if full not in self._modules["unet"]:
                return None, f"the pipeline's UNet has no {full}"
            return f"unet.{full}", ""
        encoder, _, rest = name.partition(".")
        if encoder not in self.encoders:
            known = ", ".join(self.encoders)
            return None, f"an {self.family} pipeline has no text encoder '{encoder}' (it has {known})"
        component, model = self.encoders[encoder]
        if rest == "transformer.text_projection":
            inner = "text_projection"
        elif rest.startswith("transformer.text_model.") and _TEXT.fullmatch(rest[len("transformer.text_model."):]):
            inner = ("text_model." if hasattr(model, "text_model") else "") + rest[len("transformer.text_model."):]
        else:
            return None, "not a text-encoder module with a counterpart computing the same tensor"
        if inner not in self._modules[component]:
            if self.family == "SD2.x" and _is_dropped_sd2_layer(rest, model):
                return None, _SD2_DROPPED
            return None, f"the pipeline's {component} has no {inner}"
        return f"{component}.{inner}", ""

    def _to_pack(self, name: str) -> tuple[str | None, str]:
        component, _, inner = name.partition(".")
        if component == "unet":
            found = _split_prefix(inner, [(d, i) for i, (_, d, _) in enumerate(self._blocks)])
            if found is None:
                return None, "not part of any UNet block"
            index, rel = found
            prefix, _, kind = self._blocks[index]
            reverse = {v: k for k, v in _KINDS[kind].items()}
            out = _translate_rel(rel, reverse)
            if out is None:
                return None, f"this module of a {kind} block has no counterpart computing the same tensor"
            if inner not in self._modules["unet"]:
                return None, f"the pipeline's UNet has no {inner}"
            return f"diffusion_model.{prefix}.{out}".rstrip("."), ""
        clips = {c: clip for clip, (c, _) in self.encoders.items()}
        if component not in clips:
            return None, f"not in the pipeline's UNet or text encoders ({', '.join(['unet', *clips])})"
        model = self.encoders[clips[component]][1]
        if inner not in self._modules[component]:
            return None, f"the pipeline's {component} has no {inner}"
        if inner == "text_projection" and hasattr(model, "text_projection"):
            return f"{clips[component]}.transformer.text_projection", ""
        rel = inner[len("text_model."):] if inner.startswith("text_model.") else inner
        if hasattr(model, "text_model") != inner.startswith("text_model.") or not _TEXT.fullmatch(rel):
            return None, "not a text-encoder module with a counterpart computing the same tensor"
        return f"{clips[component]}.transformer.text_model.{rel}", ""

    def to_diffusers(self, names) -> dict[str, str]:
        """Pack names -> pipeline names; raises TranslationError naming every name it cannot translate."""
        return self._all(names, self._to_diffusers, "to this diffusers pipeline")

    def to_pack(self, names) -> dict[str, str]:
        """Pipeline names -> pack names; raises TranslationError naming every name it cannot translate."""
        return self._all(names, self._to_pack, "to ComfyUI-ACT's (ComfyUI) layer names")

    def _all(self, names, one, where: str) -> dict[str, str]:
        if isinstance(names, str):
            names = [names]
        out, problems = {}, []
        for name in names:
            translated, why = one(name)
            if translated is None:
                problems.append((name, why))
            else:
                out[name] = translated
        if problems:
            shown = "; ".join(f"'{n}': {why}" for n, why in problems[:5])
            more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            raise TranslationError(f"cannot translate {len(problems)} layer name(s) {where} ({self.family}): "
                                   f"{shown}{more}", [n for n, _ in problems])
        return out

    def module(self, diffusers_name: str) -> torch.nn.Module:
        component, _, inner = diffusers_name.partition(".")
        return self._modules[component][inner]

    def modules(self, where: str) -> dict[str, torch.nn.Module]:
        """Translatable modules, by pack name, in the part(s) of the pipeline `where` names."""
        parts = {"diffusion model": ["unet"], "text encoder": [c for c, _ in self.encoders.values()]}
        parts["both"] = parts["text encoder"] + parts["diffusion model"]
        out = {}
        for component in parts[where]:
            for inner, module in self._modules[component].items():
                if not inner:
                    continue
                pack, _ = self._to_pack(f"{component}.{inner}")
                if pack is not None:
                    out[pack] = module
        return out


_SD2_DROPPED = ("diffusers' SD2.x text encoder stops one layer before ComfyUI's, whose last layer runs but "
                "never reaches the image (SD2.x uses the penultimate layer)")


def _is_dropped_sd2_layer(rest: str, model) -> bool:
    match = re.match(r"transformer\.text_model\.encoder\.layers\.(\d+)(\.|$)", rest)
    return bool(match) and int(match.group(1)) == model.config.num_hidden_layers


def to_diffusers_names(pipe, names) -> dict[str, str]:
    """Translate the pack's layer names to this pipeline's module names ("unet.…", "text_encoder.…")."""
    return PipelineLayers(pipe).to_diffusers(names)


def to_pack_names(pipe, names) -> dict[str, str]:
    """Translate this pipeline's module names to the pack's layer names (what maps files hold)."""
    return PipelineLayers(pipe).to_pack(names)


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


# ----- collecting and fitting -----

def _digest(source: list[str], target: list[str]) -> str:
    return hashlib.sha256(("\n".join(source) + "\0" + "\n".join(target)).encode()).hexdigest()


class _PassComplete(Exception):
    """Raised by a hook once the last layer a truncated pass needs has run."""


class _Collector:
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
        self.n_source = len(source)
        scale = getattr(pipe, "vae_scale_factor", 8)
        self.resolution = resolution or pipe.unet.config.sample_size * scale
        if self.resolution % scale:
            raise DiffusersSupportError(f"resolution {self.resolution} is not a multiple of {scale}")
        self.latent = self.resolution // scale
        self.batch_size = max(1, batch_size)
        self.passes = 0

    def batches(self) -> list[list[int]]:
        order = list(range(len(self.prompts)))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def info(self) -> dict:
        source, target = self.prompts[:self.n_source], self.prompts[self.n_source:]
        return {"family": self.family, "where": self.where, "layers": self.pattern or "normalization layers",
                "resolution": self.resolution, "noise_levels": 1, "source_prompts": len(source),
                "target_prompts": len(target), "prompts_sha256": _digest(source, target), "seed": self.seed}

    def _encode(self, prompts: list[str]):
        unet = self.pipe.unet
        if self.family == "SDXL":
            cond, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, device=unet.device, num_images_per_prompt=1,
                                                         do_classifier_free_guidance=False)
            return cond, pooled
        cond, _ = self.pipe.encode_prompt(prompts, unet.device, 1, False)
        return cond, None

    def _unet_call(self, batch: list[int], cond, pooled) -> None:
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
        unet(noise.to(unet.device, unet.dtype), timestep.to(unet.device), encoder_hidden_states=cond, **kwargs)

    @torch.no_grad()
    def sweep(self, batches, record: set, apply_maps: dict, fit_args, stop_after, encoded=None) -> dict:
        """One pass over `batches`, truncated after `stop_after`; `encoded`: the prompt encodings per batch
        (with the text-encoder maps applied), when they are known already, in place of encoding again."""
        total = len(self.prompts)
        result = {"samples": {}, "kinds": {}, "order": [], "maps": {}, "repeated": set()}
        need_unet = stop_after is None or stop_after in self.unet_layers
        for b, batch in enumerate(batches):
            rows = torch.tensor(batch)
            fired: set[str] = set()
            hook_for = lambda n: self._hook(n, rows, record, apply_maps, fit_args, stop_after, result, fired, total)  # noqa: E731
            text_hooks = [(m, hook_for(n)) for n, m in self.text_layers.items()
                          if n in record or n in apply_maps or fit_args]
            unet_hooks = [(m, hook_for(n)) for n, m in self.unet_layers.items()
                          if n in record or n in apply_maps or fit_args]
            try:
                if encoded is not None:
                    cond, pooled = encoded[b]
                else:
                    with hooks_installed(text_hooks):
                        cond, pooled = self._encode([self.prompts[p] for p in batch])
                if need_unet and unet_hooks:
                    with hooks_installed(unet_hooks):
                        self._unet_call(batch, cond, pooled)
            except _PassComplete:
                pass
            self.passes += 1
        return result

    def _hook(self, name, rows, record, apply_maps, fit_args, stop_after, result, fired, total):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise DiffusersSupportError(f"layer {name} does not output a tensor; leave it out with the pattern")
            if name in fired:
                result["repeated"].add(name)
                return output
            fired.add(name)
            pooled = (output.float().mean(dim=(2, 3)) if output.ndim == 4
                      else output.float().mean(1) if output.ndim == 3 else output.float()).cpu()
            if pooled.shape[0] != rows.shape[0]:
                raise DiffusersSupportError(f"layer {name} saw {pooled.shape[0]} samples where {rows.shape[0]} were sent")
            if not torch.isfinite(pooled).all():
                raise DiffusersSupportError(f"layer {name} produced NaN or infinite activations; run the pipeline in "
                                            "a higher precision (float32)")
            kind = "conv" if output.ndim == 4 else "token"
            result["kinds"][name] = kind
            if name not in result["order"]:
                result["order"].append(name)
            if name in record:
                store = result["samples"].setdefault(name, torch.full((total, pooled.shape[1]), math.nan))
                store[rows] = pooled
            layer_map = apply_maps.get(name)
            if fit_args is not None:
                is_source = rows < self.n_source
                layer_map = fit_layer(pooled[is_source], pooled[~is_source], *fit_args, kind=kind)
                result["maps"][name] = layer_map
            if layer_map is not None:
                output = layer_map.apply(output, 1.0)
            if name == stop_after:
                raise _PassComplete()
            return output
        return hook

    def split(self, samples: dict) -> tuple[dict, dict]:
        return ({n: t[:self.n_source] for n, t in samples.items()}, {n: t[self.n_source:] for n, t in samples.items()})

    def incremental(self, order: list[str], kinds: dict, method: str, support: str) -> dict[str, LayerMap]:
        """Each layer's map fitted from activations with the maps of all earlier layers applied.

        Every prompt in one batch: one pass, fitting inside the hooks. Several batches: layer by layer,
        the pack's reference schedule, one pass over all batches per layer, truncated after that layer
        (text-encoder layers stop inside the text encoder; once the last text-encoder map is fitted, the
        prompts are encoded once more with all of them applied and those encodings serve every UNet pass).
        Cost: on average half a pass over all prompts per layer (184 batch calls, mostly truncated, for
        the tiny test SD1.5 UNet's 45 layers in 4 batches), against about 1.6 passes for the pack's replay of units.
        """
        batches = self.batches()
        if len(batches) == 1:
            result = self.sweep(batches, set(), {}, (method, support), order[-1])
            return {n: result["maps"][n] for n in order}
        maps: dict[str, LayerMap] = {}
        encoded = None
        for name in order:
            if name in self.unet_layers and encoded is None:
                encoded = self.encodings(batches, maps)
            result = self.sweep(batches, {name}, dict(maps), None, name, encoded)
            source, target = self.split(result["samples"])
            maps[name] = fit_layer(source[name], target[name], method, support, kind=kinds[name])
        return maps

    @torch.no_grad()
    def encodings(self, batches, maps: dict[str, LayerMap]) -> list:
        """The UNet's conditioning per batch, encoded with the text-encoder maps applied."""
        hooks = [(m, _steering_hook(n, maps[n], 1.0)) for n, m in self.text_layers.items() if n in maps]
        out = []
        with hooks_installed(hooks):
            for batch in batches:
                out.append(self._encode([self.prompts[p] for p in batch]))
        self.passes += len(batches)
        return out


def collect_activations(pipe, source_prompts: list[str], target_prompts: list[str], where: str = "diffusion model",
                        pattern: str = "", resolution: int = 0, batch_size: int = 16, seed: int = 0) -> Activations:
    """Pooled activations of the source and target prompts, as Collect Activations records them in ComfyUI.

    where: "diffusion model", "text encoder" or "both"; pattern: "" = normalisation layers, else a regular
    expression over the pack's layer names (of the layers with a diffusers counterpart); resolution: 0 =
    the pipeline's default size; batch_size: prompts per model call (all in one batch: incremental
    fitting costs one more pass; fewer: one pass over all batches per layer, truncated after it, on
    average half a pass over all prompts per layer).
    """
    collector = _Collector(pipe, list(source_prompts), list(target_prompts), where, pattern, resolution,
                           batch_size, seed)
    everything = set(collector.text_layers) | set(collector.unet_layers)
    result = collector.sweep(collector.batches(), everything, {}, None, None)
    order = [n for n in result["order"] if n not in result["repeated"]]
    collector.text_layers = {n: m for n, m in collector.text_layers.items() if n in order}
    collector.unet_layers = {n: m for n, m in collector.unet_layers.items() if n in order}
    source, target = collector.split({n: result["samples"][n] for n in order})
    return Activations(source, target, {n: result["kinds"][n] for n in order}, collector.family, collector.info(),
                       collector)


def fit_maps(activations: Activations, method: str = "linear", support: str | None = None,
             estimation: str = "incremental") -> TransportMaps:
    """Maps keyed by the pack's layer names, with the pack's info: save_maps writes the file ComfyUI loads.

    support: None = the method's default, as Fit Transport Maps' "method default"."""
    if estimation not in SCHEDULES:
        raise DiffusersSupportError(f"estimation must be one of {SCHEDULES}, got {estimation!r}")
    support = default_support(method) if support is None else support
    if estimation == "at once":
        layers = {n: fit_layer(activations.source[n], activations.target[n], method, support, kind=activations.kinds[n])
                  for n in activations.order}
    else:
        layers = activations.collector.incremental(activations.order, activations.kinds, method, support)
    return TransportMaps(layers, dict(activations.info, method=method, support=support, estimation=estimation))
