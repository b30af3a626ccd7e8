"""What a collection pass records is what sampling computes, on tiny random-weight models built with
ComfyUI's own classes, through the real nodes.

  * prompts of different token lengths: each prompt's activations are those of a call with that
    prompt alone (FLUX.1 and SD3 attend jointly over image and text tokens, so a text repeated to
    a common length would change the image stream), and the text handed to the model is never
    longer than the longest prompt's;
  * the replay of recorded module calls falls back to the layer-by-layer schedule when a record
    it dropped as unused is read after all, and a NaN of the model's own still gets the clear error;
  * variants of a family that are another architecture are refused by name.
"""
from __future__ import annotations

import logging

import pytest
import torch

from test_exact_estimation import FALLBACK, assert_same_maps
from test_learn import collect, fit

THINGS = ["a house", "a dog", "a street", "a kitchen", "a beach", "a car", "a forest", "a cat"]


def _with_tail(clip, prompt: str, key: str, length: int) -> str:
    """`prompt` with a tail of 'red's that makes its first `key` chunk `length` tokens long (T5 takes a
    prompt whole, so its length is the prompt's)."""
    for k in range(max(0, length - 60), length):
        candidate = prompt + (", " + "red " * k if k else "")
        if len(clip.tokenize(candidate)[key][0]) == length:
            return candidate
    raise AssertionError(f"no tail gives {prompt!r} {length} {key} tokens")


def mixed_prompts(clip, fixture: str) -> tuple[str, str]:
    """Eight source/target pairs, a few of them long. FLUX.1 takes T5's tokens (256 at least): the long
    ones are 384, so a common length by repetition would be lcm(256, 384) = 768. The SD3 and SD1
    models here take CLIP's 77-token chunks: 1, 2 and 3 chunks, lcm 462 against 231."""
    if fixture == "flux":
        tails_source, tails_target = [0, 384, 0, 0, 384, 0, 0, 0], [384, 0, 0, 0, 0, 0, 0, 0]
    else:
        tails_source, tails_target = [0, 100, 0, 200, 0, 0, 0, 0], [200, 0, 100, 0, 0, 0, 0, 0]

    def prompt(thing, extra, k):
        base = f"a photo of {thing}{extra}"
        if fixture == "flux":
            return _with_tail(clip, base, "t5xxl", k) if k else base
        return base + (", " + "red " * k if k else "")
    source = [prompt(t, " with a pink elephant", k) for t, k in zip(THINGS, tails_source)]
    target = [prompt(t, "", k) for t, k in zip(THINGS, tails_target)]
    return "\n".join(source), "\n".join(target)


_MIXED: dict = {}


def mixed(clip, fixture):
    if fixture not in _MIXED:
        _MIXED[fixture] = mixed_prompts(clip, fixture)
    return _MIXED[fixture]


class TextLengths:
    """The token length of every context the diffusion model is handed, while installed."""

    def __init__(self, model):
        self.module = model.model.diffusion_model
        self.seen: list[int] = []

    def __enter__(self):
        def hook(_module, _args, kwargs):
            self.seen.append(kwargs["context"].shape[1])
        self.handle = self.module.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *_):
        self.handle.remove()


def collect_mixed(pack, fixture_value, fixture, batch_size):
    model, clip, _ = fixture_value
    source, target = mixed(clip, fixture)
    return collect(pack, model, clip, where="diffusion model", source=source, target=target,
                   batch_size=batch_size)[0]


def assert_same_activations(ours, reference):
    assert ours.order == reference.order
    for side in ("source", "target"):
        for name in reference.order:
            a, b = getattr(ours, side)[name], getattr(reference, side)[name]
            scale = max(1.0, b.abs().max().item())
            assert (a - b).abs().max().item() <= 1e-5 * scale, (side, name, (a - b).abs().max().item())


@pytest.fixture(scope="module")
def one_prompt_per_call(pack, request):
    """Activations of one prompt per diffusion-model call (what sampling that prompt computes), and the
    text lengths each prompt hands the model alone."""
    found = {}

    def get(fixture):
        if fixture not in found:
            value = request.getfixturevalue(fixture)
            with TextLengths(value[0]) as lengths:
                activations = collect_mixed(pack, value, fixture, batch_size=1)
            found[fixture] = (activations, lengths.seen)
        return found[fixture]
    return get


