"""act_core alone (no ComfyUI): the estimators, the strength semantics and the maps file."""
from __future__ import annotations

import json
import math
import struct
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import act_core
from act_core import LayerMap, MapsFileError, TransportMaps, fit_layer, load_maps, maps_from_bytes, maps_to_bytes, save_maps

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def samples(seed: int, n: int, d: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


@FAST
@given(n=st.integers(2, 40), d=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_linear_equals_least_squares_on_sorted_pairs(n, d, seed):
    a, b = samples(seed, n, d), samples(seed + 1, n, d, 2.0, 1.0) ** 3
    fit = act_core.fit_affine(a, b, "linear")
    for j in range(d):
        x, y = torch.sort(a[:, j]).values, torch.sort(b[:, j]).values
        design = torch.stack([x, torch.ones_like(x)], 1)
        coef = torch.linalg.lstsq(design, y[:, None]).solution.flatten()
        assert fit.scale[j].item() == pytest.approx(coef[0].item(), rel=1e-7, abs=1e-9)
        assert fit.shift[j].item() == pytest.approx(coef[1].item(), rel=1e-7, abs=1e-9)


def pairing_by_fractions(n: int, m: int):
    """An independent computation: walk both quantile functions with exact fractions."""
    i = j = 0
    level = Fraction(0)
    pairs = []
    while i < n and j < m:
        nxt = min(Fraction(i + 1, n), Fraction(j + 1, m))
        pairs.append((i, j, nxt - level))
        level = nxt
        if nxt == Fraction(i + 1, n):
            i += 1
        if nxt == Fraction(j + 1, m):
            j += 1
    return pairs


@FAST
@given(n=st.integers(1, 30), m=st.integers(1, 30))
def test_unequal_pairing_matches_exact_quantile_walk(n, m):
    ia, ib, mass = act_core.quantile_pairing(n, m)
    expected = pairing_by_fractions(n, m)
    assert [(int(x), int(y)) for x, y in zip(ia, ib)] == [(x, y) for x, y, _ in expected]
    assert torch.allclose(mass, torch.tensor([float(p) for _, _, p in expected], dtype=torch.float64))
    assert mass.sum().item() == pytest.approx(1.0)


def test_unequal_sizes_fit_recovers_a_known_affine_map():
    # Target quantiles are exactly 3 * source quantiles + 2 at every level: any correct pairing finds it.
    base = torch.linspace(-1, 1, 12, dtype=torch.float64)[:, None]
    source = base.repeat(2, 1)                       # 24 samples, each value twice
    target = 3 * base + 2                            # 12 samples
    fit = act_core.fit_affine(source, target, "linear")
    assert fit.scale.item() == pytest.approx(3.0)
    assert fit.shift.item() == pytest.approx(2.0)


def test_gaussian_and_mean_estimators():
    a, b = samples(1, 500, 3), samples(2, 400, 3, 2.0, 5.0)
    g = act_core.fit_affine(a, b, "gaussian")
    assert torch.allclose(g.scale, b.std(0, correction=0) / a.std(0, correction=0))
    mapped = g.scale * a + g.shift
    assert torch.allclose(mapped.mean(0), b.mean(0)) and torch.allclose(mapped.std(0, correction=0), b.std(0, correction=0))
    m = act_core.fit_affine(a, b, "mean")
    assert torch.equal(m.scale, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(m.shift, b.mean(0) - a.mean(0))


def test_zero_variance_neurons_stay_identity_and_are_counted():
    a = samples(3, 50, 4)
    a[:, 1] = 0.7
    layer = fit_layer(a, samples(4, 50, 4, 3.0, 1.0))
    assert layer.degenerate == 1
    assert layer.scale[1].item() == 1.0 and layer.shift[1].item() == 0.0


def test_non_finite_samples_are_named():
    a = samples(5, 10, 3)
    a[2, 1] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_layer(a, samples(6, 10, 3))


@FAST
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["token", "conv"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_strength_zero_is_the_identity_bit_for_bit(seed, kind, dtype):
    layer = fit_layer(samples(seed, 20, 4), samples(seed + 1, 20, 4, 2.0, 1.0), kind=kind)
    x = (samples(seed + 2, 6, 4) if kind == "token" else samples(seed + 2, 2, 4 * 9).view(2, 4, 3, 3)).to(dtype)
    out = layer.apply(x, 0.0)
    assert out.dtype == dtype and torch.equal(out, x)


@FAST
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["token", "conv"]))
def test_inverse_undoes_forward(seed, kind):
    source = samples(seed, 30, 5)
    layer = fit_layer(source, samples(seed + 1, 30, 5, 1.5, -2.0), kind=kind)  # gated on [min, max]
    x = source[:6].float() if kind == "token" else source[:6].float()[:, :, None, None].expand(6, 5, 2, 2)
    moved = layer.apply(x, 1.0)
    assert not torch.allclose(moved, x)
    assert torch.allclose(layer.apply(moved, -1.0), x, atol=1e-4)


def test_strength_interpolates_linearly_and_extrapolates():
    layer = fit_layer(samples(1, 40, 3), samples(2, 40, 3, 2.0, 1.0), support="all")
    x = samples(3, 5, 3).float()
    full = layer.apply(x, 1.0)
    assert torch.allclose(full, layer.scale * x + layer.shift, atol=1e-6)
    assert torch.allclose(layer.apply(x, 0.25), x + 0.25 * (full - x), atol=1e-6)
    assert torch.allclose(layer.apply(x, 2.0), x + 2.0 * (full - x), atol=1e-5)


def test_gating_leaves_out_of_range_values_untouched():
    source = torch.linspace(-1, 1, 101, dtype=torch.float64)[:, None].repeat(1, 2)
    layer = fit_layer(source, source * 2 + 1, support="q_10_90")
    assert layer.lo[0].item() == pytest.approx(-0.8) and layer.hi[0].item() == pytest.approx(0.8)
    x = torch.tensor([[-0.95, 0.5], [0.8, 2.0]])
    out = layer.apply(x, 1.0)
    assert out[0, 0] == x[0, 0] and out[1, 1] == x[1, 1]           # outside: untouched
    assert out[0, 1].item() == pytest.approx(2.0) and out[1, 0].item() == pytest.approx(2.6)  # inside, bound included


def test_conv_form_moves_only_the_spatial_mean():
    layer = fit_layer(samples(1, 30, 3), samples(2, 30, 3, 3.0, 2.0), kind="conv", support="all")
    x = samples(3, 2, 3 * 16).float().view(2, 3, 4, 4)
    out = layer.apply(x, 1.0)
    centred_in = x - x.mean((2, 3), keepdim=True)
    centred_out = out - out.mean((2, 3), keepdim=True)
    assert torch.allclose(centred_in, centred_out, atol=1e-5)
    assert torch.allclose(out.mean((2, 3)), layer.scale * x.mean((2, 3)) + layer.shift, atol=1e-5)


def test_gaussian_conv_maps_every_pixel_gated_on_the_channel_mean():
    """The reference's Gaussian form on conv outputs, computed by hand for one pixel of each channel:
    out' = out + lambda * [lo <= mean_hw(out) <= hi] * ((w - 1) * out + c)."""
    source = samples(1, 40, 3)
    layer = fit_layer(source, samples(2, 40, 3, 0.5, 1.0), method="gaussian", support="q_5_95", kind="conv")
    assert layer.form == "pixel" and layer.gated
    x = samples(3, 2, 3 * 16, 0.3).float().view(2, 3, 4, 4)
    x[1, 2] += 10.0  # this channel's mean lies far outside the source range: left alone
    out = layer.apply(x, 0.7)
    w = (samples(2, 40, 3, 0.5, 1.0).std(0, correction=0) / source.std(0, correction=0))
    for b in range(2):
        for d in range(3):
            m = x[b, d].mean().item()
            inside = layer.lo[d].item() <= m <= layer.hi[d].item()
            value = x[b, d, 1, 2].item()
            expected = value + 0.7 * inside * ((layer.scale[d].item() - 1) * value + layer.shift[d].item())
            assert out[b, d, 1, 2].item() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(out[1, 2], x[1, 2])
    assert torch.allclose(layer.scale.double(), w, rtol=1e-6)
    # The spread of each moved channel is scaled by w: the Gaussian map matches spreads too.
    spread = out[0].std((1, 2)) / x[0].std((1, 2))
    inside = (x[0].mean((1, 2)) >= layer.lo) & (x[0].mean((1, 2)) <= layer.hi)
    assert torch.allclose(spread[inside], (1 + 0.7 * (layer.scale - 1))[inside], rtol=1e-4)


def test_each_method_has_its_form_and_default_support():
    a, b = samples(1, 30, 4), samples(2, 30, 4, 2.0, 1.0)
    forms = {m: fit_layer(a, b, m, kind="conv") for m in act_core.METHODS}
    assert {m: l.form for m, l in forms.items()} == {"linear": "mean", "gaussian": "pixel", "mean": "pixel"}
    assert not any(layer.gated for layer in forms.values())  # every method moves every value unless told
    assert {m: act_core.default_support(m) for m in act_core.METHODS} == {"linear": "all", "gaussian": "all", "mean": "all"}
    assert fit_layer(a, b, "gaussian", support="q_0_100").gated and fit_layer(a, b, "linear", support="q_0_100").gated
    # Mean-shift moves every pixel by the same amount as it moves the mean: both forms agree.
    shift = forms["mean"]
    x = samples(3, 2, 4 * 9).float().view(2, 4, 3, 3)
    as_mean_form = LayerMap(shift.scale, shift.shift, shift.lo, shift.hi, "conv", form="mean")
    assert torch.allclose(shift.apply(x, 1.0), as_mean_form.apply(x, 1.0), atol=1e-6)


def test_files_without_a_form_keep_the_mean_form_and_pixel_files_are_version_2():
    linear = make_maps()
    header = _header(maps_to_bytes(linear))
    assert header["__metadata__"]["format_version"] == "1"  # older releases still read linear maps
    old = _rewrite_header(maps_to_bytes(linear), lambda h: h["__metadata__"].update(
        layers=json.dumps({n: {k: v for k, v in spec.items() if k != "form"}
                           for n, spec in json.loads(h["__metadata__"]["layers"]).items()})))
    assert all("form" not in spec for spec in json.loads(_header(old)["__metadata__"]["layers"]).values())
    back = maps_from_bytes(old)
    conv = "diffusion_model.input_blocks.1.0.in_layers.0"
    assert back[conv].form == "mean"
    x = samples(5, 2, 8 * 4).float().view(2, 8, 2, 2)
    assert torch.equal(back[conv].apply(x, 1.0), linear[conv].apply(x, 1.0))
    gaussian = TransportMaps({conv: fit_layer(samples(1, 16, 8), samples(2, 16, 8), "gaussian", kind="conv")})
    data = maps_to_bytes(gaussian)
    assert _header(data)["__metadata__"]["format_version"] == "2"
    assert maps_from_bytes(data)[conv].form == "pixel"
    bad = _rewrite_header(data, lambda h: h["__metadata__"].update(
        layers=h["__metadata__"]["layers"].replace('"pixel"', '"sideways"')))
    with pytest.raises(MapsFileError, match="unknown form 'sideways'"):
        maps_from_bytes(bad)


def _header(data: bytes) -> dict:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind, form", [("token", "mean"), ("conv", "mean"), ("conv", "pixel")])
def test_low_precision_activations_follow_the_float32_reference(dtype, kind, form):
    method = "linear" if form == "mean" else "gaussian"
    layer = fit_layer(samples(1, 30, 8), samples(2, 30, 8, 1.5, 0.5), method, support="q_5_95", kind=kind)
    x = samples(3, 4, 8 * 36).view(4, 8, 6, 6) if kind == "conv" else samples(3, 2 * 7, 8).view(2, 7, 8)
    low = x.to(dtype)
    out = layer.apply(low, 0.8)
    assert out.dtype == dtype and out.device == low.device
    reference = layer.apply(low.float(), 0.8)  # the same inputs, computed and kept in float32
    assert torch.equal(out, reference.to(dtype))


def test_maps_follow_the_weights_device_and_dtype_when_folding():
    """Weights on another device than the maps (the meta device stands in for a GPU here) and in
    another dtype: the fold must compute where the weights are, never mix devices."""
    layer = fit_layer(samples(1, 30, 6), samples(2, 30, 6, 2.0, 1.0), support="all")
    meta_w, meta_b = torch.empty(6, device="meta", dtype=torch.float16), torch.empty(6, device="meta")
    d_weight, d_bias = layer.fold(meta_w, meta_b)
    assert d_weight.device.type == "meta" and d_bias.device.type == "meta"
    assert d_weight.dtype == torch.float32 and d_bias.dtype == torch.float32
    d_weight, d_bias = layer.fold(torch.empty(6, 3, device="meta", dtype=torch.bfloat16), None)
    assert d_weight.shape == (6, 3) and d_bias.device.type == "meta"
    norm_w = torch.linspace(0.5, 1.5, 6, dtype=torch.bfloat16)
    norm_b = torch.linspace(-0.2, 0.3, 6, dtype=torch.bfloat16)
    d_weight, d_bias = layer.fold(norm_w, norm_b)
    assert torch.allclose(d_weight, norm_w.float() * (layer.scale - 1))
    assert torch.allclose(d_bias, norm_b.float() * (layer.scale - 1) + layer.shift)
    x = samples(3, 4, 6).float()
    normed = torch.nn.functional.layer_norm(x, (6,))
    folded = normed * (norm_w.float() + d_weight) + (norm_b.float() + d_bias)
    assert torch.allclose(folded, layer.apply(normed * norm_w.float() + norm_b.float(), 1.0), atol=1e-5)


def test_maps_act_on_the_activations_device():
    layer = fit_layer(samples(1, 30, 6), samples(2, 30, 6, 2.0, 1.0), support="q_0_100", kind="conv")
    out = layer.apply(torch.empty(2, 6, 4, 4, device="meta", dtype=torch.float16), 1.0)
    assert out.device.type == "meta" and out.dtype == torch.float16
    a, b, lo, hi = layer.params(torch.device("meta"), -0.5)
    assert all(t.device.type == "meta" and t.dtype == torch.float32 for t in (a, b, lo, hi))
    ungated = fit_layer(samples(1, 30, 6), samples(2, 30, 6, 2.0, 1.0), kind="conv")
    assert ungated.params(torch.device("meta"), 1.0)[2:] == (None, None)


def test_fold_into_norm_matches_exact_ungated_map():
    norm = torch.nn.LayerNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 6))
        norm.bias.copy_(torch.linspace(-0.2, 0.3, 6))
    layer = fit_layer(samples(1, 30, 6), samples(2, 30, 6, 2.0, 1.0), support="all")
    x = samples(3, 4, 6).float()
    d_weight, d_bias = layer.fold(norm.weight, norm.bias)
    for strength in (0.5, 1.0, 1.7):
        folded = torch.nn.functional.layer_norm(x, (6,), norm.weight + strength * d_weight, norm.bias + strength * d_bias)
        assert torch.allclose(folded, layer.apply(norm(x), strength), atol=1e-5)


