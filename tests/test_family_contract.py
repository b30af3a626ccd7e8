"""The contract every family added after FLUX.1 passes, one table row per family: Collect and Apply
recognise it, the default layers are its normalisation outputs, maps steer it (strength 0 bit-identical,
a monotonic dial, exact and fold all alike where nothing folds), its text encoder's maps move the
conditioning, prompts are collected at their own token length, maps save and load, maps of another
family are refused, and an interrupted collection leaves nothing behind. Tiny random-weight models
come from the host's own detection and classes (tests/make_models.py) with the host's own tokenizers."""
from __future__ import annotations

import os
import random
import re

import pytest
import torch

import comfy.model_management
import nodes as comfy_nodes
from conftest import sample as conftest_sample
from make_models import tiny_model
from test_learn import all_hooks, collect, fit

BOTH = "conditional and unconditional"
FOLD_ALL = "fold all (approximate)"
THINGS = ["a house", "a dog", "a busy street at night", "a kitchen", "a sandy beach", "a car", "a dark forest", "a cat"]
SOURCE = "\n".join(f"a photo of {t} with a pink elephant" for t in THINGS)
TARGET = "\n".join(f"a photo of {t}" for t in THINGS)



def named(*classes):
    """Modules of these classes (by name: ComfyUI's norm classes do not all derive from torch's),
    attention's per-head query and key norms left out."""
    per_head = ("q_norm", "k_norm", "query_norm", "key_norm", "norm_q", "norm_k", "norm_added_q", "norm_added_k")
    return lambda name, module: type(module).__name__ in classes and name.rsplit(".", 1)[-1] not in per_head


# fixture -> (family name, tiny model, the text encoders its CLIP carries, the default layers of the
#             text encoders, those of the diffusion model)
FAMILIES = {
    "chroma": ("Chroma", "Chroma", {"t5xxl"}, named("T5LayerNorm"), named("LayerNorm")),
    # Z-Image reads the second-to-last of the tiny Qwen3's three layers: the last one and the final norm
    # cannot change its text.
    "zimage": ("Z-Image", "Z-Image", {"qwen3_4b"},
               lambda n, m: named("RMSNorm")(n, m) and ".layers.2." not in n and not n.endswith("model.norm"),
               named("RMSNorm", "LayerNorm")),
    # Qwen-Image reads the last layer after the final norm: every norm of the language model counts; its
    # vision tower only sees pictures.
    "qwen_image": ("Qwen-Image", "Qwen-Image", {"qwen25_7b"},
                   lambda n, m: named("RMSNorm")(n, m) and ".visual." not in n, named("RMSNorm", "LayerNorm")),
}
# The chat-template encoder of each family that has one (its attribute, also the key of its tokens).
CHAT = {"zimage": "qwen3_4b", "qwen_image": "qwen25_7b"}
FIXTURES = list(FAMILIES)


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(fixture):
        if fixture not in built:
            built[fixture] = tiny_model(FAMILIES[fixture][1], seed=0)
        return built[fixture]
    return get


@pytest.fixture(scope="module")
def fitted(pack, models):
    """Activations and incremental maps of each family in the text encoder and the diffusion model
    (one collection serves every test: CI time)."""
    found = {}

    def get(fixture):
        if fixture not in found:
            model, clip, _ = models(fixture)
            activations = collect(pack, model, clip, where="both", source=SOURCE, target=TARGET)[0]
            found[fixture] = (activations, fit(pack, activations))
        return found[fixture]
    return get


def sample(model, clip, vae=None):
    # One step: every check here is on what the steered model predicts, which one step shows (CI time).
    return conftest_sample(model, clip, vae, steps=1)


def apply(pack, model, maps, strength=1.0, clip=None, mode="exact"):
    node = pack.nodes.nodes_apply.ApplyTransportMaps
    return node.execute(model, maps, strength, 0.0, 1.0, BOTH, mode, clip).args


def conditioning(clip, prompt="a photo of a garden with a pink elephant"):
    (cond,) = comfy_nodes.CLIPTextEncode().encode(clip, prompt)
    return cond[0][0]


def part(pack, maps, diffusion_model: bool):
    return pack.act_core.TransportMaps({n: m for n, m in maps.items()
                                        if n.startswith("diffusion_model.") == diffusion_model}, maps.info)


def default_unet_layers(pack, fixture, model, clip=None):
    """The family's default layers; with a CLIP, those a sampling step runs (ComfyUI 0.3.75's NextDiT
    holds a final RMSNorm it never calls)."""
    chosen = {n: m for n, m in pack.nodes.model_layers.unet_modules(model).items() if FAMILIES[fixture][4](n, m)}
    if clip is None:
        return chosen
    ran = set()
    handles = [m.register_forward_hook(lambda *_, n=n: ran.add(n)) for n, m in chosen.items()]
    try:
        sample(model, clip)
    finally:
        for handle in handles:
            handle.remove()
    return {n: m for n, m in chosen.items() if n in ran}


