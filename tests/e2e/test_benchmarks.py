"""Smoke test of the benchmarks' theory part on small sizes (slow: not in the default run; ``pytest -m slow``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_theory_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import theory

    res = theory.run(4000, [2.0], lattices=[("Z", 1), ("D4", 4)], sources=["gaussian", "laplacian"],
                     log=lambda *a: None)
    rows = res["rows"]
    assert len(rows) == 4
    for r in rows:
        # dithered error is uniform over the cell whatever the source: D ≈ G·Δ²
        assert r["D_over_G_step2"] == pytest.approx(1.0, abs=0.1)
        # real coder output can never beat the order-0 entropy by more than rounding, nor the Shannon lower bound
        assert r["coded_indices"] >= r["H0"] - 0.02
        assert r["coded_total"] > r["slb"]
        assert r["encoding"] in ("lattice-int", "lattice-int-coded", "lattice-coords")
    z1 = [r for r in rows if r["lattice"] == "Z1"]
    for r in z1:
        assert r["space_filling_loss"] == pytest.approx(0.5 * math.log2(2 * math.pi * math.e / 12), abs=1e-9)
        assert 0.1 < r["gap_total"] < 1.0
    text = theory.report(res, tmp_path)
    assert "| gaussian | Z1 |" in text
    assert "D4" in text
