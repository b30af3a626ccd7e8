"""The concept's words: find the words of a prompt that carry the concept, and move the prompt's
conditioning onto that of the same prompt without them. Every other prompt is left exactly as it was.

Fitted from prompt pairs (source: a caption with the concept, target: the same caption without it, or
with the concept's words replaced), each given as the untouched text encoder's token activations [T, D]
and the token id at each position:

1. Alignment by content. The pair's token ids are aligned as a text diff aligns lines (longest common
   runs first), so a word kept in both prompts pairs with itself wherever it sits. Source words with no
   counterpart are deleted words; source words that other words took the place of are replaced words.
   Both are the concept's words: each becomes an anchor, with the extent of its edit (the deleted or
   replaced run, as offsets from the word) and, for a replaced word, the ids that replaced the run.
2. The gate. A token is the concept's when it is one of the concept's own words and its activation is
   nearer to an anchor than to every target token (the references). A prompt with no such token is not
   touched: the same tensor comes back.
3. The edit. Each of the concept's tokens edits the prompt as the same word was most often edited in the
   pairs: the same run around it is deleted, or replaced by the same ids. The host encodes the edited prompt
   with the same text encoder (it is the prompt the user would have written without the concept).
4. The move. Each token of the prompt moves toward its counterpart in the edited prompt (aligned by the
   same diff): a kept word toward itself without the concept's influence, a replaced word toward its
   replacement, a deleted word toward the kept word that follows it. The pooled vector moves toward the
   edited prompt's.

    z' = z + lambda * (counterpart(z) - z)          lambda in [0, 1] a dial, above 1 further

lambda = 0 is the identity. There is no inverse: a prompt without the concept has no words to give back,
so a negative strength is refused. Pure PyTorch, no ComfyUI import.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["ConceptWords", "Edit", "PairTokens", "align", "counterparts", "fit_concept_words", "is_concept_words",
           "MAX_TARGETS"]

KEPT, DELETED, REPLACED = 0, 1, 2
# At most this many target tokens are kept as the gate's references: those nearest to the anchors, the
# only ones that can outvote an anchor for a token near it. Bounds the file and each prompt's distances.
MAX_TARGETS = 1024
# At most this many replacement ids per anchor (a replaced run longer than this is cut).
MAX_REPLACEMENT = 8
# Words of an edit kept on each side of an anchor (an edit's run is read that far).
CONTEXT = 8
_CHUNK = 1024  # tokens per distance computation
_ID_TABLES = ("extents", "replacements", "words", "context")


@dataclass(frozen=True)
class PairTokens:
    """One prompt's encoding: token activations [T, D] and the token id at each position."""

    activations: torch.Tensor
    ids: Sequence[int]


@dataclass(frozen=True)
class Edit:
    """Delete positions [start, end) of a prompt and put `ids` in their place (none: a deletion)."""

    start: int
    end: int
    ids: tuple[int, ...] = ()


