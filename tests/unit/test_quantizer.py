"""The linear-time codeword counting in udnc_fx.quantizer (bincount over mixed-radix codes, with a sorting
fallback for wide spans) gives exactly what np.unique on the rows gives."""

from __future__ import annotations

import numpy as np
import pytest

from udnc_fx import quantizer
from udnc_fx.lattice import get_lattice


def _reference(points):
    uniq, inverse, counts = np.unique(points, axis=0, return_inverse=True, return_counts=True)
    return uniq, inverse.reshape(-1), counts


def _as_dict(rows, counts):
    return {tuple(r): int(c) for r, c in zip(rows.tolist(), counts.tolist())}


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("spread", [3, 1000, 10**7])  # the last one is too wide for dense codes: np.unique path
def test_unique_rows_matches_numpy(n, spread):
    rng = np.random.default_rng(n * 7 + spread)
    points = np.rint(rng.standard_t(2.0, size=(5000, n)) * spread / 10).astype(np.int64)
    rows, inverse, counts = quantizer.unique_rows(points)
    ref_rows, _, ref_counts = _reference(points)
    assert _as_dict(rows, counts) == _as_dict(ref_rows, ref_counts)
    assert np.array_equal(rows[inverse], points)
    assert sorted(quantizer._count_rows(points).tolist()) == sorted(ref_counts.tolist())


@pytest.mark.parametrize("lattice, n", [("Z", 1), ("Z", 3), ("A2", 2), ("D4", 4), ("E8", 8)])
def test_quantize_array_indices_and_codebook_follow_the_documented_order(lattice, n):
    rng = np.random.default_rng(1)
    w = rng.standard_t(1.5, size=4001)
    q = quantizer.quantize_array(w, lattice=lattice, n=n, step=0.3, key=99)
    # Most frequent codeword first, ties by integer coordinates; every index decodes to its own lattice point.
    lat = get_lattice(lattice, n)
    v = quantizer.vectors_of(w, lat.dim)
    factor = float(lat.scale) * 0.3
    points = lat.to_int(quantizer._lattice_points(v, q.dither(), lat, factor))
    assert np.array_equal(q.codebook_int[q.indices], points)
    _, _, ref_counts = _reference(points)
    assert q.counts.tolist() == sorted(ref_counts.tolist(), reverse=True)
    assert all(q.counts[i] >= q.counts[i + 1] for i in range(len(q.counts) - 1))
    ent = quantizer.entropy_bits_per_weight(v, lat, 0.3, quantizer.raw_dither(99, v.shape[0], lat))
    assert ent == pytest.approx(q.entropy_bits(), rel=1e-12)
