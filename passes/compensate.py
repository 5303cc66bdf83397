"""Error-compensating dithered rounding (the GPTQ / OBQ / LDLQ family) with a subtractive dither.

A layer computes ``y = W x``. Rounding each weight on its own makes the weight error small; what matters is the
output error ``E‖(W − Ŵ) x‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ)`` with ``H = E[x xᵀ]``. Rounding the input columns in order
and pushing each column's error onto the columns not yet rounded, weighted by the upper Cholesky factor ``U`` of
``H⁻¹`` (``H⁻¹ = Uᵀ U``), minimises that error greedily (Frantar et al., GPTQ 2022; Chee et al., LDLQ 2023).

The dither stays exactly as without compensation: each vector of ``n`` consecutive weights of a row (one lattice
vector) has its own dither ``u`` from the tensor's key, the encoder rounds the *updated* weights
``k = Q(w' + u)`` and the decoder computes ``ŵ = c[k] − u`` as always. So the file and the decoder do not change;
only which lattice point each vector gets does. Columns go in blocks of ``n`` (one lattice vector per row):
the block's error ``Δ = w' − ŵ`` (rows × n) is pushed on as ``W[:, later] −= Δ · U_bb⁻¹ · U_b,later`` (the
block form of the scalar rule ``Δ_j / U_jj · U_j,later``).

Exact zeros (``exact_zero``): the lattice point 0 decodes to exactly 0, so its error is the whole weight; vectors
that were all zero before quantization (pruned) are never given compensation (they are reset to 0 before rounding,
so they get the point 0 and stay exactly 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import PassError
from ..lattice import Lattice
from ..record import lattice_factor, scaled_dither

__all__ = ["inverse_factor", "compensated_points", "act_order", "BLOCK"]

BLOCK = 32  # columns per lazy-update block (GPTQ's trick; 32 measured 2-3x faster than 128 on 384-1536 wide layers)


def inverse_factor(h: np.ndarray, damping: float) -> tuple[np.ndarray | None, str]:
    """Upper Cholesky factor ``U`` of ``(H + λ·I)⁻¹`` in float64, with ``λ = damping · mean(diag H)``.

    Inputs that were always zero (``H_jj = 0``) get ``H_jj = 1``: nothing is known about them, so their errors are
    not pushed anywhere. If the factorisation fails the damping grows tenfold, up to five times.

    Returns:
        ``(U, note)``: ``U`` is None when ``H`` is not finite or cannot be factored; ``note`` says what was done
        (empty when nothing unusual happened).
    """
    h = np.array(h, dtype=np.float64, copy=True)
    if not np.isfinite(h).all():
        return None, "H has NaN/Inf entries (non-finite calibration activations)"
    d = h.shape[0]
    diag = np.diag(h).copy()
    dead = diag <= 0
    notes = []
    if dead.any():
        h[dead, :] = 0.0
        h[:, dead] = 0.0
        h[dead, dead] = 1.0
        notes.append(f"{int(dead.sum())} input(s) always zero")
    live = diag[~dead]
    lam = damping * (float(live.mean()) if live.size else 1.0)
    th = torch.from_numpy(h)
    eye = torch.eye(d, dtype=torch.float64)
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(th + lam * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0 and bool(torch.isfinite(u).all()):
                if attempt:
                    notes.append(f"H singular: damping raised to {lam:.3g}")
                return u.numpy(), "; ".join(notes)
        lam = lam * 10.0 if lam > 0 else 1e-8
    return None, "H could not be factored even with 1e5x damping"


def act_order(h: np.ndarray, n: int = 1) -> np.ndarray:
    """GPTQ's "act-order": the column order in which to round, inputs with the largest ``H_jj`` first.

    For an ``n``-dimensional lattice the order moves whole vectors (blocks of ``n`` consecutive columns, ranked by
    the sum of their ``H_jj``), so each lattice vector keeps its own columns and its own dither. Ties keep the
    weight's order (a stable sort): the order is a pure function of ``H``.

    Why: the columns rounded first have the most columns left to push their error onto; the inputs with the largest
    energy make the largest output error per unit of weight error, so they should be the ones compensated for, not
    the ones left to absorb the others' errors (Frantar et al. 2022, Sec. 4 of the GPTQ repository's notes).

    Returns:
        int64 permutation of ``range(d)``: round column ``perm[0]`` first.
    """
    diag = np.asarray(np.diag(h), dtype=np.float64)
    d = diag.shape[0]
    if d % n:
        raise PassError(f"{d} columns do not split into {n}-vectors")
    energy = diag.reshape(d // n, n).sum(axis=1)
    blocks = np.argsort(-energy, kind="stable")
    return (blocks[:, None] * n + np.arange(n)[None, :]).reshape(-1).astype(np.int64)


def compensated_points(
    w: np.ndarray,
    factors: list[np.ndarray],
    lat: Lattice,
    step: float,
    u_raw: np.ndarray,
    *,
    exact_zero: bool = False,
    perms: list[np.ndarray | None] | None = None,
    metric: bool = False,
) -> np.ndarray:
    """Raw lattice points ``(num_vectors, n)`` chosen by error-compensating dithered rounding.

    Args:
        w: the weight reshaped to ``(rows, groups·d)`` float64 (rows = output channels; ``d`` columns per group in
            the weight's row-major order). ``d`` must be a multiple of ``n``.
        factors: one ``(d, d)`` upper factor per group (:func:`inverse_factor`); rows are split evenly by group.
        lat, step: the lattice and Δ (the lattice is scaled by ``lat.scale · Δ``).
        u_raw: the tensor's raw dither ``(num_vectors, n)`` (:func:`udnc_fx.record.raw_dither`), vectors in
            row-major order (row ``r``, vector ``b`` is ``r·d/n + b``).
        exact_zero: the point 0 decodes to exactly 0 (see the module docstring).
        perms: per group, the order in which to round the columns (:func:`act_order`), or None for the weight's
            own order. Each factor must then be that of the *permuted* ``H`` (``H[perm][:, perm]``). Only the order
            of rounding changes: every vector keeps its own dither and its own place in the output.
        metric: for ``n > 1``, give each vector the point that adds least to the output error (see
            :func:`_metric_points`) instead of the Euclidean nearest point. Ignored for ``n = 1``.

    Returns:
        float64 raw points, same layout as ``u_raw``: ``codebook[k] − dither`` of the result is what decoders see.
    """
    rows, d = w.shape
    groups = len(factors)
    n = lat.dim
    if d % n or rows % groups:
        raise PassError(f"a {rows}x{d} weight does not split into {groups} groups of rows of whole {n}-vectors")
    factor = lattice_factor(lat, step)
    # The decoder subtracts float32(Δ·u); the feedback uses the same numbers in float64 (its own rounding of
    # c[k] − u to float32 would change the pushed error by ~1e-7 relative: irrelevant to which point is chosen).
    dither = scaled_dither(u_raw, factor).astype(np.float64).reshape(rows, d // n, n)
    nearest = (lambda x: np.round(x) + 0.0) if lat.name == "Z" else lat.nearest_raw
    out = np.empty((rows, d // n, n), dtype=np.float64)
    per_group = rows // groups
    for g, U in enumerate(factors):
        r0, r1 = g * per_group, (g + 1) * per_group
        perm = None if perms is None else perms[g]
        if perm is not None:
            perm = np.asarray(perm, dtype=np.int64)
            if perm.shape != (d,) or not np.array_equal(np.sort(perm), np.arange(d)) or (
                n > 1 and not np.array_equal(perm.reshape(-1, n), perm.reshape(-1, n)[:, :1] + np.arange(n))
            ) or (n > 1 and (perm[::n] % n).any()):
                raise PassError(f"column order of group {g} is not a permutation of whole {n}-vectors of {d} columns")
        wg = w[r0:r1] if perm is None else w[r0:r1][:, perm]
        bperm = None if perm is None else perm[::n] // n  # the order of the lattice vectors of a row
        if n == 1:
            pts = _scalar_points(wg, U, dither[r0:r1, :, 0] if perm is None else dither[r0:r1, perm, 0], factor,
                                 exact_zero).T
            if perm is None:
                out[r0:r1, :, 0] = pts
            else:
                out[r0:r1, perm, 0] = pts
            continue
        W = np.array(wg, dtype=np.float64, copy=True)
        dg = dither[r0:r1] if bperm is None else dither[r0:r1][:, bperm]
        og = np.empty((r1 - r0, d // n, n), dtype=np.float64)
        pruned = None
        if exact_zero:
            pruned = ~W.reshape(W.shape[0], d // n, n).any(axis=2)  # all-zero vectors: keep them exactly 0
            if not pruned.any():
                pruned = None
        # 1/U_bb for every block of n columns, computed once (n = 1: a scalar division)
        inv_blocks = [np.linalg.inv(U[j : j + n, j : j + n]) for j in range(0, d, n)] if n > 1 else None
        S = short_vectors(lat) if metric and n > 1 else None
        inv_diag = 1.0 / np.diag(U) if n == 1 else None
        block = max(n, BLOCK // n * n)  # whole lattice vectors per block
        for i1 in range(0, d, block):
            i2 = min(i1 + block, d)
            W1 = W[:, i1:i2]  # a view: updated in place
            U1 = U[i1:i2, i1:i2]
            err = np.zeros_like(W1)
            for j in range(0, i2 - i1, n):
                b = (i1 + j) // n
                col = W1[:, j : j + n]
                if pruned is not None:
                    col[pruned[:, b]] = 0.0
                u = dg[:, b]
                point = nearest((col + u) / factor)
                if S is not None:
                    point = _metric_points(point, (col + u) / factor, col / factor if exact_zero else None,
                                           inv_blocks[b], S)
                    if pruned is not None:
                        point[pruned[:, b]] = 0.0  # pruned vectors keep the point 0 (their exact zero)
                    if lat.name == "A2":  # b·fl(√3/2) + fl(√3/2) may miss (b + 1)·fl(√3/2) by an ulp
                        point = lat.from_int(lat.to_int(point))
                decoded = point * factor - u
                if exact_zero:
                    decoded[~point.any(axis=1)] = 0.0
                og[:, b] = point
                if n == 1:
                    e = (col - decoded) * inv_diag[i1 + j]
                else:
                    e = (col - decoded) @ inv_blocks[b]
                if j + n < i2 - i1:
                    W1[:, j + n :] -= e @ U1[j : j + n, j + n :]
                err[:, j : j + n] = e
            if i2 < d:
                W[:, i2:] -= err @ U[i1:i2, i2:]
        if bperm is None:
            out[r0:r1] = og
        else:
            out[r0:r1][:, bperm] = og
    return out.reshape(-1, n)


def _scalar_points(w: np.ndarray, U: np.ndarray, dither: np.ndarray, factor: float, exact_zero: bool) -> np.ndarray:
    """:func:`compensated_points` for one group of a scalar lattice (``Z¹``), returning the points transposed
    ``(d, rows)``. The same arithmetic as the vector path, on the transposed weight: a column is then a contiguous
    row, and the per-column update is an outer product over contiguous memory (2-3x faster on 384-1536 wide layers
    than strided columns)."""
    d = w.shape[1]
    WT = np.array(w.T, dtype=np.float64, order="C")  # (d, rows)
    DT = np.ascontiguousarray(dither.T)
    pruned = (WT == 0.0) if exact_zero else None  # zero weights before quantization stay exactly 0
    if pruned is not None and not pruned.any():
        pruned = None
    out = np.empty_like(WT)
    inv_diag = 1.0 / np.diag(U)
    for i1 in range(0, d, BLOCK):
        i2 = min(i1 + BLOCK, d)
        W1 = WT[i1:i2]  # a view: updated in place
        U1 = U[i1:i2, i1:i2]
        err = np.empty_like(W1)
        for j in range(i2 - i1):
            col = W1[j]
            if pruned is not None:
                col[pruned[i1 + j]] = 0.0
            u = DT[i1 + j]
            point = np.round((col + u) / factor) + 0.0
            decoded = point * factor - u
            if exact_zero:
                decoded[point == 0.0] = 0.0
            out[i1 + j] = point
            e = (col - decoded) * inv_diag[i1 + j]
            if j + 1 < i2 - i1:
                W1[j + 1 :] -= U1[j, j + 1 :, None] * e[None, :]
            err[j] = e
        if i2 < d:
            WT[i2:] -= U[i1:i2, i2:].T @ err
    return out


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` per row: the mean squared layer-output error the rounding caused."""
    diff = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.einsum("ij,jk,ik->", diff, h, diff) / diff.shape[0]) if math.prod(diff.shape) else 0.0


