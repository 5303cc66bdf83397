"""The per-layer affine correction fitted to fine-tuned codewords (``passes.finetune.fit_affine``): least squares
weighted by use counts, the exact-zero and unused codewords left out, float32 results."""

from __future__ import annotations

import numpy as np
import pytest

from udnc_fx.passes.finetune import fit_affine


def test_fit_recovers_scale_and_offset_weighted_by_use():
    rng = np.random.default_rng(0)
    points = rng.integers(-4, 5, size=(40, 8)).astype(np.float64) * 0.1
    points[3] = 0.0
    counts = rng.integers(1, 50, size=40)
    tuned = 1.07 * points - 0.02
    tuned[3] = 5.0  # the zero point's codeword is never used by the fit (it decodes to exactly 0)
    a, b = fit_affine(points, tuned, counts, zero_index=3)
    assert a == pytest.approx(1.07, abs=1e-6) and b == pytest.approx(-0.02, abs=1e-6)
    assert float(np.float32(a)) == a and float(np.float32(b)) == b  # what the file stores
    # noise on a rarely used codeword moves the fit less than the same noise on a frequent one
    rare, frequent = tuned.copy(), tuned.copy()
    counts[0], counts[1] = 1, 1000
    rare[0] += 1.0
    frequent[1] += 1.0
    a_rare, _ = fit_affine(points, rare, counts, 3)
    a_freq, _ = fit_affine(points, frequent, counts, 3)
    assert abs(a_rare - 1.07) < abs(a_freq - 1.07)
    # an unused codeword is ignored whatever it holds
    counts[5] = 0
    moved = tuned.copy()
    moved[5] += 100.0
    assert fit_affine(points, moved, counts, 3) == fit_affine(points, tuned, counts, 3)


def test_no_fit_when_nothing_determines_it():
    points = np.zeros((3, 2))
    assert fit_affine(points, points + 1, np.array([1, 2, 3])) is None  # all points equal: no slope
    pts = np.arange(6.0).reshape(3, 2)
    assert fit_affine(pts, pts, np.zeros(3, np.int64)) is None  # nothing used
    assert fit_affine(pts, 0 * pts, np.ones(3, np.int64)) is None  # a = 0 is no correction
