"""The writer's test for ``lattice-coords`` (does the reader rebuild exactly these indices and codebook?) against the
rule it replaces: rebuilding both from every vector with ``lattice_coords.index_points``."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from udnc_fx.coding import lattice_coords as lc
from udnc_fx.coding.payload import _in_reader_order


def _rebuilds_exactly(cb_int: np.ndarray, indices: np.ndarray) -> bool:
    rebuilt_indices, rebuilt_points, _ = lc.index_points(cb_int[indices])
    return np.array_equal(rebuilt_points, cb_int) and np.array_equal(rebuilt_indices, indices)


@st.composite
def codebooks(draw):
    """Random codebooks and indices, and the quantizer's own (codebook, indices) of random points with one of the
    changes a caller's codebook can have: rows swapped, an unused row, a repeated row."""
    n = draw(st.integers(1, 3))
    if draw(st.booleans()):
        k = draw(st.integers(1, 6))
        cb = np.array(draw(st.lists(st.integers(-2, 2), min_size=k * n, max_size=k * n)), np.int64).reshape(k, n)
        indices = np.array(draw(st.lists(st.integers(0, k - 1), max_size=40)), np.int64)
        return cb, indices
    count = draw(st.integers(1, 40))
    points = np.array(draw(st.lists(st.integers(-2, 2), min_size=count * n, max_size=count * n)), np.int64)
    indices, cb, _ = lc.index_points(points.reshape(count, n))
    k = cb.shape[0]
    change = draw(st.sampled_from(["none", "swap", "unused", "repeat"]))
    if change == "swap" and k > 1:
        a, b = draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))
        perm = np.arange(k)
        perm[[a, b]] = perm[[b, a]]
        cb, indices = cb[perm], np.argsort(perm)[indices]  # the same points, rows in another order
    elif change == "unused":
        cb = np.concatenate([cb, np.full((1, n), 7, np.int64)])
    elif change == "repeat":
        row = draw(st.integers(0, k - 1))
        cb = np.concatenate([cb, cb[row : row + 1]])
        moved = draw(st.lists(st.integers(0, count - 1), max_size=count))
        indices = indices.copy()
        indices[[i for i in moved if indices[i] == row]] = k
    return cb, indices


@settings(max_examples=150, deadline=None)
@given(codebooks())
def test_reader_order_check_is_the_rebuild_rule(case):
    cb, indices = case
    assert _in_reader_order(cb, indices) == _rebuilds_exactly(cb, indices)


def test_quantizer_order_passes_and_any_change_fails():
    rng = np.random.default_rng(0)
    points = rng.integers(-3, 4, (500, 2))
    indices, cb, _ = lc.index_points(points)
    assert _in_reader_order(cb, indices) and _rebuilds_exactly(cb, indices)
    perm = np.array([1, 0, *range(2, cb.shape[0])])
    swapped, remapped = cb[perm], np.argsort(perm)[indices]  # the same points, two rows in the other order
    assert np.array_equal(swapped[remapped], cb[indices])
    assert not _in_reader_order(swapped, remapped) and not _rebuilds_exactly(swapped, remapped)
    unused = np.concatenate([cb, [[9, 9]]])
    assert not _in_reader_order(unused, indices)
    repeated = np.concatenate([cb, cb[-1:]])
    assert not _in_reader_order(repeated, np.append(indices, cb.shape[0]))
