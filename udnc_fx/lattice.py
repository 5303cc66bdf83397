"""Lattices for randomized (dithered) lattice quantization: ``Z^n`` (n = 1..8), ``A2``, ``D4`` and ``E8``.

NumPy only, so a deployment can regenerate dithers and decode without torch.

Two coordinate systems:

* **raw** coordinates are the standard ones of Conway & Sloane (SPLAG ch. 4): ``Z^n`` is the integer vectors,
  ``D4`` the integer vectors with even coordinate sum, ``E8`` the integer or all-half-integer vectors with even
  sum, ``A2`` the points ``(a + b/2, b·√3/2)`` for integers ``a, b``. Raw points of ``Z^n``, ``D4`` and ``E8`` are
  dyadic rationals, so they and everything the dither computes from them are exact in float64.
* **unit-volume** coordinates are ``scale · raw`` with ``scale = vol_raw ** (-1/n)``, so every lattice has a
  Voronoi cell of volume 1 and the same step Δ means the same rate whichever lattice is used; at equal rate the
  per-dimension distortion is then ``G · Δ²`` with ``G`` the lattice's normalized second moment.

Nearest-point search follows Conway & Sloane, "Fast quantizing and decoding algorithms for lattice quantizers and
codes" (IEEE Trans. IT-28, 1982) and SPLAG ch. 20:

* ``Z^n``: round every coordinate.
* ``D_n``: round; if the coordinate sum is odd, re-round the other way the coordinate with the largest rounding
  error.
* ``E8 = D8 ∪ (D8 + ½·1)``: decode both cosets with the ``D_n`` decoder and keep the closer.
* ``A2 = (Z × √3Z) ∪ ((½, √3/2) + Z × √3Z)``: round to each rectangular coset and keep the closer.

Tie-breaking is deterministic and part of the file format (the dither depends on it):

* rounding is ``np.round``, i.e. round half to even (ONNX ``Round`` does the same);
* in ``D_n`` the coordinate re-rounded is the first index of largest ``|x_i - round(x_i)|`` (``np.argmax``), and it
  moves by ``+1`` when ``x_i - round(x_i) >= 0`` (so an exactly integral coordinate moves up), else by ``-1``;
* between two cosets (``E8``, ``A2``) the second coset (half-integer ``E8`` points, odd-``b`` ``A2`` points) is
  chosen only when it is strictly closer. The comparison is done as
  ``sum((y1 - y0) * (2x - y0 - y1)) > 0``, which equals ``|x - y0|² - |x - y1|²`` but, for ``E8`` inputs on a
  grid of ``2**-24`` with ``|x_i| < 2**20`` (all dither inputs), is computed exactly in float64 in any summation
  order (every term is a multiple of ``2**-24`` of magnitude at most 4).

Returned raw points never contain ``-0.0`` (a signed zero would make byte comparisons of equal points fail).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import ConfigError

__all__ = ["Lattice", "get_lattice", "LATTICES", "SQRT3", "SQRT3_2"]

#: Names of the available lattice families (``get_lattice`` also accepts them in lower case).
LATTICES: tuple[str, ...] = ("Z", "A2", "D4", "E8")

_Z_MAX_DIM = 8

#: √3/2 in float64 (0.8660254037844386): the height of the A2 basis vector (1/2, √3/2). Every A2 coordinate that
#: involves it is computed as ``b * SQRT3_2`` (one correctly rounded float64 product) so that points, their integer
#: coordinates and the fundamental region agree bit for bit.
SQRT3_2 = math.sqrt(3.0) / 2.0
SQRT3 = math.sqrt(3.0)  # == 2 * SQRT3_2 exactly (halving and doubling are exact)


# ----------------------------------------------------------------------------------------------------------------
# Nearest-point kernels on 2-D arrays (m, n) of float64 raw coordinates. Each returns a new float64 array.
# ----------------------------------------------------------------------------------------------------------------


def _nearest_z(x: np.ndarray) -> np.ndarray:
    return np.round(x) + 0.0  # + 0.0 turns -0.0 into +0.0


def _nearest_dn(x: np.ndarray) -> np.ndarray:
    f = np.round(x)
    # The sum of rounded coordinates is a sum of integers, exact in float64 below 2**53.
    odd = np.remainder(f.sum(axis=1), 2.0) != 0.0
    if odd.any():
        rows = np.flatnonzero(odd)
        err = x[rows] - f[rows]
        k = np.argmax(np.abs(err), axis=1)
        err_k = err[np.arange(rows.size), k]
        # The coordinate whose rounding was least certain pays for fixing the parity: moving it the other way
        # costs the least extra distance (Conway & Sloane's w(x)).
        f[rows, k] += np.where(err_k >= 0.0, 1.0, -1.0)
    return f + 0.0


def _pick_closer(x: np.ndarray, y0: np.ndarray, y1: np.ndarray) -> np.ndarray:
    # |x-y0|² - |x-y1|² = Σ (y1-y0)(2x-y0-y1): each term is small and, for dyadic x, exact, so the choice does not
    # depend on float rounding or on the order in which an implementation sums (ONNX ReduceSum, NumPy pairwise).
    gap = np.einsum("ij,ij->i", y1 - y0, 2.0 * x - y0 - y1)
    return np.where((gap > 0.0)[:, None], y1, y0)


def _nearest_e8(x: np.ndarray) -> np.ndarray:
    y0 = _nearest_dn(x)
    y1 = _nearest_dn(x - 0.5) + 0.5
    return _pick_closer(x, y0, y1)


def _nearest_a2(x: np.ndarray) -> np.ndarray:
    x0 = x[:, 0]
    x1 = x[:, 1]
    # Coset 0: b = 2j even, point (i, j·√3). Coset 1: b = 2j + 1 odd, point (i + 1/2, (2j + 1)·√3/2).
    j0 = np.round(x1 / SQRT3)
    j1 = np.round((x1 - SQRT3_2) / SQRT3)
    y0 = np.stack([np.round(x0), (2.0 * j0) * SQRT3_2], axis=1)
    y1 = np.stack([np.round(x0 - 0.5) + 0.5, (2.0 * j1 + 1.0) * SQRT3_2], axis=1)
    return _pick_closer(x, y0, y1) + 0.0


_NEAREST: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Z": _nearest_z,
    "A2": _nearest_a2,
    "D4": _nearest_dn,
    "E8": _nearest_e8,
}


# ----------------------------------------------------------------------------------------------------------------
# The public class
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lattice:
    """One lattice, with nearest-point search, a Voronoi-uniform dither and integer coordinates.

    Instances are immutable; get them from :func:`get_lattice`.

    Attributes:
        name: family name, ``"Z"``, ``"A2"``, ``"D4"`` or ``"E8"``.
        dim: the dimension ``n``.
        scale: ``vol_raw ** (-1/n)`` (float64): multiplies raw coordinates into unit-volume ones.
        G: normalized second moment: ``1/12`` (``Z^n``), ``5/(36·√3)`` (``A2``), ``13/(120·√2)`` (``D4``),
            ``929/12960`` (``E8``). The per-dimension second moment of the unit-volume Voronoi cell.
        vol_raw: volume of a Voronoi cell in raw coordinates: 1 (``Z^n``, ``E8``), √3/2 (``A2``), 2 (``D4``).
        box_raw: the side lengths ``w`` of the box ``[0, w_0) × … × [0, w_{n-1})`` that is a fundamental region of
            the raw lattice (see :meth:`fundamental_raw`); its volume is ``vol_raw``.
    """

    name: str
    dim: int
    scale: float
    G: float
    vol_raw: float
    box_raw: tuple[float, ...]

    # -- helpers --------------------------------------------------------------------------------------------------

    def _as_rows(self, x: np.ndarray, what: str) -> tuple[np.ndarray, tuple[int, ...]]:
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim == 0 or arr.shape[-1] != self.dim:
            raise ConfigError(
                f"{what} must have shape (..., {self.dim}) for lattice {self.label}, got shape {np.shape(x)}"
            )
        return arr.reshape(-1, self.dim), arr.shape

    @property
    def label(self) -> str:
        """Display name: ``"Z4"`` for ``Z^4``, else the family name (``"E8"``)."""
        return f"Z{self.dim}" if self.name == "Z" else self.name

    # -- nearest point --------------------------------------------------------------------------------------------

    def nearest_raw(self, x: np.ndarray) -> np.ndarray:
        """Nearest lattice point in raw coordinates.

        Args:
            x: array ``(..., dim)`` of raw coordinates (converted to float64). Non-finite inputs give
                meaningless results (not checked: this runs on every weight).

        Returns:
            float64 array ``(..., dim)``: the nearest raw lattice point of each vector, with exact coordinates
            (integers or half-integers; for ``A2``, ``(a + b/2, b * fl(√3/2))``). Ties are broken as the module
            docstring describes.

        Raises:
            ConfigError: if the last axis is not ``dim`` long.
        """
        rows, shape = self._as_rows(x, "x")
        return _NEAREST[self.name](rows).reshape(shape)

    def nearest(self, x: np.ndarray) -> np.ndarray:
        """Nearest lattice point in unit-volume coordinates: ``scale * nearest_raw(x / scale)``.

        Args:
            x: array ``(..., dim)`` in unit-volume coordinates.

        Returns:
            float64 array ``(..., dim)``.
        """
        rows, shape = self._as_rows(x, "x")
        if self.scale == 1.0:
            return _NEAREST[self.name](rows).reshape(shape)
        return (self.scale * _NEAREST[self.name](rows / self.scale)).reshape(shape)

    # -- dither ---------------------------------------------------------------------------------------------------

    def fundamental_raw(self, r: np.ndarray) -> np.ndarray:
        """Map ``r`` uniform in ``[0, 1)^dim`` to a point uniform over a fundamental region of the raw lattice.

        File-format contract (an ONNX graph reproduces it as one ``Mul``): ``x = r * box_raw``, elementwise, with

        * ``Z^n``: ``x = r`` (box ``[0,1)^n``);
        * ``D4``: ``x = (r0, r1, r2, 2·r3)`` (box ``[0,1)^3 × [0,2)``);
        * ``E8``: ``x = (r0/2, r1, r2, r3, r4, r5, r6, 2·r7)`` (box ``[0,½) × [0,1)^6 × [0,2)``);
        * ``A2``: ``x = (r0, r1 · 0.8660254037844386)`` (box ``[0,1) × [0,√3/2)``; the factor is float64 √3/2).

        Each box is a fundamental region because the lattice has a triangular basis whose diagonal is the box's
        sides (``E8``: ``(½,…,½)``, ``e_k - e_8`` for k = 2..7, ``2·e_8``; ``D4``: ``e_k - e_4``, ``2·e_4``;
        ``A2``: ``(1, 0)``, ``(½, √3/2)``): reducing one coordinate at a time picks exactly one representative.
        For ``Z^n``, ``D4`` and ``E8`` the products are by 1, ½ or 2, hence exact in float64 (and float32).

        Args:
            r: array ``(..., dim)``, values in ``[0, 1)`` (not checked; values outside still give a valid dither,
                just not a uniform one).

        Returns:
            float64 array ``(..., dim)``.
        """
        rows, shape = self._as_rows(r, "r")
        return (rows * np.asarray(self.box_raw, dtype=np.float64)).reshape(shape)

    def dither_raw(self, r: np.ndarray) -> np.ndarray:
        """Voronoi-uniform dither in raw coordinates: ``x = fundamental_raw(r)``, return ``x - nearest_raw(x)``.

        A uniform point of a fundamental region, reduced modulo the lattice, is uniform over the Voronoi cell of
        0. For ``Z^n``, ``D4`` and ``E8`` with ``r`` on a grid of ``2**-24`` (the dither generator's output) every
        step is exact in float64, so any implementation that follows the same operations gets the same bits.

        Args:
            r: array ``(..., dim)`` uniform in ``[0, 1)``.

        Returns:
            float64 array ``(..., dim)`` of raw dither vectors.
        """
        rows, shape = self._as_rows(r, "r")
        x = rows * np.asarray(self.box_raw, dtype=np.float64)
        return (x - _NEAREST[self.name](x)).reshape(shape)

    # -- integer coordinates --------------------------------------------------------------------------------------

    def to_int(self, raw_points: np.ndarray) -> np.ndarray:
        """Integer coordinates of raw lattice points, for compact storage.

        ``Z^n``, ``D4``: the coordinates themselves. ``E8``: twice the coordinates. ``A2``: the basis coefficients
        ``(a, b)`` with ``point = a·(1, 0) + b·(½, √3/2)``.

        Args:
            raw_points: array ``(..., dim)`` of raw lattice points, e.g. from :meth:`nearest_raw`.

        Returns:
            int64 array ``(..., dim)``.

        Raises:
            ConfigError: on a wrong last axis or if some vector is not a lattice point (for ``Z^n``, ``D4``, ``E8``
                exactly; for ``A2`` the first coordinate exactly and the second within ``1e-9`` relative).
        """
        rows, shape = self._as_rows(raw_points, "raw_points")
        if self.name == "A2":
            b = np.rint(rows[:, 1] / SQRT3_2)
            a = np.rint(rows[:, 0] - 0.5 * b)
            ok = (a + 0.5 * b == rows[:, 0]) & (
                np.abs(b * SQRT3_2 - rows[:, 1]) <= 1e-9 * np.maximum(1.0, np.abs(rows[:, 1]))
            )
            ints = np.stack([a, b], axis=1)
        else:
            doubled = rows * 2.0 if self.name == "E8" else rows
            ints = np.rint(doubled)
            ok = np.all(ints == doubled, axis=1)
        ok &= np.all(np.isfinite(ints), axis=1)  # rint(inf) == inf would otherwise pass and cast to garbage
        if not np.all(ok):
            bad = int(np.flatnonzero(~ok)[0])
            raise ConfigError(
                f"raw_points[{bad}] = {rows[bad].tolist()} is not a point of {self.label} "
                "(quantize with nearest_raw first)"
            )
        out = ints.astype(np.int64)
        self._check_int_members(out)
        return out.reshape(shape)

    def from_int(self, ints: np.ndarray) -> np.ndarray:
        """Raw lattice points from integer coordinates: the inverse of :meth:`to_int`.

        ``Z^n``, ``D4``: ``float64(ints)``. ``E8``: ``ints / 2``. ``A2``: ``(a + b/2, b * fl(√3/2))``.

        Args:
            ints: integer array ``(..., dim)``.

        Returns:
            float64 array ``(..., dim)``.

        Raises:
            ConfigError: on a non-integer dtype, a wrong last axis, or coordinates of no lattice point (odd sum for
                ``D4``; mixed parity or ``sum % 4 != 0`` for ``E8``).
        """
        arr = np.asarray(ints)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"ints must have an integer dtype, got {arr.dtype}")
        if arr.ndim == 0 or arr.shape[-1] != self.dim:
            raise ConfigError(f"ints must have shape (..., {self.dim}) for lattice {self.label}, got {arr.shape}")
        rows = arr.reshape(-1, self.dim).astype(np.int64)
        self._check_int_members(rows)
        if self.name == "A2":
            a = rows[:, 0].astype(np.float64)
            b = rows[:, 1].astype(np.float64)
            out = np.stack([a + 0.5 * b, b * SQRT3_2], axis=1) + 0.0
        elif self.name == "E8":
            out = rows.astype(np.float64) * 0.5
        else:
            out = rows.astype(np.float64)
        return out.reshape(arr.shape)

    def _check_int_members(self, rows: np.ndarray) -> None:
        if self.name == "D4":
            ok = rows.sum(axis=1) % 2 == 0
        elif self.name == "E8":
            parity = rows % 2
            ok = np.all(parity == parity[:, :1], axis=1) & (rows.sum(axis=1) % 4 == 0)
        else:
            return
        if not np.all(ok):
            bad = int(np.flatnonzero(~ok)[0])
            raise ConfigError(f"integer coordinates {rows[bad].tolist()} are not a point of {self.label}")


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------


def _make(name: str, dim: int, vol_raw: float, G: float, box_raw: tuple[float, ...]) -> Lattice:
    return Lattice(
        name=name, dim=dim, scale=float(vol_raw ** (-1.0 / dim)), G=float(G), vol_raw=float(vol_raw), box_raw=box_raw
    )


_REGISTRY: dict[tuple[str, int], Lattice] = {
    **{("Z", n): _make("Z", n, 1.0, 1.0 / 12.0, (1.0,) * n) for n in range(1, _Z_MAX_DIM + 1)},
    ("A2", 2): _make("A2", 2, SQRT3_2, 5.0 / (36.0 * math.sqrt(3.0)), (1.0, SQRT3_2)),
    ("D4", 4): _make("D4", 4, 2.0, 13.0 / (120.0 * math.sqrt(2.0)), (1.0, 1.0, 1.0, 2.0)),
    ("E8", 8): _make("E8", 8, 1.0, 929.0 / 12960.0, (0.5,) + (1.0,) * 6 + (2.0,)),
}

_OWN_DIM = {"A2": 2, "D4": 4, "E8": 8}


def get_lattice(name: str, n: int | None = None) -> Lattice:
    """The lattice called ``name`` in dimension ``n``.

    Args:
        name: ``"Z"``, ``"A2"``, ``"D4"`` or ``"E8"``, case-insensitive.
        n: dimension. ``"Z"`` takes 1..8 and defaults to 1 (scalar quantization) when ``None``; ``"A2"``, ``"D4"``
            and ``"E8"`` accept ``None`` or their own dimension.

    Returns:
        The (shared, immutable) :class:`Lattice`.

    Raises:
        ConfigError: for an unknown name or a dimension the lattice does not have.
    """
    available = "available: Z (n = 1..8), A2 (n = 2), D4 (n = 4), E8 (n = 8)"
    if not isinstance(name, str):
        raise ConfigError(f"lattice name must be a string, got {name!r}; {available}")
    key = name.strip().upper()
    if key not in LATTICES:
        raise ConfigError(f"unknown lattice {name!r}; {available}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer))):
        raise ConfigError(f"lattice dimension n must be an integer or None, got {n!r}; {available}")
    if key == "Z":
        dim = 1 if n is None else int(n)
        if not 1 <= dim <= _Z_MAX_DIM:
            raise ConfigError(f"lattice Z has dimensions 1..{_Z_MAX_DIM}, got n = {dim}; {available}")
    else:
        dim = _OWN_DIM[key]
        if n is not None and int(n) != dim:
            raise ConfigError(f"lattice {key} has dimension {dim} only, got n = {int(n)}; {available}")
    return _REGISTRY[(key, dim)]
