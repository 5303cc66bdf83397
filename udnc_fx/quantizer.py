"""The randomized lattice quantizer on NumPy arrays (the encoder core; no torch).

``v`` (a flattened weight, zero-padded to a multiple of ``n``) is cut into vectors, the dither ``u`` is added,
``y = Q(v + u)`` is found on the lattice scaled by Δ, and the distinct lattice points used become the codebook
(most frequent first). The result is a :class:`udnc_fx.record.CompressedWeight`, which owns the decode
(``codebook[k] − u``; without a key the dither is zero: plain rounding) and the dither and scaling rules used here.
"""

from __future__ import annotations

import math

import numpy as np

from . import dither as _dither
from .errors import ConfigError
from .lattice import Lattice, get_lattice
from .record import (  # noqa: F401 (codebook_from_int, raw_dither: re-exported, their historical home)
    CompressedWeight,
    codebook_from_int,
    entropy_from_counts,
    index_dtype,
    lattice_factor,
    raw_dither,
    scaled_dither,
)

__all__ = [
    "quantize_array",
    "codebook_from_int",
    "raw_dither",
    "entropy_bits_per_weight",
    "coded_rate_bits_per_weight",
    "z1_rate_bits_chunked",
    "rate_bits_of_points",
    "coded_rate_of_raw_points",
    "vectors_of",
    "blocked_sum",
    "blocked_std",
    "signal_and_error_sums",
    "quantize_with_sums",
]


def vectors_of(values: np.ndarray, n: int) -> np.ndarray:
    """Flatten to float64, zero-pad to a multiple of ``n`` and view as ``(num_vectors, n)``."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    pad = (-flat.size) % n
    if pad:
        flat = np.concatenate([flat, np.zeros(pad)])
    return flat.reshape(-1, n)


def _row_keys(points: np.ndarray) -> np.ndarray:
    """One sortable 1-D key per integer row (a void view of the little-endian bytes)."""
    points = np.ascontiguousarray(points.astype("<i8"))
    return points.view(np.dtype((np.void, 8 * points.shape[1]))).reshape(-1)


# Above this many distinct mixed-radix codes, counting falls back to sorting (np.unique on row keys).
_MAX_DENSE_CODES = 1 << 24


def _dense_codes(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """Mixed-radix int64 code per integer row (``(codes, lows, radices, span)``), or None if the span is too wide.

    Why: ``np.unique`` on void row keys sorts, which took ~0.2 s per call on an 11.7M-weight embedding and made
    ``target_bits`` solving on all-MiniLM-L6-v2 take minutes; counting dense codes with ``np.bincount`` is linear.
    """
    if points.shape[0] == 0:
        return None
    lows = points.min(axis=0)
    radices = points.max(axis=0) - lows + 1
    span = 1
    for r in radices.tolist():
        span *= int(r)
        if span > max(_MAX_DENSE_CODES, 4 * points.shape[0]) or span > 2**62:
            return None
    codes = np.zeros(points.shape[0], dtype=np.int64)
    for j in range(points.shape[1]):
        codes *= radices[j]
        codes += points[:, j] - lows[j]
    return codes, lows, radices, span


def _count_rows(points: np.ndarray) -> np.ndarray:
    """Counts of the distinct integer rows of ``points`` (in no particular order)."""
    dense = _dense_codes(points)
    if dense is None:
        return np.unique(_row_keys(points), return_counts=True)[1]
    counts = np.bincount(dense[0], minlength=dense[3])
    return counts[counts > 0]


def unique_rows(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(unique_rows, inverse, counts)`` of an int64 (m, n) array; the order of the unique rows is unspecified."""
    dense = _dense_codes(points)
    if dense is None:
        _, first, inverse, counts = np.unique(
            _row_keys(points), return_index=True, return_inverse=True, return_counts=True
        )
        return points[first], inverse.reshape(-1), counts
    codes, lows, radices, span = dense
    all_counts = np.bincount(codes, minlength=span)
    used = np.flatnonzero(all_counts)
    lookup = np.zeros(span, dtype=np.int64)
    lookup[used] = np.arange(used.size)
    rows = np.empty((used.size, points.shape[1]), dtype=np.int64)
    rest = used.copy()
    for j in range(points.shape[1] - 1, -1, -1):  # undo the mixed radix, last coordinate first
        rows[:, j] = rest % radices[j] + lows[j]
        rest //= radices[j]
    return rows, lookup[codes], all_counts[used]