@pytest.mark.parametrize("fixture", FIXTURES)
def test_collect_and_fit_map_the_normalisation_outputs_of_the_diffusion_model(pack, models, fitted, fixture):
    model, clip, _ = models(fixture)
    maps = part(pack, fitted(fixture)[1], diffusion_model=True)
    family = FAMILIES[fixture][0]
    assert maps.family == family and maps.info["family"] == family
    expected = default_unet_layers(pack, fixture, model, clip)
    assert set(maps) == set(expected)
    for name, layer in maps.items():
        assert layer.kind == "token" and layer.dim == pack.nodes.model_layers.output_dim(expected[name])
        assert torch.isfinite(layer.scale).all()


@pytest.mark.parametrize("fixture", FIXTURES)
def test_strength_zero_is_bit_identical_and_the_dial_is_monotonic_in_both_modes(pack, models, fitted, fixture):
    model, clip, _ = models(fixture)
    maps = part(pack, fitted(fixture)[1], diffusion_model=True)
    plain = sample(model, clip)
    distances = []
    for strength in (0.0, 0.5, 1.0):
        steered = sample(apply(pack, model, maps, strength)[0], clip)
        if strength == 0.0:
            assert torch.equal(steered, plain)
            assert torch.equal(sample(apply(pack, model, maps, strength, mode=FOLD_ALL)[0], clip), plain)
        distances.append((steered - plain).pow(2).mean().sqrt().item())
    assert distances[0] == 0 < distances[1] < distances[2], distances
    # These norms have no bias to fold into: both modes run them per step, alike.
    assert torch.equal(sample(apply(pack, model, maps, 1.0, mode=FOLD_ALL)[0], clip), steered)
    assert torch.equal(sample(model, clip), plain)  # the model that went in is untouched


@pytest.mark.parametrize("fixture", FIXTURES)
def test_text_encoder_maps_cover_its_norms_and_dial_the_conditioning(pack, models, fitted, fixture):
    model, clip, _ = models(fixture)
    _, maps = fitted(fixture)
    _, _, encoders, chosen, _ = FAMILIES[fixture]
    text = part(pack, maps, diffusion_model=False)
    modules = pack.nodes.model_layers.clip_modules(clip)
    assert {n.split(".", 1)[0] for n in text} == encoders
    assert set(text) == {n for n, m in modules.items() if chosen(n, m)}
    # Chosen so before collecting, not only kept after it: a layer no text prompt runs is not chosen.
    collection = pack.nodes.collection
    collector = collection.Collector(model, clip, SOURCE.splitlines(), TARGET.splitlines(),
                                     collection.CollectSettings(where="text encoder"))
    assert set(collector.text_layers) == set(text)
    assert any(n.startswith("diffusion_model.") for n in maps)
    plain = conditioning(clip)
    distances = []
    for strength in (0.0, 0.5, 1.0):
        cond = conditioning(apply(pack, model, text, strength, clip)[1])
        if strength == 0.0:
            assert torch.equal(cond, plain)
        distances.append((cond - plain).pow(2).mean().sqrt().item())
    assert distances[0] == 0 < distances[1] < distances[2], distances
    image = sample(model, clip)
    assert torch.equal(sample(*apply(pack, model, maps, 0.0, clip)), image)
    assert not torch.allclose(sample(*apply(pack, model, maps, 1.0, clip)), image, atol=1e-3)
    assert torch.equal(conditioning(clip), plain)  # the CLIP that went in is untouched


@pytest.mark.parametrize("fixture", FIXTURES)
def test_prompts_of_different_lengths_are_collected_as_each_alone(pack, models, fitted, fixture):
    """The text encoders here take a prompt unpadded: a batch may only join prompts of one length, so
    what is recorded equals one prompt per call, in the text encoder and in the diffusion model (on
    each one's first layers: a pass stops after the last layer it records)."""
    model, clip, _ = models(fixture)
    batched = fitted(fixture)[0]
    lengths = {len(next(iter(clip.tokenize(p).values()))[0]) for p in SOURCE.splitlines() + TARGET.splitlines()}
    assert len(lengths) >= 3, lengths
    first = [next(n for n in batched.order if n.startswith(e)) for e in sorted(FAMILIES[fixture][2])]
    first.append(next(n for n in batched.order if n.startswith("diffusion_model.")))
    alone = collect(pack, model, clip, where="both", source=SOURCE, target=TARGET, batch_size=1,
                    layers="custom pattern", pattern="|".join(f"^{re.escape(n)}$" for n in first))[0]
    assert alone.order == first
    for side in ("source", "target"):
        for name in first:
            a, b = getattr(batched, side)[name], getattr(alone, side)[name]
            assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), (side, name)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_maps_save_load_and_steer_alike(pack, models, fitted, fixture):
    model, clip, _ = models(fixture)
    maps = fitted(fixture)[1]
    name = f"test-family-contract-{fixture}"
    path = pack.nodes.nodes_files.SaveTransportMaps.execute(maps, name, True).args[0]
    try:
        loaded, summary = pack.nodes.nodes_files.LoadTransportMaps.execute(f"{name}.safetensors").args
    finally:
        os.remove(path)
    family = FAMILIES[fixture][0]
    assert loaded.family == family and family in summary and list(loaded) == list(maps)
    assert torch.equal(sample(*apply(pack, model, loaded, 1.0, clip)), sample(*apply(pack, model, maps, 1.0, clip)))


