"""The native (numba) kernels give the NumPy paths' bits: dither hash, Z^n rounding, ranking, sums (udnc_fx.kernels).

Each test runs the same public function with the kernels forced off (``UDNC_NATIVE=0``) and forced on
(``UDNC_NATIVE=1``) and compares the results bit for bit; the NumPy paths are the reference (they are what the
format's test vectors and the golden files were made with).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import udnc_fx.quantizer as Q
from udnc_fx import ConfigError
from udnc_fx.dither import fmix32_np, hash_stream_np, key_words, native, tensor_key, uniform_np

pytest.importorskip("numba")

HASH_VECTORS = [  # tests/unit/test_dither.py's (docs/FORMAT.md)
    (0x0, [0x7E3D55DD, 0x6C6858CD, 0x7DC93873, 0x45960480, 0xD4AFB643, 0x688AC882]),
    (0xFFFFFFFFFFFFFFFF, [0x189C1A40, 0x7FAA8E99, 0x57E03F7D, 0xB9616779, 0x8C9BAB10, 0xD3E159F6]),
]


def both(monkeypatch, fn):
    """``fn()`` with the kernels off, then on."""
    monkeypatch.setenv("UDNC_NATIVE", "0")
    ref = fn()
    monkeypatch.setenv("UDNC_NATIVE", "1")
    got = fn()
    return ref, got


def test_native_switch(monkeypatch):
    monkeypatch.setenv("UDNC_NATIVE", "0")
    assert native(1 << 30) is None
    monkeypatch.setenv("UDNC_NATIVE", "1")
    assert native(1) is not None


@pytest.mark.parametrize("key,expected", HASH_VECTORS)
def test_hash_vectors_native(key, expected):
    assert [int(x) for x in hash_stream_np(key, len(expected), native=True)] == expected


@pytest.mark.parametrize("key", [0, 1, 0x0123456789ABCDEF, 2**64 - 1, tensor_key(3, "fc.weight")])
@pytest.mark.parametrize("start,count", [(0, 70_001), (2**32 - 5_000, 5_000), (12_345, 0), (2**31 - 7, 19)])
def test_hash_and_uniform_native_equal_numpy(key, start, count):
    ref = hash_stream_np(key, count, start, native=False)
    assert np.array_equal(ref, hash_stream_np(key, count, start, native=True))
    for dtype in (np.float32, np.float64):
        ref = uniform_np(key, count, start, dtype=dtype, native=False)
        got = uniform_np(key, count, start, dtype=dtype, native=True)
        assert got.dtype == ref.dtype and np.array_equal(ref, got)


def test_fmix32_native_equal_numpy():
    h = np.arange(200_000, dtype=np.uint32) * np.uint32(2654435761)
    assert np.array_equal(fmix32_np(h.copy(), native=False), fmix32_np(h.copy(), native=True))


def test_bad_range_refused_on_both_paths():
    for flag in (False, True):
        with pytest.raises(ConfigError):
            hash_stream_np(5, 10, start=2**32 - 5, native=flag)


def _same_record(a, b):
    assert a.indices.dtype == b.indices.dtype and np.array_equal(a.indices, b.indices)
    assert np.array_equal(a.codebook_int, b.codebook_int) and a.zero_index == b.zero_index
    assert np.array_equal(a.codebook.view(np.uint32), b.codebook.view(np.uint32))


@pytest.mark.parametrize("n", [1, 3, pytest.param(2, marks=pytest.mark.slow), pytest.param(8, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk", [7, 1 << 18])
def test_z_quantize_native_equal_numpy(monkeypatch, n, dtype, chunk):
    monkeypatch.setattr(Q, "QUANTIZE_CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(n)
    w = (rng.standard_normal((37, 29)) * 0.1).astype(dtype)
    w[:, ::5] = 0  # exact zeros
    cases = ((tensor_key(1, "w"), 0.03, False), (tensor_key(2, "w"), 0.3, True), (None, 0.05, True))
    for key, step, exact_zero in cases:
        ref, got = both(monkeypatch, lambda: Q.quantize_array(w, lattice="Z", n=n, step=step, key=key,
                                                                exact_zero=exact_zero))
        _same_record(ref, got)
        s_ref, s_got = both(monkeypatch, lambda: Q.signal_and_error_sums(ref, w.reshape(-1), leaf=128))
        assert [x.hex() for x in s_ref] == [x.hex() for x in s_got]


def test_forced_native_runs_the_kernels(monkeypatch):
    from udnc_fx import kernels

    calls = []
    for name in ("z_points", "count_codes", "map_codes", "z_sq_err", "widen_checked"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    monkeypatch.setenv("UDNC_NATIVE", "1")
    w = np.linspace(-1, 1, 5000, dtype=np.float32)
    q = Q.quantize_array(w, lattice="Z", n=1, step=0.1, key=5)
    Q.signal_and_error_sums(q, w)
    Q.blocked_std(w)
    assert set(calls) == {"z_points", "count_codes", "map_codes", "z_sq_err", "widen_checked"}


def test_rounding_ties_half_to_even(monkeypatch):
    # Without dither, w / step = k + 1/2 exactly: rint rounds half to even on both paths.
    w = (np.arange(-40, 40) + 0.5).astype(np.float32) * np.float32(0.25)
    ref, got = both(monkeypatch, lambda: Q.quantize_array(w, lattice="Z", n=1, step=0.25, key=None))
    _same_record(ref, got)
    assert np.array_equal(ref.codebook_int[ref.indices, 0], np.rint(np.arange(-40, 40) + 0.5).astype(np.int64))


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=300),
    step=st.sampled_from([2.0**-20, 1e-3, 0.37, 1.0, 1e5]),
    n=st.integers(1, 4),
    seed=st.integers(0, 3),
)
def test_z_quantize_property(values, step, n, seed):
    w = np.array(values, dtype=np.float32)
    key = tensor_key(seed, "p")
    import os

    old = os.environ.get("UDNC_NATIVE")
    try:
        os.environ["UDNC_NATIVE"] = "0"
        ref = Q.quantize_array(w, lattice="Z", n=n, step=step, key=key)
        sums_ref = Q.signal_and_error_sums(ref, w)
        os.environ["UDNC_NATIVE"] = "1"
        got = Q.quantize_array(w, lattice="Z", n=n, step=step, key=key)
        sums_got = Q.signal_and_error_sums(got, w)
    finally:
        os.environ.pop("UDNC_NATIVE") if old is None else os.environ.__setitem__("UDNC_NATIVE", old)
    _same_record(ref, got)
    assert [x.hex() for x in sums_ref] == [x.hex() for x in sums_got]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused_on_both_paths(monkeypatch, bad):
    w = np.ones(1000, np.float32)
    w[517] = bad
    for mode in ("0", "1"):
        monkeypatch.setenv("UDNC_NATIVE", mode)
        with pytest.raises(ConfigError, match="NaN or Inf"):
            Q.quantize_array(w, lattice="Z", n=1, step=0.1, key=3)
        with pytest.raises(ConfigError, match="NaN or Inf"):
            Q.blocked_std(w)


def test_points_past_int_range_take_the_numpy_path(monkeypatch):
    # |w / step| > 2**62: the kernel gives up and the NumPy path decides, so both modes end the same way.
    def outcome(w, step):
        try:
            q = Q.quantize_array(w, lattice="Z", n=1, step=step, key=3)
        except Exception as exc:  # noqa: BLE001 -- whatever the NumPy path does, the native mode must do too
            return type(exc).__name__
        return q.indices.tobytes(), q.codebook_int.tobytes()

    for w, step in ((np.array([3e38, 1.0], np.float32), 1e-30), (np.array([2.0**61, -(2.0**61), 0.0]), 1.0)):
        with np.errstate(all="ignore"):
            ref, got = both(monkeypatch, lambda: outcome(w, step))
        assert ref == got


@pytest.mark.parametrize("dim", [1, 2, 4])
@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
def test_rank_rows_native_equal_numpy(monkeypatch, dim, dtype):
    rng = np.random.default_rng(dim)
    parts = [rng.integers(-20, 9, size=(m, dim)).astype(dtype) for m in (0, 1, 500, 77)]
    ref, got = both(monkeypatch, lambda: Q.rank_rows(parts, dim))
    for a, b in zip(ref, got):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocked_std_native_equal_numpy(monkeypatch, dtype):
    x = (np.random.default_rng(0).standard_normal(100_003) * 3 + 1).astype(dtype)
    ref, got = both(monkeypatch, lambda: Q.blocked_std(x, leaf=1000))
    assert ref.hex() == got.hex() == float(np.std(x.astype(np.float64))).hex()


@pytest.mark.parametrize("lattice,n", [("Z", 1), ("Z", 3), ("E8", 8), ("D4", 4)])
def test_signal_and_error_sums_match_the_whole_tensor_sums(monkeypatch, lattice, n):
    w = (np.random.default_rng(1).standard_normal(10_007) * 0.2).astype(np.float32)
    for exact_zero in (False, True):
        q = Q.quantize_array(w, lattice=lattice, n=n, step=0.15, key=tensor_key(0, "x"), exact_zero=exact_zero)
        decoded = q.decode().reshape(-1).astype(np.float64)
        wide = w.astype(np.float64)
        expect = (float((wide**2).sum()), float(((decoded - wide) ** 2).sum()))
        ref, got = both(monkeypatch, lambda: Q.signal_and_error_sums(q, w))
        assert [x.hex() for x in ref] == [x.hex() for x in got] == [x.hex() for x in expect]


def test_key_words_in_kernel_range():
    a, b = key_words(2**64 - 1)
    assert 0 <= a < 2**32 and 0 <= b < 2**32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("key,step,exact_zero", [(tensor_key(1, "w"), 0.03, False), (tensor_key(2, "w"), 0.3, True),
                                                 (None, 0.05, True), (None, 0.25, False)])
@pytest.mark.parametrize("leaf", [128, pytest.param(1000, marks=pytest.mark.slow), None])
def test_quantize_with_sums_is_quantize_then_sums(monkeypatch, dtype, key, step, exact_zero, leaf):
    rng = np.random.default_rng(7)
    w = (rng.standard_normal(5003) * 0.1).astype(dtype)
    w[::3] = 0
    w[1::7] = (np.arange(w[1::7].size) - 300 + 0.5) * 0.25  # exact ties without dither at step 0.25
    monkeypatch.setenv("UDNC_NATIVE", "0")
    q_ref = Q.quantize_array(w, lattice="Z", n=1, step=step, key=key, exact_zero=exact_zero)
    sums_ref = Q.signal_and_error_sums(q_ref, w, leaf)
    for mode in ("0", "1"):
        monkeypatch.setenv("UDNC_NATIVE", mode)
        q, sig, err = Q.quantize_with_sums(w, lattice="Z", n=1, step=step, key=key, exact_zero=exact_zero, leaf=leaf)
        _same_record(q_ref, q)
        assert [sig.hex(), err.hex()] == [x.hex() for x in sums_ref]


def test_quantize_with_sums_falls_back_on_bad_weights(monkeypatch):
    monkeypatch.setenv("UDNC_NATIVE", "1")
    w = np.ones(3000, np.float32)
    w[2999] = np.nan
    with pytest.raises(ConfigError, match="NaN or Inf"):
        Q.quantize_with_sums(w, lattice="Z", n=1, step=0.1, key=1)
    with pytest.raises(ConfigError, match="step"):
        Q.quantize_with_sums(w[:10], lattice="Z", n=1, step=-1.0, key=1)


def test_kernels_that_fail_to_load_fall_back_to_numpy(monkeypatch):
    import sys

    import udnc_fx
    import udnc_fx.dither as D

    class Refuse:  # numba's own failures at import, e.g. no writable cache folder, arrive as RuntimeError
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "udnc_fx.kernels":
                raise RuntimeError("cannot cache function: no locator available")
            return None

    monkeypatch.setattr(D, "_NATIVE", [])
    monkeypatch.delitem(sys.modules, "udnc_fx.kernels", raising=False)
    monkeypatch.delattr(udnc_fx, "kernels", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Refuse, *sys.meta_path])
    monkeypatch.setenv("UDNC_NATIVE", "1")
    with pytest.warns(RuntimeWarning, match="native kernels unavailable"):
        assert D.native(1 << 30) is None
    w = np.linspace(-1, 1, 999, dtype=np.float32)
    q = Q.quantize_array(w, lattice="Z", n=1, step=0.1, key=5)  # the NumPy path, no error
    assert q.indices.size == 999
