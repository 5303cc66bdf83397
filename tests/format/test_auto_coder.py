"""``coder="auto"`` (``save``'s default): per tensor, the smaller of ``ans-dither-v2`` and, on streams of at most
``AUTO_TRY_LIMIT`` vectors, ``range-context-v1``; the entry records the coder it got, and the bytes are deterministic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from udnc_fx.coding import payload
from udnc_fx.coding.container import (
    Container, QuantizedTensor, decode_container, derived_key, encode_container, read_header,
)
from udnc_fx.quantizer import quantize_array


def _tensor(fqn: str, shape, sparsity: float, seed: int = 0, lattice: str = "Z", n: int = 1) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    values = rng.laplace(size=shape)
    values[rng.random(shape) < sparsity] = 0.0  # pruned: rows of different density suit range-context-v1
    key = derived_key(0, fqn)
    qa = quantize_array(values, lattice=lattice, n=n, step=0.6, key=key, exact_zero=sparsity > 0)
    return QuantizedTensor(fqn, shape, lattice, n, qa.step, key, "udnc-hash32-v1", qa.indices, qa.codebook,
                           codebook_int=qa.codebook_int, coder="auto", zero_index=qa.zero_index)


def _lengths(tensors: list[QuantizedTensor], coder: str) -> list[int]:
    data = encode_container(Container([dataclasses.replace(t, coder=coder) for t in tensors]))
    return [q["indices"]["length"] + q["codebook"]["length"] for q in read_header(data)["quantized"]]


def test_auto_takes_the_smaller_coder_per_tensor():
    tensors = [_tensor("a.weight", (16, 9), 0.1), _tensor("b.weight", (64, 256), 0.9, 1),
               _tensor("c.weight", (200, 300), 0.0, 2), _tensor("d.weight", (32, 64), 0.5, 3, "E8", 8)]
    data = encode_container(Container(tensors))
    assert encode_container(Container(tensors)) == data
    header = read_header(data)
    ans, rng = _lengths(tensors, "ans-dither-v2"), _lengths(tensors, "range-context-v1")
    got = [(q["indices"]["coder"], q["indices"]["length"] + q["codebook"]["length"]) for q in header["quantized"]]
    want = [("range-context-v1", r) if r < a else ("ans-dither-v2", a) for a, r in zip(ans, rng)]
    assert got == want
    assert {c for c, _ in got} == {"ans-dither-v2", "range-context-v1"}  # this set of tensors exercises both
    back = decode_container(data)
    for t, q in zip(tensors, back.quantized):
        assert np.array_equal(t.indices, q.indices)


def test_auto_does_not_try_the_adaptive_coder_on_large_streams(monkeypatch):
    small = _tensor("b.weight", (64, 256), 0.9, 1)  # range-context-v1 wins here ...
    assert _lengths([small], "range-context-v1")[0] < _lengths([small], "ans-dither-v2")[0]
    monkeypatch.setattr(payload, "AUTO_TRY_LIMIT", 64 * 256 - 1)  # ... but past the limit it is not tried
    assert read_header(encode_container(Container([small])))["quantized"][0]["indices"]["coder"] == "ans-dither-v2"


@pytest.mark.parametrize("coder", ["ans-dither-v2", "range-context-v1", "ans-dither-v1"])
def test_a_named_coder_is_used_as_it_is(coder):
    t = dataclasses.replace(_tensor("a.weight", (16, 9), 0.1), coder=coder)
    assert read_header(encode_container(Container([t])))["quantized"][0]["indices"]["coder"] == coder