@pytest.mark.parametrize("fixture", ["flux", "sd3", "sd15"])
def test_prompts_of_different_lengths_record_what_each_prompt_alone_computes(pack, request, one_prompt_per_call,
                                                                             fixture):
    alone, lengths_alone = one_prompt_per_call(fixture)
    assert len(set(lengths_alone)) >= 2, lengths_alone  # the prompts do differ in length
    with TextLengths(request.getfixturevalue(fixture)[0]) as lengths:
        batched = collect_mixed(pack, request.getfixturevalue(fixture), fixture, batch_size=16)
    assert_same_activations(batched, alone)
    # Nothing is padded beyond the longest prompt: the peak does not grow with the spread of lengths.
    assert max(lengths.seen) == max(lengths_alone), (sorted(set(lengths.seen)), sorted(set(lengths_alone)))


@pytest.mark.parametrize("fixture", ["flux", "sd3"])
def test_every_schedule_on_prompts_of_different_lengths_equals_the_reference(pack, request, caplog,
                                                                             one_prompt_per_call, fixture):
    """Batches of one text length each: "at once" fits what one prompt per call records, and the
    incremental schedules (the replay, for one batch of 16 split by length as for batches of 4) give
    the layer-by-layer reference's maps."""
    alone, lengths_alone = one_prompt_per_call(fixture)
    at_once_reference = fit(pack, alone, "at once")
    for batch_size in (16, 4):
        with TextLengths(request.getfixturevalue(fixture)[0]) as lengths:
            activations = collect_mixed(pack, request.getfixturevalue(fixture), fixture, batch_size)
            assert len(activations.collector.batches()) > 1
            assert_same_maps(fit(pack, activations, "at once"), at_once_reference, alone.order)
            with caplog.at_level(logging.WARNING, logger="comfyui_act"):
                maps = fit(pack, activations)
            # Same batches as the reference, so that float sums agree (other batchings round
            # differently, and eleven incremental fits magnify that to about 1e-5).
            reference = activations.collector.incremental(activations, "linear", "q_0_100", blocks="layers")
        assert FALLBACK not in caplog.text
        assert_same_maps(maps, reference, alone.order)
        assert max(lengths.seen) == max(lengths_alone)



def test_texts_of_different_lengths_in_one_batch_are_refused_not_padded(pack, sd15, monkeypatch):
    """Should an encoder give one token layout texts of different lengths, the batch is refused with
    the way out, never padded."""
    monkeypatch.setattr(pack.nodes.collection.Collector, "_token_layout", lambda self, prompt: ())
    with pytest.raises(pack.nodes.model_layers.ActError, match=r"texts of \[77, 154, 231\] tokens.*batch_size to 1"):
        collect_mixed(pack, sd15, "sd15", batch_size=16)

class LateReader(torch.nn.Module):
    """Stands in for the UNet's output head (GroupNorm, SiLU, conv) with a second norm, and reads the
    first norm's output again after the second one, but only for batches smaller than `big`: on the
    first batch that output looks unused. `poison` makes its input NaN (the model's own NaN)."""

    def __init__(self, head: torch.nn.Sequential, big: int):
        super().__init__()
        channels = head[0].num_channels
        self.first, self.act, self.conv = head[0], head[1], head[2]
        self.second = torch.nn.GroupNorm(head[0].num_groups, channels)
        with torch.no_grad():
            self.second.weight.copy_(1.0 + 0.1 * torch.randn(channels, generator=torch.Generator().manual_seed(5)))
        self.big, self.poison = big, False

    def forward(self, x):
        if self.poison:
            x = x * float("nan")
        a = self.first(x)
        h = self.act(a)
        late = a if x.shape[0] < self.big else None
        del a
        b = self.second(h)
        if late is not None:
            b = b + 0.5 * late
        return self.conv(b)


@pytest.fixture
def late_reader_sd15():
    """A fresh tiny SD1.5 whose output head is a LateReader; 20 prompts in batches of 16 and 4."""
    from make_models import tiny_model
    model, clip, vae = tiny_model("SD15", seed=0)
    unet = model.model.diffusion_model
    unet.out = LateReader(unet.out, big=16)
    return model, clip, unet.out


LATE_PATTERN = r"input_blocks\.1\.0\.in_layers\.0$|diffusion_model\.out(\.first|\.second)?$"


