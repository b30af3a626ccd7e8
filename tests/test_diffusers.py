"""The same maps in diffusers: the tiny models (and the thin SD1.5 checkpoint) converted to diffusers with
diffusers' own single-file converters, then ComfyUI and diffusers checked against each other.

ComfyUI's side always runs through the pack's real nodes (Collect Activations, Fit, Apply, Load) and
ComfyUI's samplers; the diffusers side through act_core.diffusers, and through plain forward hooks as
an oracle that shares nothing with either.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import comfy.sd
import comfy.utils
import folder_paths
import nodes as comfy_nodes
from act_core import fit_layer, load_maps, save_maps
from act_core.diffusers import PipelineLayers, TranslationError, collect_activations, fit_maps, steer
from conftest import COMFY_DIR, PACK_DIR
from make_models import TINY_CLIP, TINY_VAE, checkpoint_state_dict

FAMILIES = [("SD1.x", "sd15"), ("SD2.x", "sd2"), ("SDXL", "sdxl")]
THINGS = ["a house", "a dog", "a street", "a kitchen", "a beach", "a car", "a forest", "a bridge"]
SOURCE = [f"a photo of {t} with a pink elephant" for t in THINGS]
TARGET = [f"a photo of {t}" for t in THINGS]
RESOLUTION = 64
RELATIVE = 1e-4


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of the reference's largest magnitude."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


# ----- converting a ComfyUI model to a diffusers pipeline, with diffusers' own converters -----

def _text_config(name: str, overrides: dict, layers_dropped: int = 0) -> CLIPTextConfig:
    """ComfyUI's text-encoder configuration (its json, overridden as the test models override it)."""
    config = json.loads((COMFY_DIR / "comfy" / name).read_text())
    config.update(overrides)
    config["num_hidden_layers"] -= layers_dropped
    keep = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                   "projection_dim", "hidden_act", "max_position_embeddings", "vocab_size",
                                   "eos_token_id", "layer_norm_eps")}
    return CLIPTextConfig(**keep, bos_token_id=49406, pad_token_id=1)


def _load(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattens CLIPTextModel, as diffusers' loader knows
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, _unexpected = model.load_state_dict(state, strict=False)
    assert not [k for k in missing if "position_ids" not in k], missing
    return model.eval()


def _unet_config(unet: dict, family: str) -> dict:
    """UNet2DConditionModel's configuration for a ComfyUI unet_config (one res-block depth per level)."""
    mult, blocks = unet["channel_mult"], unet["num_res_blocks"]
    depth = [unet["transformer_depth"][sum(blocks[:level])] for level in range(len(mult))]
    heads = ([unet["model_channels"] * m // unet["num_head_channels"] for m in mult]
             if unet.get("num_head_channels", -1) > 0 else unet["num_heads"])
    config = dict(sample_size=RESOLUTION // 8, in_channels=unet["in_channels"], out_channels=unet["out_channels"],
                  block_out_channels=[unet["model_channels"] * m for m in mult], layers_per_block=blocks[0],
                  down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
                  up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)],
                  transformer_layers_per_block=[max(1, d) for d in depth], cross_attention_dim=unet["context_dim"],
                  attention_head_dim=heads, use_linear_projection=unet["use_linear_in_transformer"])
    if family == "SDXL":
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=unet["adm_in_channels"])
    return config


def _vae(checkpoint: dict, ddconfig: dict, scaling: float) -> AutoencoderKL:
    config = dict(in_channels=3, out_channels=3, latent_channels=ddconfig["z_channels"],
                  block_out_channels=[ddconfig["ch"] * m for m in ddconfig["ch_mult"]],
                  down_block_types=["DownEncoderBlock2D"] * len(ddconfig["ch_mult"]),
                  up_block_types=["UpDecoderBlock2D"] * len(ddconfig["ch_mult"]),
                  layers_per_block=ddconfig["num_res_blocks"], sample_size=ddconfig["resolution"], scaling_factor=scaling)
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config))
    return vae.eval()


