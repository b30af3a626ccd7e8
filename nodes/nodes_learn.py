"""Learning nodes: prompts -> pooled activations -> transport maps."""
from __future__ import annotations

import logging

import comfy.utils
from comfy_api.latest import io
from tqdm import tqdm

from ..act_core import METHODS, SUPPORTS, TransportMaps, default_support
from .concept_words import describe, fit_from_collector, pairs_taking_words_out
from .collection import SCHEDULES, CollectSettings, Collector, fit_maps, parse_prompts
from .model_layers import WHERE, ActError
from .types import CATEGORY, Activations, Maps

log = logging.getLogger("comfyui_act")

PRESETS = ("normalization layers", "custom pattern")
# What Fit Transport Maps moves: the paper's per-layer maps (every token alike), or the final
# conditioning's tokens that look like the concept's (act_core/token_transport.py).
MOVES = ("every token alike (AcT)", "the concept's words only")
# The default: Fit looks at the pairs and picks one of MOVES (choose_moves), and says which in its summary.
AUTO = "auto (from the pairs)"
# A combo's default cannot follow another input, so the first choice stands for the method's own
# default support, resolved when fitting and recorded in the maps' info.
METHOD_DEFAULT = "method default"


def fit_concept_words(activations, picked: bool = False) -> TransportMaps:
    """The concept's words (act_core/concept_words.py), from the untouched CLIP's tokens and encodings of
    the collected prompt pairs (source line i with target line i)."""
    collector = activations.collector
    if not collector.spec.one_text_length:
        raise ActError(f"'the concept's words only' is not available for {collector.family}: its text encoder "
                       "gives each prompt its own length, which the concept's words are "
                       "not yet fitted on; set 'moves' to every token alike on Fit Transport Maps")
    conditioning = fit_from_collector(collector)
    info = dict(activations.info, method="concept words", support="gated", estimation="at once",
                moves=MOVES[1] + (" (picked by auto)" if picked else ""))
    return TransportMaps({}, info, conditioning=conditioning)


def choose_moves(activations) -> tuple[str, str]:
    """What 'auto' picks, and why: the concept's words only when at least half the pairs take words out
    of their source prompt or change them (a removal, an edit: where the arena's removal and edit tasks
    are won by the concept's words), every token alike when they only add words (a style, an added
    background or object: won by the paper's maps) or where this model cannot have the concept's words."""
    collector = activations.collector
    if not collector.spec.one_text_length:
        return MOVES[0], f"{collector.family} gives each prompt its own text length"
    try:
        taking = pairs_taking_words_out(collector)
    except ActError:
        return MOVES[0], "this model's text encoders tokenize a prompt their own ways"
    pairs = collector.n_source
    if taking and 2 * taking >= pairs:
        return MOVES[1], f"{taking} of {pairs} pairs take words out of the source prompt or change them"
    return MOVES[0], f"{pairs - taking} of {pairs} pairs only add words"


class Progress:
    """Model passes, shown on the node in the UI (ComfyUI's progress bar) and in the console."""

    def __init__(self, total: int, what: str):
        self.ui = comfy.utils.ProgressBar(total)
        self.console = tqdm(total=total, desc=f"ComfyUI-ACT {what}", unit="pass")

    def update(self, n: int) -> None:
        self.ui.update(n)
        self.console.update(n)
        if self.console.n >= self.console.total:
            self.console.close()