@pytest.mark.parametrize("fixture", FIXTURES)
def test_maps_of_another_family_are_refused_both_ways_naming_both(pack, models, fitted, flux, fixture):
    model = models(fixture)[0]
    family = FAMILIES[fixture][0]
    # Maps say their family before any layer is compared: FLUX.1's need no fitting here.
    flux_maps = pack.act_core.TransportMaps({}, {"family": "FLUX.1"})
    for maps, target in ((flux_maps, model), (fitted(fixture)[1], flux[0])):
        with pytest.raises(pack.nodes.model_layers.ActError) as error:
            apply(pack, target, maps)
        assert family in str(error.value) and "FLUX.1" in str(error.value), str(error.value)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_interrupting_collection_leaves_nothing_behind(pack, models, fixture):
    model, clip, _ = models(fixture)
    before = sample(model, clip)
    victim = random.Random(fixture).choice(list(default_unet_layers(pack, fixture, model).values()))

    def interrupt(*_):
        comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    handle = victim.register_forward_hook(interrupt)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            collect(pack, model, clip, where="both", source=SOURCE, target=TARGET)
    finally:
        handle.remove()
        comfy.model_management.interrupt_current_processing(False)
    assert all_hooks(model.model, clip.cond_stage_model) == 0
    assert not model.object_patches and not model.patches
    assert torch.equal(sample(model, clip), before)


@pytest.mark.parametrize("fixture", list(CHAT))
def test_prompts_count_by_their_own_tokens_not_the_chat_template(pack, models, fitted, fixture):
    """The tokenizer wraps each prompt in Qwen's chat markers (Qwen-Image's also in a system prompt); a
    prompt's recorded activation is the mean over its own tokens, found here by the host's tokenizer on
    the bare prompt."""
    _, clip, _ = models(fixture)
    activations = fitted(fixture)[0]
    encoder = CHAT[fixture]
    layer = f"{encoder}.transformer.model.layers.0.input_layernorm"
    module = pack.nodes.model_layers.clip_modules(clip)[layer]
    hf_tokenizer = getattr(clip.tokenizer, encoder).tokenizer
    for index, prompt in ((0, SOURCE.splitlines()[0]), (2, SOURCE.splitlines()[2])):
        tokens = clip.tokenize(prompt)
        ids = [t[0] for t in tokens[encoder][0]]
        own = hf_tokenizer(prompt)["input_ids"]
        start = next(i for i in range(len(ids)) if ids[i:i + len(own)] == own)
        assert 0 < start and start + len(own) < len(ids)  # markers on both sides
        seen = []
        handle = module.register_forward_hook(lambda _m, _i, output: seen.append(output[0].float()))
        try:
            clip.encode_from_tokens(tokens)
        finally:
            handle.remove()
        recorded = activations.source[layer][index]
        assert torch.allclose(recorded, seen[0][start:start + len(own)].mean(0), atol=1e-5)
        assert not torch.allclose(recorded, seen[0].mean(0), atol=1e-3)


def test_flux2_is_refused_with_the_reason_on_both_nodes(pack, flux):
    """FLUX.2 (a subclass of FLUX.1's config in ComfyUI) is refused before FLUX.1 could claim it, saying why."""
    import comfy.supported_models as sm
    from test_collection_correctness import tiny_variant
    if not hasattr(sm, "Flux2"):
        pytest.skip("this ComfyUI has no FLUX.2")
    model = tiny_variant(pack.nodes.families.by_name("FLUX.1"), "Flux2")
    for node, run in (("Collect Activations", lambda: collect(pack, model, flux[1], where="diffusion model")),
                      ("Apply Transport Maps", lambda: apply(pack, model, pack.act_core.TransportMaps({}, {})))):
        with pytest.raises(pack.nodes.model_layers.ActError) as error:
            run()
        message = str(error.value)
        assert node in message and "Flux2" in message and "attention mask" in message, message


@pytest.mark.parametrize("fixture", FIXTURES)
def test_the_concepts_words_only_is_refused_where_each_prompt_has_its_own_length(pack, fitted, fixture):
    """Source prompts are longer than their targets here: compared token by token at one length, the
    concept's words would be cut off."""
    activations = fitted(fixture)[0]
    node = pack.nodes.nodes_learn.FitTransportMaps
    with pytest.raises(pack.nodes.model_layers.ActError) as error:
        node.execute(activations, "linear", "method default", "incremental", pack.nodes.nodes_learn.MOVES[1])
    message = str(error.value)
    assert FAMILIES[fixture][0] in message and "every token alike" in message, message