def test_a_record_read_only_on_a_later_batch_falls_back_to_the_layer_by_layer_maps(pack, caplog, late_reader_sd15):
    model, clip, _ = late_reader_sd15
    activations = collect(pack, model, clip, where="diffusion model", batch_size=16, layers="custom pattern",
                          pattern=LATE_PATTERN)[0]
    assert [len(b) for b in activations.collector.batches()] == [16, 4]
    assert activations.order[-1] == "diffusion_model.out"
    reference = activations.collector.incremental(activations, "linear", "q_0_100", blocks="layers")
    with caplog.at_level(logging.WARNING, logger="comfyui_act"):
        maps = fit(pack, activations)
    fallbacks = [r.getMessage() for r in caplog.records if FALLBACK in r.getMessage()]
    assert len(fallbacks) == 1 and "dropped" in fallbacks[0], fallbacks
    assert_same_maps(maps, reference, activations.order)


def test_a_nan_of_the_model_itself_in_the_replay_is_reported(pack, caplog, late_reader_sd15):
    model, clip, head = late_reader_sd15
    activations = collect(pack, model, clip, where="diffusion model", batch_size=16, layers="custom pattern",
                          pattern=r"diffusion_model\.out\.(first|second)$")[0]
    head.poison = True  # as an fp16 overflow that only the fitting meets
    with caplog.at_level(logging.WARNING, logger="comfyui_act"):
        with pytest.raises(pack.nodes.model_layers.ActError, match=r"out\.first produced NaN.*--force-fp32"):
            fit(pack, activations)
    assert FALLBACK not in caplog.text


