"""Progress bars on save and load: drawn when asked (or on a terminal), silent otherwise, and the bytes written do
not depend on them; the default coder is the dither-conditioned one, and pruned (exact-zero) models round-trip."""

from __future__ import annotations

import torch

import udnc_fx
from udnc_fx.demo import DigitsCNN
from udnc_fx.passes.fold import fold_batchnorm


def compressed(**fields):
    torch.manual_seed(0)
    model = fold_batchnorm(DigitsCNN().eval())
    return udnc_fx.compress(model, udnc_fx.CompressConfig(target_bits=1.5, **fields))


def test_bars_only_when_asked_and_bytes_do_not_change(tmp_path, capfd):
    gm = compressed()
    udnc_fx.save(gm, tmp_path / "quiet.udnc", progress=False)
    assert capfd.readouterr().err == ""
    udnc_fx.save(gm, tmp_path / "default.udnc")  # stderr is not a terminal under pytest: silent
    assert capfd.readouterr().err == ""
    udnc_fx.save(gm, tmp_path / "bar.udnc", progress=True)
    assert "coding" in capfd.readouterr().err
    data = (tmp_path / "quiet.udnc").read_bytes()
    assert data == (tmp_path / "bar.udnc").read_bytes() == (tmp_path / "default.udnc").read_bytes()
    assert data[10] == 5  # minor version 5: save stores the header compressed
    loaded = udnc_fx.load(tmp_path / "bar.udnc", fold_batchnorm(DigitsCNN()).eval(), progress=True)
    assert "decoding" in capfd.readouterr().err
    udnc_fx.load(tmp_path / "bar.udnc", fold_batchnorm(DigitsCNN()).eval(), progress=False)
    assert capfd.readouterr().err == ""
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded(x), gm(x))


def test_exact_zero_and_vector_lattices_load_bit_exact(tmp_path):
    for fields in ({"exact_zero": True}, {"lattice": "E8"}, {"lattice": "D4", "exact_zero": True}):
        gm = compressed(**fields)
        udnc_fx.save(gm, tmp_path / "m.udnc", progress=False)
        loaded = udnc_fx.load(tmp_path / "m.udnc", fold_batchnorm(DigitsCNN()).eval(), progress=False)
        x = torch.rand(4, 1, 8, 8)
        assert torch.equal(loaded(x), gm(x)), fields
        (tmp_path / "m.udnc").unlink()


def test_saved_bytes_do_not_depend_on_the_thread_count(tmp_path):
    threads = torch.get_num_threads()
    try:
        files = []
        for count in (1, 2):
            torch.set_num_threads(count)
            gm = compressed()
            udnc_fx.save(gm, tmp_path / f"t{count}.udnc", progress=False)
            files.append((tmp_path / f"t{count}.udnc").read_bytes())
    finally:
        torch.set_num_threads(threads)
    assert files[0] == files[1]
