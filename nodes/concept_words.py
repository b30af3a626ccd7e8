"""The concept's words in ComfyUI: fitted from the CLIP's own tokens and encodings, applied where ComfyUI
encodes a prompt, and taken back where the sampler must not see it.

Fit: each collected prompt is tokenized and encoded by the untouched CLIP (its tokens give the ids the
pairs are aligned by, act_core/concept_words.py). The conditioning's positions must be one token stream's
positions: CLIP text encoders (SD1.x, SD2.x, SDXL's two, which share their tokens). T5 and the language
models of newer families tokenize a prompt their own way, so the fit refuses them with a message.

Apply: an object patch on the CLIP's "encode_token_weights" finds the concept's words in each prompt's
encoding; a prompt without them comes back untouched (the same tensors). A prompt with them is encoded a
second time with them edited out, and its conditioning and pooled vector move toward that encoding.
The branch and the sampling window: the moved conditionings are remembered (a few, per Apply), and a
patch on the diffusion model gives a row its untouched conditioning back in a call that must not be
steered (the negative prompt's pass under "conditional only", the steps outside the window).
"""
from __future__ import annotations

from collections import deque

import torch

from ..act_core.concept_words import (ConceptWords, Edit, PairTokens, apply_edits, fit_concept_words, move,
                                      takes_words_out)
from .model_layers import ActError
from . import per_step
from .patching import original_or_patched

# Moved conditionings remembered per Apply, for giving rows back (a graph encodes a few prompts).
REMEMBERED = 64


def _id(token) -> int:
    """A token's id (an embedding given as a tensor, textual inversion, has none: -1)."""
    return token[0] if isinstance(token[0], int) else -1


def stream(tokens: dict) -> str:
    """The key of the token stream whose positions are the conditioning's: every stream must hold the same
    words at the same positions (CLIP-L and CLIP-G do; T5 and language models tokenize their own way)."""
    keys = list(tokens)

    def words(chunk: list) -> list[int]:
        ids = [_id(t) for t in chunk]
        return ids[:ids.index(ids[-1])] if ids else ids  # up to the padding (or the end token)
    first = tokens[keys[0]]
    for key in keys[1:]:
        other = tokens[key]
        if len(other) != len(first) or any(len(a) != len(b) or words(a) != [_id(t) for t in b][:len(words(a))]
                                           for a, b in zip(first, other)):
            raise ActError("'the concept's words only' needs text encoders that share one tokenization (CLIP: "
                           "SD1.x, SD2.x, SDXL); this model's encoders tokenize a prompt their own ways "
                           f"({', '.join(keys)}). Choose 'every token alike (AcT)' on Fit Transport Maps")
    return keys[0]


