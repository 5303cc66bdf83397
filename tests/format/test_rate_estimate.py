"""The rate estimate ``target_bits`` solves for matches the file the writer produces (issue 12, point 3).

For vector lattices the estimate (``udnc_fx.quantizer.rate_bits_of_points`` →
``udnc_fx.coding.payload.estimate_points_bits``) costs the tensor's sections as the default coder writes them: count
tables, dither contexts, row classes, the writer's choice between indices plus a table of points and
``lattice-coords``. Stated tolerance: within 2 % + 96 bits of the real sections, per tensor
(measured: within 1.5 % + 90 bits on Gaussian layers of 72 to 76 800 weights, pruned and not, dithered and not).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from udnc_fx.coding.ans import AnsDitherCoder, dither_codes
from udnc_fx.coding.ans_native import AnsNativeCoder
from udnc_fx.coding.entries import entry_from_record
from udnc_fx.coding.format import DEFAULT_MAX_ELEMENTS
from udnc_fx.coding.lattice_coords import point_symbols
from udnc_fx.coding.payload import encode_quantized
from udnc_fx.coding.range_coders import RangeAdaptiveCoder
from udnc_fx.quantizer import quantize_array, rate_bits_of_points

VECTOR_LATTICES = [("Z", 2), ("A2", 2), ("D4", 4), ("E8", 8), ("Z", 4)]


def file_bits(q) -> int:
    """Bits of a record's two sections, as the writer stores them."""
    _, indices, codebook = encode_quantized(entry_from_record(q, fqn="w"), "float32", DEFAULT_MAX_ELEMENTS)
    return 8 * (len(indices) + len(codebook))


def estimate_bits(q, exact_zero: bool) -> float:
    points = np.asarray(q.codebook_int)[np.asarray(q.indices)]
    return rate_bits_of_points(points, q.lattice, key=q.key, shape=tuple(q.shape), exact_zero=exact_zero) * points.size


def within_tolerance(estimate: float, real: int) -> bool:
    return abs(estimate - real) <= 0.02 * real + 96