_SHORT: dict[str, np.ndarray] = {}
METRIC_SEARCH = 4  # local-search moves per vector (MiniLM E8/D4: a second move changes < 1e-4 of the error)
METRIC_ROWS = 16384  # rows scored at once (a rows × 240 float64 score matrix for E8)


def _grid(values: tuple[int, ...], n: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.int64)
    return np.stack(np.meshgrid(*([v] * n), indexing="ij"), axis=-1).reshape(-1, n)


def short_vectors(lat: Lattice) -> np.ndarray:
    """The nonzero raw lattice vectors of smallest norm (E8: 240, D4: 24, A2: 6, ``Z^n``: ``2n``), in a fixed
    order (the lexicographic order of their integer coordinates: ties in :func:`_metric_points` go to the first)."""
    if lat.label not in _SHORT:
        n = lat.dim
        if lat.name == "E8":  # integer coordinates are twice the raw ones: all even or all odd, sum ≡ 0 (mod 4)
            ints = np.concatenate([_grid(v, n) for v in ((-2, 0, 2), (-1, 1))])
            ints = ints[ints.sum(axis=1) % 4 == 0]
        else:
            ints = _grid((-1, 0, 1), n)
            if lat.name == "D4":
                ints = ints[ints.sum(axis=1) % 2 == 0]
        pts = lat.from_int(ints)
        norm = np.einsum("ij,ij->i", pts, pts)
        least = norm[norm > 0.5].min()  # A2's norms are 1 and 3 up to rounding; the others' are exact
        _SHORT[lat.label] = pts[np.abs(norm - least) < 1e-9]
    return _SHORT[lat.label]