def _lattice_points(v: np.ndarray, dither32: np.ndarray, lat: Lattice, factor: float) -> np.ndarray:
    # Nearest point of the scaled lattice (factor = scale·Δ) to v + u, in raw coordinates, with u the float32
    # dither every decoder subtracts.
    return lat.nearest_raw((v + dither32.astype(np.float64)) / factor)


def _points_at(v: np.ndarray, u_raw: np.ndarray, lat: Lattice, step: float) -> np.ndarray:
    """Integer lattice points of the vectors ``v`` rounded with the raw dither ``u_raw`` at ``step``."""
    factor = lattice_factor(lat, step)
    return lat.to_int(_lattice_points(v, scaled_dither(u_raw, factor), lat, factor))


def coded_rate_of_raw_points(
    raw_points: np.ndarray, lat: Lattice, *, key: int | None = None, shape: tuple[int, ...] | None = None,
    exact_zero: bool = False,
) -> float:
    """:func:`rate_bits_of_points` of raw lattice points ``(num_vectors, n)`` chosen by any rounding rule."""
    return rate_bits_of_points(lat.to_int(raw_points), lat.name, key=key, shape=shape, exact_zero=exact_zero)


def entropy_bits_per_weight(
    v: np.ndarray, lat: Lattice, step: float, u_raw: np.ndarray
) -> float:
    """Order-0 entropy (bits per weight) of the indices ``v`` would get at ``step`` (``v``: num_vectors × n)."""
    points = _points_at(v, u_raw, lat, step)
    return entropy_from_counts(_count_rows(points)) / lat.dim


def rate_bits_of_points(
    points: np.ndarray, lattice: str, *, key: int | None = None, shape: tuple[int, ...] | None = None,
    exact_zero: bool = False,
) -> float:
    """Estimated coded rate (bits per weight) of integer lattice points ``(m, n)`` as the container stores them.

    ``Z¹``: the order-0 entropy ``H(k)`` of the indices (the file's index stream is usually a little smaller: the
    default coder conditions on the dither and on row density).

    Vector lattices (``n > 1``): what the default coder (``ans-dither-v2``) writes for the tensor's two sections,
    following the writer's choice between indices plus a table of points and table-free ``lattice-coords``
    (:func:`udnc_fx.coding.payload.estimate_points_bits`): per-stream count tables, dither contexts (``key``: the
    tensor's dither key, ``None`` for none) and row classes (``shape``: the weight's shape) included; the tensor's
    header entry is not (``exact_zero``: the record keeps the point 0 exact, which the writer's choice of form
    weighs). Why not entropies: on the pruned demo CNN at 1.12 bits/weight the index entropy plus a table
    costed at the coordinates' entropy gave E8 1.12 where its sections took 2.00 (the cost of the table of points and
    the per-stream count tables of small layers were missing; benchmarks/rate_estimate.py). Every target is
    reachable with every lattice.
    """
    m, n = points.shape
    if m == 0:
        return 0.0
    if n == 1:
        return entropy_from_counts(_count_rows(points))
    from udnc_fx.coding.payload import estimate_points_bits

    return estimate_points_bits(points, lattice, n, key, shape, exact_zero=exact_zero) / (m * n)


def coded_rate_bits_per_weight(
    v: np.ndarray, lat: Lattice, step: float, u_raw: np.ndarray, *, key: int | None = None,
    shape: tuple[int, ...] | None = None, exact_zero: bool = False,
) -> float:
    """:func:`rate_bits_of_points` of the points ``v`` (num_vectors × n) would get at ``step``: what ``target_bits``
    solves for (``key``, ``shape``: the tensor's dither key and shape, for the vector lattices' estimate)."""
    points = _points_at(v, u_raw, lat, step)
    return rate_bits_of_points(points, lat.name, key=key, shape=shape, exact_zero=exact_zero)


#: Vectors per work item of :func:`quantize_array` (times ``n`` elements): the float64 temporaries of the nearest
#: point search stay a few MiB whatever the tensor's size. Any value gives the same result (the dither is
#: counter-based, the ranking of points is a total order); tests lower it to cross chunk boundaries.
QUANTIZE_CHUNK_ELEMENTS = 1 << 18