def to_diffusers(checkpoint: dict, unet_config: dict, family: str, text_overrides: dict,
                 ddconfig: dict, v_prediction: bool = False):
    """A diffusers pipeline holding the same weights as a ComfyUI checkpoint state dict."""
    config = _unet_config(unet_config, family)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config))
    unet.eval()
    tokenizer = CLIPTokenizer.from_pretrained(COMFY_DIR / "comfy" / "sd1_tokenizer", model_max_length=77)
    # SD2's and SDXL's OpenCLIP encoders pad with "!" (id 0), as ComfyUI's tokenizers for them do.
    open_tokenizer = CLIPTokenizer.from_pretrained(COMFY_DIR / "comfy" / "sd1_tokenizer", model_max_length=77, pad_token="!")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       prediction_type="v_prediction" if v_prediction else "epsilon")
    if family == "SDXL":
        text_encoder = _load(CLIPTextModel(_text_config("sd1_clip_config.json", text_overrides)),
                             convert_ldm_clip_checkpoint(checkpoint))
        text_model_2 = CLIPTextModelWithProjection(_text_config("clip_config_bigg.json", text_overrides))
        text_encoder_2 = _load(text_model_2, convert_open_clip_checkpoint(
            text_model_2, checkpoint, prefix="conditioner.embedders.1.model."))
        return StableDiffusionXLPipeline(vae=_vae(checkpoint, ddconfig, 0.13025), text_encoder=text_encoder,
                                         text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                         tokenizer_2=open_tokenizer, unet=unet, scheduler=scheduler)
    if family == "SD2.x":
        # diffusers' SD2 text encoder has one layer less than the OpenCLIP checkpoint: SD2 uses the penultimate.
        model = CLIPTextModel(_text_config("text_encoders/sd2_clip_config.json", text_overrides, layers_dropped=1))
        text_encoder = _load(model, convert_open_clip_checkpoint(model, checkpoint, prefix="cond_stage_model.model."))
        tokenizer = open_tokenizer
    else:
        text_encoder = _load(CLIPTextModel(_text_config("sd1_clip_config.json", text_overrides)),
                             convert_ldm_clip_checkpoint(checkpoint))
    return StableDiffusionPipeline(vae=_vae(checkpoint, ddconfig, 0.18215), text_encoder=text_encoder,
                                   tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


_PIPES: dict[str, object] = {}


def pipeline_for(request, fixture: str, family: str):
    if fixture not in _PIPES:
        model, clip, vae = request.getfixturevalue(fixture)
        checkpoint = checkpoint_state_dict(model, clip, vae)  # keys as this host saves a checkpoint
        _PIPES[fixture] = to_diffusers(checkpoint, model.model.model_config.unet_config, family, TINY_CLIP,
                                       TINY_VAE["params"]["ddconfig"], v_prediction=fixture == "sd2")
    return _PIPES[fixture]


@pytest.fixture(params=FAMILIES, ids=[f for f, _ in FAMILIES])
def case(request, pack):
    family, fixture = request.param
    model, clip, vae = request.getfixturevalue(fixture)
    return family, model, clip, pipeline_for(request, fixture, family)


# ----- what both hosts compute -----

def diffusers_unet_output(pipe, x, timestep, cond, pooled, size):
    kwargs = {}
    if pooled is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * x.shape[0], dtype=torch.float32)}
    with torch.no_grad():
        return pipe.unet(x, timestep, encoder_hidden_states=cond, **kwargs).sample