def _metric_points(point: np.ndarray, y: np.ndarray, zero_y: np.ndarray | None, A: np.ndarray,
                   S: np.ndarray) -> np.ndarray:
    """Lattice points minimising a block's share of the output error, by local search from the nearest point.

    The block LDL pushes a block's error ``Δ = col − ŵ`` on as ``e = Δ · A`` with ``A = U_bb⁻¹``, and the layer's
    output error is the sum of ``‖e‖²`` over the blocks, so the point that costs least is the one nearest to
    ``y = (col + u)/factor`` in the metric ``‖(y − p) · A‖²`` (in units of ``factor²``), not in the Euclidean one
    (they agree when ``A`` is a multiple of an orthogonal matrix, i.e. when the block's columns are uncorrelated).
    From the Euclidean nearest point, each row moves to the best of its neighbours ``p + s`` (``s`` in
    :func:`short_vectors`) while that is strictly better, at most :data:`METRIC_SEARCH` times. The rule commutes
    with lattice translations (``y → y + λ`` gives ``p → p + λ``), so with the subtractive dither the error is still
    independent of the weight and uniform over one cell of the lattice's volume: same rate, less output error.

    ``zero_y``: with ``exact_zero``, ``col/factor``: the point 0 decodes to exactly 0, so its cost is ``‖zero_y·A‖²``.
    """
    T = S @ A
    T2 = -2.0 * T.T  # exact (a power of two): r @ T2 == -2·(r @ Tᵀ)
    TT = np.einsum("ij,ij->i", T, T)
    smax = float(np.einsum("ij,ij->i", S, S).max()) + 1e-9
    out = point.copy()
    for c0 in range(0, out.shape[0], METRIC_ROWS):
        cur = out[c0 : c0 + METRIC_ROWS]  # a view: moved in place
        yc = y[c0 : c0 + METRIC_ROWS]
        zc_all = None if zero_y is None else zero_y[c0 : c0 + METRIC_ROWS]
        rows = np.arange(cur.shape[0])
        for _ in range(METRIC_SEARCH):
            r = (yc[rows] - cur[rows]) @ A
            score = r @ T2
            score += TT  # ‖r − s·A‖² − ‖r‖² for every neighbour s
            here = np.zeros(rows.size)  # the current point's cost, on the same scale
            if zc_all is not None:
                z = zc_all[rows] @ A
                zc = np.einsum("ij,ij->i", z, z) - np.einsum("ij,ij->i", r, r)
                c = cur[rows]
                here = np.where(c.any(axis=1), here, zc)
                near = np.flatnonzero(np.einsum("ij,ij->i", c, c) <= smax)  # rows with 0 among the neighbours
                if near.size:
                    rr, cc = np.nonzero(np.all(c[near][:, None, :] + S[None] == 0.0, axis=2))
                    score[near[rr], cc] = zc[near[rr]]
            best = np.argmin(score, axis=1)
            move = score[np.arange(rows.size), best] < here
            if not move.any():
                break
            rows = rows[move]
            cur[rows] += S[best[move]]
    return out
