"""Property tests for range-context-v1's row mode: round trips for any row length, and damaged row-mode payloads
fail only with FormatError (the registry-wide tests in test_coder_roundtrip.py cover its flat mode)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udnc_fx.coding import get_coder
from udnc_fx.errors import FormatError

CODER = get_coder("range-context-v1")
SETTINGS = settings(deadline=None, derandomize=True, max_examples=250, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def row_streams(draw, max_rows: int = 40, max_length: int = 120):
    k = draw(st.one_of(st.sampled_from([2, 3, 255, 256, 257]), st.integers(min_value=2, max_value=600)))
    rows = draw(st.integers(min_value=1, max_value=max_rows))
    length = draw(st.integers(min_value=1, max_value=max_length))
    tail = draw(st.integers(min_value=0, max_value=length - 1))  # a short last row
    n = max(1, rows * length - tail)
    rng = np.random.default_rng(draw(st.integers(min_value=0, max_value=2**32 - 1)))
    zero = int(rng.integers(0, k))
    density = rng.choice([0.0, 0.02, 0.3, 0.9, 1.0], -(-n // length))
    keep = rng.random(n) < np.repeat(density, length)[:n]
    values = rng.integers(0, k, n)
    if draw(st.booleans()):
        values = np.clip(np.round(rng.laplace(0, 3.0, n)) + k // 2, 0, k - 1).astype(np.int64)
    stream = np.where(keep, values, zero).astype(np.int64)
    hint = draw(st.one_of(st.just(length), st.integers(min_value=1, max_value=2 * n + 1)))
    return stream, k, hint


@SETTINGS
@given(case=row_streams())
def test_row_mode_round_trip(case):
    stream, k, hint = case
    forced = CODER._encode_rows(stream, k, min(hint, stream.size))
    assert forced[0] == 1
    np.testing.assert_array_equal(CODER.decode(forced, stream.size, k), stream)
    chosen = CODER.encode(stream, k, row_length=hint)
    assert CODER.encode(stream, k, row_length=hint) == chosen
    np.testing.assert_array_equal(CODER.decode(chosen, stream.size, k), stream)


@SETTINGS
@given(case=row_streams(max_rows=20, max_length=60), data=st.data())
def test_damaged_row_payloads_raise_only_format_error(case, data):
    stream, k, hint = case
    payload = bytearray(CODER._encode_rows(stream, k, min(hint, stream.size)))
    mutation = data.draw(st.sampled_from(["flip", "truncate", "append", "splice", "count"]))
    if mutation == "flip":
        at = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
        payload[at] ^= data.draw(st.integers(min_value=1, max_value=255))
    elif mutation == "truncate":
        del payload[data.draw(st.integers(min_value=0, max_value=len(payload) - 1)) :]
    elif mutation == "append":
        payload += data.draw(st.binary(min_size=1, max_size=16))
    elif mutation == "splice":
        at = data.draw(st.integers(min_value=0, max_value=len(payload)))
        payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    count = stream.size
    if mutation == "count":
        count = data.draw(st.integers(min_value=0, max_value=2 * stream.size + 5))
    try:
        out = CODER.decode(bytes(payload), count, k)
    except FormatError as exc:
        assert exc.kind in ("truncated", "corrupt_payload", "bad_value"), exc.kind
        return
    assert out.dtype == np.int64 and out.shape == (count,)
    if count:
        assert 0 <= int(out.min()) and int(out.max()) < k
