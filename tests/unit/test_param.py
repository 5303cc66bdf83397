"""Tests of ``DitheredLatticeParam``: storage (index dtype, what enters the state_dict), decoding against an
independent reference built from ``udnc_fx.quantizer`` and ``compute_dither``, the error bound of dithered lattice
quantization, and validation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from udnc_fx import ConfigError, DitheredLatticeParam
from udnc_fx.dither import tensor_key
from udnc_fx.lattice import get_lattice
from udnc_fx.param import compute_dither, index_dtype_for
from udnc_fx.quantizer import quantize_array

# (lattice, n) pairs covering every family, and Z^n with and without padding of odd-sized weights.
LATTICES = [("Z", 1), ("Z", 2), ("Z", 3), ("Z", 8), ("A2", 2), ("D4", 4), ("E8", 8)]
LAT_IDS = [f"Z{n}" if name == "Z" else name for name, n in LATTICES]

# Covering radius of each lattice in raw coordinates, from the textbook (Conway & Sloane, SPLAG ch. 4), not from
# the code under test: Z^n: √n/2; A2 (minimal distance 1): 1/√3; D4 and E8 (minimal norm 2): 1.
COVERING_RADIUS_RAW = {"Z": lambda n: math.sqrt(n) / 2, "A2": lambda n: 1 / math.sqrt(3), "D4": lambda n: 1.0,
                       "E8": lambda n: 1.0}


def make_param(weight: torch.Tensor, lattice: str, n: int, step: float, key: int | None) -> DitheredLatticeParam:
    q = quantize_array(weight.numpy(), lattice=lattice, n=n, step=step, key=key)
    return DitheredLatticeParam(
        torch.from_numpy(q.indices),
        torch.from_numpy(q.codebook),
        shape=tuple(weight.shape),
        lattice=lattice,
        n=n,
        step=step,
        key=key,
    )


def weight_of(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


# ----------------------------------------------------------------------------------------------------------------
# Index dtype
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_codewords, dtype",
    [(1, torch.uint8), (2, torch.uint8), (256, torch.uint8), (257, torch.int16), (2**15, torch.int16),
     (2**15 + 1, torch.int32)],
)
def test_index_dtype_is_the_smallest_that_fits(num_codewords, dtype):
    assert index_dtype_for(num_codewords) == dtype


@pytest.mark.parametrize("num_codewords, dtype", [(256, torch.uint8), (257, torch.int16), (1000, torch.int16)])
def test_param_stores_indices_in_the_smallest_dtype(num_codewords, dtype):
    n = 1
    numel = 1200
    indices = torch.arange(numel) % num_codewords
    codebook = torch.arange(num_codewords, dtype=torch.float32).unsqueeze(1)
    dlp = DitheredLatticeParam(indices, codebook, shape=(30, 40), lattice="Z", n=n, step=1.0, key=None)
    assert dlp.indices.dtype == dtype
    # the narrowing cast must not wrap any index (uint8 holds 0..255, int16 0..32767)
    assert torch.equal(dlp.indices.long(), indices)
    assert torch.equal(dlp(), codebook[indices].reshape(30, 40))


# ----------------------------------------------------------------------------------------------------------------
# What is stored
# ----------------------------------------------------------------------------------------------------------------


def test_state_dict_holds_indices_and_codebook_only_never_the_dither():
    w = weight_of((24, 10))
    dlp = make_param(w, "Z", 1, 0.05, key=tensor_key(3, "fc.weight"))
    dlp()  # populate the dither cache: it must still stay out of the state_dict
    assert dlp._dither_cache is not None and dlp._dither_cache.numel() == w.numel()
    sd = dlp.state_dict()
    assert set(sd) == {"indices", "codebook"}
    assert not sd["indices"].dtype.is_floating_point
    assert sd["codebook"].shape == (dlp.num_codewords, 1)
    floats = [k for k, t in sd.items() if t.dtype.is_floating_point]
    assert floats == ["codebook"]
    assert [name for name, _ in dlp.named_parameters()] == ["codebook"]


def test_state_dict_round_trip_into_a_fresh_param_decodes_the_same():
    w = weight_of((7, 9))
    key = tensor_key(11, "w")
    dlp = make_param(w, "D4", 4, 0.1, key)
    fresh = DitheredLatticeParam(
        torch.zeros_like(dlp.indices, dtype=torch.int64),
        torch.zeros_like(dlp.codebook),
        shape=dlp.shape,
        lattice="D4",
        n=4,
        step=0.1,
        key=key,
    )
    fresh.load_state_dict(dlp.state_dict())
    assert torch.equal(fresh(), dlp())


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lattice, n", LATTICES, ids=LAT_IDS)
def test_forward_equals_materialize_and_the_reference_decode(lattice, n):
    w = weight_of((5, 3, 3))  # 45 weights: padded for every n except 1 and 3
    step = 0.07
    key = tensor_key(7, "conv.weight")
    dlp = make_param(w, lattice, n, step, key)

    out = dlp().detach()
    mat = dlp.materialize()
    assert out.shape == w.shape and out.dtype == torch.float32
    assert torch.equal(out, mat)
    assert not mat.requires_grad

    # Reference decode, computed independently of the module: codebook[indices] - dither, flattened and cut.
    nv = -(-w.numel() // n)
    dither = torch.from_numpy(compute_dither(key, nv, lattice, n, step))
    ref = (dlp.codebook.detach()[dlp.indices.long()] - dither).reshape(-1)[: w.numel()].view(w.shape)
    assert torch.equal(out, ref)

    # and the encoder's own decode (what the quantizer promises every decoder computes)
    q = quantize_array(w.numpy(), lattice=lattice, n=n, step=step, key=key)
    assert np.array_equal(out.numpy().reshape(-1), q.decode().reshape(-1))
    assert np.array_equal(q.dither(), compute_dither(key, nv, lattice, n, step))


def test_materialize_returns_an_independent_tensor():
    dlp = make_param(weight_of((4, 4)), "Z", 1, 0.1, key=1)
    mat = dlp.materialize()
    before = dlp().clone()
    mat.add_(1.0)
    assert torch.equal(dlp(), before)


@pytest.mark.parametrize("lattice, n", LATTICES, ids=LAT_IDS)
@pytest.mark.parametrize("step", [0.01, 0.3, 2.0])
def test_decoded_error_is_bounded_by_the_covering_radius(lattice, n, step):
    w = weight_of((13, 11), seed=1)  # 143 weights: padding for every n > 1
    dlp = make_param(w, lattice, n, step, key=tensor_key(5, f"{lattice}{n}"))
    lat = get_lattice(lattice, n)
    radius = COVERING_RADIUS_RAW[lattice](n) * lat.scale * step
    err = (dlp().detach().double() - w.double()).reshape(-1)
    pad = (-err.numel()) % n
    vectors = torch.cat([err, err.new_zeros(pad)]).view(-1, n)
    # float32 codebook and dither each round once: allow a few ulps of the values involved
    slack = 1e-5 * (step + float(w.abs().max()))
    # the error of a whole vector lies in the Voronoi cell, hence so does each weight's
    assert float(vectors.norm(dim=1).max()) <= radius + slack
    assert float(err.abs().max()) <= radius + slack
    # and the bound is not vacuous: the error really reaches a good part of the cell
    assert float(vectors.norm(dim=1).max()) > 0.3 * radius


def test_dither_is_regenerated_from_the_key_not_stored():
    w = weight_of((6, 6))
    dlp = make_param(w, "Z", 1, 0.2, key=tensor_key(0, "a"))
    first = dlp().clone()
    dlp._dither_cache = None  # a freshly loaded module has no cache
    assert torch.equal(dlp(), first)
    assert torch.equal(dlp.dither(), torch.from_numpy(compute_dither(dlp.key, 36, "Z", 1, 0.2)))


def test_undithered_param_decodes_to_codewords():
    w = weight_of((8, 5))
    dlp = make_param(w, "Z", 1, 0.25, key=None)
    assert not dlp.dithered
    assert torch.equal(dlp.dither(), torch.zeros(40, 1))
    assert torch.equal(dlp(), dlp.codebook.detach()[dlp.indices.long()].view(8, 5))
    # plain rounding to the grid: every decoded weight is a multiple of the step
    decoded = dlp().detach()
    assert torch.equal(decoded / 0.25, torch.round(decoded / 0.25))


def test_zero_index_decodes_to_exact_zeros():
    indices = torch.tensor([0, 1, 0, 2])
    codebook = torch.tensor([[0.0], [1.0], [-1.0]])
    dlp = DitheredLatticeParam(indices, codebook, shape=(2, 2), lattice="Z", n=1, step=1.0, key=123,
                               zero_index=0)
    out = dlp().reshape(-1)
    assert out[0].item() == 0.0 and out[2].item() == 0.0
    assert out[1].item() != 1.0  # the dither is subtracted elsewhere


def test_codebook_gradient_flows_and_indices_do_not_change():
    dlp = make_param(weight_of((4, 6)), "A2", 2, 0.2, key=9)
    idx = dlp.indices.clone()
    dlp().pow(2).sum().backward()
    assert dlp.codebook.grad is not None and dlp.codebook.grad.abs().sum() > 0
    assert torch.equal(dlp.indices, idx)


def test_deepcopy_decodes_the_same():
    dlp = make_param(weight_of((3, 8)), "E8", 8, 0.3, key=4)
    dup = copy.deepcopy(dlp)
    assert torch.equal(dup(), dlp())
    assert dup.codebook is not dlp.codebook


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])
def test_codeword_counts_and_entropy(n):
    indices = torch.tensor([0, 0, 0, 1, 1, 2, 0, 3])
    codebook = torch.zeros(5, n)  # codeword 4 unused
    dlp = DitheredLatticeParam(indices, codebook, shape=(8 * n,), lattice="Z", n=n, step=1.0, key=None)
    assert dlp.codeword_counts().tolist() == [4, 2, 1, 1, 0]
    p = np.array([4, 2, 1, 1]) / 8
    expected = float(-(p * np.log2(p)).sum()) / n  # per weight, not per vector
    assert dlp.entropy_bits() == pytest.approx(expected, rel=1e-12)
    assert dlp.num_codewords == 5
    assert dlp.numel == 8 * n


def test_extra_repr_names_the_quantizer():
    dlp = make_param(weight_of((4, 4)), "E8", 8, 0.5, key=0xABC)
    text = repr(dlp)
    assert "E8" in text and "uint8" in text and "0x0000000000000abc" in text


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(indices=torch.zeros(4, dtype=torch.long), codebook=torch.zeros(2, 2), n=1), "codebook must be"),
        (dict(indices=torch.zeros(3, dtype=torch.long), codebook=torch.zeros(2, 1), n=1), "indices must be"),
        (dict(indices=torch.zeros(2, 2, dtype=torch.long), codebook=torch.zeros(2, 1), n=1), "indices must be"),
        (dict(indices=torch.zeros(4, dtype=torch.long), codebook=torch.zeros(2, 1), n=1, zero_index=2),
         "zero_index"),
        (dict(indices=torch.zeros(4, dtype=torch.long), codebook=torch.zeros(2, 1), n=1, lattice="Q"),
         "unknown lattice"),
        (dict(indices=torch.zeros(1, dtype=torch.long), codebook=torch.zeros(2, 4), n=4, lattice="E8"),
         "dimension"),
    ],
)
def test_invalid_construction_raises_config_error(kwargs, match):
    args = dict(shape=(2, 2), lattice="Z", step=1.0, key=None)
    args.update(kwargs)
    indices, codebook = args.pop("indices"), args.pop("codebook")
    with pytest.raises(ConfigError, match=match):
        DitheredLatticeParam(indices, codebook, **args)


@pytest.mark.parametrize("k, stored, kept", [(300, np.uint16, torch.int16), (70000, np.uint32, torch.int32),
                                             (200, np.uint8, torch.uint8), (300, np.int64, torch.int16)])
def test_from_record_keeps_the_narrow_index_dtype(k, stored, kept):
    """The reader's unsigned indices become the dtype the parameter keeps without an int64 copy in between; the
    decoded weight is the record's."""
    from udnc_fx.record import CompressedWeight

    rng = np.random.default_rng(k)
    indices = rng.integers(0, k, 1000).astype(stored)
    record = CompressedWeight(indices=indices, codebook=rng.standard_normal((k, 1)).astype(np.float32),
                              shape=(40, 25), lattice="Z", n=1, step=0.1, key=7)
    param = DitheredLatticeParam.from_record(record)
    assert param.indices.dtype == kept
    assert np.array_equal(param.indices.numpy().astype(np.int64), indices.astype(np.int64))
    assert torch.equal(param.materialize(), torch.from_numpy(record.decode()))
