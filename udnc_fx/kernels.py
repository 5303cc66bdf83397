"""Native (numba) kernels of the quantizer's per-weight loops: the dither hash, Z^n rounding, codebook ranking and
the squared errors of the SQNR.

Each kernel is a one-pass loop that computes, element by element, exactly what the NumPy code it replaces computes
array by array (the same IEEE operations in the same order, so the same bits; ``tests/unit/test_kernels.py`` holds
every kernel against its NumPy twin, ties and chunk edges included). They are ``@njit(cache=True, nogil=True)``:
compiled once per argument types and cached on disk, and they release the GIL, so independent layers can run in
threads.

This module imports numba at import time; :func:`udnc_fx.dither.native` imports it lazily and answers ``None``
when numba is missing or ``UDNC_NATIVE=0`` is set, and every caller then takes its NumPy path.

Integer arithmetic is done in uint64 (or int64) on purpose: numba turns a mix of signed and unsigned 64-bit
integers into float64, and 32-bit unsigned products must wrap modulo 2**32, which the explicit mask does.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_M32 = np.uint64(0xFFFFFFFF)
_C1 = np.uint64(0x85EBCA6B)
_C2 = np.uint64(0xC2B2AE35)
_S8 = np.uint64(8)
_S13 = np.uint64(13)
_S16 = np.uint64(16)
_INV24 = 2.0**-24
_LIMIT = 4.611686018427388e18  # 2**62: points beyond are refused (the NumPy path decides)


@njit(cache=True, nogil=True, inline="always")
def _fmix(h):
    # h: uint64 holding a 32-bit value; MurmurHash3's fmix32 with the products wrapped to 32 bits.
    h ^= h >> _S16
    h = (h * _C1) & _M32
    h ^= h >> _S13
    h = (h * _C2) & _M32
    h ^= h >> _S16
    return h


@njit(cache=True, nogil=True, inline="always")
def _hash(a, b, i):
    # a, b: the whitened key words (uint64 < 2**32); i: the counter (uint64 < 2**32). dither.py's definition.
    return _fmix(_fmix(i ^ a) ^ b)


@njit(cache=True, nogil=True, inline="always")
def _uniform(a, b, i):
    return np.float64(_hash(a, b, i) >> _S8) * _INV24


@njit(cache=True, nogil=True)
def hash_fill(a, b, start, out):
    """``out[j] = h_{start + j}`` (uint32) for the key words ``a, b`` (uint64)."""
    for j in range(out.size):
        out[j] = _hash(a, b, start + np.uint64(j))


@njit(cache=True, nogil=True)
def uniform_fill(a, b, start, out):
    """``out[j] = r_{start + j} = (h >> 8) · 2**-24`` (exact in float32 and float64)."""
    for j in range(out.size):
        out[j] = _uniform(a, b, start + np.uint64(j))


@njit(cache=True, nogil=True)
def fmix_inplace(h):
    """``fmix32`` on every element of a uint32 array, in place."""
    for j in range(h.size):
        h[j] = _fmix(np.uint64(h[j]))


@njit(cache=True, nogil=True, inline="always")
def _z_dither32(a, b, i, factor):
    # Z^n's raw dither of element i (x = r, u = x − (rint(x) + 0.0)), scaled and rounded once to float32:
    # record.scaled_dither(lattice.dither_raw(r), factor).
    x = _uniform(a, b, i)
    u = x - (np.rint(x) + 0.0)
    return np.float32(u * factor)


@njit(cache=True, nogil=True)
def z_points(flat, e0, size, a, b, dithered, factor, out):
    """Integer points of ``Z^n`` for the elements ``e0 .. e0 + out.size`` of the weights ``flat`` (zero past
    ``size``, the zero padding of the last vector): ``rint((v + float64(d)) / factor)`` with ``d`` the float32
    dither of the element (zero when not ``dithered``), as ``quantizer._points_at`` computes them.

    Returns ``(ok, lo, hi)``: whether every weight was finite and every point within ``±2**62`` (else ``out`` holds
    garbage and the caller takes the NumPy path, which raises the right error), and the smallest and largest point.
    """
    lo = np.inf
    hi = -np.inf
    finite = True
    for j in range(out.size):
        e = e0 + j
        v = np.float64(flat[e]) if e < size else 0.0
        finite &= np.isfinite(v)
        d = np.float32(0.0)
        if dithered:
            d = _z_dither32(a, b, np.uint64(e), factor)
        y = np.rint((v + np.float64(d)) / factor)
        lo = min(lo, y)
        hi = max(hi, y)
        out[j] = np.int64(y) if abs(y) <= _LIMIT else 0
    ok = finite and out.size > 0 and -_LIMIT <= lo and hi <= _LIMIT  # also false for NaN
    if not ok:
        return False, 0, 0
    return True, np.int64(lo), np.int64(hi)


@njit(cache=True, nogil=True)
def z1_points_sums(flat, e0, a, b, dithered, factor, exact_zero, out, sig, err):
    """:func:`z_points` for ``Z¹`` (no padding: every element is a vector), and for each element ``sig = w²`` and
    ``err = (float64(w_hat) − w)²`` with ``w_hat`` its decode: the codeword ``float32(float64(p) · factor)``
    (``record.codebook_from_int``) minus the float32 dither (not subtracted without dither), or 0 for the point 0
    when ``exact_zero`` (the record's ``zero_index``): what :func:`z_sq_err` and :func:`squares` give from the
    record, without hashing again."""
    lo = np.inf
    hi = -np.inf
    finite = True
    for j in range(out.size):
        v = np.float64(flat[e0 + j])
        finite &= np.isfinite(v)
        d = np.float32(0.0)
        if dithered:
            d = _z_dither32(a, b, np.uint64(e0 + j), factor)
        y = np.rint((v + np.float64(d)) / factor)
        lo = min(lo, y)
        hi = max(hi, y)
        p = np.int64(y) if abs(y) <= _LIMIT else 0
        out[j] = p
        if exact_zero and p == 0:
            w_hat = np.float32(0.0)
        else:
            w_hat = np.float32(np.float64(p) * factor)
            if dithered:
                w_hat = np.float32(w_hat - d)
        diff = np.float64(w_hat) - v
        err[j] = diff * diff
        sig[j] = v * v
    ok = finite and out.size > 0 and -_LIMIT <= lo and hi <= _LIMIT
    if not ok:
        return False, 0, 0
    return True, np.int64(lo), np.int64(hi)


@njit(cache=True, nogil=True)
def count_codes(part, lows, radices, counts):
    """``counts[code] += 1`` for the mixed-radix code ``Σ_j (part[i, j] − lows[j]) · Π_{l>j} radices[l]`` of every
    row ``i`` (``quantizer.rank_rows``' dense codes)."""
    m, n = part.shape
    for i in range(m):
        c = np.int64(0)
        for j in range(n):
            c = c * radices[j] + (np.int64(part[i, j]) - lows[j])
        counts[c] += 1


@njit(cache=True, nogil=True)
def map_codes(part, lows, radices, table, out, offset):
    """``out[offset + i] = table[code of row i]`` (:func:`count_codes`' codes)."""
    m, n = part.shape
    for i in range(m):
        c = np.int64(0)
        for j in range(n):
            c = c * radices[j] + (np.int64(part[i, j]) - lows[j])
        out[offset + i] = table[c]


@njit(cache=True, nogil=True)
def z_sq_err(flat, lo, indices, codebook, zero_index, a, b, dithered, factor, out):
    """``out[j] = (float64(w_hat) − float64(w))²`` for the elements ``lo .. lo + out.size`` of a ``Z^n`` weight:
    ``w_hat = codebook[indices[e // n], e % n] − d_e`` in float32 (``n = codebook.shape[1]``; ``d``: the float32
    dither; 0 where the index is ``zero_index``, when that is ``>= 0``), as ``CompressedWeight.decode_rows``
    decodes it."""
    n = codebook.shape[1]
    v = lo // n
    c = lo - v * n
    for j in range(out.size):
        e = lo + j
        k = np.int64(indices[v])
        if k == zero_index:
            w_hat = np.float32(0.0)
        else:
            w_hat = codebook[k, c]
            if dithered:
                w_hat = np.float32(w_hat - _z_dither32(a, b, np.uint64(e), factor))
        diff = np.float64(w_hat) - np.float64(flat[e])
        out[j] = diff * diff
        c += 1
        if c == n:
            c = 0
            v += 1


@njit(cache=True, nogil=True)
def squares(flat, lo, out):
    """``out[j] = float64(flat[lo + j])²``."""
    for j in range(out.size):
        x = np.float64(flat[lo + j])
        out[j] = x * x


@njit(cache=True, nogil=True)
def widen_checked(flat, lo, out):
    """``out[j] = float64(flat[lo + j])``; returns whether all were finite."""
    ok = True
    for j in range(out.size):
        x = np.float64(flat[lo + j])
        out[j] = x
        if not np.isfinite(x):
            ok = False
    return ok


@njit(cache=True, nogil=True)
def squared_deviations(flat, lo, mean, out):
    """``out[j] = (float64(flat[lo + j]) − mean)²``."""
    for j in range(out.size):
        x = np.float64(flat[lo + j]) - mean
        out[j] = x * x