def z1_rate_bits_chunked(flat: np.ndarray, step: float, key: int | None) -> float:
    """:func:`coded_rate_bits_per_weight` for Z¹ of the weights ``flat`` (1-D, any float dtype), bit for bit, in
    chunks of :data:`QUANTIZE_CHUNK_ELEMENTS`: the dither is regenerated chunk by chunk and the index counts are
    merged (in ascending order of the points, as the whole-tensor count gives them), so no float64 copy of the
    weights, no dither and no array of points of the whole tensor is held."""
    lat = get_lattice("Z", 1)
    values = np.zeros(0, dtype=np.int64)
    counts = np.zeros(0, dtype=np.int64)
    native = _dither.native(flat.size)
    for v0 in range(0, flat.size, QUANTIZE_CHUNK_ELEMENTS):
        v1 = min(v0 + QUANTIZE_CHUNK_ELEMENTS, flat.size)
        points = _chunk_points(flat, v0, v1, lat, step, key, None, None, native)[:, 0]
        lo = int(points.min())
        if int(points.max()) - lo < 4 * points.size:  # a dense histogram (no sort) when the range is narrow
            dense = np.bincount(points - lo)
            vals = np.flatnonzero(dense)
            cnts, vals = dense[vals], vals + lo
        else:
            vals, cnts = np.unique(points, return_counts=True)
        merged, inverse = np.unique(np.concatenate([values, vals]), return_inverse=True)
        total = np.zeros(merged.size, dtype=np.int64)
        np.add.at(total, inverse.reshape(-1), np.concatenate([counts, cnts]))
        values, counts = merged, total
    return entropy_from_counts(counts) if counts.size else 0.0