def _bounds(chunks: list, tokenizer, key: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of a prompt's stream, flattened, and each chunk's words as (first, last+1) positions: past
    the start token, before the end token."""
    own = getattr(tokenizer, f"clip_{key}", None)
    start, end = getattr(own, "start_token", None), getattr(own, "end_token", None)
    ids, bounds, at = [], [], 0
    for chunk in chunks:
        chunk_ids = [_id(t) for t in chunk]
        a = 1 if chunk_ids and start is not None and chunk_ids[0] == start else 0
        b = chunk_ids.index(end, a) if end is not None and end in chunk_ids[a:] else len(chunk_ids)
        ids += chunk_ids
        bounds.append((at + a, at + b))
        at += len(chunk_ids)
    return ids, bounds


def _stream_ids(collector, tokens: dict) -> tuple[list[int], list[tuple[int, int]]]:
    """A collected prompt's ids and each chunk's word bounds, in the stream the conditioning follows."""
    key = stream(tokens)
    return _bounds(tokens[key], collector.clip.tokenizer, key)


def pairs_taking_words_out(collector) -> int:
    """How many source/target pairs delete or replace words of the source (raises ActError where the
    concept's words cannot be fitted: encoders that tokenize apart, unequal counts)."""
    n = collector.n_source
    if n != len(collector.prompts) - n:
        raise ActError(f"there are {n} source and {len(collector.prompts) - n} target prompts, so they do not "
                       "pair line by line")
    words = []
    for tokens in collector.tokens:
        ids, bounds = _stream_ids(collector, tokens)
        words.append([i for a, b in bounds for i in ids[a:b]])  # the prompt's words: no start, end or padding
    return sum(takes_words_out(s, t) for s, t in zip(words[:n], words[n:]))


def fit_from_collector(collector) -> ConceptWords:
    """The concept's words from the collected prompts, source line i paired with target line i."""
    n = collector.n_source
    if n != len(collector.prompts) - n:
        raise ActError(f"'the concept's words only' pairs source and target prompts line by line, but there are "
                       f"{n} source and {len(collector.prompts) - n} target prompts: give both the same count "
                       "on Collect Activations")
    encoded = []
    with torch.inference_mode():
        for tokens in collector.tokens:
            cond = collector.clip.encode_from_tokens(tokens).float().cpu()[0]
            ids, _ = _stream_ids(collector, tokens)
            if len(ids) != cond.shape[0]:
                raise ActError("'the concept's words only' needs a conditioning of one token per position of the "
                               f"prompt's tokens ({len(ids)} tokens gave {cond.shape[0]}); choose 'every token "
                               "alike (AcT)' on Fit Transport Maps")
            encoded.append(PairTokens(cond, ids))
    try:
        return fit_concept_words(list(zip(encoded[:n], encoded[n:])))
    except ValueError as error:
        raise ActError(f"{error}; fix the prompts on Collect Activations") from None


def describe(words: ConceptWords, clip) -> str:
    """What Fit Transport Maps says it learned: the concept's own words, as the tokenizer spells them."""
    ids = sorted(set(words.words[:, 0].tolist()))
    spelled = None
    for name in ("clip_l", "clip_g", "clip_h"):
        vocabulary = getattr(getattr(getattr(clip, "tokenizer", None), name, None), "tokenizer", None)
        if vocabulary is not None and hasattr(vocabulary, "decode"):
            spelled = [vocabulary.decode([i]).strip() for i in ids]
            break
    shown = ", ".join(f"'{w}'" for w in spelled) if spelled else f"{len(ids)} words"
    return (f"the concept's words: {shown} ({words.anchors.shape[0]} examples in the prompts); a prompt that "
            "holds none of them is left exactly as it is")


class Remembered:
    """The conditionings the concept's words moved, with what they were, so that a call the sampler must
    not steer can have them back. Lives as long as the Apply's outputs."""

    def __init__(self):
        self.entries: deque = deque(maxlen=REMEMBERED)

    def add(self, moved: torch.Tensor, original: torch.Tensor, moved_pooled, original_pooled) -> None:
        self.entries.append((moved[0].detach(), original[0].detach(),
                             None if moved_pooled is None else moved_pooled[0].detach(),
                             None if original_pooled is None else original_pooled[0].detach()))

    def original(self, row: torch.Tensor) -> torch.Tensor | None:
        """The untouched conditioning of a context row [T', D] that is a moved one (repeated to T' tokens,
        as ComfyUI repeats a prompt to batch it with longer ones), cast as the row is; else None."""
        for moved, original, _, _ in self.entries:
            t = moved.shape[0]
            if row.shape[-1] != moved.shape[-1] or row.shape[0] % t:
                continue
            if torch.equal(row.reshape(-1, t, row.shape[-1]), moved.to(row)[None].expand(row.shape[0] // t, -1, -1)):
                return original.to(row).repeat(row.shape[0] // t, 1)
        return None

    def original_pooled(self, y: torch.Tensor) -> torch.Tensor | None:
        """y [P'] whose first P values are a moved pooled vector, with the untouched one there instead."""
        for _, _, moved, original in self.entries:
            if moved is None or y.shape[0] < moved.shape[0]:
                continue
            if torch.equal(y[:moved.shape[0]], moved.to(y)):
                out = y.clone()
                out[:moved.shape[0]] = original.to(y)
                return out
        return None


def steer_words(patched, clip, words: ConceptWords, strength: float, remembered: Remembered | None) -> None:
    """Patch the clone `patched` of `clip` so that its prompts lose the concept's words at `strength`."""
    if strength < 0:
        raise ActError(f"strength is {strength}: 'the concept's words only' moves the words a prompt holds and "
                       "has no inverse (a prompt without the concept has nothing to give back). Use a strength "
                       "from 0 up on Apply Transport Maps, or fit 'add' pairs with 'every token alike'")
    stage = clip.cond_stage_model
    tokenizer = clip.tokenizer
    inner = original_or_patched(patched.patcher, "encode_token_weights", stage, "encode_token_weights")

    def encode(token_weight_pairs, *args, **kwargs):
        out = inner(token_weight_pairs, *args, **kwargs)
        cond, pooled = out[0], out[1]
        if cond.shape[-1] != words.dim:
            raise ActError(f"these maps' conditioning map is {words.dim} wide but this CLIP's conditioning is "
                           f"{cond.shape[-1]}: fit the maps on this model (Fit Transport Maps)")
        key = stream(token_weight_pairs)
        ids, bounds = _bounds(token_weight_pairs[key], tokenizer, key)
        if cond.shape[0] != 1 or len(ids) != cond.shape[1]:
            return out
        edits = words.edits(cond[0].float(), ids, bounds)
        if not edits:
            return out
        edited = {k: _edited(chunks, edits) for k, chunks in token_weight_pairs.items()}
        target = inner(edited, *args, **kwargs)
        edited_ids, _ = _bounds(edited[key], tokenizer, key)
        moved = move(cond[0].float(), target[0][0].float(), ids, edited_ids, strength)[None].to(cond.dtype)
        moved_pooled = pooled
        if pooled is not None and target[1] is not None:
            moved_pooled = (pooled.float() + strength * (target[1].float() - pooled.float())).to(pooled.dtype)
        if remembered is not None:
            remembered.add(moved, cond, moved_pooled, pooled)
        return (moved, moved_pooled, *out[2:])
    patched.patcher.add_object_patch("encode_token_weights", encode)


def _edited(chunks: list, edits: list[Edit]) -> list:
    """A stream's chunks with the edits (positions over all chunks) made in each chunk."""
    out, at = [], 0
    for chunk in chunks:
        local = [Edit(e.start - at, e.end - at, e.ids) for e in edits if at <= e.start < at + len(chunk)]
        out.append(apply_edits(chunk, local, lambda i, like: (i, *like[1:])) if local else chunk)
        at += len(chunk)
    return out


def give_back(patched_model, remembered: Remembered, steered_rows) -> None:
    """Patch the diffusion model of `patched_model` so that the rows of a call that steered_rows(args,
    kwargs, running model) does not name (None: all rows steered) get their untouched conditioning back.
    Bound to no module: ComfyUI may run these patches on another copy of the model (nodes/per_step.py)."""
    import comfy.patcher_extension
    key = "diffusion_model.forward"
    state = per_step.CallState(patched_model.model)
    patched_model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "comfyui_act",
                                       per_step.running_model_wrapper(state))
    inner = per_step.layer_call("diffusion_model", patched_model.object_patches.get(key), state)

    def forward(*args, **kwargs):
        context = kwargs.get("context")
        if context is None or not remembered.entries:
            return inner(*args, **kwargs)
        rows = steered_rows(args, kwargs, state.running())
        if rows is None:
            return inner(*args, **kwargs)
        keep = set(rows.tolist())
        y = kwargs.get("y")
        new_context, new_y = context, y
        for r in range(context.shape[0]):
            if r in keep:
                continue
            back = remembered.original(context[r])
            if back is not None:
                new_context = new_context.clone() if new_context is context else new_context
                new_context[r] = back
            if y is not None and y.ndim == 2:
                pooled = remembered.original_pooled(y[r])
                if pooled is not None:
                    new_y = new_y.clone() if new_y is y else new_y
                    new_y[r] = pooled
        kwargs = dict(kwargs, context=new_context, **({"y": new_y} if y is not None else {}))
        return inner(*args, **kwargs)
    patched_model.add_object_patch(key, forward)
