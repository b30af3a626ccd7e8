"""'The concept's words only' through the real nodes on tiny SD1.5, SDXL and FLUX.1 models: what the
diffusion model receives under 'conditional only', SDXL's pooled vector, and what is refused."""
from __future__ import annotations

import pytest
import torch

import nodes as comfy_nodes
from conftest import sample
from test_learn import collect

THINGS = ["a house", "a dog", "a street", "a kitchen", "a beach", "a car", "a forest", "a market"]
# Pairs of different lengths, the concept joined two ways, as Concept Prompts writes them.
SOURCE = "\n".join((f"a photo of {t} with a pink elephant" if i % 2 else f"a pink elephant beside a photo of {t}")
                   for i, t in enumerate(THINGS))
TARGET = "\n".join(f"a photo of {t}" for t in THINGS)
WORDS = "the concept's words only"


def fit_words(pack, model, clip):
    activations, _ = collect(pack, model, clip, where="text encoder", source=SOURCE, target=TARGET)
    return pack.nodes.nodes_learn.FitTransportMaps.execute(activations, "linear", "method default", "incremental",
                                                           WORDS).args[0]


def apply(pack, model, clip, maps, strength=1.0, branch="conditional and unconditional"):
    return pack.nodes.nodes_apply.ApplyTransportMaps.execute(model, maps, strength, 0.0, 1.0, branch, "exact",
                                                             clip=clip).args


def encode(clip, text):
    (cond,) = comfy_nodes.CLIPTextEncode().encode(clip, text)
    return cond[0][0], cond[0][1].get("pooled_output")


@pytest.fixture(scope="module")
def sd15_words(pack, sd15):
    model, clip, _ = sd15
    return fit_words(pack, model, clip)


def test_the_negative_prompt_reaches_the_model_untouched_under_conditional_only(pack, sd15, sd15_words):
    """branch 'conditional only': the diffusion model receives the negative prompt as the untouched CLIP
    encodes it, bit for bit, though it names the concept; the prompt's pass receives the moved one."""
    model, clip, _ = sd15
    seen = []
    recording = model.clone()
    forward = type(model.model.diffusion_model).forward.__get__(model.model.diffusion_model)

    def record(*args, **kwargs):
        seen.append((kwargs["context"].clone(), list(kwargs["transformer_options"].get("cond_or_uncond", []))))
        return forward(*args, **kwargs)
    recording.add_object_patch("diffusion_model.forward", record)
    steered, steered_clip = apply(pack, recording, clip, sd15_words, branch="conditional only")
    # Both as the fit wrote them, so that a random-weight encoder certainly finds the concept in them.
    prompt, negative = "a photo of a dog with a pink elephant", "a pink elephant beside a photo of a house"
    moved = encode(steered_clip, prompt)[0]
    assert not torch.equal(moved, encode(clip, prompt)[0]), "the prompt names the concept: it must move"
    assert not torch.equal(encode(steered_clip, negative)[0], encode(clip, negative)[0]), "so would the negative"
    sample(steered, steered_clip, prompt=prompt, negative=negative, steps=2)
    untouched_negative = encode(clip, negative)[0]
    assert seen
    for context, chunks in seen:
        rows = context.reshape(len(chunks), -1, *context.shape[1:])
        for kind, row in zip(chunks, rows):
            expected = moved if kind == 0 else untouched_negative
            assert torch.equal(row[0], expected[0].to(row)), f"{'prompt' if kind == 0 else 'negative'} pass"


def test_a_negative_strength_is_refused_with_the_reason(pack, sd15, sd15_words):
    model, clip, _ = sd15
    with pytest.raises(Exception, match="no inverse"):
        apply(pack, model, clip, sd15_words, strength=-1.0)


def test_sdxl_pooled_vector_reads_as_the_prompt_without_the_concept(pack, sdxl):
    """SDXL: at strength 1 the CLIP-G pooled vector (which enters every block) and the words after the
    edit are those of the prompt written without the concept; a prompt without it is left bit for bit."""
    model, clip, _ = sdxl
    maps = fit_words(pack, model, clip)
    _, steered_clip = apply(pack, model, clip, maps)
    cond, pooled = encode(steered_clip, "a photo of a dog with a pink elephant")
    cond_without, pooled_without = encode(clip, "a photo of a dog")
    assert torch.allclose(pooled, pooled_without, atol=1e-5)
    assert torch.allclose(cond[0, :5], cond_without[0, :5], atol=1e-5)
    for plain in ("", "a photo of a street"):
        assert all(torch.equal(a, b) for a, b in zip(encode(steered_clip, plain), encode(clip, plain)))


def test_flux_is_refused_because_its_encoders_tokenize_apart(pack, flux):
    model, clip, _ = flux
    with pytest.raises(Exception, match="share one tokenization"):
        fit_words(pack, model, clip)


def fit_default(pack, model, clip, source, target, where="text encoder"):
    """Fit Transport Maps as a user leaves it: moves at its default (auto). Returns (maps, summary)."""
    activations, _ = collect(pack, model, clip, where=where, source=source, target=target)
    node = pack.nodes.nodes_learn.FitTransportMaps
    return node.execute(activations, "linear", "method default", "incremental").args


# A style as Style Prompts writes it: the same captions with tags added, nothing taken out.
STYLED = "\n".join(f"a photo of {t}, watercolor painting, soft washes" for t in THINGS)


@pytest.mark.parametrize("kind", ["remove", "edit", "style"])
def test_auto_picks_the_concepts_words_for_pairs_that_take_words_out_and_every_token_for_pairs_that_add(
        pack, sd15, kind):
    """The default of 'moves' looks at the pairs: Concept Prompts 'remove' and a one-word edit (the arena's
    removal and edit tasks, which the concept's words win) get the concept's words; captions with style
    tags added (the style tasks, which the paper's maps win) get every token alike. The summary names the
    pick, and the maps carry it to Apply."""
    model, clip, _ = sd15
    source, target = {"remove": (SOURCE, TARGET),
                      "edit": ("\n".join(f"a red car beside {t}" for t in THINGS),
                               "\n".join(f"a blue car beside {t}" for t in THINGS)),
                      "style": (TARGET, STYLED)}[kind]
    maps, summary = fit_default(pack, model, clip, source, target)
    if kind == "style":
        assert getattr(maps, "conditioning", None) is None and len(maps) > 0
        assert summary.startswith("moves auto: every token alike (AcT) (8 of 8 pairs only add words)")
    else:
        assert pack.act_core.concept_words.is_concept_words(maps.conditioning) and len(maps) == 0
        assert summary.startswith("moves auto: the concept's words only (8 of 8 pairs take words out")
    assert maps.info["moves"].endswith("(picked by auto)")


def test_auto_takes_every_token_where_the_encoders_tokenize_apart(pack, flux):
    """FLUX.1's T5 and CLIP-L tokenize apart, so the concept's words cannot be fitted: auto takes the
    paper's maps there, and says why, instead of refusing."""
    model, clip, _ = flux
    maps, summary = fit_default(pack, model, clip, SOURCE, TARGET)
    assert getattr(maps, "conditioning", None) is None and len(maps) > 0
    assert "tokenize a prompt their own ways" in summary
