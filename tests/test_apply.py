"""Apply Transport Maps on tiny SD1.5 and SDXL through the real KSampler."""
from __future__ import annotations

import pytest
import torch

from act_core import LayerMap, TransportMaps
from conftest import patch_state, sample
from steering_reference import hooked, ungated
from test_learn import collect, fit

BOTH = "conditional and unconditional"


@pytest.fixture(scope="module")
def maps_sd15(pack, sd15):
    model, clip, _ = sd15
    return fit(pack, collect(pack, model, clip, where="both")[0])


@pytest.fixture(scope="module")
def maps_sdxl(pack, sdxl):
    model, clip, _ = sdxl
    return fit(pack, collect(pack, model, clip, where="both")[0])


def apply(pack, model, maps, strength=1.0, clip=None, mode="exact", start=0.0, end=1.0, branch=BOTH):
    node = pack.nodes.nodes_apply.ApplyTransportMaps
    return node.execute(model, maps, strength, start, end, branch, mode, clip).args


@pytest.mark.parametrize("mode", ["exact", "fused"])
@pytest.mark.parametrize("fixture, maps_fixture", [("sd15", "maps_sd15"), ("sdxl", "maps_sdxl")])
def test_strength_zero_is_bit_identical_and_the_dial_is_monotonic(pack, request, fixture, maps_fixture, mode):
    model, clip, vae = request.getfixturevalue(fixture)
    maps = request.getfixturevalue(maps_fixture)
    plain = sample(model, clip, vae)
    distances = []
    for strength in (0.0, 0.25, 0.5, 0.75, 1.0):
        m, c = apply(pack, model, maps, strength, clip, mode)
        image = sample(m, c, vae)
        if strength == 0.0:
            assert torch.equal(image, plain)
        distances.append((image - plain).pow(2).mean().sqrt().item())
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    assert torch.equal(sample(model, clip, vae), plain)  # the unpatched inputs are untouched


def test_inputs_are_never_mutated(pack, sd15, maps_sd15):
    model, clip, _ = sd15
    before = patch_state(model, clip)
    m, c = apply(pack, model, maps_sd15, 1.0, clip)
    assert m is not model and c is not clip
    assert patch_state(model, clip) == before and model.patches == {}
    assert set(m.object_patches) - set(model.object_patches)  # the steering went onto the clone


def close_to(result, reference, plain) -> bool:
    """result equals the reference to the folds' float32 rounding (test_folding.assert_close's bound),
    far closer than steering moves the latent."""
    moved = (reference - plain).abs().max().item()
    error = (result - reference).abs().max().item()
    assert moved > 1e-2, moved
    return error <= 1e-4 * max(1.0, reference.abs().max().item()) and error <= 1e-2 * moved


def test_two_apply_nodes_chain_and_compose(pack, sd15, maps_sd15):
    """The second node's maps act on what the first node's maps made, as the graph reads, against the
    hand-written reference (a reversed chain or a dropped first node is far outside its bound)."""
    model, clip, _ = sd15
    first = ungated(maps_sd15)
    second = TransportMaps({n: LayerMap(torch.full_like(l.scale, 0.9), l.shift * 0 + 0.05, l.lo, l.hi, l.kind,
                                        form=l.form) for n, l in first.items()}, first.info)
    m1, _ = apply(pack, model, first, 1.0)
    chained_off, _ = apply(pack, m1, second, 0.0)
    assert torch.equal(sample(chained_off, clip), sample(m1, clip))
    both = sample(apply(pack, m1, second, 1.0)[0], clip)
    plain = sample(model, clip)
    assert close_to(both, sample(hooked(model, [(first, 1.0), (second, 1.0)]), clip), plain)
    assert not close_to(both, sample(hooked(model, [(second, 1.0), (first, 1.0)]), clip), plain)


