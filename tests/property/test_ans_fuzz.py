"""Property tests for ans-dither-v1 and ans-dither-v2: round trips over streams, alphabets and dither contexts, and damaged payloads
fail only with FormatError (or decode to a stream of the right shape and range), never crash, hang or over-allocate."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udnc_fx.coding import get_coder
from udnc_fx.coding.ans import dither_codes
from udnc_fx.errors import FormatError

CODERS = ["ans-dither-v1", "ans-dither-v2"]
SETTINGS = settings(deadline=None, derandomize=True, max_examples=200, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def streams(draw):
    k = draw(st.one_of(st.sampled_from([1, 2, 3, 255, 256, 257, 70_000]), st.integers(min_value=1, max_value=600)))
    n = draw(st.integers(min_value=0, max_value=3000))
    rng = np.random.default_rng(draw(st.integers(min_value=0, max_value=2**32 - 1)))
    shape = draw(st.sampled_from(["uniform", "laplace", "constant", "sparse"]))
    if shape == "uniform":
        s = rng.integers(0, k, n)
    elif shape == "laplace":
        s = np.clip(np.round(rng.laplace(0, draw(st.floats(0.1, 50.0)), n)) + k // 2, 0, k - 1)
    elif shape == "constant":
        s = np.full(n, int(rng.integers(0, k)))
    else:
        s = np.where(rng.random(n) < 0.9, 0, rng.integers(0, k, n))
    key = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)))
    lattice_n = draw(st.sampled_from([1, 2, 4, 8]))
    context = None if key is None else dither_codes(key, n, lattice_n)
    if shape == "sparse" and n > 8 and draw(st.booleans()):  # rows of different density
        length = draw(st.integers(min_value=1, max_value=n))
        density = rng.random(-(-n // length))
        s = np.where(rng.random(n) < np.repeat(density, length)[:n], s, 0)
        return s.astype(np.int64), k, context, length
    return s.astype(np.int64), k, context, None


def _fit(name, case):
    """The case with its alphabet within the coder's (v2 takes up to 2^16 symbols: larger ones are folded in)."""
    stream, k, context, rows = case
    top = get_coder(name).max_alphabet_size
    if k > top:
        stream, k = stream % top, top
    return stream, k, context, rows


@SETTINGS
@given(case=streams())
@pytest.mark.parametrize("name", CODERS)
def test_round_trip(name, case):
    stream, k, context, rows = _fit(name, case)
    CODER = get_coder(name)
    data = CODER.encode(stream, k, context=context, row_length=rows)
    assert CODER.encode(stream, k, context=context, row_length=rows) == data
    np.testing.assert_array_equal(CODER.decode(data, stream.size, k, context=context), stream)


@SETTINGS
@given(case=streams(), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 10**6)), count_delta=st.sampled_from([0, 0, 0, -1, 1, 1000]))
@pytest.mark.parametrize("name", CODERS)
def test_damaged_payloads_raise_only_format_error(name, case, edits, cut, count_delta):
    stream, k, context, rows = _fit(name, case)
    CODER = get_coder(name)
    data = bytearray(CODER.encode(stream, k, context=context, row_length=rows))
    for where, value in edits:
        if data:
            data[where % len(data)] = value
    if cut is not None and data:
        data = data[: cut % (len(data) + 1)]
    n = max(0, stream.size + count_delta)
    ctx = None if context is None or n != stream.size else context
    try:
        out = CODER.decode(bytes(data), n, k, context=ctx)
    except FormatError:
        return
    assert out.shape == (n,) and out.dtype == np.int64 and (n == 0 or (out.min() >= 0 and out.max() < k))
