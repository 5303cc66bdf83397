"""Tests of udnc_fx.lattice: nearest points against brute force, membership, integer coordinates, and the
statistics of dithered quantization (error uniform over the cell, second moment G·Δ², uncorrelated with the input).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from udnc_fx.errors import ConfigError
from udnc_fx.lattice import LATTICES, Lattice, get_lattice

ALL = [get_lattice("Z", n) for n in range(1, 9)] + [get_lattice(name) for name in ("A2", "D4", "E8")]
IDS = [lat.label for lat in ALL]
SQRT3_2 = math.sqrt(3.0) / 2.0


# ----------------------------------------------------------------------------------------------------------------
# Independent reference helpers (no use of the module's decoders)
# ----------------------------------------------------------------------------------------------------------------


def is_member(lat: Lattice, p: np.ndarray) -> np.ndarray:
    """Membership of raw points (rows of ``p``) by the textbook definitions."""
    p = np.asarray(p, dtype=np.float64).reshape(-1, lat.dim)
    if lat.name == "Z":
        return np.all(p == np.round(p), axis=1)
    if lat.name == "D4":
        return np.all(p == np.round(p), axis=1) & (np.round(p).sum(axis=1) % 2 == 0)
    if lat.name == "E8":
        integral = np.all(p == np.round(p), axis=1)
        half = np.all(p - 0.5 == np.round(p - 0.5), axis=1)
        return (integral | half) & (p.sum(axis=1) % 2 == 0)
    # A2: p = (a + b/2, b·√3/2) with integers a, b.
    b = p[:, 1] / SQRT3_2
    a = p[:, 0] - b / 2
    return (np.abs(b - np.round(b)) < 1e-9) & (np.abs(a - np.round(a)) < 1e-9)


def candidates_near(lat: Lattice, x: np.ndarray, reach: int = 1) -> np.ndarray:
    """All raw lattice points within ``reach`` integer steps per coordinate of round(x) (and of the half coset).

    A radius-1 box suffices for Z^n, D4 and E8: the nearest point is within distance 1 of x (the covering radius
    of D4 and E8 is 1), so each of its coordinates is within 1 of x's rounded coordinate (or, for the half coset,
    of floor(x) + 1/2).
    """
    if lat.name == "A2":
        b0 = round(x[1] / SQRT3_2)
        a0 = round(x[0] - b0 / 2)
        ab = np.array(list(itertools.product(range(-3, 4), repeat=2)), dtype=np.float64) + [a0, b0]
        return np.stack([ab[:, 0] + ab[:, 1] / 2, ab[:, 1] * SQRT3_2], axis=1)
    offsets = np.array(list(itertools.product(range(-reach, reach + 1), repeat=lat.dim)), dtype=np.float64)
    cands = [np.round(x) + offsets]
    if lat.name == "E8":
        cands.append(np.floor(x) + 0.5 + offsets)
    pts = np.concatenate(cands)
    return pts[is_member(lat, pts)]


def short_vectors(lat: Lattice) -> np.ndarray:
    """Nonzero raw lattice points of norm at most 4·R² (R the covering radius): the only ones whose bisector
    can cut the Voronoi cell of 0, since a point d of the cell has |d| ≤ R."""
    covering_sq = {"Z": lat.dim / 4, "A2": 1 / 3, "D4": 1.0, "E8": 1.0}[lat.name]
    if lat.name == "A2":
        pts = candidates_near(lat, np.zeros(2))
    else:
        pts = candidates_near(lat, np.zeros(lat.dim), reach=2 if lat.name != "Z" else 1)
    norms = (pts**2).sum(axis=1)
    return pts[(norms > 0) & (norms <= 4 * covering_sq + 1e-9)]


def sample_points(lat: Lattice, m: int, seed: int) -> np.ndarray:
    """Random raw points, half of them on a quarter grid so that rounding ties and equidistant cosets occur."""
    rng = np.random.default_rng(seed)
    smooth = rng.normal(scale=3.0, size=(m // 2, lat.dim))
    ties = np.round(rng.normal(scale=3.0, size=(m - m // 2, lat.dim)) * 4) / 4
    return np.concatenate([smooth, ties])


# ----------------------------------------------------------------------------------------------------------------
# Registry and constants
# ----------------------------------------------------------------------------------------------------------------


def test_registry_and_constants():
    assert LATTICES == ("Z", "A2", "D4", "E8")
    assert get_lattice("e8") is get_lattice("E8", 8)
    assert get_lattice("z", 3).dim == 3
    assert get_lattice("Z").dim == 1  # scalar quantization by default
    assert get_lattice("a2").G == pytest.approx(0.0801875, abs=1e-7)
    assert get_lattice("D4").G == pytest.approx(0.0766032, abs=1e-7)
    assert get_lattice("E8").G == pytest.approx(0.0716821, abs=1e-7)
    assert get_lattice("Z", 5).G == 1 / 12


@pytest.mark.parametrize("lat", ALL, ids=IDS)
def test_scale_gives_unit_volume(lat):
    assert lat.scale**lat.dim * lat.vol_raw == pytest.approx(1.0, rel=1e-14)
    # The fundamental box has the cell's volume.
    assert math.prod(lat.box_raw) == pytest.approx(lat.vol_raw, rel=1e-15)


@pytest.mark.parametrize(
    "name, n", [("Q", 2), ("E8", 4), ("Z", 9), ("Z", 0), ("A2", 3), ("D4", 8), ("Z", 2.5), (None, 2), ("Z", True)]
)
def test_bad_lattice_raises_config_error(name, n):
    with pytest.raises(ConfigError, match="available"):
        get_lattice(name, n)


def test_lattice_is_immutable():
    lat = get_lattice("D4")
    with pytest.raises(AttributeError):
        lat.dim = 5


@pytest.mark.parametrize("method", ["nearest_raw", "nearest", "fundamental_raw", "dither_raw", "to_int"])
def test_wrong_last_axis_raises(method):
    with pytest.raises(ConfigError, match=r"\(\.\.\., 8\)"):
        getattr(get_lattice("E8"), method)(np.zeros((3, 4)))


# ----------------------------------------------------------------------------------------------------------------
# Nearest point
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lat", ALL, ids=IDS)
def test_nearest_matches_brute_force(lat):
    x = sample_points(lat, 120, seed=lat.dim + 10 * len(lat.name))
    y = lat.nearest_raw(x)
    assert y.dtype == np.float64 and y.shape == x.shape
    assert np.all(is_member(lat, y))
    got = ((x - y) ** 2).sum(axis=1)
    for i in range(len(x)):
        cands = candidates_near(lat, x[i])
        best = ((cands - x[i]) ** 2).sum(axis=1).min()
        assert got[i] <= best + 1e-12, (x[i], y[i], best)


@pytest.mark.parametrize("lat", ALL, ids=IDS)
def test_nearest_vectorises_and_is_stable(lat):
    x = sample_points(lat, 600, seed=7)
    flat = lat.nearest_raw(x)
    stacked = lat.nearest_raw(x.reshape(3, 200, lat.dim))
    assert stacked.shape == (3, 200, lat.dim)
    np.testing.assert_array_equal(stacked.reshape(-1, lat.dim), flat)
    np.testing.assert_array_equal(lat.nearest_raw(x[5]), flat[5])  # a single vector
    # A lattice point is its own nearest point, and no -0.0 is ever produced.
    np.testing.assert_array_equal(lat.nearest_raw(flat), flat)
    assert not np.any(np.signbit(flat) & (flat == 0))


@pytest.mark.parametrize("lat", ALL, ids=IDS)
def test_nearest_unit_volume_is_scaled_raw(lat):
    x = np.random.default_rng(3).normal(size=(500, lat.dim))
    np.testing.assert_allclose(lat.nearest(x), lat.scale * lat.nearest_raw(x / lat.scale), rtol=0, atol=0)
    assert np.all(is_member(lat, lat.nearest(x) / lat.scale))


def test_documented_tie_breaking():
    z = get_lattice("Z", 3)
    np.testing.assert_array_equal(z.nearest_raw([0.5, 1.5, -0.5]), [0.0, 2.0, 0.0])  # half to even
    d4 = get_lattice("D4")
    # round -> (1, 0, 0, 0), odd sum; the largest rounding error is coordinate 0 (-0.4), so it moves back to 0.
    np.testing.assert_array_equal(d4.nearest_raw([0.6, 0.2, 0.0, 0.0]), [0.0, 0.0, 0.0, 0.0])
    # An exactly integral point with odd sum: first coordinate moves up by one.
    np.testing.assert_array_equal(d4.nearest_raw([1.0, 0.0, 0.0, 0.0]), [2.0, 0.0, 0.0, 0.0])
    e8 = get_lattice("E8")
    # (1/4, ..., 1/4) is equidistant from 0 and (1/2, ..., 1/2): the integer coset wins ties.
    np.testing.assert_array_equal(e8.nearest_raw(np.full(8, 0.25)), np.zeros(8))
    np.testing.assert_array_equal(e8.nearest_raw(np.full(8, 0.26)), np.full(8, 0.5))
    a2 = get_lattice("A2")
    # (1/4, √3/4) is equidistant from 0 and (1/2, √3/2) up to rounding; just check it is one of them.
    y = a2.nearest_raw([0.25, SQRT3_2 / 2])
    assert y.tolist() in ([0.0, 0.0], [0.5, SQRT3_2])


# ----------------------------------------------------------------------------------------------------------------
# Integer coordinates
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lat", ALL, ids=IDS)
def test_int_round_trip(lat):
    y = lat.nearest_raw(sample_points(lat, 2000, seed=11))
    ints = lat.to_int(y)
    assert ints.dtype == np.int64
    np.testing.assert_array_equal(lat.from_int(ints), y)  # bit exact
    np.testing.assert_array_equal(lat.to_int(lat.from_int(ints)), ints)
    np.testing.assert_array_equal(lat.from_int(ints.astype(np.int32)), y)


def test_int_coordinates_are_the_documented_ones():
    e8 = get_lattice("E8")
    np.testing.assert_array_equal(e8.to_int(np.full(8, 0.5)), np.ones(8, dtype=np.int64))
    a2 = get_lattice("A2")
    np.testing.assert_array_equal(a2.to_int([0.5, SQRT3_2]), [0, 1])
    np.testing.assert_array_equal(a2.from_int(np.array([2, -3])), [2 - 1.5, -3 * SQRT3_2])
    d4 = get_lattice("D4")
    np.testing.assert_array_equal(d4.to_int([1.0, -1.0, 0.0, 2.0]), [1, -1, 0, 2])


@pytest.mark.parametrize(
    "name, point",
    [
        ("D4", [1.0, 0.0, 0.0, 0.0]),  # odd sum
        ("E8", [0.5] * 7 + [1.0]),  # mixed cosets
        ("E8", [0.5] * 7 + [-0.5]),  # half coset, odd sum
        ("Z", [0.25]),
        ("Z", [np.inf]),
        ("A2", [0.25, 0.0]),
    ],
)
def test_to_int_rejects_non_members(name, point):
    lat = get_lattice(name, len(point))
    with pytest.raises(ConfigError, match="not a point"):
        lat.to_int(np.array(point))


def test_from_int_rejects_bad_input():
    with pytest.raises(ConfigError, match="integer dtype"):
        get_lattice("Z", 2).from_int(np.zeros(2))
    with pytest.raises(ConfigError, match="not a point"):
        get_lattice("E8").from_int(np.array([1] * 7 + [0]))
    with pytest.raises(ConfigError, match="not a point"):
        get_lattice("D4").from_int(np.array([1, 0, 0, 0]))


# ----------------------------------------------------------------------------------------------------------------
# Fundamental region and dither
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lat", ALL, ids=IDS)
def test_fundamental_box_formula_and_tiling(lat):
    r = np.random.default_rng(5).random((100, lat.dim))
    np.testing.assert_array_equal(lat.fundamental_raw(r), r * np.array(lat.box_raw))
    # A box of the cell's volume is a fundamental region iff no two of its points differ by a lattice vector,
    # i.e. no nonzero lattice point lies in the open box of half-widths box_raw around 0.
    w = np.array(lat.box_raw)
    pts = candidates_near(lat, np.zeros(lat.dim), reach=2)
    inside = np.all(np.abs(pts) < w - 1e-12, axis=1) & np.any(pts != 0, axis=1)
    assert not inside.any(), pts[inside]


@pytest.mark.parametrize("lat", ALL, ids=IDS)
def test_dither_is_uniform_over_voronoi_cell(lat):
    rng = np.random.default_rng(100 + lat.dim)
    m = 100_000
    r = rng.integers(0, 2**24, size=(m, lat.dim)) / 2**24  # the dither generator's grid
    d = lat.dither_raw(r)
    assert d.shape == (m, lat.dim) and d.dtype == np.float64
    if lat.name != "A2":  # exact dyadic arithmetic: every coordinate is a multiple of 2**-25
        assert np.all(d * 2**25 == np.round(d * 2**25))
    expected = lat.G * lat.vol_raw ** (2 / lat.dim)
    second = (d**2).mean()
    assert second == pytest.approx(expected, rel=0.02)
    # Mean 0 within 5 standard errors per coordinate.
    assert np.all(np.abs(d.mean(axis=0)) < 5 * math.sqrt(expected / m))
    # Every dither point is at least as close to 0 as to any lattice point that could cut the cell.
    vecs = short_vectors(lat)
    for chunk in np.array_split(d[:20_000], 10):
        assert np.all(2 * chunk @ vecs.T <= (vecs**2).sum(axis=1) + 1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Dithered quantization: error uniform over the cell, independent of the weights, whatever their distribution
# ----------------------------------------------------------------------------------------------------------------


def _source(kind: str, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    if kind == "gaussian":
        return rng.normal(size=shape)
    if kind == "laplacian":
        return rng.laplace(scale=1 / math.sqrt(2), size=shape)
    if kind == "uniform":
        return rng.uniform(-math.sqrt(3), math.sqrt(3), size=shape)
    # bimodal: an equal mixture of N(±1, 0.3²)
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    return sign + 0.3 * rng.normal(size=shape)


SOURCES = ["gaussian", "laplacian", "uniform", "bimodal"]


def dithered_stats(lat: Lattice, kind: str, seed: int = 0) -> tuple[float, float]:
    """(per-dimension MSE / (G·Δ²), pooled correlation of error with input) for one lattice and source."""
    # At least 1e5 vectors and 4e5 scalars: the correlation's standard error is then <= 0.0016, so the 0.01 bound
    # is >= 6 sigma even in one dimension (and the MSE ratio's is <= 0.15 %, against a 2 % bound).
    m = max(100_000, 400_000 // lat.dim)
    rng = np.random.default_rng([seed, lat.dim, len(lat.name), SOURCES.index(kind)])
    v = _source(kind, rng, (m, lat.dim))
    step = 0.3 * v.std()
    u = step * lat.scale * lat.dither_raw(rng.random((m, lat.dim)))
    y = step * lat.nearest((v + u) / step)
    err = (y - u) - v
    ratio = (err**2).mean() / (lat.G * step**2)
    corr = np.corrcoef(err.ravel(), v.ravel())[0, 1]
    return float(ratio), float(corr)


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("lat", ALL, ids=IDS)
def test_dithered_quantization_error_is_uniform_and_uncorrelated(lat, kind):
    ratio, corr = dithered_stats(lat, kind)
    assert ratio == pytest.approx(1.0, abs=0.02)
    assert abs(corr) < 0.01
