"""The randomized lattice quantizer on NumPy arrays (the encoder core; no torch).

``v`` (a flattened weight, zero-padded to a multiple of ``n``) is cut into vectors, the dither ``u`` is added,
``y = Q(v + u)`` is found on the lattice scaled by Δ, and the distinct lattice points used become the codebook
(most frequent first). The result is a :class:`udnc_fx.record.CompressedWeight`, which owns the decode
(``codebook[k] − u``; without a key the dither is zero: plain rounding) and the dither and scaling rules used here.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError
from .lattice import Lattice, get_lattice
from .record import (  # noqa: F401 (codebook_from_int, raw_dither: re-exported, their historical home)
    CompressedWeight,
    codebook_from_int,
    entropy_from_counts,
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
    "rate_bits_of_points",
    "coded_rate_of_raw_points",
    "vectors_of",
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

    Vector lattices (``n > 1``): what the default coder (``ans-dither-v1``) writes for the tensor's two sections,
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

    Args:
        values: any-shaped float array (finite).
        lattice, n: the lattice (see :func:`udnc_fx.lattice.get_lattice`).
        step: Δ > 0.
        key: the dither key (``None``: no dither, deterministic rounding).
        exact_zero: make the lattice point 0 decode to exactly 0 (pruned weights stay 0).
        u_raw: precomputed :func:`raw_dither` (speeds up repeated calls).
        raw_points: the lattice points (raw coordinates, ``num_vectors × n``) already chosen by another rounding
            rule (error-compensating rounding); ``values`` then only gives the shape. Default: nearest to ``v + u``.

    Raises:
        ConfigError: non-finite values or step, or an unknown lattice.

    Returns:
        The :class:`~udnc_fx.record.CompressedWeight` of ``values`` (shape ``values.shape``; ``codebook_int`` set).
    """
    lat = get_lattice(lattice, n)
    if not (isinstance(step, (int, float, np.floating)) and math.isfinite(step) and step > 0):
        raise ConfigError(f"step must be a finite number > 0, got {step!r}")
    v = vectors_of(values, lat.dim)
    if not np.isfinite(v).all():
        raise ConfigError("cannot quantize NaN or Inf values")
    if u_raw is None:
        u_raw = raw_dither(key, v.shape[0], lat)
    if raw_points is None:
        points = _points_at(v, u_raw, lat, step)
    else:
        points = lat.to_int(np.asarray(raw_points, dtype=np.float64).reshape(v.shape))
    uniq_points, inverse, counts = unique_rows(points)
    # Most frequent codeword first (helps byte-oriented coders); ties broken by the integer coordinates.
    order = np.lexsort(tuple(uniq_points[:, j] for j in range(lat.dim - 1, -1, -1)) + (-counts,))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    indices = rank[inverse.reshape(-1)].astype(np.int64)
    codebook_int = uniq_points[order]
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
