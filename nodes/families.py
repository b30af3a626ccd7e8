"""The model families ComfyUI-ACT steers, as data: one entry per family, asked by everything else.

A family says how ComfyUI shows it (the comfy.supported_models config classes that mean it, and the
subclasses that do not), which layers are steered when the user names none, what a collection pass
must hand the diffusion model besides the prompt (pooled text embedding, image size, guidance), its
native resolution and the text encoders its CLIP carries (TextEncoder: the attribute of ComfyUI's
cond_stage_model, the key of its tokens, its own normalization classes such as T5's T5LayerNorm).
Adding a family is one Family(...) entry here plus its tiny test model in tests/make_models.py and its
row in tests/test_family_contract.py.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ActError

NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def norm_layers(name: str, module: torch.nn.Module) -> bool:
    """The paper's choice: every GroupNorm / LayerNorm. On FLUX and SD3 these keep the image and text
    token streams apart (img_norm* / txt_norm*, x_block.norm* / context_block.norm*)."""
    return isinstance(module, NORM_TYPES)


def _is_rms_norm(module: torch.nn.Module) -> bool:
    # ComfyUI's RMSNorm classes (comfy.ops, comfy.rmsnorm, its language models' own) do not all derive
    # from torch's: known by name.
    return any(c.__name__ == "RMSNorm" for c in type(module).__mro__)


# Attention's per-head query and key norms, as the families name them (Lumina 2 and Qwen3: q_norm,
# k_norm; Qwen-Image: norm_q, norm_k and the text stream's norm_added_q, norm_added_k).
PER_HEAD_NORMS = ("q_norm", "k_norm", "norm_q", "norm_k", "norm_added_q", "norm_added_k")


def stream_norm_layers(name: str, module: torch.nn.Module) -> bool:
    """Every LayerNorm / RMSNorm of the token stream: the paper's choice on transformers normalised
    with RMSNorm. Attention's per-head query and key norms are not the stream (their outputs are
    [batch, heads, tokens, head width]) and are left out."""
    if name.rsplit(".", 1)[-1] in PER_HEAD_NORMS:
        return False
    return isinstance(module, NORM_TYPES) or _is_rms_norm(module)


def _no_extras(pooled: torch.Tensor | None, resolution: int) -> dict:
    return {}


def _sdxl_extras(pooled, resolution):
    # SDXL's UNet embeds the pooled CLIP-G output and six size/crop numbers (ComfyUI's defaults).
    return {"pooled_output": pooled, "width": resolution, "height": resolution, "crop_w": 0, "crop_h": 0,
            "target_width": resolution, "target_height": resolution}


def _pooled_only(pooled, resolution):
    return {"pooled_output": pooled}


def _flux_extras(pooled, resolution):
    # FLUX.1-dev embeds a guidance value (FluxGuidance node; 3.5 is ComfyUI's default); schnell ignores it.
    return {"pooled_output": pooled, "guidance": 3.5}


@dataclass(frozen=True)
class TextEncoder:
    """A text encoder inside ComfyUI's CLIP. Its layers are named "<attribute>.<module path>" in maps
    files, so a map always says which encoder it belongs to."""
    attribute: str                              # of the CLIP's cond_stage_model: clip_l, clip_g, t5xxl
    tokens: str                                 # key of its chunks in the tokenizer's output: l, g, t5xxl
    norms: tuple[str, ...] = ()                 # its own normalization classes, beside torch's (by name)
    # A language model's prompt is wrapped in its chat template (ComfyUI's tokenizer adds the markers
    # around it): a prompt counts as the mean over its own tokens, the template's are the same on both
    # sides and are not part of the concept.
    chat_template: bool = False
    # Its sub-modules that only encode pictures given with a prompt (Qwen2.5-VL's vision tower, which
    # Qwen-Image-Edit's text node feeds): a text prompt never runs them, so they are no default layer.
    pictures_only: tuple[str, ...] = ()

    def is_norm(self, name: str, module: torch.nn.Module) -> bool:
        if any(f".{part}." in f".{name}." for part in self.pictures_only):
            return False
        if self.chat_template:
            return stream_norm_layers(name, module)
        return isinstance(module, NORM_TYPES) or type(module).__name__ in self.norms

    def reaches_output(self, name: str, encoder: torch.nn.Module, clip_layer: int | None) -> bool:
        """Whether a language model's layer can change what the encoder hands the diffusion model.
        ComfyUI reads one of its hidden layers (Z-Image: the second-to-last; `clip_layer`, what CLIP Set
        Last Layer set, overrides it): the layers after that one, and the final norm, run for nothing."""
        if not self.chat_template:
            return True
        count = getattr(encoder, "num_layers", None)
        index = clip_layer if clip_layer is not None else getattr(encoder, "layer_idx", None)
        if not count or not isinstance(index, int) or abs(index) > count or (
                clip_layer is None and getattr(encoder, "layer", None) != "hidden"):
            return True
        block = re.search(r"\.layers\.(\d+)\.", name)
        if block:
            return int(block.group(1)) <= index % count
        return not name.endswith(".model.norm") or getattr(encoder, "layer_norm_hidden_state", True)


CLIP_L = TextEncoder("clip_l", "l")
CLIP_G = TextEncoder("clip_g", "g")
CLIP_H = TextEncoder("clip_h", "h")
# ComfyUI's T5 (comfy/text_encoders/t5.py) normalizes with its own RMS-style T5LayerNorm (a weight,
# no bias): fused mode has no bias to fold into and runs these maps exactly.
T5XXL = TextEncoder("t5xxl", "t5xxl", norms=("T5LayerNorm",))
# Qwen3-4B (comfy/text_encoders/llama.py), in Z-Image's chat template; its RMSNorms carry a weight and
# no bias, so no fold can take a map's shift.
QWEN3_4B = TextEncoder("qwen3_4b", "qwen3_4b", chat_template=True)
# Qwen2.5-VL-7B (comfy/text_encoders/qwen_image.py), in Qwen-Image's chat template (a system prompt, then
# the user's); ComfyUI reads its last layer after the final norm, so every layer of its language model
# reaches the diffusion model.
QWEN25_7B = TextEncoder("qwen25_7b", "qwen25_7b", chat_template=True, pictures_only=("visual",))


@dataclass(frozen=True)
class Family:
    name: str                                   # as stored in maps files and shown to users
    configs: tuple[str, ...]                    # comfy.supported_models classes (subclasses included)
    text_encoders: tuple[TextEncoder, ...]      # those its CLIP may carry (a loader may leave some out)
    native_resolution: int | Callable           # pixels, or f(model) -> pixels
    extras: Callable = _no_extras               # f(pooled [samples, D], resolution) -> cond extras
    default_layers: Callable = norm_layers      # f(name, module) -> bool
    default_layers_text: str = "normalization layers"
    pooled_from: str = ""                       # the encoder whose pooled output `extras` gets ("" = first)
    # Subclasses of `configs` in comfy.supported_models, each named in one of the two: `excluded` are
    # another architecture (an extra image input, other conditioning) and are refused by name;
    # `variants` are this one with other depths or settings, steered as the family
    # (tests/test_collection_correctness.py checks that every subclass is named).
    excluded: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()
    # One text-encoder call for a whole batch works when the CLIP's output is one token stream per
    # prompt chunk; FLUX and SD3 join several encoders' streams (CLIP then T5, whose prompts differ in
    # length), so their prompts are encoded one by one, and their text-encoder maps are fitted one
    # layer at a time (collection.Collector.incremental).
    batched_text: bool = True
    # 'The concept's words only' compares source and target conditionings token by token, at one
    # length; a text encoder that gives each prompt its own length (unpadded T5, a language model)
    # would have the concept's words cut off.
    one_text_length: bool = True

    def encoder(self, layer: str) -> TextEncoder:
        """The text encoder a text-encoder layer name ("t5xxl.transformer...") belongs to."""
        attribute = layer.split(".", 1)[0]
        return next((e for e in self.text_encoders if e.attribute == attribute), TextEncoder(attribute, attribute))

    def default_text_layer(self, name: str, module: torch.nn.Module) -> bool:
        """The normalization layers of the text encoder that holds `name`."""
        return self.encoder(name).is_norm(name, module)


def _sd2_resolution(model) -> int:
    import comfy.model_base
    return 768 if model.model.model_type == comfy.model_base.ModelType.V_PREDICTION else 512


def _own_resolution(default: int) -> Callable:
    # A model may say its own size: the shapes demo models draw 64 px pictures.
    def size(model) -> int:
        return getattr(model.model.model_config, "native_resolution", default)
    return size


FAMILIES: tuple[Family, ...] = (
    # Subclasses first: SDXL and SD2 variants share bases with the others.
    Family("SDXL", ("SDXL",), (CLIP_L, CLIP_G), _own_resolution(1024), _sdxl_extras, pooled_from="clip_g",
           # instructpix2pix takes the picture to edit beside the noise (8 input channels).
           excluded=("SDXL_instructpix2pix",),
           variants=("SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B")),  # distilled SDXL UNets
    Family("SD2.x", ("SD20",), (CLIP_H,), _sd2_resolution,
           # unCLIP is conditioned on a CLIP-vision embedding, the x4 upscaler on a low-resolution
           # picture, Lotus (depth/normal estimation) on the picture it reads.
           excluded=("SD21UnclipL", "SD21UnclipH", "SD_X4Upscaler", "LotusD")),
    Family("SD1.x", ("SD15",), (CLIP_L,), _own_resolution(512), excluded=("SD15_instructpix2pix",)),
    Family("SD3", ("SD3",), (CLIP_L, CLIP_G, T5XXL), 1024, _pooled_only, batched_text=False),
    Family("FLUX.1", ("Flux",), (CLIP_L, T5XXL), 1024, _flux_extras,
           excluded=("Flux2", "FluxInpaint"), variants=("FluxSchnell",), batched_text=False),
    # FLUX.1's blocks without its vector input (Chroma's modulations come from its own small network
    # of the noise level alone: the pooled output is None, as CLIPTextEncode hands it) and T5 alone,
    # unpadded: one token stream, encoded in batches of prompts of one length.
    # Chroma Radiance draws in pixel space (no VAE latent) with another output head.
    Family("Chroma", ("Chroma",), (T5XXL,), 1024, _pooled_only, excluded=("ChromaRadiance",),
           one_text_length=False),
    # Lumina 2's NextDiT: caption tokens and image tokens each refined on their own, then joined in one
    # stream; every block normalises with RMSNorm before and after attention and the MLP. The pixel-
    # space variant has no VAE latent and a decoder of its own.
    Family("Z-Image", ("ZImage",), (QWEN3_4B,), 1024, default_layers=stream_norm_layers,
           default_layers_text="normalization layers (RMSNorm, LayerNorm)", excluded=("ZImagePixelSpace",),
           one_text_length=False),
    # MMDiT-like blocks with an image and a text stream, each normalised by LayerNorms without weight
    # (img_norm1/2, txt_norm1/2, as FLUX.1's), after the RMSNorm on the text encoder's output
    # (txt_norm); no pooled or vector input. Its text encoder drops the template's system prompt from
    # the start of its output once per call, so prompts joined as chunks of one call would all but
    # the first keep theirs: prompts are encoded one by one. 1024: ComfyUI gives this family no size
    # of its own but scales Qwen-Image-Edit's reference pictures to 1024 x 1024 pixels.
    Family("Qwen-Image", ("QwenImage",), (QWEN25_7B,), 1024, default_layers=stream_norm_layers,
           default_layers_text="normalization layers (RMSNorm, LayerNorm)", batched_text=False,
           one_text_length=False),
)

SUPPORTED_FAMILIES = tuple(f.name for f in FAMILIES)

# Families ComfyUI loads that are refused with the reason they cannot be steered faithfully yet.
NOT_STEERED = {
    "Flux2": "FLUX.2's Klein text encoders (Qwen3) pad every prompt to 512 tokens and hand the model an "
             "attention mask over the padding, which a collection pass does not pass on yet, so the activations "
             "it would record are not those sampling computes",
}


def family_of(model, node: str) -> Family:
    """The Family of a ComfyUI MODEL; any other model, a family's excluded variants included, raises
    ActError naming its type and `node`, the node that was given it."""
    import comfy.supported_models as sm
    config = model.model.model_config
    kind = type(config).__name__

    def is_one_of(names):
        return any(isinstance(config, getattr(sm, c)) for c in names if hasattr(sm, c))
    for name, reason in NOT_STEERED.items():
        if is_one_of((name,)):
            raise ActError(f"{node}: the MODEL is of type {kind}, which ComfyUI-ACT does not support yet: {reason}; "
                           f"it supports {', '.join(SUPPORTED_FAMILIES)}")
    for family in FAMILIES:
        if not is_one_of(family.configs):
            continue
        if is_one_of(family.excluded):
            raise ActError(f"{node}: the MODEL is of type {kind}, a variant of {family.name} with another "
                           f"architecture, which ComfyUI-ACT does not support; connect a plain "
                           f"{' / '.join(SUPPORTED_FAMILIES)} model")
        return family
    raise ActError(f"{node}: the MODEL is a {kind} model, which ComfyUI-ACT does not support yet; "
                   f"it supports {', '.join(SUPPORTED_FAMILIES)}")


def by_name(name: str) -> Family | None:
    return next((f for f in FAMILIES if f.name == name), None)


def native_resolution(family: Family, model) -> int:
    size = family.native_resolution
    return size(model) if callable(size) else size
