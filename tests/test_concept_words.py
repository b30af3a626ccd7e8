"""The concept's words (act_core/concept_words.py): pairs of any length aligned by content, prompts without
the concept left bit for bit, and a prompt with it moved toward itself without the concept's words.

The encoder here is a small causal one made of fixed random vectors, so that what each test expects is
worked out by hand: which words an edit takes out, and where each kept word goes."""
from __future__ import annotations

import random

import pytest
import torch

from act_core.concept_words import ConceptWords, PairTokens, align, apply_edits, counterparts, fit_concept_words, move

BOS, EOS = 0, 1
WORDS = {w: i + 2 for i, w in enumerate(
    "a the small large red blue green yellow circle square cross house dog tree hill on with near and , "
    "beside behind elephant pink seen".split())}
T, D = 16, 24
_TABLE = torch.randn(len(WORDS) + 2, D, generator=torch.Generator().manual_seed(0))


def ids_of(text: str) -> list[int]:
    ids = [BOS] + [WORDS[w] for w in text.replace(",", " ,").split()] + [EOS]
    return (ids + [EOS] * T)[:T]


def encode(ids: list[int]) -> torch.Tensor:
    """A causal encoder: each token's vector plus half the mean of the ones before it."""
    x = _TABLE[ids]
    before = torch.cumsum(x, 0) - x
    return x + 0.5 * before / torch.arange(1, T + 1)[:, None].clamp_min(1)


def pair(source: str, target: str) -> tuple[PairTokens, PairTokens]:
    s, t = ids_of(source), ids_of(target)
    return PairTokens(encode(s), s), PairTokens(encode(t), t)


CAPTIONS = ["a house on the hill", "a large dog", "the small tree near a house", "a blue square and a cross",
            "a green circle", "the dog near the tree", "a small yellow square", "a house and a large tree"]
JOINS = ["{c} with {x}", "{x} beside {c}", "{c} , {x} near", "{c} and {x}", "{x} behind {c}", "{c} , {x} seen"]


def concept_pairs(concept: str = "a pink elephant", n: int = 32, seed: int = 0):
    """Like Concept Prompts 'remove': the concept joined to a caption in one of several phrasings."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        caption = CAPTIONS[i % len(CAPTIONS)]
        out.append(pair(rng.choice(JOINS).format(c=caption, x=concept), caption))
    return out


@pytest.fixture(scope="module")
def elephant() -> ConceptWords:
    return fit_concept_words(concept_pairs())


def test_kept_words_pair_with_themselves_wherever_the_concept_put_them():
    """'a pink elephant beside a house' -> 'a house': the house's words move toward the target's house,
    not toward whatever sits at their position there (pairing by position fails this)."""
    source, target = ids_of("a pink elephant beside a house"), ids_of("a house")
    index = counterparts(source, target)
    assert index[5].item() == 1 and index[6].item() == 2   # 'a house' at 5, 6 -> 1, 2
    kinds = [k for _, k, _, _ in align(source, target)]
    assert kinds[1:5] == [1, 1, 1, 1]  # 'a pink elephant beside' deleted
    assert kinds[5:7] == [0, 0]


def test_the_concepts_own_words_are_learned_not_the_words_that_join_it(elephant):
    assert set(elephant.words[:, 0].tolist()) == {WORDS["pink"], WORDS["elephant"]}


@pytest.mark.parametrize("prompt, expected", [
    ("a pink elephant beside the dog near the tree", "the dog near the tree"),
    ("the dog near the tree with a pink elephant", "the dog near the tree"),
    ("a house on the hill and a pink elephant", "a house on the hill"),
])
def test_a_prompt_loses_the_concept_wherever_it_names_it(elephant, prompt, expected):
    """Prompts that name the concept first, last or joined another way: the edit takes out the concept's
    phrase and the word that joined it, and nothing else."""
    ids = ids_of(prompt)
    edits = elephant.edits(encode(ids), ids, [(1, ids.index(EOS))])
    assert apply_edits(ids, edits) == ids_of(expected)


@pytest.mark.parametrize("prompt", ["", "a house on the hill", "the small tree near a house with a dog",
                                    "a large dog beside a green circle , a cross seen"])
def test_prompts_without_the_concept_are_not_touched(elephant, prompt):
    """No edit for the empty prompt or prompts without the concept, even ones with the words that joined
    it in the fit ('with', 'near') or with 'pink' and 'elephant' apart."""
    ids = ids_of(prompt)
    assert elephant.edits(encode(ids), ids, [(1, ids.index(EOS))]) == []


def test_the_move_is_a_dial_toward_the_prompt_without_the_concept():
    source, edited = ids_of("a house with a pink elephant"), ids_of("a house")
    z, target = encode(source), encode(edited)
    assert torch.equal(move(z, target, source, edited, 0.0), z)
    at_one = move(z, target, source, edited, 1.0)
    assert torch.allclose(at_one[1:3], target[1:3])         # 'a house' as it reads without the concept
    assert torch.allclose(at_one[3:7], target[3].expand(4, D))  # 'with a pink elephant' onto the end token
    half = move(z, target, source, edited, 0.5)
    assert torch.allclose(half, 0.5 * (z + at_one), atol=1e-6)


def test_the_file_form_keeps_the_map_in_half_precision_and_refuses_damage(elephant):
    tensors = elephant.tensors()
    assert tensors["anchors"].dtype == torch.float16 and tensors["targets"].dtype == torch.float16
    back = ConceptWords.from_tensors(elephant.spec(), tensors)
    ids = ids_of("the dog with a pink elephant")
    assert back.edits(encode(ids), ids, [(1, ids.index(EOS))]) == elephant.edits(encode(ids), ids, [(1, ids.index(EOS))])
    broken = dict(tensors, extents=tensors["extents"].flip(1))
    with pytest.raises(ValueError, match="edits"):
        ConceptWords.from_tensors(elephant.spec(), broken)
    with pytest.raises(ValueError, match="do not match"):
        ConceptWords.from_tensors(elephant.spec(), {k: v for k, v in tensors.items() if k != "context"})


def test_pairs_that_hold_the_same_words_are_refused():
    with pytest.raises(ValueError, match="same words"):
        fit_concept_words([pair("a house", "a house")] * 4)


@pytest.mark.parametrize("width, limit_mb", [(768, 5), (2048, 5)])
def test_a_64_pair_maps_file_stays_small_at_the_real_widths(width, limit_mb):
    """64 Concept-Prompts-like pairs encoded at SD1.x's (768) and SDXL's (2048) width and CLIP's 77 tokens:
    the maps file stays within the goal (float16, at most MAX_TARGETS references)."""
    from act_core import TransportMaps, maps_to_bytes
    g = torch.Generator().manual_seed(1)
    table = torch.randn(len(WORDS) + 2, width, generator=g)
    pairs = []
    for source, target in concept_pairs(n=64):
        s_ids, t_ids = list(source.ids) + [EOS] * (77 - T), list(target.ids) + [EOS] * (77 - T)
        pairs.append(tuple(PairTokens(table[ids] + 0.1 * torch.randn(77, width, generator=g), ids)
                           for ids in (s_ids, t_ids)))
    words = fit_concept_words(pairs)
    size = len(maps_to_bytes(TransportMaps({}, {}, conditioning=words)))
    assert size <= limit_mb * 2 ** 20, f"{size / 2 ** 20:.1f} MB"