def test_wasserstein1_is_zero_for_equal_sets_and_shift_size_for_shifts():
    a = samples(1, 50, 3)
    assert torch.allclose(act_core.wasserstein1(a, a), torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(act_core.wasserstein1(a, a + 2.5), torch.full((3,), 2.5, dtype=torch.float64))


def make_maps() -> TransportMaps:
    layers = {"diffusion_model.input_blocks.1.0.in_layers.0": fit_layer(samples(1, 16, 8), samples(2, 16, 8), kind="conv"),
              "clip_l.transformer.text_model.encoder.layers.0.layer_norm1": fit_layer(samples(3, 16, 5), samples(4, 16, 5), support="all")}
    return TransportMaps(layers, {"family": "SD1.x", "method": "linear", "support": "q_0_100"})


def test_save_load_round_trips_exactly(tmp_path):
    maps = make_maps()
    path = save_maps(maps, tmp_path / "m.safetensors")
    back = load_maps(path)
    assert back.info == maps.info and list(back) == list(maps)
    for name in maps:
        for key in ("scale", "shift", "lo", "hi"):
            assert torch.equal(getattr(back[name], key), getattr(maps[name], key))
        assert back[name].kind == maps[name].kind and back[name].form == maps[name].form
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left


def test_truncated_files_fail_cleanly_at_every_length():
    data = maps_to_bytes(make_maps())
    for cut in range(len(data)):
        with pytest.raises(MapsFileError):
            maps_from_bytes(data[:cut], source="cut.safetensors")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_fail_cleanly(blob):
    with pytest.raises(MapsFileError):
        maps_from_bytes(blob)


def _rewrite_header(data: bytes, edit) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length:]


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["__metadata__"].pop("format"), "format: comfyui-act-maps"),
    (lambda h: h["__metadata__"].update(format_version="6"), "newer"),
    (lambda h: h["__metadata__"].update(layers="{not json"), "not valid JSON"),
    (lambda h: next(v for k, v in h.items() if k != "__metadata__").update(dtype="F64"), "expected F32"),
    (lambda h: next(v for k, v in h.items() if k != "__metadata__").update(shape=[2, 4]), "expected \\[neurons\\]"),
    (lambda h: next(v for k, v in h.items() if k != "__metadata__").update(data_offsets=[0, 10**12]), "outside the file"),
])
def test_foreign_newer_or_malformed_files_are_named(edit, message):
    data = _rewrite_header(maps_to_bytes(make_maps()), edit)
    with pytest.raises(MapsFileError, match=message) as error:
        maps_from_bytes(data, source="shared.safetensors")
    assert "shared.safetensors" in str(error.value)


def test_huge_declared_header_and_non_utf8_metadata_fail_cleanly():
    with pytest.raises(MapsFileError, match="header claims"):
        maps_from_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(MapsFileError, match="UTF-8"):
        maps_from_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(MapsFileError, match="does not exist"):
        load_maps(tmp_path / "nope.safetensors")


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_maps(make_maps(), target)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_strength_is_refused():
    layer = make_maps()["clip_l.transformer.text_model.encoder.layers.0.layer_norm1"]
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            layer.apply(torch.zeros(2, 5), bad)


def test_inverse_of_a_half_open_support_stays_half_open():
    layer = LayerMap(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([-math.inf]), torch.tensor([3.0]))
    inverse = layer.inverse()
    assert inverse.lo.item() == -math.inf and inverse.hi.item() == pytest.approx(7.0, rel=1e-5)
