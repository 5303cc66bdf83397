"""Real files with ``lattice-coords`` tensors: save/load and the ONNX sidecar decode bit for bit for every lattice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import udnc_fx
from udnc_fx.coding.container import read_header
from udnc_fx.demo import DigitsCNN
from udnc_fx.passes.materialize import served_params

LATTICES = [("Z", 1), ("Z", 4), ("A2", 2), ("D4", 4), ("E8", 8)]


def _compress(lattice: str, n: int, bits: float = 4.0, **extra):
    torch.manual_seed(0)
    config = udnc_fx.CompressConfig(lattice=lattice, n=n, target_bits=bits, **extra)
    return udnc_fx.compress(DigitsCNN().eval(), config).eval()


@pytest.mark.parametrize("exact_zero", [False, True])
@pytest.mark.parametrize("lattice,n", LATTICES)
def test_save_load_bit_exact_with_coordinates(tmp_path, lattice, n, exact_zero):
    gm = _compress(lattice, n, exact_zero=exact_zero)
    path = tmp_path / "m.udnc"
    udnc_fx.save(gm, path)
    encodings = {q["codebook"]["encoding"] for q in read_header(path)["quantized"]}
    if n > 1:  # at 4 bits/weight the vector lattices' points are (nearly) all distinct: no table in the file
        assert "lattice-coords" in encodings
    # A2, D4, E8 under a dither-conditioned coder (hash dither): contexts from each coordinate's own dither (format
    # 1.4); save's "auto" coder takes range-context-v1 (no contexts, no -u layout) where that is smaller
    layouts = [(q["codebook"]["layout"], q["indices"]["coder"]) for q in read_header(path)["quantized"]
               if "layout" in q["codebook"]]
    assert all(lay.endswith("-u") is (lattice != "Z" and coder.startswith("ans-dither")) for lay, coder in layouts)
    assert lattice == "Z" or any(lay.endswith("-u") for lay, _ in layouts)  # the larger layers keep them
    back = udnc_fx.load(path, DigitsCNN().eval())
    saved = {d.fqn: d for d in served_params(gm)}
    for d in served_params(back):
        s = saved[d.fqn]
        # the reader rebuilds the quantizer's own indices and codebook, so the model is the same, not just its weights
        assert torch.equal(d.indices.long(), s.indices.long()) and torch.equal(d.codebook, s.codebook)
        assert d.zero_index == s.zero_index
        assert d.materialize().numpy().tobytes() == s.materialize().numpy().tobytes()


@pytest.mark.parametrize("lattice,n", [("A2", 2), ("D4", 4), ("E8", 8)])
def test_onnx_sidecar_with_coordinates_decodes_bit_exact(tmp_path, lattice, n):
    from onnx import numpy_helper

    from udnc_fx.export import prepare_model, to_onnx

    gm = _compress(lattice, n)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    result = to_onnx(gm, (x,), tmp_path / "m.onnx", sidecar=True)
    entries = read_header(result.sidecar_path)["quantized"]
    assert "lattice-coords" in {q["codebook"]["encoding"] for q in entries}
    assert any(q["codebook"].get("layout", "").endswith("-u") for q in entries)  # format 1.4 contexts
    decoded = prepare_model(tmp_path / "m.onnx", decode="numpy")
    inits = {i.name: numpy_helper.to_array(i) for i in decoded.graph.initializer}
    for d in served_params(gm):
        w = d.materialize().numpy()
        np.testing.assert_array_equal(inits[d.fqn].view(np.uint32), w.view(np.uint32), err_msg=d.fqn)