@given(
    n=st.integers(1, 3000),
    k=st.integers(2, 300),
    spread=st.floats(0.05, 50.0),
    seed=st.integers(0, 2**32 - 1),
    context=st.booleans(),
    rows=st.integers(0, 40),
)
@example(n=633, k=119, spread=41.0, seed=419, context=False, rows=0)  # 26.9 bits over: found by CI's hypothesis run
@settings(max_examples=30, deadline=None)
@pytest.mark.parametrize("coder_type", [AnsDitherCoder, AnsNativeCoder])
def test_ans_cost_bits_is_the_encoded_size(coder_type, n, k, spread, seed, context, rows):
    """Each ANS coder's cost without coding is within 24 bits + 1 % of the stream it writes (property)."""
    rng = np.random.default_rng(seed)
    symbols = np.minimum(np.abs(rng.standard_normal(n) * spread).astype(np.int64), k - 1)
    hints = {}
    if context:
        hints["context"] = dither_codes(seed, n, 1)
    if rows:
        hints["row_length"] = max(1, n // rows)
    coder = coder_type()
    real = 8 * len(coder.encode(symbols, k, **hints))
    assert abs(coder.cost_bits(symbols, k, **hints) - real) <= 24 + 0.01 * real


@pytest.mark.parametrize("coder_type", [AnsDitherCoder, AnsNativeCoder])
def test_ans_cost_bits_of_a_stream_with_nothing_to_code(coder_type):
    coder = coder_type()
    zeros = np.zeros(50, np.int64)
    assert coder.cost_bits(zeros, 3) == 8 * len(coder.encode(zeros, 3))
    assert coder.cost_bits(np.zeros(0, np.int64), 3) == 0.0


def test_v2_cost_bits_on_long_streams():
    """4 interleaved states: the estimate still within 24 bits + 1 % (measured on 20k to 200k symbols)."""
    coder = AnsNativeCoder()
    rng = np.random.default_rng(5)
    for n, spread in ((20_000, 0.3), (200_000, 3.0), (60_000, 40.0)):
        symbols = np.minimum(np.abs(rng.standard_normal(n) * spread).astype(np.int64), 299)
        codes = dither_codes(n, n, 1)
        real = 8 * len(coder.encode(symbols, 300, context=codes))
        assert abs(coder.cost_bits(symbols, 300, context=codes) - real) <= 24 + 0.01 * real


def test_range_adaptive_cost_bits():
    """Exact (coded) on short streams; the formula on long ones is within 12 % of the coded size."""
    rng = np.random.default_rng(3)
    coder = RangeAdaptiveCoder()
    short = rng.integers(0, 40, 5000)
    assert coder.cost_bits(short, 40) == 8 * len(coder.encode(short, 40))
    # a long table of points, most frequent first (what the table form codes): its statistics drift
    w = rng.standard_normal((512, 384))
    q = quantize_array(w, lattice="E8", n=8, step=0.3, key=None)
    long = point_symbols("E8", np.asarray(q.codebook_int)).ravel()
    assert long.size > coder.EXACT_COST_SYMBOLS
    real = 8 * len(coder.encode(long, int(long.max()) + 1))
    assert abs(coder.cost_bits(long, int(long.max()) + 1) - real) <= 0.12 * real


@pytest.mark.parametrize("lattice, n", VECTOR_LATTICES)
@pytest.mark.parametrize("step", [0.05, 0.4, 3.0])
@pytest.mark.parametrize("pruned", [False, True])
def test_estimate_matches_the_written_sections(lattice, n, step, pruned):
    """Random layers, every vector lattice, fine to coarse, with and without pruned (all-zero) vectors, dithered
    and not: the estimate is the file's sections within the stated tolerance."""
    check_random_layers(lattice, n, step, pruned, [(16, 72)])


@pytest.mark.slow
@pytest.mark.parametrize("lattice, n", VECTOR_LATTICES)
@pytest.mark.parametrize("step", [0.05, 0.4, 3.0])
@pytest.mark.parametrize("pruned", [False, True])
def test_estimate_matches_the_written_sections_of_larger_layers(lattice, n, step, pruned):
    check_random_layers(lattice, n, step, pruned, [(96, 200), (3000,)])


def check_random_layers(lattice, n, step, pruned, shapes):
    rng = np.random.default_rng([ord(c) for c in lattice] + [n, int(step * 100), int(pruned)])
    for shape in shapes:
        w = rng.standard_normal(shape)
        if pruned:
            vectors = w.reshape(-1, n)
            vectors[rng.random(vectors.shape[0]) < 0.8] = 0.0
        for key in (0x5EED, None):
            q = quantize_array(w, lattice=lattice, n=n, step=step, key=key, exact_zero=pruned)
            real = file_bits(q)
            est = estimate_bits(q, pruned)
            assert within_tolerance(est, real), (shape, key, est, real)


def test_z1_estimate_is_the_index_entropy():
    """Z¹ keeps the order-0 index entropy (what its target_bits has always meant); its file is near it (here 2 %
    above: the codebook and the count tables of a layer of 8192 weights; on larger layers, dither conditioning and
    row classes take the file below it)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128))
    q = quantize_array(w, lattice="Z", n=1, step=0.3, key=7)
    counts = np.bincount(np.asarray(q.indices))
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log2(p)).sum())
    assert estimate_bits(q, False) == pytest.approx(entropy * w.size)
    assert file_bits(q) <= 1.03 * entropy * w.size


@pytest.mark.slow
@pytest.mark.parametrize("lattice, n", [("A2", 2), ("D4", 4), ("E8", 8)])
def test_estimate_matches_the_file_on_the_demo_cnn(lattice, n, tmp_path):
    """Real layers (the trained demo CNN, 80 % pruned in lattice vectors, exact zeros, at h(0.8) + 2 bits per kept
    weight, where the old estimate put E8 at 1.12 bits/weight and the file at 2.17): every layer's sections are
    the estimate within the stated tolerance, and the whole is the target within 2 %."""
    import torch

    import udnc_fx
    from udnc_fx.coding.container import read_header, section_sizes
    from udnc_fx.demo import load_digits_split, train_digits_cnn
    from udnc_fx.passes.fold import fold_batchnorm
    from udnc_fx.passes.materialize import served_params
    from udnc_fx.passes.prune import prune

    torch.manual_seed(0)
    data = load_digits_split()
    model = train_digits_cnn(data, epochs=5, progress=False)
    for pruned, target in ((True, 1.122), (False, 2.5)):
        config = udnc_fx.CompressConfig(lattice=lattice, n=n, seed=1, target_bits=target, exact_zero=pruned)
        source = prune(fold_batchnorm(model), 0.8, config=config)[0] if pruned else model
        gm = udnc_fx.compress(source, config)
        # the estimate models ans-dither-v2's streams; save's default "auto" may take range-context-v1 on a small
        # layer where that is smaller still
        udnc_fx.save(gm, tmp_path / "m.udnc", coder="ans-dither-v2")
        sizes = section_sizes(read_header(tmp_path / "m.udnc"))["tensors"]
        total_est = total_weights = 0.0
        for dlp in served_params(gm):
            q = dlp.record()
            real = 8 * (sizes[dlp.fqn]["indices"] + sizes[dlp.fqn]["codebook"])
            est = estimate_bits(q, pruned)
            assert within_tolerance(est, real), (dlp.fqn, est, real)
            total_est += est
            total_weights += dlp.numel
        assert total_est / total_weights == pytest.approx(target, rel=0.02)
