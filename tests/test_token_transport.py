"""Gated token transport (act_core/token_transport.py): what moves, what stays, and bad input."""
from __future__ import annotations

import pytest
import torch

from act_core.token_transport import changed_tokens, fit_gated_tokens


def _pairs(n=64, t=8, d=16, seed=0):
    """Prompt pairs whose position 3 carries the concept on the source side only: the source token
    there sits at +4 on neuron 0, the target's at -4; every other token is the same on both sides."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(n, t, d, generator=g)
    source = target.clone()
    source[:, 3, 0] = 4.0 + 0.3 * torch.randn(n, generator=g)
    target[:, 3, 0] = -4.0 + 0.3 * torch.randn(n, generator=g)
    return source, target


def test_only_the_concepts_tokens_are_changed_and_moved():
    source, target = _pairs()
    assert changed_tokens(source, target).sum(0).tolist() == [0, 0, 0, 64, 0, 0, 0, 0]
    fitted = fit_gated_tokens(source, target)
    prompt = source[:4]
    moved = fitted.apply(prompt, 1.0)
    # The concept's token lands where the target's is; the other tokens are left as they were.
    assert moved[:, 3, 0].mean() == pytest.approx(-4.0, abs=0.5)
    assert torch.allclose(moved[:, [0, 1, 2, 4, 5, 6, 7]], prompt[:, [0, 1, 2, 4, 5, 6, 7]], atol=1e-3)


def test_a_prompt_without_the_concept_is_left_alone_and_strength_0_is_the_identity():
    source, target = _pairs()
    fitted = fit_gated_tokens(source, target)
    clean = _pairs(seed=1)[1]
    assert torch.allclose(fitted.apply(clean, 1.0), clean, atol=1e-3)
    assert fitted.apply(source, 0.0) is source


def test_identical_prompt_sets_are_refused_with_a_clear_error():
    source, _ = _pairs()
    with pytest.raises(ValueError, match="same tokens"):
        fit_gated_tokens(source, source.clone())
    with pytest.raises(ValueError, match="one shape"):
        fit_gated_tokens(source, source[:, :5])


def test_the_maps_file_keeps_a_conditioning_map_and_old_files_stay_as_they_were():
    from act_core import TransportMaps, fit_layer, maps_from_bytes, maps_to_bytes
    from act_core.fileformat import MapsFileError

    source, target = _pairs()
    layer = fit_layer(source[:, 0], target[:, 0] + 1.0)
    plain = TransportMaps({"clip_l.final_layer_norm": layer}, {"method": "linear"})
    data = maps_to_bytes(plain)
    assert b'"format_version":"1"' in data.replace(b" ", b"")  # no conditioning map: written as before
    assert maps_from_bytes(data).conditioning is None

    for form in ("nearest", "linear"):
        fitted = fit_gated_tokens(source, target, form)
        back = maps_from_bytes(maps_to_bytes(TransportMaps({"clip_l.final_layer_norm": layer}, {}, conditioning=fitted)))
        assert back.conditioning.form == form
        assert torch.equal(back.conditioning.apply(source[:3], 0.7), fitted.apply(source[:3], 0.7))
        assert torch.equal(back["clip_l.final_layer_norm"].scale, layer.scale)

    broken = maps_to_bytes(TransportMaps({}, {}, conditioning=fit_gated_tokens(source, target, "nearest")))
    form = b'form\\": \\"nearest'
    assert broken.count(form) == 1
    broken = broken.replace(form, b'form\\": \\"sidewys')  # same length: the header stays readable
    with pytest.raises(MapsFileError, match="conditioning"):
        maps_from_bytes(broken)


def _causal_pairs(n=64, t=8, d=16, seed=0, concept=True):
    """Prompts as a causal text encoder gives them: each token is one of a few words (plus a little
    noise); on the source side position 3 is the concept's word and every later token carries a trace
    of it (+0.5 on neuron 1), as padding does in CLIP. concept=False: prompts that never had it."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(6, d, generator=torch.Generator().manual_seed(99)) * 2
    target = words[torch.randint(1, 6, (n, t), generator=g)] + 0.01 * torch.randn(n, t, d, generator=g)
    if not concept:
        return target
    source = target.clone()
    source[:, 3] = words[0] + 0.01 * torch.randn(n, d, generator=g)
    source[:, 4:, 1] += 0.5
    return source, target


def test_the_nearest_gate_moves_the_concepts_words_and_leaves_other_prompts_exactly():
    """The concept changes every later token a little, so nearly all tokens count as changed; the
    nearest gate still moves only tokens nearer a changed source token than any target token: a prompt
    with the concept gets its target's tokens back, one without it is returned unchanged."""
    source, target = _causal_pairs()
    fitted = fit_gated_tokens(source, target, "nearest")
    assert fitted.gate_kind == "nearest"
    held_source, held_target = _causal_pairs(n=8, seed=5)
    moved = fitted.apply(held_source, 1.0)
    assert (moved[:, 4:] - held_target[:, 4:]).abs().max() < 0.1  # the concept's trace is gone
    assert (moved[:, 3] - held_source[:, 3]).norm(dim=-1).min() > 1.0  # the concept's word moved
    assert torch.equal(moved[:, :3], held_source[:, :3])  # tokens before it did not
    clean = _causal_pairs(n=8, seed=6, concept=False)
    assert torch.equal(fitted.apply(clean, 1.0), clean)
    assert fitted.gate(clean).max() == 0 and fitted.gate(held_source)[:, 3:].min() == 1


def test_the_maps_file_keeps_the_nearest_gate_and_a_version_3_map_keeps_its_gaussian_gate():
    import json
    import struct

    from act_core import TransportMaps, maps_from_bytes, maps_to_bytes

    source, target = _causal_pairs()
    nearest = fit_gated_tokens(source, target, "nearest")
    data = maps_to_bytes(TransportMaps({}, {}, conditioning=nearest))
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]
    assert header["format_version"] == "4" and json.loads(header["conditioning"])["gate"] == "nearest"
    back = maps_from_bytes(data).conditioning
    clean = _causal_pairs(n=8, seed=6, concept=False)
    assert back.gate_kind == "nearest" and torch.equal(back.apply(source[:3], 0.7), nearest.apply(source[:3], 0.7))
    assert torch.equal(back.apply(clean, 1.0), clean)

    old = fit_gated_tokens(source, target, "nearest", gate="gaussian")  # what a version 3 file holds
    data = maps_to_bytes(TransportMaps({}, {}, conditioning=old))
    assert b'"format_version":"3"' in data.replace(b" ", b"") and b"targets" not in data
    back = maps_from_bytes(data).conditioning
    assert back.gate_kind == "gaussian" and torch.equal(back.apply(source[:3], 0.7), old.apply(source[:3], 0.7))
    with pytest.raises(ValueError, match="nearest form"):
        fit_gated_tokens(source, target, "linear", gate="nearest")
