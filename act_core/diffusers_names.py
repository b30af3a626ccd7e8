"""ComfyUI <-> diffusers layer names, derived from a pipeline's own block structure.

Maps always name layers as ComfyUI does (the pack's names); PipelineLayers(pipe) finds them in an
SD1.x, SD2.x or SDXL pipeline and back, and refuses, by name, modules that do not compute the same
tensor in both hosts. The correspondence table is in docs/diffusers.md.
"""
from __future__ import annotations

import re

import torch

__all__ = ["DiffusersSupportError", "TranslationError", "PipelineLayers", "to_diffusers_names", "to_pack_names",
           "EXTRA"]

EXTRA = "diffusers"

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