def diffusers_encode(pipe, prompt: str):
    with torch.no_grad():
        if isinstance(pipe, StableDiffusionXLPipeline):
            cond, _, pooled, _ = pipe.encode_prompt(prompt=[prompt], device="cpu", num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
            return cond, pooled
        return pipe.encode_prompt([prompt], "cpu", 1, False)[0], None


def comfy_step(model, clip, prompt: str, seed: int = 3):
    """One real KSampler step (cfg 1: the conditional pass only); returns what ComfyUI's UNet was given and gave."""
    seen = {}

    def capture(_module, args, kwargs, output):
        seen.update(x=args[0].clone(), t=args[1].clone(), context=kwargs["context"].clone(), y=kwargs.get("y"),
                    out=output.clone())

    (positive,) = comfy_nodes.CLIPTextEncode().encode(clip, prompt)
    (latent,) = comfy_nodes.EmptyLatentImage().generate(RESOLUTION, RESOLUTION, 1)
    handle = model.model.diffusion_model.register_forward_hook(capture, with_kwargs=True)
    try:
        comfy_nodes.KSampler().sample(model, seed, 1, 1.0, "euler", "normal", positive, positive, latent)
    finally:
        handle.remove()
    return seen


def test_the_two_unets_and_text_encoders_compute_the_same(case):
    family, model, clip, pipe = case
    seen = comfy_step(model, clip, "a house by a lake")
    cond, pooled = diffusers_encode(pipe, "a house by a lake")
    assert relative_error(cond, seen["context"]) <= RELATIVE
    if pooled is not None:
        assert relative_error(pooled, seen["y"][:, :pooled.shape[1]]) <= RELATIVE
    # ComfyUI's SDXL size conditioning is the latent's size when the prompt carries none.
    out = diffusers_unet_output(pipe, seen["x"], seen["t"], seen["context"], pooled, RESOLUTION)
    assert relative_error(out, seen["out"]) <= RELATIVE
    # At another noise level, too: the timestep embedding agrees, not only the first step.
    x = torch.randn(seen["x"].shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([412.0])
    comfy_kwargs = {"y": seen["y"]} if pooled is not None else {}
    with torch.no_grad():
        reference = model.model.diffusion_model(x, t, context=seen["context"], **comfy_kwargs)
    assert relative_error(diffusers_unet_output(pipe, x, t, seen["context"], pooled, RESOLUTION), reference) <= RELATIVE


def test_thin_sd15_checkpoint_converts_to_the_same_network(thin_checkpoint):
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(thin_checkpoint), output_vae=True, output_clip=True)[:3]
    checkpoint = {k: v.float() for k, v in comfy.utils.load_torch_file(str(thin_checkpoint)).items()}
    ddconfig = {"z_channels": 4, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "resolution": 256}
    pipe = to_diffusers(checkpoint, model.model.model_config.unet_config, "SD1.x", {}, ddconfig)
    seen = comfy_step(model, clip, "a lighthouse at dusk")
    cond, _ = diffusers_encode(pipe, "a lighthouse at dusk")
    assert relative_error(cond, seen["context"]) <= RELATIVE
    assert relative_error(diffusers_unet_output(pipe, seen["x"], seen["t"], cond, None, 0), seen["out"]) <= RELATIVE
    layers = PipelineLayers(pipe)
    assert layers.family == "SD1.x"
    unet_map = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    _check_against_comfy_table(layers, unet_map, model.model.diffusion_model.state_dict())


# ----- names -----

def _check_against_comfy_table(layers: PipelineLayers, unet_map: dict, comfy_state: dict) -> int:
    """Every module ComfyUI's own key table (comfy.utils.unet_to_diffusers) pairs must translate the same way."""
    checked = 0
    diffusers_state = layers.unet.state_dict()
    for diffusers_key, comfy_key in unet_map.items():
        # The table also lists keys of other layouts (class_embedding beside add_embedding, a last downsampler).
        if comfy_key not in comfy_state or diffusers_key not in diffusers_state:
            continue
        comfy_module, diffusers_module = comfy_key.rsplit(".", 1)[0], diffusers_key.rsplit(".", 1)[0]
        pack = f"diffusion_model.{comfy_module}"
        assert layers.to_diffusers([pack]) == {pack: f"unet.{diffusers_module}"}
        assert layers.to_pack([f"unet.{diffusers_module}"]) == {f"unet.{diffusers_module}": pack}
        checked += 1
    assert checked > 20
    return checked


def test_name_translation_agrees_with_comfyui_key_table_and_weights(case):
    family, model, clip, pipe = case
    layers = PipelineLayers(pipe)
    assert layers.family == family
    unet_map = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    _check_against_comfy_table(layers, unet_map, model.model.diffusion_model.state_dict())
    # Every module that translates holds the very weights diffusers' converter put there: the names pair
    # the same computation, not only similar-looking paths.
    comfy_modules = {f"diffusion_model.{n}": m for n, m in model.model.diffusion_model.named_modules() if n}
    comfy_modules.update({n: m for n, m in clip.cond_stage_model.named_modules() if n})
    translated = 0
    for name, module in comfy_modules.items():
        try:
            target = layers.to_diffusers([name])[name]
        except TranslationError:
            continue
        theirs = dict(layers.module(target).named_parameters(recurse=False))
        ours = dict(module.named_parameters(recurse=False))
        assert set(ours) == set(theirs), name
        for key, value in ours.items():
            assert torch.equal(value.float(), theirs[key].float()), f"{name}.{key}"
        assert layers.to_pack([target]) == {target: name}
        translated += 1
    norms = [n for n, m in comfy_modules.items() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    untranslated = [n for n in norms if n not in layers.modules("both")]
    if family == "SD2.x":  # the last OpenCLIP layer, which diffusers' SD2 text encoder does not have
        assert untranslated and all(re.search(r"clip_h\..*layers\.2\.", n) for n in untranslated)
    else:
        assert untranslated == []
    assert translated > len(norms)


def test_an_untranslatable_name_is_refused_by_name(case):
    family, _model, _clip, pipe = case
    layers = PipelineLayers(pipe)
    with pytest.raises(TranslationError, match=r"diffusion_model\.input_blocks\.1\.0\.in_layers\.1") as caught:
        layers.to_diffusers(["diffusion_model.input_blocks.1.0.in_layers.0", "diffusion_model.input_blocks.1.0.in_layers.1",
                             "diffusion_model.no_such_block.norm"])
    assert caught.value.names == ["diffusion_model.input_blocks.1.0.in_layers.1", "diffusion_model.no_such_block.norm"]
    with pytest.raises(TranslationError, match=r"unet\.down_blocks\.0\.resnets\.0\.nonlinearity"):
        layers.to_pack(["unet.down_blocks.0.resnets.0.nonlinearity"])
    with pytest.raises(TranslationError, match=r"clip_x\.transformer"):
        layers.to_diffusers(["clip_x.transformer.text_model.final_layer_norm"])


# ----- collecting -----

def comfy_collect(pack, model, clip, where="both", batch_size=16):
    node = pack.nodes.nodes_learn.CollectActivations
    return node.execute(model, clip, "\n".join(SOURCE), "\n".join(TARGET), where=where, layers="normalization layers",
                        resolution=RESOLUTION, noise_levels=1, batch_size=batch_size, seed=0).args[0]


def transported(layer, out: torch.Tensor, strength: float) -> torch.Tensor:
    """A map applied to one layer's output as the method defines it (act_core.maps' docstring), written
    out here rather than taken from LayerMap.apply, which both hosts use: token maps move each element
    inside [lo, hi] to z + s ((scale - 1) z + shift); conv maps move the channel's spatial mean ("mean"
    form) or every pixel ("pixel" form) by s ((scale - 1) v + shift) where the channel's mean lies in
    [lo, hi]. Strengths >= 0 only."""
    assert strength >= 0
    x = out.float()
    scale, shift, lo, hi = (t.to(x.device) for t in (layer.scale, layer.shift, layer.lo, layer.hi))
    if layer.kind == "token":
        return torch.where((x >= lo) & (x <= hi), x + strength * ((scale - 1) * x + shift), x).to(out.dtype)
    scale, shift, lo, hi = (t.view(-1, 1, 1) for t in (scale, shift, lo, hi))
    mean = x.mean(dim=(-2, -1), keepdim=True)
    moved = mean if layer.form == "mean" else x
    return (x + strength * ((scale - 1) * moved + shift) * ((mean >= lo) & (mean <= hi))).to(out.dtype)


class _Stop(Exception):
    pass


def plain_hook_pass(pipe, record: list[str], maps: dict | None = None, stop_after: str | None = None):
    """An oracle sharing nothing with act_core.diffusers but the name table: all prompts in one batch
    through tokenizers, text encoders and the UNet called by hand, plain forward hooks that pool the
    `record` layers' outputs (means over tokens / pixels) and move the `maps` layers' outputs with
    `transported` (strength 1), stopping after `stop_after`. Returns {layer: (pooled [prompts, D], kind)}
    and the order in which the recorded layers ran."""
    layers = PipelineLayers(pipe)
    maps = maps or {}
    targets = layers.to_diffusers(sorted(set(record) | set(maps)))
    pooled_by_layer: dict[str, tuple[torch.Tensor, str]] = {}
    order: list[str] = []

    def hook(name):
        def run(_module, _inputs, out):
            if name in record and name not in pooled_by_layer:
                pooled_by_layer[name] = (out.float().mean(dim=(2, 3) if out.ndim == 4 else 1),
                                         "conv" if out.ndim == 4 else "token")
                order.append(name)
            if name == stop_after:
                raise _Stop
            return transported(maps[name], out, 1.0) if name in maps else out
        return run
    handles = [layers.module(d).register_forward_hook(hook(n)) for n, d in targets.items()]
    prompts = SOURCE + TARGET
    try:
        with torch.no_grad():
            def tokens(tokenizer):
                return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            kwargs = {}
            if isinstance(pipe, StableDiffusionXLPipeline):
                first = pipe.text_encoder(tokens(pipe.tokenizer), output_hidden_states=True)
                second = pipe.text_encoder_2(tokens(pipe.tokenizer_2), output_hidden_states=True)
                cond = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
                kwargs["added_cond_kwargs"] = {"text_embeds": second.text_embeds, "time_ids": torch.tensor(
                    [[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]] * len(prompts), dtype=torch.float32)}
            else:
                cond = pipe.text_encoder(tokens(pipe.tokenizer))[0]
            # Source prompt i and target prompt i start from the same noise, seeded with i.
            noise = torch.stack([torch.randn((4, RESOLUTION // 8, RESOLUTION // 8), generator=torch.Generator().manual_seed(i))
                                 for i in list(range(len(SOURCE))) * 2])
            pipe.unet(noise, torch.tensor([999.0] * len(prompts)), encoder_hidden_states=cond, **kwargs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return pooled_by_layer, order


def plain_hook_collection(pipe, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: pooled for n, (pooled, _kind) in plain_hook_pass(pipe, names)[0].items()}


def plain_hook_incremental(pipe, names: list[str], method: str = "linear", support: str = "all"):
    """The incremental fit as the method defines it, layer by layer in the order the layers run: each
    layer's map fitted (act_core.fit_layer, the estimator alone) from its activations with the maps of
    all earlier layers applied. Returns the maps and each layer's source activations."""
    _, order = plain_hook_pass(pipe, names)
    maps, sources = {}, {}
    for name in order:
        pooled, kind = plain_hook_pass(pipe, [name], maps, stop_after=name)[0][name]
        sources[name] = pooled[:len(SOURCE)]
        maps[name] = fit_layer(pooled[:len(SOURCE)], pooled[len(SOURCE):], method, support, kind=kind)
    return maps, sources


def test_pooled_activations_agree_across_hosts(pack, case):
    family, model, clip, pipe = case
    comfy = comfy_collect(pack, model, clip)
    layers = PipelineLayers(pipe)
    common = [n for n in comfy.order if n in layers.modules("both")]
    assert len(common) >= len(comfy.order) - (2 if family == "SD2.x" else 0)
    assert any(not n.startswith("diffusion_model.") for n in common)
    oracle = plain_hook_collection(pipe, common)
    ours = collect_activations(pipe, SOURCE, TARGET, where="both", resolution=RESOLUTION)
    for name in common:
        theirs = torch.cat([comfy.source[name], comfy.target[name]])
        assert relative_error(theirs, oracle[name]) <= RELATIVE, name
        mine = torch.cat([ours.source[name], ours.target[name]])
        assert relative_error(mine, oracle[name]) <= RELATIVE, name
        assert ours.kinds[name] == comfy.kinds[name], name
    assert ours.info == comfy.info


# ----- steering both ways -----

def comfy_apply(pack, model, clip, maps, strength):
    return pack.nodes.nodes_apply.ApplyTransportMaps.execute(
        model, maps, strength, 0.0, 1.0, "conditional and unconditional", "exact", clip).args


def plain_hook_steered(pipe, maps, strength: float, x, t):
    """The conditioning and the UNet's output with every map (of the layers the pipeline has) applied by
    `transported` through plain forward hooks."""
    layers = PipelineLayers(pipe)
    present = [n for n in maps if n in layers.modules("both")]
    handles = [layers.module(d).register_forward_hook(lambda _m, _i, out, layer=maps[n]: transported(layer, out, strength))
               for n, d in layers.to_diffusers(present).items()]
    try:
        cond, pooled = diffusers_encode(pipe, "a lighthouse at dusk")
        return cond, diffusers_unet_output(pipe, x, t, cond, pooled, RESOLUTION)
    finally:
        for handle in handles:
            handle.remove()


# Exact mode folds ungated text-encoder maps into the norms' weights (nodes/folding.py). ComfyUI keeps
# text-encoder weights in fp16 even on a CPU (model_management.text_encoder_dtype) and rounds a patched
# weight back to that dtype, stochastically, so a folded norm weight carries up to one fp16 ulp of
# relative error (2^-10), where forward hooks compute in float32 on the unrounded map: the fold is as
# exact as the weights' own storage. Measured: 4.2e-4 on these models.
FP16_STORAGE = 2.0 ** -10


def steering_tolerance(pack, clip, maps, strength) -> float:
    folding = pack.nodes.folding
    modules = pack.nodes.model_layers.clip_modules(clip)
    folded_into_fp16 = any(
        folding.folds_exactly(layer, strength) and getattr(modules[name], "weight", None) is not None
        and modules[name].weight.dtype == torch.float16
        for name, layer in maps.items() if name in modules)
    return FP16_STORAGE if folded_into_fp16 else RELATIVE


def assert_steered_alike(pack, model, clip, pipe, maps, strength):
    tolerance = steering_tolerance(pack, clip, maps, strength)
    plain = comfy_step(model, clip, "a lighthouse at dusk")
    steered_model, steered_clip = comfy_apply(pack, model, clip, maps, strength)
    comfy = comfy_step(steered_model, steered_clip, "a lighthouse at dusk")
    with steer(pipe, maps, strength):
        cond, pooled = diffusers_encode(pipe, "a lighthouse at dusk")
        ours = diffusers_unet_output(pipe, comfy["x"], comfy["t"], cond, pooled, RESOLUTION)
    assert relative_error(cond, comfy["context"]) <= tolerance
    assert relative_error(ours, comfy["out"]) <= tolerance
    # Both agree with the maps applied by plain forward hooks and the method's own arithmetic.
    oracle_cond, oracle_out = plain_hook_steered(pipe, maps, strength, comfy["x"], comfy["t"])
    assert relative_error(comfy["context"], oracle_cond) <= tolerance
    assert relative_error(comfy["out"], oracle_out) <= tolerance
    # The maps really moved the output, far beyond the tolerance, and the hooks are gone afterwards.
    assert relative_error(plain["out"], comfy["out"]) > 100 * RELATIVE
    cond_after, pooled_after = diffusers_encode(pipe, "a lighthouse at dusk")
    after = diffusers_unet_output(pipe, comfy["x"], comfy["t"], cond_after, pooled_after, RESOLUTION)
    assert relative_error(after, plain["out"]) <= RELATIVE


def test_maps_fitted_in_comfyui_steer_diffusers_alike(pack, case):
    family, model, clip, pipe = case
    fitted = pack.nodes.nodes_learn.FitTransportMaps.execute(
        comfy_collect(pack, model, clip), "linear", "q_0_100", "incremental", "every token alike (AcT)").args[0]
    assert fitted.family == family
    assert_steered_alike(pack, model, clip, pipe, fitted, 1.0)


def test_maps_fitted_in_diffusers_load_and_steer_comfyui_alike(pack, case, tmp_path):
    family, model, clip, pipe = case
    maps = fit_maps(collect_activations(pipe, SOURCE, TARGET, where="both", resolution=RESOLUTION))
    folder = Path(folder_paths.get_folder_paths("act")[0])
    name = f"test-diffusers-{family}.safetensors"
    path = save_maps(maps, folder / name)
    try:
        loaded = pack.nodes.nodes_files.LoadTransportMaps.execute(name).args[0]
    finally:
        path.unlink()
    assert loaded.info == maps.info and loaded.family == family and list(loaded) == list(maps)
    assert_steered_alike(pack, model, clip, pipe, loaded, 0.8)


def assert_same_maps(pack, model, clip, pipe, where: str, batch_size: int, tolerance: float = RELATIVE) -> None:
    activations = comfy_collect(pack, model, clip, where=where, batch_size=batch_size)
    comfy = pack.nodes.nodes_learn.FitTransportMaps.execute(activations, "linear", "method default", "incremental",
                                                            "every token alike (AcT)").args[0]
    ours = fit_maps(collect_activations(pipe, SOURCE, TARGET, where=where, resolution=RESOLUTION, batch_size=batch_size))
    assert list(ours) == list(comfy)
    assert ours.info == comfy.info
    # A least-squares slope from 8 samples amplifies float noise in its intercept; the affine map's values
    # on the source activations are the well-conditioned quantity (ungated: the sources lie on the
    # support's very ends, where float noise decides in or out).
    worst = 0.0
    for name in comfy:
        source = activations.source[name]
        moved = [layer.scale * source + layer.shift for layer in (ours[name], comfy[name])]
        worst = max(worst, relative_error(*moved))
        for key in ("lo", "hi"):  # equal infinities where ungated, close values where gated
            bounds = getattr(ours[name], key), getattr(comfy[name], key)
            assert torch.equal(*bounds) or relative_error(*bounds) <= tolerance, (name, key)
    assert worst <= tolerance


def test_both_hosts_fit_the_same_maps(pack, case):
    family, model, clip, pipe = case
    assert_same_maps(pack, model, clip, pipe, "diffusion model", batch_size=16)


def test_maps_fitted_in_several_batches_equal_the_plain_hook_reference(pack, request):
    """Prompts in four batches of up to 5 (sources and targets mixed in one, the last one short): the pack
    and diffusers both fit by replaying module calls; both must give the maps of the method's
    incremental fit computed here with plain hooks, all prompts in one batch, layer by layer in the order
    the layers run, the text encoder's layers and the UNet's after them included."""
    model, clip, _vae = request.getfixturevalue("sd15")
    pipe = pipeline_for(request, "sd15", "SD1.x")
    activations = comfy_collect(pack, model, clip, where="both", batch_size=5)
    assert len(activations.collector.batches()) == 4
    comfy = pack.nodes.nodes_learn.FitTransportMaps.execute(activations, "linear", "method default", "incremental",
                                                            "every token alike (AcT)").args[0]
    ours = fit_maps(collect_activations(pipe, SOURCE, TARGET, where="both", resolution=RESOLUTION, batch_size=5))
    reference, sources = plain_hook_incremental(pipe, activations.order)
    assert any(not n.startswith("diffusion_model.") for n in reference) and len(reference) > 20
    assert list(comfy) == list(reference) and list(ours) == list(reference)
    # As in assert_same_maps: compared by the maps' values on the source activations.
    for name, expected in reference.items():
        moved = expected.scale * sources[name] + expected.shift
        for fitted in (comfy, ours):
            assert relative_error(fitted[name].scale * sources[name] + fitted[name].shift, moved) <= RELATIVE, name
            assert torch.equal(fitted[name].lo, expected.lo) and torch.equal(fitted[name].hi, expected.hi), name


def test_diffusers_fits_several_batches_by_the_replay_to_the_one_batch_and_comfyui_maps(pack, request):
    """Prompts in four batches: diffusers takes the replay of module calls, as ComfyUI does, in a few
    passes rather than one per layer, and its maps are those of one batch holding every prompt (fitted
    inside the hooks) and those ComfyUI fits from the same batches."""
    model, clip, _vae = request.getfixturevalue("sd15")
    pipe = pipeline_for(request, "sd15", "SD1.x")
    whole = fit_maps(collect_activations(pipe, SOURCE, TARGET, where="both", resolution=RESOLUTION, batch_size=20))
    activations = collect_activations(pipe, SOURCE, TARGET, where="both", resolution=RESOLUTION, batch_size=5)
    host = activations.collector
    assert len(host.batches()) == 4
    ours = fit_maps(activations)
    assert host.estimation.last_fit.schedule == "replay"
    comfy_activations = comfy_collect(pack, model, clip, where="both", batch_size=5)
    comfy = pack.nodes.nodes_learn.FitTransportMaps.execute(comfy_activations, "linear", "method default",
                                                            "incremental", "every token alike (AcT)").args[0]
    comfy_fit = comfy_activations.collector.estimation.last_fit
    assert comfy_fit.schedule == "replay"
    # The model's entry (text encoding, UNet call) runs a few times per batch, not once per layer and
    # batch as layer by layer; as many times as in ComfyUI.
    assert host.estimation.last_fit.passes < len(activations.order)
    assert host.estimation.last_fit.passes == comfy_fit.passes
    assert list(ours) == list(whole) == list(comfy)
    for name in ours:
        sources = activations.source[name]
        moved = whole[name].scale * sources + whole[name].shift
        for fitted in (ours, comfy):
            assert relative_error(fitted[name].scale * sources + fitted[name].shift, moved) <= RELATIVE, name
            assert torch.equal(fitted[name].lo, whole[name].lo) and torch.equal(fitted[name].hi, whole[name].hi), name


def test_maps_of_another_family_are_refused(pack, request):
    sd15_pipe = pipeline_for(request, "sd15", "SD1.x")
    maps = fit_maps(collect_activations(pipeline_for(request, "sdxl", "SDXL"), SOURCE, TARGET, pattern=r"\.out\.0$",
                                        resolution=RESOLUTION), estimation="at once")
    with pytest.raises(ValueError, match="fitted on an SDXL model but the pipeline is SD1.x"):
        with steer(sd15_pipe, maps):
            pass


# ----- the documented example (docs/diffusers.md, linked from the README) -----

def test_readme_diffusers_example_runs(request, tmp_path, monkeypatch):
    text = (PACK_DIR / "docs" / "diffusers.md").read_text()
    section = text.split("# Use the maps in diffusers", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    pipe = pipeline_for(request, "sd15", "SD1.x")
    monkeypatch.chdir(tmp_path)
    namespace = {"pipe": pipe}
    exec(compile(code, "docs/diffusers.md", "exec"), namespace)
    image = namespace["image"]
    assert image.size == (RESOLUTION, RESOLUTION)
    assert load_maps(tmp_path / "watercolor.safetensors").family == "SD1.x"
    hooks = [m for m in pipe.unet.modules() if m._forward_hooks] + [m for m in pipe.text_encoder.modules() if m._forward_hooks]
    assert hooks == []


# ----- an optional extra -----

def test_act_core_imports_without_diffusers_and_names_the_extra_when_it_is_needed(request, monkeypatch):
    check = ("import sys, act_core, act_core.diffusers; "
             "sys.exit(1 if {'diffusers', 'transformers'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", check], cwd=PACK_DIR).returncode == 0
    pipe = pipeline_for(request, "sd15", "SD1.x")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"diffusers is missing.*'diffusers' extra"):
        PipelineLayers(pipe)
