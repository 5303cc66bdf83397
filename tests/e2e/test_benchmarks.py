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


def test_encoder_benchmark_runs_each_setting_with_each_lattice(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import encoder

    assert [v["label"] for v in encoder._variants(True)][:2] == ["plain + probe allocation", "compensated"]
    both = encoder._variants(True, ("Z1", "E8"))
    comp = [v for v in both if v["base_label"] == "compensated"]
    assert [(v["label"], v["lattice"], v["n"]) for v in comp] == [("compensated Z1", "Z", 1), ("compensated E8", "E8", 8)]
    with pytest.raises(SystemExit):
        encoder._variants(True, ("B7",))


@pytest.mark.slow
def test_digits_pipeline_smoke(tmp_path, monkeypatch):
    """The pruned + calibrated + fine-tuned row of issue 10 (benchmarks/digits_pipeline.py), on tiny epochs: the
    choice is made on a validation split of the TRAIN images, every point's ratio is the original model's float32
    state_dict over real file bytes, and the accuracy is the loaded file's."""
    monkeypatch.syspath_prepend(str(BENCH))
    import digits_pipeline
    import peers

    task = peers.digits_task()
    res = digits_pipeline.run(task, [0, 1], tmp_path, quick=True)
    sel = res["selection"]
    assert sel["images"] == 252  # 20 % of the 1257 TRAIN images, none of the 540 test images
    val = digits_pipeline.validation_split(task.extra["data"])
    assert len(val.y_train) + len(val.y_test) == len(task.extra["data"].y_train)
    (point,) = res["points"]
    assert point.method == digits_pipeline.METHOD
    assert len(point.extra["per_seed_acc"]) == 2 and all(0 <= a <= 100 for a in point.extra["per_seed_acc"])
    # 90 % pruned at 1.5 bits per kept weight: far past the post-training rates, and the file holds everything
    assert 20 < point.ratio < 80
    assert point.ratio == pytest.approx(task.numerator / point.bytes)
    assert point.passes == (min(point.extra["per_seed_acc"]) >= task.threshold)
    assert not list(tmp_path.glob("*.udnc"))  # the benchmark cleans up its files
    text = digits_pipeline.report(res, [0, 1])
    assert "robust best on test" in text and "Validation (252 images" in text


@pytest.mark.slow
def test_digits_pipeline_gradual_pruning_and_coder(tmp_path, monkeypatch):
    """--prune-steps prunes gradually through prune(steps=...) (the masks hit the sparsity and its layer bound), and
    --coder reaches save(coder=...)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import digits_pipeline
    import udnc_fx
    from udnc_fx.demo import load_digits_split, train_digits_cnn

    data = load_digits_split()
    model = train_digits_cnn(data, epochs=2, seed=0, progress=False)
    recipe = digits_pipeline.Recipe(retrain_epochs=1, finetune_epochs=1, prune_steps=3, prune_step_epochs=1,
                                    coder="range-context-v1")
    pipe = digits_pipeline.Pipeline(model, data, recipe, 153_896, tmp_path)
    source, _ = pipe.pruned(0.9, 0.95)
    weights = [m.weight for m in (source.conv1, source.conv2, source.fc1, source.fc2)]
    zero = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zero == pytest.approx(0.9, abs=2e-3) and max(float((w == 0).float().mean()) for w in weights) <= 0.95
    coders = []
    real_save = udnc_fx.save
    monkeypatch.setattr(udnc_fx, "save", lambda *a, **k: coders.append(k.get("coder")) or real_save(*a, **k))
    row = pipe.run_seed(0.9, 1.0, 0, 0.95)
    assert coders == ["range-context-v1"] and row["bytes"] > 0


@pytest.mark.slow
def test_digits_pipeline_vector_lattice_data_free(tmp_path, monkeypatch):
    """Recipe(lattice=..., calibrate=False) (lattice_sweep.py --bar's demo pipeline): pruning takes whole E8 vectors,
    compress runs without calibration, and the per-layer bytes are those of the file."""
    monkeypatch.syspath_prepend(str(BENCH))
    import digits_pipeline
    import udnc_fx
    from udnc_fx.demo import load_digits_split, train_digits_cnn

    data = load_digits_split()
    model = train_digits_cnn(data, epochs=2, seed=0, progress=False)
    recipe = digits_pipeline.Recipe(retrain_epochs=1, finetune_epochs=1, lattice="E8", calibrate=False)
    pipe = digits_pipeline.Pipeline(model, data, recipe, 153_896, tmp_path)
    source, _ = pipe.pruned(0.8)
    for m in (source.conv1, source.conv2, source.fc1, source.fc2):
        vectors = m.weight.detach().reshape(-1, 8)  # every layer's size is a multiple of 8
        zero = (vectors == 0).all(dim=1) | (vectors != 0).all(dim=1)
        assert bool(zero.all())  # a vector is pruned whole or kept whole
    calls = []
    real_compress = udnc_fx.compress
    monkeypatch.setattr(udnc_fx, "compress",
                        lambda *a, **k: calls.append(k.get("calibration")) or real_compress(*a, **k))
    row = pipe.run_seed(0.8, 2.0, 0)
    assert calls == [None]
    layers = row["extra"]["layers"]
    assert row["bytes"] == layers["(file)"]["bytes"]
    assert sum(e["bytes"] for name, e in layers.items() if name != "(file)") <= row["bytes"]
    assert {name for name in layers if not name.startswith("(")} == {"conv1.weight", "conv2.weight", "fc1.weight",
                                                                       "fc2.weight"}
    assert digits_pipeline.lattice_fields("E8") == {"lattice": "E8", "n": 8}
    assert digits_pipeline.lattice_fields("Z1") == {"lattice": "Z", "n": 1}
    with pytest.raises(SystemExit):
        digits_pipeline.lattice_fields("E7")


def test_pipeline_target_bits(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import digits_pipeline

    assert digits_pipeline.target_bits(0.9, 1.5) == pytest.approx(0.469 + 0.15, abs=1e-3)
    assert digits_pipeline.target_bits(0.0, 2.0) == 2.0


def test_pipeline_candidates_parse_sparsity_and_layer_bound(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import digits_pipeline

    assert digits_pipeline._candidates(["0.9", "0.92@0.95", 0.85, (0.9, 0.97)]) == [
        (0.9, None), (0.92, 0.95), (0.85, None), (0.9, 0.97)]
    assert digits_pipeline._label(0.92, 0.95) == "sparsity 0.92 (layer bound 0.95)"


@pytest.mark.slow
def test_theory_gap_smoke(monkeypatch):
    """The gap breakdown: the file costs at least the ideal rate of its own contexts (its tables cost bits); for Z¹
    the file's contexts are the hash codes, for E8 bins of each coordinate's own dither, which beat the hash codes."""
    monkeypatch.syspath_prepend(str(BENCH))
    import theory
    import theory_gap

    h = theory.differential_entropy_bits("gaussian")
    x = theory.sample("gaussian", 16000, 0)
    rows = {n: theory_gap.measure(x, h, lat, n, 3.0, key=0x5EED + n) for lat, n in (("Z", 1), ("E8", 8))}
    for r in rows.values():
        assert r["file"] >= r["file_ctx"] - 0.005
        assert r["order0"] >= r["file_ctx"] - 1e-9  # a context never raises the empirical entropy
    assert rows[1]["hashed"] == rows[1]["file_ctx"]
    assert rows[8]["hashed"] > rows[8]["file_ctx"] and rows[8]["layout"].endswith("-u")
