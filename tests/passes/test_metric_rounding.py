"""Metric-aware lattice points for compensated rounding with vector lattices (``metric_rounding``).

The reference is the definition, computed the slow way: for every row and block, each candidate point (the
Euclidean nearest point and its neighbours, moved until no neighbour is better) is scored by the layer's output
error that remains after the later columns are re-solved by least squares, exactly as ``ls_reference`` in
``test_compensate.py`` does for the Euclidean rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import udnc_fx
from udnc_fx import CompressConfig, ConfigError
from udnc_fx.dither import tensor_key
from udnc_fx.lattice import get_lattice
from udnc_fx.passes.compensate import act_order, compensated_points, inverse_factor, output_error, short_vectors
from udnc_fx.passes.materialize import served_params
from udnc_fx.quantizer import _count_rows, entropy_from_counts, raw_dither

from test_compensate import correlated_inputs


def brute_force_reference(W, X, damping, lat, step, u_raw, exact_zero=False, search=4):
    """Sequential dithered rounding where each vector takes, by local search over the neighbours of the Euclidean
    nearest point, the point that leaves the least output error after the later columns are re-solved by least
    squares (scored row by row and candidate by candidate)."""
    rows, d = W.shape
    n = lat.dim
    N = X.shape[0]
    H = X.T @ X / N
    lam = damping * float(np.mean(np.diag(H)))
    Xa = np.vstack([X / math.sqrt(N), math.sqrt(lam) * np.eye(d)])
    target = Xa @ W.T  # (N + d, rows)
    factor = float(lat.scale) * step
    u = (u_raw * factor).astype(np.float32).astype(np.float64).reshape(rows, d // n, n)
    S = short_vectors(lat)
    cur = W.copy()
    what = np.zeros_like(W)
    points = np.zeros((rows, d // n, n))
    for b in range(d // n):
        lo, hi = b * n, b * n + n
        if hi < d:
            Q, _ = np.linalg.qr(Xa[:, hi:])
        for r in range(rows):
            y = (cur[r, lo:hi] + u[r, b]) / factor

            def cost(p, r=r, b=b, lo=lo, hi=hi):
                dec = np.zeros(n) if exact_zero and not p.any() else p * factor - u[r, b]
                res = target[:, r] - Xa[:, :lo] @ what[r, :lo] - Xa[:, lo:hi] @ dec
                if hi < d:
                    res = res - Q @ (Q.T @ res)  # the best the later columns can do
                return float(res @ res)

            p = lat.nearest_raw(y[None])[0]
            for _ in range(search):
                costs = [cost(p + s) for s in S]
                k = int(np.argmin(costs))
                if not costs[k] < cost(p):
                    break
                p = p + S[k]
            points[r, b] = p
            what[r, lo:hi] = 0.0 if exact_zero and not p.any() else p * factor - u[r, b]
        if hi < d:
            rhs = target - Xa[:, :hi] @ what[:, :hi].T
            sol, *_ = np.linalg.lstsq(Xa[:, hi:], rhs, rcond=None)
            cur[:, hi:] = sol.T
    return points.reshape(-1, n), what


def test_short_vectors_are_the_minimal_vectors():
    for name, count, norm in (("E8", 240, 2.0), ("D4", 24, 2.0), ("A2", 6, 1.0)):
        lat = get_lattice(name)
        S = short_vectors(lat)
        assert S.shape == (count, lat.dim)
        np.testing.assert_allclose((S * S).sum(axis=1), norm, rtol=1e-12)
        assert len({tuple(s) for s in S}) == count
        lat.to_int(S)  # every one a lattice point
    assert short_vectors(get_lattice("Z", 3)).shape == (6, 3)


@pytest.mark.parametrize("lattice,exact_zero", [("E8", False), ("D4", False), ("A2", False), ("D4", True),
                                                ("E8", True)])
def test_metric_points_match_brute_force_reference(lattice, exact_zero):
    lat = get_lattice(lattice)
    n = lat.dim
    rows, d = 5, 4 * 8  # four E8 blocks, eight D4 blocks, sixteen A2 blocks
    g = np.random.default_rng(11)
    W = g.normal(size=(rows, d))
    X = correlated_inputs(300, d, 4).double().numpy()
    U, _ = inverse_factor(X.T @ X / X.shape[0], 0.01)
    u_raw = raw_dither(tensor_key(5, "w"), rows * d // n, lat)
    step = 3.0 if exact_zero else 0.5  # coarse: many vectors near the point 0
    got = compensated_points(W, [U], lat, step, u_raw, exact_zero=exact_zero, metric=True)
    ref, _ = brute_force_reference(W, X, 0.01, lat, step, u_raw, exact_zero=exact_zero)
    if lattice == "A2":  # the second coordinate is b·fl(√3/2): compare the integer coordinates
        assert np.array_equal(lat.to_int(got), lat.to_int(ref))
    else:
        assert np.array_equal(got, ref)
    euclid = compensated_points(W, [U], lat, step, u_raw, exact_zero=exact_zero)
    assert not np.array_equal(got, euclid)  # the choice is not a no-op
    if exact_zero:
        assert (~got.any(axis=1)).sum() >= 5  # the point 0 is in play


def _entropy(points, lat):
    return entropy_from_counts(_count_rows(lat.to_int(points))) / lat.dim


@pytest.mark.parametrize("lattice", ["E8", "D4", "A2"])
def test_metric_points_lower_output_error_at_equal_rate(lattice):
    lat = get_lattice(lattice)
    n = lat.dim
    rows, d = 256, 64
    g = np.random.default_rng(0)
    W = g.normal(size=(rows, d))
    X = correlated_inputs(2000, d, 1).double().numpy()
    H = X.T @ X / X.shape[0]
    U, _ = inverse_factor(H, 0.01)
    u_raw = raw_dither(tensor_key(1, "w"), rows * d // n, lat)
    factor = lat.scale * 0.3
    u = (u_raw * factor).astype(np.float32).astype(np.float64).reshape(rows, d)
    res = {}
    for metric in (False, True):
        p = compensated_points(W, [U], lat, 0.3, u_raw, metric=metric)
        res[metric] = (output_error(W, p.reshape(rows, d) * factor - u, H), _entropy(p, lat))
    (e0, h0), (e1, h1) = res[False], res[True]
    assert abs(h1 - h0) < 0.01  # same step, same rate: the decision cell has the cell's volume
    # measured 0.908 (E8), 0.960 (D4), 0.995 (A2: two correlated columns a block leave little to gain)
    assert e1 < {"E8": 0.95, "D4": 0.98, "A2": 0.999}[lattice] * e0, (e1 / e0)


def test_metric_points_with_act_order_and_groups():
    """Every group and column order is the metric rounding of its own (permuted) sub-problem."""
    lat = get_lattice("D4")
    rows, d = 8, 24
    g = np.random.default_rng(2)
    W = g.normal(size=(rows, 2 * d))
    Xs = [correlated_inputs(200, d, s).double().numpy() for s in (7, 8)]
    Xs[1][:, 5] *= 6.0  # a loud column: act-order moves its vector first
    u_raw = raw_dither(tensor_key(9, "w"), rows * 2 * d // 4, lat)
    factors, perms = [], []
    for X in Xs:
        H = X.T @ X / X.shape[0]
        perm = act_order(H, 4)
        perms.append(perm)
        factors.append(inverse_factor(H[np.ix_(perm, perm)], 0.01)[0])
    assert not np.array_equal(perms[1], np.arange(d))
    got = compensated_points(W.reshape(2 * rows, d), factors, lat, 0.4, u_raw, perms=perms, metric=True)
    per_row = d // 4
    u_rows = u_raw.reshape(2 * rows, per_row, 4)
    for gi, (X, perm) in enumerate(zip(Xs, perms)):
        Wg = W.reshape(2 * rows, d)[gi * rows : (gi + 1) * rows]
        bperm = perm[::4] // 4
        ug = u_rows[gi * rows : (gi + 1) * rows][:, bperm].reshape(-1, 4)
        ref, _ = brute_force_reference(Wg[:, perm], X[:, perm], 0.01, lat, 0.4, ug)
        back = np.empty((rows, per_row, 4))
        back[:, bperm] = ref.reshape(rows, per_row, 4)
        assert np.array_equal(got.reshape(2 * rows, per_row, 4)[gi * rows : (gi + 1) * rows], back)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 8)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_compress_default_on_switch_off_pruned_zero_and_reproducible(tmp_path):
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.fc1.weight[:, 8:16] = 0.0  # a whole E8 vector of every row pruned
    x = correlated_inputs(400, 32, 3)
    cfg = CompressConfig(lattice="E8", step=0.05, seed=4, exact_zero=True)
    assert cfg.metric_rounding
    outs, files = [], []
    for i, c in enumerate((cfg, cfg, cfg.replace(metric_rounding=False))):
        out = udnc_fx.compress(model, c, calibration=[x[:200], x[200:]])
        outs.append({p.fqn: p().detach().numpy() for p in served_params(out)})
        files.append(tmp_path / f"m{i}.udnc")
        udnc_fx.save(out, files[-1])
        if i == 0:
            reason = next(ch["reason"] for ch in udnc_fx.inspect(out).changes if ch["fqn"] == "fc1.weight")
            assert "points nearest in H's metric" in reason
    assert files[0].read_bytes() == files[1].read_bytes()  # same config and seed: same bytes
    assert files[0].read_bytes() != files[2].read_bytes()  # the switch changes the points
    assert (outs[0]["fc1.weight"][:, 8:16] == 0).all()  # pruned vectors stay exactly zero
    # on the float model's inputs, the metric rule leaves less output error in the first layer at the same step
    X = x.double().numpy()
    H = X.T @ X / X.shape[0]
    W = model.fc1.weight.detach().double().numpy()
    assert output_error(W, outs[0]["fc1.weight"], H) < output_error(W, outs[2]["fc1.weight"], H)


def test_metric_rounding_refused_when_not_bool():
    with pytest.raises(ConfigError, match="metric_rounding"):
        CompressConfig(metric_rounding=1)
    assert CompressConfig.from_dict(CompressConfig(metric_rounding=False).to_dict()).metric_rounding is False