class CollectActivations(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ACTCollectActivations",
            display_name="Collect Activations (AcT)",
            category=CATEGORY,
            description="Runs the source and target prompts through the loaded model (one denoising step, "
                        "conditional branch only) and records each chosen layer's pooled activations.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input("source_prompts", multiline=True, default="",
                                tooltip="One prompt per line: what the model does now (e.g. captions with "
                                        "'a pink elephant'). At least 8. Lines longer than CLIP's 77-token window "
                                        "are split into chunks, as ComfyUI does (T5 on FLUX.1/SD3 takes a line "
                                        "whole); a prompt counts as the mean over all its tokens."),
                io.String.Input("target_prompts", multiline=True, default="",
                                tooltip="One prompt per line: what it should do instead (the same captions "
                                        "without it, or with style tags). At least 8."),
                io.Combo.Input("where", options=list(WHERE), default=WHERE[0],
                               tooltip="Which part of the model to learn maps for. The paper steers the "
                                       "diffusion model; adding the text encoder can help with concepts. Text "
                                       "encoders steered: CLIP-L (SD1.x), CLIP-H (SD2.x), CLIP-L + CLIP-G (SDXL), "
                                       "CLIP-L + T5 (FLUX.1), CLIP-L + CLIP-G + T5 (SD3, those loaded). On FLUX.1 "
                                       "and SD3 the text-encoder maps are fitted one layer at a time: one text "
                                       "pass over the prompts per layer."),
                io.Combo.Input("layers", options=list(PRESETS), default=PRESETS[0],
                               tooltip="normalization layers: every GroupNorm/LayerNorm output, as in the "
                                       "paper; on FLUX.1 and SD3 the norms before each block's attention and "
                                       "MLP, image and text streams apart (img_norm/txt_norm, x_block/"
                                       "context_block); in T5 its own T5LayerNorm. custom pattern: the modules "
                                       "whose names match 'pattern' (text encoders: 'clip_l.', 'clip_g.', 't5xxl.')."),
                io.String.Input("pattern", default="", optional=True,
                                tooltip="Regular expression over module names such as "
                                        "'diffusion_model.output_blocks.*norm' (used with 'custom pattern')."),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=8,
                             tooltip="Image size the step runs at. 0 = the model's native size (512 SD1.x, "
                                     "768 SD2.x-v, 1024 SDXL, SD3 and FLUX.1). Smaller is faster, less faithful."),
                io.Int.Input("noise_levels", default=1, min=1, max=16,
                             tooltip="1 = the first, noisiest step, as the paper. More spreads the samples "
                                     "over the schedule (each prompt is run once per level)."),
                io.Int.Input("batch_size", default=16, min=1, max=4096,
                             tooltip="Samples per model call: sets the GPU memory peak (the number of "
                                     "prompts does not). Incremental fitting gives the same maps at any size: "
                                     "one extra pass when all prompts x noise levels fit in one batch, about "
                                     "1.6 otherwise, with the replayed activations kept in spare GPU memory "
                                     "or system RAM."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False),
            ],
            outputs=[Activations.Output(display_name="activations"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, model, clip, source_prompts, target_prompts, where, layers, resolution, noise_levels,
                batch_size, seed, pattern="") -> io.NodeOutput:
        if layers == PRESETS[1] and not pattern.strip():
            raise ValueError("layers is 'custom pattern' but 'pattern' is empty: type a pattern or pick "
                             "'normalization layers' on Collect Activations")
        settings = CollectSettings(where=where, pattern=pattern.strip() if layers == PRESETS[1] else "",
                                   resolution=resolution, noise_levels=noise_levels, batch_size=batch_size,
                                   seed=seed)
        collector = Collector(model, clip, parse_prompts(source_prompts, "source_prompts"),
                              parse_prompts(target_prompts, "target_prompts"), settings)
        activations = collector.collect(Progress(len(collector.batches()), "collecting activations"))
        return io.NodeOutput(activations, activations.summary())


class FitTransportMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ACTFitTransportMaps",
            display_name="Fit Transport Maps (AcT)",
            category=CATEGORY,
            description="Learns, for every neuron, the map that moves source activations onto target ones.",
            inputs=[
                Activations.Input("activations"),
                io.Combo.Input("method", options=list(METHODS), default="linear",
                               tooltip="linear: Linear-AcT, the optimal-transport fit (best in the paper); on "
                                       "conv layers it moves each channel's mean and keeps the detail. "
                                       "gaussian: matches mean and spread, mapping every pixel. mean: shifts "
                                       "the mean only (a steering vector)."),
                io.Combo.Input("support", options=[METHOD_DEFAULT, *SUPPORTS], default=METHOD_DEFAULT,
                               tooltip="Where a neuron is moved. method default = all, for every method: it "
                                       "steered far better than the paper's q_0_100 on the trained shapes model "
                                       "(README). q_0_100 = only within the range the source prompts produced "
                                       "(the paper's Linear-AcT); q_5_95 etc. = narrower; all = everywhere. "
                                       "Values outside the range are left untouched."),
                io.Combo.Input("estimation", options=list(SCHEDULES), default=SCHEDULES[0],
                               tooltip="incremental: each layer is learned with the earlier layers already "
                                       "steered (the paper's default, better; reruns the model). at once: all "
                                       "layers from the collected activations, no extra model run."),
                io.Combo.Input("moves", options=[AUTO, *MOVES], default=AUTO, optional=True,
                               tooltip="auto: picked from the pairs, and named in the summary: the concept's words "
                                       "only when at least half the pairs take words out of the source prompt or "
                                       "change them, every token alike when they only add words (and on models "
                                       "that cannot have the concept's words). "
                                       "every token alike (AcT): the paper's maps on every chosen layer; best for "
                                       "a style or a background. the concept's words only: for an object or an "
                                       "attribute (no pink elephant, remove a colour or a shape, change one "
                                       "object): learns which words the source prompts add or change, takes "
                                       "them out of a prompt that holds them (wherever it puts them) and moves "
                                       "it toward itself without them; any other prompt, the empty one "
                                       "included, is left exactly as it is. Pairs may differ in length (Concept "
                                       "Prompts 'remove'); source line i pairs with target line i. CLIP models "
                                       "only (SD1.x, SD2.x, SDXL); method, support and estimation are not used."),
            ],
            outputs=[Maps.Output(display_name="maps"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, activations, method, support, estimation, moves=AUTO) -> io.NodeOutput:
        picked = ""
        if moves == AUTO:
            moves, why = choose_moves(activations)
            picked = f"moves auto: {moves} ({why}). "
            log.info("Fit Transport Maps: %s", picked.strip())
        if moves == MOVES[1]:
            maps = fit_concept_words(activations, picked=bool(picked))
            return io.NodeOutput(maps, picked + describe(maps.conditioning, activations.collector.clip))
        if moves != MOVES[0]:
            raise ActError(f"moves must be one of {(AUTO, *MOVES)}, got {moves!r} (fix 'moves' on Fit Transport "
                           "Maps)")
        if support == METHOD_DEFAULT:
            support = default_support(method)
        maps = fit_maps(activations, method, support, estimation,
                        progress_factory=lambda total: Progress(total, "incremental fitting"))
        if picked:  # chosen by hand, the layer maps' info stays as it always was (and as diffusers writes it)
            maps.info["moves"] = MOVES[0] + " (picked by auto)"
        degenerate = sum(m.degenerate for m in maps.values())
        summary = (f"{picked}{len(maps)} layers, {maps.neurons()} neurons, {method} / {support} / {estimation}"
                   + (f"; {degenerate} neurons had no spread and are left as they are" if degenerate else ""))
        return io.NodeOutput(maps, summary)