class Tagged(torch.nn.Module):
    """A norm that also hands on integers: each pixel's strongest channel (as a layer that returns
    token ids or a mask beside its hidden states)."""

    def __init__(self, norm: torch.nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        a = self.norm(x)
        return a, a.argmax(dim=1, keepdim=True)


class LateIntegerReader(torch.nn.Module):
    """The UNet's output head with its first norm inside a Tagged, whose integers are read again after
    the second norm, for batches smaller than `big` only: on the first batch they look unused."""

    def __init__(self, head: torch.nn.Sequential, big: int):
        super().__init__()
        channels = head[0].num_channels
        self.tagged, self.act, self.conv = Tagged(head[0]), head[1], head[2]
        self.second = torch.nn.GroupNorm(head[0].num_groups, channels)
        self.big = big

    def forward(self, x):
        a, strongest = self.tagged(x)
        h = self.act(a)
        late = strongest if x.shape[0] < self.big else None
        del a, strongest
        b = self.second(h)
        if late is not None:
            b = b + torch.gather(b, 1, late).expand_as(b)
        return self.conv(b)


def test_integers_handed_on_by_a_layer_are_never_replaced_by_a_stand_in(pack):
    """A dropped record is answered by NaN, so that a wrong guess shows; integers have no NaN (they were
    answered by zeros, and a later batch that read them gave wrong maps without a word)."""
    from make_models import tiny_model
    model, clip, _ = tiny_model("SD15", seed=0)
    unet = model.model.diffusion_model
    unet.out = LateIntegerReader(unet.out, big=16)
    activations = collect(pack, model, clip, where="diffusion model", batch_size=16, layers="custom pattern",
                          pattern=r"input_blocks\.1\.0\.in_layers\.0$|diffusion_model\.out(\.tagged\.norm|\.second)?$")[0]
    assert [len(b) for b in activations.collector.batches()] == [16, 4]
    reference = activations.collector.incremental(activations, "linear", "q_0_100", blocks="layers")
    assert_same_maps(fit(pack, activations), reference, activations.order)


# ----- variants of a family that are another architecture -----

FIXTURE_OF = {"SD1.x": "sd15", "SD2.x": "sd2", "SDXL": "sdxl", "SD3": "sd3", "FLUX.1": "flux"}
TINY_OF = {"SD1.x": "SD15", "SD2.x": "SD2", "SDXL": "SDXL", "SD3": "SD3", "FLUX.1": "FLUX"}


def subclasses_in_comfyui(family) -> list[str]:
    """The config classes of comfy.supported_models that derive from the family's, not the family's own."""
    import inspect

    import comfy.supported_models as sm
    bases = tuple(getattr(sm, c) for c in family.configs if hasattr(sm, c))
    return sorted(name for name, cls in inspect.getmembers(sm, inspect.isclass)
                  if cls.__module__ == sm.__name__ and issubclass(cls, bases) and cls not in bases)


def tiny_variant(family, name: str):
    """A MODEL of config class `name`, built with ComfyUI's classes on the family's tiny settings plus the
    variant's own input layout (in_channels, adm_in_channels, image_model, guidance_embed)."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    from make_models import randomize, unet_config
    cls = getattr(sm, name)
    unet = unet_config(TINY_OF[family.name])
    unet.update({k: v for k, v in cls.unet_config.items()
                 if k in ("in_channels", "adm_in_channels", "image_model", "guidance_embed")})
    config = cls(unet)
    settings = config.unet_config
    if "disable_self_attentions" in settings:  # one entry per level, and the tiny UNet has fewer levels
        settings["disable_self_attentions"] = settings["disable_self_attentions"][:len(settings["channel_mult"])]
    if "channel_mult" in settings and settings.get("num_heads", -1) == -1 and settings.get("num_head_channels", -1) == -1:
        settings["num_head_channels"] = 64
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, "")
    randomize(base.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def test_every_subclass_of_a_family_config_is_named_excluded_or_a_variant(pack):
    """A ComfyUI that adds a variant fails here until it is classified in nodes/families.py."""
    for family in pack.nodes.families.FAMILIES:
        found = subclasses_in_comfyui(family)
        unnamed = [n for n in found if n not in family.excluded + family.variants]
        assert not unnamed, f"{family.name}: classify {unnamed} as excluded or variants in nodes/families.py"
        assert not set(family.excluded) & set(family.variants), family.name


EXCLUDED = [(f, n) for f, names in (("SD1.x", ("SD15_instructpix2pix",)), ("SDXL", ("SDXL_instructpix2pix",)),
                                    ("SD2.x", ("SD21UnclipL", "SD21UnclipH", "SD_X4Upscaler", "LotusD")),
                                    ("FLUX.1", ("FluxInpaint", "Flux2"))) for n in names]


@pytest.mark.parametrize("family_name, name", EXCLUDED)
def test_a_variant_of_another_architecture_is_refused_by_name_on_both_nodes(pack, request, family_name, name):
    import comfy.supported_models as sm
    if not hasattr(sm, name):
        pytest.skip(f"this ComfyUI has no {name}")
    family = pack.nodes.families.by_name(family_name)
    model = tiny_variant(family, name)
    assert isinstance(model.model.model_config, tuple(getattr(sm, c) for c in family.configs))
    clip = request.getfixturevalue(FIXTURE_OF[family_name])[1]
    with pytest.raises(pack.nodes.model_layers.ActError) as error:
        collect(pack, model, clip, where="diffusion model")
    message = str(error.value)
    assert name in message and "Collect Activations" in message and "does not support" in message, message
    maps = pack.act_core.TransportMaps({}, {"family": family_name})
    with pytest.raises(pack.nodes.model_layers.ActError) as error:
        pack.nodes.nodes_apply.ApplyTransportMaps.execute(model, maps, 1.0, 0.0, 1.0,
                                                          "conditional and unconditional", "exact", None)
    message = str(error.value)
    assert name in message and "Apply Transport Maps" in message and "does not support" in message, message


@pytest.mark.parametrize("family_name, name", [("SDXL", "SSD1B"), ("SDXL", "KOALA_700M"), ("FLUX.1", "FluxSchnell")])
def test_variants_of_the_same_architecture_are_steered_as_the_family(pack, family_name, name):
    import comfy.supported_models as sm
    if not hasattr(sm, name):
        pytest.skip(f"this ComfyUI has no {name}")
    model = tiny_variant(pack.nodes.families.by_name(family_name), name)
    assert pack.nodes.families.family_of(model, "Collect Activations").name == family_name


def test_a_plain_sd2_still_collects_and_applies(pack, sd2):
    model, clip, _ = sd2
    activations, summary = collect(pack, model, clip, where="diffusion model")
    assert summary.startswith("SD2.x") and activations.order
    maps = pack.act_core.TransportMaps({}, {"family": "SD2.x"})
    steered = pack.nodes.nodes_apply.ApplyTransportMaps.execute(model, maps, 1.0, 0.0, 1.0,
                                                                "conditional and unconditional", "exact", None).args
    assert steered[0] is not None
