"""Property tests for ans-dither-v1: round trips over streams, alphabets and dither contexts, and damaged payloads
fail only with FormatError (or decode to a stream of the right shape and range), never crash, hang or over-allocate."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udnc_fx.coding import get_coder
from udnc_fx.coding.ans import dither_codes
from udnc_fx.errors import FormatError

CODER = get_coder("ans-dither-v1")
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


@SETTINGS
@given(case=streams())
def test_round_trip(case):
    stream, k, context, rows = case
    data = CODER.encode(stream, k, context=context, row_length=rows)
    assert CODER.encode(stream, k, context=context, row_length=rows) == data
    np.testing.assert_array_equal(CODER.decode(data, stream.size, k, context=context), stream)


@SETTINGS
@given(case=streams(), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 10**6)), count_delta=st.sampled_from([0, 0, 0, -1, 1, 1000]))
def test_damaged_payloads_raise_only_format_error(case, edits, cut, count_delta):
    stream, k, context, rows = case
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