def test_composes_with_a_lora_style_weight_patch(pack, sd15, maps_sd15):
    model, clip, _ = sd15
    lora = model.clone()
    name = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    weight = lora.model.state_dict()[name]
    lora.add_patches({name: (0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)),)}, 1.0)
    with_lora = sample(lora, clip)
    assert not torch.equal(with_lora, sample(model, clip))
    steered, _ = apply(pack, lora, maps_sd15, 0.0)
    assert torch.equal(sample(steered, clip), with_lora)
    steered, _ = apply(pack, lora, maps_sd15, 1.0)
    assert not torch.equal(sample(steered, clip), with_lora)
    assert not torch.equal(sample(steered, clip), sample(apply(pack, model, maps_sd15, 1.0)[0], clip))


def test_fused_matches_exact_for_ungated_token_maps(pack, sd15):
    model, clip, _ = sd15
    activations = collect(pack, model, clip, where="both", layers="custom pattern",
                          pattern=r"(norm[123]|layer_norm[12])$")[0]
    maps = fit(pack, activations, support="all")
    assert all(l.kind == "token" and not l.gated for l in maps.values())
    steering = pack.nodes.steering  # the reference: every map run per step on its layer's output
    exact = sample(steering.steer_model(model, maps, 0.8, fold=False), steering.steer_clip(clip, maps, 0.8, fold=False))
    fused = sample(*apply(pack, model, maps, 0.8, clip, "fused"))
    assert torch.allclose(exact, fused, atol=1e-3, rtol=1e-3)
    fused_model, _ = apply(pack, model, maps, 0.8, None, "fused")
    assert not fused_model.object_patches and fused_model.patches  # folded, nothing hooked


def test_sampling_window_and_branch_steer_what_the_reference_steers(pack, sd15, maps_sd15):
    model, clip, _ = sd15
    maps = ungated(maps_sd15)
    plain = sample(model, clip)
    late = sample(apply(pack, model, maps, 1.0, start=0.5)[0], clip)
    assert close_to(late, sample(hooked(model, [(maps, 1.0)], start=0.5), clip), plain)
    early = sample(apply(pack, model, maps, 1.0, end=0.5)[0], clip)
    assert close_to(early, sample(hooked(model, [(maps, 1.0)], end=0.5), clip), plain)
    cond_only = sample(apply(pack, model, maps, 1.0, branch="conditional only")[0], clip)
    assert close_to(cond_only, sample(hooked(model, [(maps, 1.0)], conditional_only=True), clip), plain)
    never = sample(apply(pack, model, maps, 1.0, start=1.0, end=1.0)[0], clip)
    assert torch.equal(never, plain)


def test_negative_strength_runs_the_inverse(pack, sd15, maps_sd15):
    """Strength -1 is the textbook inverse (z - shift) / scale of every map, folded or per step."""
    model, clip, _ = sd15
    maps = ungated(maps_sd15)
    plain = sample(model, clip)
    removed = sample(apply(pack, model, maps, -1.0)[0], clip)
    assert close_to(removed, sample(hooked(model, [(maps, -1.0)]), clip), plain)
    half = sample(apply(pack, model, maps, -0.5)[0], clip)
    assert close_to(half, sample(hooked(model, [(maps, -0.5)]), clip), plain)


def test_maps_of_another_family_are_refused_by_name(pack, sd15, maps_sdxl):
    model, clip, _ = sd15
    with pytest.raises(ValueError, match="fitted on an SDXL model but the MODEL is SD1.x"):
        apply(pack, model, maps_sdxl, 1.0, clip)


def test_mismatched_layers_are_listed(pack, sd15, maps_sd15):
    model, clip, _ = sd15
    name = next(n for n in maps_sd15 if n.startswith("diffusion_model."))
    bad = dict(maps_sd15.layers)
    bad[name] = LayerMap(*(torch.zeros(3) for _ in range(4)), kind=bad[name].kind)
    bad["diffusion_model.no.such.layer"] = bad[name]
    with pytest.raises(ValueError, match=r"do not match this model's layers \(2 of") as error:
        apply(pack, model, TransportMaps(bad, maps_sd15.info), 1.0)
    assert f"{name}: 3 neurons in the maps, 32 in the model" in str(error.value)
    assert "diffusion_model.no.such.layer: no such layer" in str(error.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_strength_is_refused(pack, sd15, maps_sd15, bad):
    model, clip, _ = sd15
    with pytest.raises(ValueError, match="finite"):
        apply(pack, model, maps_sd15, bad, clip)