def _narrow_ints(a: np.ndarray, lo: int | None = None, hi: int | None = None) -> np.ndarray:
    """``a`` (int64) in the narrowest signed dtype that holds its values (int8 .. int64); ``lo``, ``hi``: its
    smallest and largest value when the caller knows them."""
    if a.size == 0:
        return a.astype(np.int8)
    if lo is None or hi is None:
        lo, hi = int(a.min()), int(a.max())
    for dt in (np.int8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return a.astype(dt)
    return a


def _native_z_points(
    k, flat: np.ndarray, v0: int, v1: int, lat: Lattice, step: float, key: int | None
) -> tuple[np.ndarray, int, int] | None:
    """``_chunk_points`` of a ``Z^n`` chunk by the native kernels ``k`` (one pass: hash, dither, round), with the
    points' smallest and largest value; ``None`` where the kernel does not apply (``k`` is ``None``, another lattice
    or dtype) or gave up (non-finite weights, points past ±2**62: the NumPy path then raises or computes them)."""
    if k is None or lat.name != "Z" or flat.dtype not in (np.float32, np.float64) or flat.ndim != 1:
        return None
    n = lat.dim
    a, b = _dither.key_words(key) if key is not None else (0, 0)
    out = np.empty((v1 - v0) * n, np.int64)
    ok, lo, hi = k.z_points(
        flat, v0 * n, flat.size, np.uint64(a), np.uint64(b), key is not None, lattice_factor(lat, step), out
    )
    if not ok:
        return None
    return out.reshape(-1, n), int(lo), int(hi)


def _chunk_points(
    flat: np.ndarray, v0: int, v1: int, lat: Lattice, step: float, key: int | None, u_raw: np.ndarray | None,
    raw_points: np.ndarray | None, native=None,
) -> np.ndarray:
    """Integer lattice points (int64 ``(v1 − v0) × n``) of vectors ``v0 .. v1`` of the zero-padded ``flat``
    (``native``: the kernels to use, or ``None``)."""
    if u_raw is None and raw_points is None:
        fast = _native_z_points(native, flat, v0, v1, lat, step, key)
        if fast is not None:
            return fast[0]
    n = lat.dim
    lo, hi = v0 * n, min(v1 * n, flat.size)
    v = np.asarray(flat[lo:hi], dtype=np.float64)
    if not np.isfinite(v).all():
        raise ConfigError("cannot quantize NaN or Inf values")
    if raw_points is not None:
        return lat.to_int(raw_points[v0:v1])
    if hi - lo < (v1 - v0) * n:  # the last vector's zero padding (vectors_of)
        v = np.concatenate([v, np.zeros((v1 - v0) * n - (hi - lo))])
    v = v.reshape(-1, n)
    u = raw_dither(key, v1 - v0, lat, v0) if u_raw is None else u_raw[v0:v1]
    return _points_at(v, u, lat, step)


def _narrow_chunk_points(
    flat: np.ndarray, v0: int, v1: int, lat: Lattice, step: float, key: int | None, u_raw: np.ndarray | None,
    raw_points: np.ndarray | None, native=None,
) -> np.ndarray:
    """:func:`_chunk_points` in the narrowest integer dtype that holds them (:func:`_narrow_ints`)."""
    if u_raw is None and raw_points is None:
        fast = _native_z_points(native, flat, v0, v1, lat, step, key)
        if fast is not None:
            return _narrow_ints(*fast)
    return _narrow_ints(_chunk_points(flat, v0, v1, lat, step, key, u_raw, raw_points))


def quantize_array(
    values: np.ndarray,
    *,
    lattice: str,
    n: int,
    step: float,
    key: int | None,
    exact_zero: bool = False,
    u_raw: np.ndarray | None = None,
    raw_points: np.ndarray | None = None,
) -> CompressedWeight:
    """Quantize ``values`` with the randomized lattice quantizer.

    Works in chunks of rows (:data:`QUANTIZE_CHUNK_ELEMENTS`): the float64 temporaries are those of one chunk, the
    points are kept in the narrowest integer dtype that holds them, and the indices come back in the smallest dtype
    that holds ``K − 1`` (:func:`udnc_fx.record.index_dtype`), so the memory added is about 1–2 bytes per weight
    plus 1–4 bytes per vector. The result does not depend on the chunk size.

    Args:
        values: any-shaped float array (finite).
        lattice, n: the lattice (see :func:`udnc_fx.lattice.get_lattice`).
        step: Δ > 0.
        key: the dither key (``None``: no dither, deterministic rounding).
        exact_zero: make the lattice point 0 decode to exactly 0 (pruned weights stay 0).
        u_raw: precomputed :func:`raw_dither` (speeds up repeated calls); default: regenerated chunk by chunk.
        raw_points: the lattice points (raw coordinates, ``num_vectors × n``) already chosen by another rounding
            rule (error-compensating rounding); ``values`` then only gives the shape. Default: nearest to ``v + u``.

    Raises:
        ConfigError: non-finite values or step, or an unknown lattice.

    Returns:
        The :class:`~udnc_fx.record.CompressedWeight` of ``values`` (shape ``values.shape``; ``codebook_int`` set;
        indices of dtype :func:`udnc_fx.record.index_dtype` of the codebook size).
    """
    lat = get_lattice(lattice, n)
    if not (isinstance(step, (int, float, np.floating)) and math.isfinite(step) and step > 0):
        raise ConfigError(f"step must be a finite number > 0, got {step!r}")
    dim = lat.dim
    flat = np.asarray(values).reshape(-1)
    m = -(-flat.size // dim)
    if raw_points is not None:
        raw_points = np.asarray(raw_points, dtype=np.float64).reshape(m, dim)
    chunk = max(1, QUANTIZE_CHUNK_ELEMENTS // dim)
    bounds = [(v0, min(v0 + chunk, m)) for v0 in range(0, m, chunk)]
    # Pass 1: every chunk's integer points, kept narrow; pass 2: rank the distinct points.
    native = _dither.native(flat.size)
    parts = [
        _narrow_chunk_points(flat, v0, v1, lat, float(step), key, u_raw, raw_points, native) for v0, v1 in bounds
    ]
    return _ranked_record(parts, values, lat, step, key, exact_zero)


def _ranked_record(
    parts: list[np.ndarray], values: np.ndarray, lat: Lattice, step: float, key: int | None, exact_zero: bool
) -> CompressedWeight:
    """The record of the points ``parts`` (consecutive chunks, :func:`rank_rows`) of ``values``."""
    indices, codebook_int, _ = rank_rows(parts, lat.dim)
    parts.clear()
    zero_index = None
    if exact_zero:
        hits = np.flatnonzero(~codebook_int.any(axis=1))
        if hits.size:
            zero_index = int(hits[0])
    # codebook=None: the record computes the codewords from the integers by the one rule (codebook_from_int)
    return CompressedWeight(
        indices=indices,
        codebook=None,
        codebook_int=codebook_int,
        shape=np.shape(values),
        lattice=lat.name,
        n=lat.dim,
        step=float(step),
        key=key,
        zero_index=zero_index,
    )


class _GaveUp(Exception):
    """The native kernel met a weight it leaves to the NumPy path (NaN/Inf, a point past ±2**62)."""


def quantize_with_sums(
    values: np.ndarray, *, lattice: str, n: int, step: float, key: int | None, exact_zero: bool = False,
    leaf: int | None = None,
) -> tuple[CompressedWeight, float, float]:
    """``(q, Σ w², Σ (ŵ − w)²)``: :func:`quantize_array` and :func:`signal_and_error_sums` of its result, bit for
    bit, in one pass over the weights where the native ``Z¹`` kernel applies (float32/float64 weights): each block
    of the sums' pairwise tree is rounded, decoded and squared as it is hashed, so the dither is generated once.
    Elsewhere the two functions are called one after the other.

    Raises:
        ConfigError: as :func:`quantize_array`.
    """
    lat = get_lattice(lattice, n)
    flat = np.asarray(values).reshape(-1)
    k = _native_flat_kernels(flat)
    valid_step = isinstance(step, (int, float, np.floating)) and math.isfinite(step) and step > 0
    if k is None or lat.name != "Z" or lat.dim != 1 or flat.size == 0 or not valid_step:
        q = quantize_array(values, lattice=lattice, n=n, step=step, key=key, exact_zero=exact_zero)
        return (q, *signal_and_error_sums(q, flat, leaf))
    a, b = _dither.key_words(key) if key is not None else (0, 0)
    factor = lattice_factor(lat, float(step))
    parts: list[np.ndarray] = []

    def block(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        points, sig, err = np.empty(hi - lo, np.int64), np.empty(hi - lo), np.empty(hi - lo)
        ok, p_lo, p_hi = k.z1_points_sums(
            flat, lo, np.uint64(a), np.uint64(b), key is not None, factor, exact_zero, points, sig, err
        )
        if not ok:
            raise _GaveUp
        parts.append(_narrow_ints(points.reshape(-1, 1), int(p_lo), int(p_hi)))
        return sig, err

    try:
        sig, err = _blocked_sums(flat.size, block, leaf, 2)
    except _GaveUp:
        q = quantize_array(values, lattice=lattice, n=n, step=step, key=key, exact_zero=exact_zero)
        return (q, *signal_and_error_sums(q, flat, leaf))
    return _ranked_record(parts, values, lat, float(step), key, exact_zero), sig, err


def rank_rows(parts: list[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index integer points given as consecutive chunks ``parts`` (each ``(rows, dim)``, any integer dtype).

    Returns ``(indices, codebook_int, counts)``: the distinct points most frequent first, ties broken by the
    coordinates (lexicographically) — the quantizer's codebook order — as int64 ``(K, dim)``, their counts, and each
    row's position among them in the smallest dtype that holds ``K − 1`` (:func:`udnc_fx.record.index_dtype`).
    Dense mixed-radix codes (:func:`_dense_codes`' rule) are counted chunk by chunk when the coordinate ranges
    allow, so only one chunk's int64 codes exist at a time; otherwise all rows are sorted at once.
    """
    m = sum(p.shape[0] for p in parts)
    native = _dither.native(m * dim)
    lows = np.zeros(dim, np.int64)
    highs = np.zeros(dim, np.int64)
    first = True
    for part in parts:
        if part.shape[0]:
            lo, hi = part.min(axis=0).astype(np.int64), part.max(axis=0).astype(np.int64)
            lows, highs = (lo, hi) if first else (np.minimum(lows, lo), np.maximum(highs, hi))
            first = False
    radices = highs - lows + 1
    span: int | None = 1
    for r in radices.tolist():
        span *= int(r)
        if span > max(_MAX_DENSE_CODES, 4 * m) or span > 2**62:
            span = None
            break
    if span is None:
        points = np.concatenate([p.astype(np.int64) for p in parts]) if parts else np.zeros((0, dim), np.int64)
        uniq, inverse, counts = unique_rows(points)
        del points
        position = inverse.reshape(-1)
        positions = lambda rank: [rank[position]]  # noqa: E731
    elif native is not None:
        return _rank_dense_native(native, parts, m, dim, lows, radices, span)
    else:

        def codes_of(part: np.ndarray) -> np.ndarray:
            codes = part[:, 0].astype(np.int64)
            codes -= lows[0]
            for j in range(1, dim):
                codes *= radices[j]
                codes += part[:, j]
                codes -= lows[j]
            return codes

        all_counts = np.zeros(span, dtype=np.int64)
        for part in parts:
            all_counts += np.bincount(codes_of(part), minlength=span)
        used = np.flatnonzero(all_counts)
        uniq = _points_of_codes(used, lows, radices, dim)
        counts = all_counts[used]
        del all_counts
        lookup = np.zeros(span, dtype=index_dtype(max(used.size, 1)))
        lookup[used] = np.arange(used.size)

        def positions(rank: np.ndarray):
            if not rank.size:  # no rows
                return ()
            table = rank[lookup]  # each code's rank: one gather per chunk, by the int64 codes themselves
            del rank
            return (np.take(table, codes_of(part)) for part in parts)
    # Most frequent codeword first (helps byte-oriented coders); ties broken by the integer coordinates.
    order = np.lexsort(tuple(uniq[:, j] for j in range(dim - 1, -1, -1)) + (-counts,))
    k = order.size
    idx_dtype = index_dtype(max(k, 1))
    rank = np.empty(k, dtype=idx_dtype)
    rank[order] = np.arange(k, dtype=idx_dtype)
    indices = np.empty(m, dtype=idx_dtype)
    start = 0
    for ranks in positions(rank):
        indices[start : start + ranks.size] = ranks
        start += ranks.size
    return indices, uniq[order], counts[order].astype(np.int64)


def _points_of_codes(used: np.ndarray, lows: np.ndarray, radices: np.ndarray, dim: int) -> np.ndarray:
    """The integer points (``(len(used), dim)`` int64) behind mixed-radix codes: the last coordinate first."""
    uniq = np.empty((used.size, dim), dtype=np.int64)
    rest = used.copy()
    for j in range(dim - 1, -1, -1):
        uniq[:, j] = rest % radices[j] + lows[j]
        rest //= radices[j]
    return uniq


def _rank_dense_native(
    k, parts: list[np.ndarray], m: int, dim: int, lows: np.ndarray, radices: np.ndarray, span: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`rank_rows`' dense-code branch by the native kernels: one counting pass and one pass writing each row's
    rank (through a table from code to rank), with the same codebook order and the same indices."""
    all_counts = np.zeros(span, dtype=np.int64)
    for part in parts:
        k.count_codes(np.ascontiguousarray(part), lows, radices, all_counts)
    used = np.flatnonzero(all_counts)
    uniq = _points_of_codes(used, lows, radices, dim)
    counts = all_counts[used]
    del all_counts
    order = np.lexsort(tuple(uniq[:, j] for j in range(dim - 1, -1, -1)) + (-counts,))
    idx_dtype = index_dtype(max(order.size, 1))
    code_rank = np.zeros(span, dtype=idx_dtype)
    code_rank[used[order]] = np.arange(order.size, dtype=idx_dtype)
    indices = np.empty(m, dtype=idx_dtype)
    start = 0
    for part in parts:
        k.map_codes(np.ascontiguousarray(part), lows, radices, code_rank, indices, start)
        start += part.shape[0]
    return indices, uniq[order], counts[order].astype(np.int64)


#: Elements per block of :func:`blocked_sum`.
SUM_BLOCK_ELEMENTS = 1 << 16


def blocked_sum(size: int, block, leaf: int | None = None) -> float:
    """``np.add.reduce`` of a float64 vector of ``size`` elements given block by block, bit for bit.

    ``block(lo, hi)`` returns elements ``lo .. hi`` (float64). NumPy sums a contiguous float64 vector by pairwise
    summation (split ``k`` elements at ``k/2`` rounded down to a multiple of 8, down to blocks of 128); this follows
    the same splits down to blocks of at most ``leaf`` elements and sums each block with NumPy, so the result is that
    of summing the whole vector at once while only one block is ever materialised (tested against ``np.sum``).
    """
    return _blocked_sums(size, lambda lo, hi: (block(lo, hi),), leaf, 1)[0]


def _blocked_sums(size: int, block, leaf: int | None, count: int) -> tuple[float, ...]:
    """:func:`blocked_sum` of ``count`` vectors at once: ``block(lo, hi)`` returns a tuple of their elements
    ``lo .. hi``; the blocks are asked for in increasing order and each exactly once."""
    # below 128 elements NumPy sums with 8 accumulators, not by halving: a block is never split there
    leaf = max(int(SUM_BLOCK_ELEMENTS if leaf is None else leaf), 128)

    def rec(lo: int, k: int) -> tuple:
        if k <= leaf:
            return tuple(np.add.reduce(np.asarray(x, dtype=np.float64)) for x in block(lo, lo + k))
        half = k // 2
        half -= half % 8
        left, right = rec(lo, half), rec(lo + half, k - half)
        return tuple(x + y for x, y in zip(left, right))

    if size <= 0:
        return (0.0,) * count
    return tuple(float(x) for x in rec(0, int(size)))


def _native_flat_kernels(flat: np.ndarray):
    """The native kernels when they apply to the weights ``flat`` (a 1-D float32/float64 array), else ``None``."""
    if not isinstance(flat, np.ndarray) or flat.ndim != 1 or flat.dtype not in (np.float32, np.float64):
        return None
    return _dither.native(flat.size)


def blocked_std(flat: np.ndarray, leaf: int | None = None) -> float:
    """``float(np.std(flat.astype(np.float64)))`` bit for bit, without the float64 copy (:func:`blocked_sum`).

    Raises:
        ConfigError: ``flat`` holds NaN or Inf values (checked block by block).
    """
    size = flat.size
    k = _native_flat_kernels(flat)

    def values(lo: int, hi: int) -> np.ndarray:
        if k is not None:
            x = np.empty(hi - lo)
            finite = k.widen_checked(flat, lo, x)
        else:
            x = np.asarray(flat[lo:hi], dtype=np.float64)
            finite = np.isfinite(x).all()
        if not finite:
            raise ConfigError("cannot quantize NaN or Inf values")
        return x

    def deviations(lo: int, hi: int) -> np.ndarray:
        if k is not None:
            out = np.empty(hi - lo)
            k.squared_deviations(flat, lo, mean, out)
            return out
        return np.square(values(lo, hi) - mean)

    # numpy's _var: mean = sum / n; x = arr - mean; sum(x * x) / n; sqrt
    mean = np.float64(blocked_sum(size, values, leaf)) / size
    sq = blocked_sum(size, deviations, leaf)
    return float(np.sqrt(np.float64(sq) / size))


def signal_and_error_sums(q: CompressedWeight, flat: np.ndarray, leaf: int | None = None) -> tuple[float, float]:
    """``(Σ w², Σ (ŵ − w)²)`` in float64 over the weights ``flat`` (1-D, the ``numel`` weights ``q`` quantized) and
    their decode ``ŵ`` (:meth:`~udnc_fx.record.CompressedWeight.decode_rows`), each summed as NumPy sums the whole
    vector (:func:`blocked_sum`), bit for bit: the SQNR's two sums without a float64 copy of the weights. ``Z^n``
    weights are decoded by a native kernel (when available) element by element inside each block."""
    numel, n = q.numel, q.n
    k = _native_flat_kernels(flat)
    if k is not None and q.lattice == "Z" and q.affine is None:
        codebook = np.ascontiguousarray(q.codebook, dtype=np.float32)
        a, b = _dither.key_words(q.key) if q.key is not None else (0, 0)
        zero = -1 if q.zero_index is None else int(q.zero_index)
        args = (np.asarray(q.indices), codebook, zero, np.uint64(a), np.uint64(b), q.key is not None, q.factor)

        def errors(lo: int, hi: int) -> np.ndarray:
            out = np.empty(hi - lo)
            k.z_sq_err(flat, lo, *args, out)
            return out

        def signal(lo: int, hi: int) -> np.ndarray:
            out = np.empty(hi - lo)
            k.squares(flat, lo, out)
            return out

    else:

        def decoded(lo: int, hi: int) -> np.ndarray:
            v0, v1 = lo // n, -(-hi // n)
            return q.decode_rows(v0, v1).reshape(-1)[lo - v0 * n : hi - v0 * n].astype(np.float64)

        def wide(lo: int, hi: int) -> np.ndarray:
            return flat[lo:hi].astype(np.float64)

        def errors(lo: int, hi: int) -> np.ndarray:
            return np.square(decoded(lo, hi) - wide(lo, hi))

        def signal(lo: int, hi: int) -> np.ndarray:
            return np.square(wide(lo, hi))

    return blocked_sum(numel, signal, leaf), blocked_sum(numel, errors, leaf)