def align(source_ids: Sequence[int], target_ids: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """For every source position: (target position it moves toward, KEPT / DELETED / REPLACED, first and
    last+1 source positions of its edit). A deleted word moves toward the target word that follows it."""
    out = []
    matcher = difflib.SequenceMatcher(None, list(source_ids), list(target_ids), autojunk=False)
    last = len(target_ids) - 1
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            out += [(j1 + k, KEPT, i1 + k, i1 + k + 1) for k in range(i2 - i1)]
        elif tag == "replace":
            out += [(j1 + (i - i1) * (j2 - j1) // (i2 - i1), REPLACED, i1, i2) for i in range(i1, i2)]
        elif tag == "delete":
            out += [(min(j1, last), DELETED, i1, i2) for _ in range(i1, i2)]
    return out


def takes_words_out(source_ids: Sequence[int], target_ids: Sequence[int]) -> bool:
    """Whether the pair deletes or replaces a word of its source (a removal or an edit), rather than only
    adding words to it (a style, an added object): what 'auto' on Fit Transport Maps decides by."""
    return bool(_runs(source_ids, target_ids))


def counterparts(source_ids: Sequence[int], target_ids: Sequence[int]) -> torch.Tensor:
    """[len(source)] long: the target position each source position moves toward."""
    return torch.tensor([a[0] for a in align(source_ids, target_ids)], dtype=torch.long)


def _nearest(rows: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    points = points.to(rows.device, torch.float32)
    found = [torch.cdist(chunk, points).min(-1) for chunk in rows.float().split(_CHUNK)]
    return torch.cat([f.values for f in found]), torch.cat([f.indices for f in found])


@dataclass(eq=False)
class ConceptWords:
    """anchors [K, D]: the concept's words as the fit prompts encoded them; extents [K, 2]: each one's
    edit as (first, last+1) offsets from the word; replacements [K, MAX_REPLACEMENT]: the ids that took
    the run's place (-1: none, a deletion); targets [M, D]: the gate's references."""

    anchors: torch.Tensor
    extents: torch.Tensor
    replacements: torch.Tensor
    targets: torch.Tensor
    words: torch.Tensor   # [K, 3] ids: the anchor's own word, the first and the last word of its edit
    context: torch.Tensor  # [K, 2 * CONTEXT + 1] ids of the anchor's edit around it (-1 outside the edit)

    @property
    def dim(self) -> int:
        return int(self.anchors.shape[1])

    def concept_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For token activations x [T, D]: ([T] bool: the concept's tokens, [T] index of the nearest anchor)."""
        to_anchor, nearest = _nearest(x, self.anchors)
        to_target, _ = _nearest(x, self.targets)
        return to_anchor < to_target, nearest

    def edits(self, x: torch.Tensor, ids: Sequence[int], bounds: Sequence[tuple[int, int]]) -> list[Edit]:
        """The edits that take the concept out of one prompt: x [T, D] its activations, ids its token ids,
        bounds the (first, last+1) positions of its words in each chunk (an edit never crosses a chunk or
        touches its start, end or padding tokens). [] when no token is the concept's."""
        concept, nearest = self.concept_tokens(x)
        # Only the concept's own words open the gate: a word the fit never edited is never taken out, however
        # near an anchor it sits (the start token or 'purple' beside learned 'cross' tokens, where the
        # references kept do not surround them).
        known = set(self.words[:, 0].tolist())
        runs: dict[tuple[int, int], tuple[int, ...]] = {}
        found: set[int] = set()
        for position in concept.nonzero().flatten().tolist():
            chunk = next(((a, b) for a, b in bounds if a <= position < b), None)
            if chunk is not None and int(ids[position]) in known:
                start, end, ids_in = self._run(int(nearest[position]), position, ids, chunk)
                runs[(start, end)] = ids_in
                found.add(int(ids[position]))
        # The concept named again later in the prompt (a long prompt that repeats itself, a second chunk)
        # reads differently to the gate: a causal encoder has seen the first naming by then. Once the gate
        # has found a word, its other occurrences go too, where a learned edit fits their words exactly.
        for position, i in enumerate(ids):
            if int(i) in found and not concept[position]:
                chunk = next(((a, b) for a, b in bounds if a <= position < b), None)
                learned = self._learned_run(position, ids, chunk) if chunk is not None else None
                if learned is not None:
                    runs[learned[:2]] = learned[2]
        return _merge(runs)

    def _learned_run(self, position: int, ids: Sequence[int], chunk: tuple[int, int]) -> tuple | None:
        """The most common learned edit of this word whose first and last words are where this prompt has
        them: (start, end, replacing ids), or None."""
        votes: dict[tuple, int] = {}
        for j in (self.words[:, 0] == int(ids[position])).nonzero().flatten().tolist():
            lo, hi = int(self.extents[j, 0]), int(self.extents[j, 1])
            a, b = position + lo, position + hi
            if chunk[0] <= a and b <= chunk[1] and int(ids[a]) == int(self.words[j, 1]) \
                    and int(ids[b - 1]) == int(self.words[j, 2]):
                key = (a, b, tuple(int(i) for i in self.replacements[j].tolist() if i >= 0))
                votes[key] = votes.get(key, 0) + 1
        return max(votes, key=votes.get) if votes else None

    def _run(self, k: int, position: int, ids: Sequence[int], chunk: tuple[int, int]) -> tuple[int, int, tuple]:
        """The edit around `position` for nearest anchor k: of the edits learned for the same word, the
        most common whose first and last words are where this prompt has them (the same diff can cut a
        run at either of two equal words: 'a red circle and' or 'red circle and a'); else the run the
        learned edits' words make around it in this prompt."""
        same = (self.words[:, 0] == int(ids[position])).nonzero().flatten().tolist()
        learned = self._learned_run(position, ids, chunk)
        if learned is not None:
            return learned
        # No learned edit fits this prompt's words: take the run of words around this one that the
        # learned edits of the same word held at the same offsets (the concept's phrase, 'a small red
        # circle', wherever the prompt puts it).
        profile: dict[int, set[int]] = {}
        for j in same:
            for off in range(int(self.extents[j, 0]), int(self.extents[j, 1])):
                profile.setdefault(off, set()).add(int(self.context[j, off + CONTEXT]) if abs(off) <= CONTEXT else -2)
        start = position
        while start - 1 >= chunk[0] and int(ids[start - 1]) in profile.get(start - 1 - position, ()):
            start -= 1
        end = position + 1
        while end < chunk[1] and int(ids[end]) in profile.get(end - position, ()):
            end += 1
        # A run that opens the prompt takes the joining word after it along, as the learned runs took the
        # one before them ('and a red circle' learned, 'a red circle and ...' met).
        firsts = {int(self.words[j, 1]) for j in same} - {int(self.words[j, 0]) for j in same}
        if start == chunk[0] and end < chunk[1] and int(ids[end]) in firsts:
            end += 1
        near = same[int(torch.cdist(self.anchors[same].float(), self.anchors[k][None].float())[:, 0].argmin())] \
            if same else k
        return start, end, tuple(int(i) for i in self.replacements[near].tolist() if i >= 0)

    # -- the maps file --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The anchors and references in float16 (half the size; the gate's distances keep their order
        at that precision for all but near ties), the edits as int32."""
        ids = {k: getattr(self, k).to(torch.int32).contiguous() for k in _ID_TABLES}
        return {"anchors": self.anchors.to(torch.float16).contiguous(),
                "targets": self.targets.to(torch.float16).contiguous(), **ids}

    def spec(self) -> dict:
        return {"kind": "concept words", "dim": self.dim, "anchors": int(self.anchors.shape[0]),
                "targets": int(self.targets.shape[0])}

    @classmethod
    def from_tensors(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "ConceptWords":
        """Inverse of tensors()/spec(); raises ValueError naming what does not fit."""
        dim, count, refs = spec.get("dim"), spec.get("anchors"), spec.get("targets")
        if spec.get("kind") != "concept words" or not all(isinstance(v, int) and v > 0 for v in (dim, count, refs)):
            raise ValueError(f"malformed conditioning map description {spec!r}")
        if set(tensors) != {"anchors", "targets", *_ID_TABLES}:
            raise ValueError(f"conditioning map tensors {sorted(tensors)} do not match its description")
        t = tensors
        widths = {"extents": 2, "replacements": MAX_REPLACEMENT, "words": 3, "context": 2 * CONTEXT + 1}
        if t["anchors"].shape != (count, dim) or t["targets"].shape != (refs, dim) \
                or any(t[k].shape != (count, w) for k, w in widths.items()):
            raise ValueError("conditioning map tensors have the wrong sizes")
        if not (torch.isfinite(t["anchors"].float()).all() and torch.isfinite(t["targets"].float()).all()):
            raise ValueError("conditioning map has NaN or infinite values")
        if (t["extents"][:, 0] > 0).any() or (t["extents"][:, 1] <= 0).any():
            raise ValueError("conditioning map edits do not hold the word they start from")
        return cls(t["anchors"].float(), *(t[k].long() for k in ("extents", "replacements")), t["targets"].float(),
                   *(t[k].long() for k in ("words", "context")))


def is_concept_words(conditioning) -> bool:
    """Whether a maps object's conditioning map is this kind (by what it says of itself: a script may load
    this module under another package name than the node pack does)."""
    return conditioning is not None and conditioning.spec().get("kind") == "concept words"


def _merge(runs: dict[tuple[int, int], tuple[int, ...]]) -> list[Edit]:
    """Overlapping runs as one edit (a replacement kept only where the runs do not overlap)."""
    out: list[Edit] = []
    for (start, end), ids in sorted(runs.items()):
        if out and start < out[-1].end:
            last = out[-1]
            out[-1] = Edit(last.start, max(last.end, end), last.ids if (start, end) == (last.start, last.end) else ())
        else:
            out.append(Edit(start, end, ids))
    return out


def apply_edits(ids: Sequence, edits: Sequence[Edit], make=lambda i, like: i) -> list:
    """A chunk's tokens with the edits made, padded back to its length with its own last token.
    make(id, token it replaces) builds a replacement token in the chunk's own form (id, weight...)."""
    out, at = [], 0
    for e in edits:
        out += list(ids[at:e.start]) + [make(i, ids[e.start]) for i in e.ids]
        at = e.end
    out += list(ids[at:])
    if len(out) > len(ids):  # a longer replacement: the chunk keeps its closing token
        return out[:len(ids) - 1] + [ids[-1]]
    return out + [ids[-1]] * (len(ids) - len(out))


def move(source: torch.Tensor, edited: torch.Tensor, source_ids: Sequence[int], edited_ids: Sequence[int],
         strength: float) -> torch.Tensor:
    """source [T, D] moved at `strength` toward its counterparts in the edited prompt's activations."""
    index = counterparts(source_ids, edited_ids).to(source.device)
    return source + strength * (edited[index].to(source.dtype) - source)


def _runs(source_ids: Sequence[int], target_ids: Sequence[int]) -> list[tuple[int, int, list[int]]]:
    """The pair's edits: (first, last+1 source position, replacing ids) of each deleted or replaced run."""
    matcher = difflib.SequenceMatcher(None, list(source_ids), list(target_ids), autojunk=False)
    return [(i1, i2, list(target_ids[j1:j2]) if tag == "replace" else [])
            for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag in ("delete", "replace")]


def _centred(ids: Sequence[int], i1: int, i2: int, own: set[int]) -> tuple[int, int]:
    """A deleted run slid along equal words ('cross and a red' = 'and a red cross' after 'a blue cross')
    to where the concept's own words sit nearest its middle: the diff cuts either way."""
    options = [(i1, i2)]
    a, b = i1, i2
    while a > 0 and ids[a - 1] == ids[b - 1]:
        a, b = a - 1, b - 1
        options.append((a, b))
    a, b = i1, i2
    while b < len(ids) and ids[a] == ids[b]:
        a, b = a + 1, b + 1
        options.append((a, b))

    def off_centre(run):
        at = [i for i in range(*run) if ids[i] in own]
        return abs(sum(at) / len(at) - (run[0] + run[1] - 1) / 2) if at else float("inf")
    return min(options, key=off_centre)


def fit_concept_words(pairs: Sequence[tuple[PairTokens, PairTokens]], max_targets: int = MAX_TARGETS) -> ConceptWords:
    """Fit from (source, target) encodings of prompt pairs. Raises ValueError when no pair differs."""
    edits, targets = [], []
    in_runs: dict[int, int] = {}     # id -> pairs whose edits hold it
    in_targets: dict[int, int] = {}  # id -> target prompts that hold it
    for source, target in pairs:
        s, t = source.activations.float(), target.activations.float()
        if s.ndim != 2 or t.ndim != 2 or s.shape[1] != t.shape[1]:
            raise ValueError(f"paired token activations must be [tokens, width] of one width, got "
                             f"{tuple(s.shape)} and {tuple(t.shape)}")
        if len(source.ids) != s.shape[0] or len(target.ids) != t.shape[0]:
            raise ValueError("each prompt needs one token id per token activation")
        ids = [int(i) for i in source.ids]
        runs = _runs(ids, [int(i) for i in target.ids])
        edits.append((ids, s, runs))
        for i in {ids[p] for a, b, _ in runs for p in range(a, b)}:
            in_runs[i] = in_runs.get(i, 0) + 1
        for i in {int(i) for i in target.ids}:
            in_targets[i] = in_targets.get(i, 0) + 1
        targets.append(t)
    if not in_runs:
        raise ValueError("the source and target prompts hold the same words: nothing to learn (the source "
                         "prompts must hold the concept, the target prompts must not)")
    # The concept's own words are those most pairs edit and few targets hold ("pink", "elephant"), not
    # the words around them ("a", "with", "in the background"): only those open the gate, and each one
    # carries the whole run of its edit.
    own = {i for i, n in in_runs.items() if n >= 0.5 * len(pairs) and in_targets.get(i, 0) <= 0.1 * n}
    if not own:
        own = {max(in_runs, key=lambda i: (in_runs[i] - in_targets.get(i, 0), in_runs[i]))}
    rows = []
    for ids, s, runs in edits:
        for i1, i2, replacing in runs:
            if not replacing:
                i1, i2 = _centred(ids, i1, i2, own)
            replacing = replacing[:MAX_REPLACEMENT] + [-1] * (MAX_REPLACEMENT - len(replacing[:MAX_REPLACEMENT]))
            for i in range(i1, i2):
                if ids[i] in own:
                    run = [ids[i + off] if i1 <= i + off < i2 else -1 for off in range(-CONTEXT, CONTEXT + 1)]
                    rows.append((s[i], (i1 - i, i2 - i), replacing, (ids[i], ids[i1], ids[i2 - 1]), run))
    anchor = torch.stack([r[0] for r in rows])
    references = torch.unique(torch.cat(targets), dim=0)
    if references.shape[0] > max_targets:
        distance, _ = _nearest(references, anchor)
        references = references[distance.topk(max_targets, largest=False).indices.sort().values]

    def table(k):
        return torch.tensor([r[k] for r in rows], dtype=torch.long)
    return ConceptWords(anchor, table(1), table(2), references, table(3), table(4))
