"""Fine-tuned codewords without a table (issue 12 point 2): fine-tuning's per-layer choice between the float table
and the affine correction of the integer points, and real files (``.udnc``, ONNX self-contained and with a
sidecar) that decode the corrected codewords bit for bit, in onnxruntime and in ``load_onnx``'s NumPy path."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import udnc_fx
from udnc_fx.coding.container import read_header
from udnc_fx.demo import DigitsCNN
from udnc_fx.errors import ConfigError
from udnc_fx.passes.finetune import choose_codebooks, finetune
from udnc_fx.passes.materialize import served_params

LATTICES = [("Z", 1), ("Z", 4), ("A2", 2), ("D4", 4), ("E8", 8)]
SLOW = pytest.mark.slow


def _matrix(fast: set) -> list:
    """Every lattice × option, the ``fast`` ones in the default suite and the rest marked slow (a few s each)."""
    return [
        pytest.param(lat, n, opt, marks=() if (lat + str(n), opt) in fast else SLOW, id=f"{lat}{n}-{opt}")
        for lat, n in LATTICES for opt in (False, True)
    ]


def _data(seed=0, batches=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(batches)]


def _tuned(lattice, n, codebook="affine", exact_zero=False):
    torch.manual_seed(0)
    config = udnc_fx.CompressConfig(lattice=lattice, n=n, relative_step=0.5, exact_zero=exact_zero)
    gm = udnc_fx.compress(DigitsCNN().eval(), config)
    finetune(gm, _data(), F.cross_entropy, epochs=1, lr=3e-2, keep="last", progress=False, codebook=codebook)
    return gm.eval()


def _bits(t) -> bytes:
    return np.ascontiguousarray(t.detach().numpy() if isinstance(t, torch.Tensor) else t, np.float32).tobytes()


@pytest.mark.parametrize("lattice,n,exact_zero", _matrix({("E88", True)}))
def test_save_load_keeps_the_corrected_codewords_bit_exact(tmp_path, lattice, n, exact_zero):
    gm = _tuned(lattice, n, exact_zero=exact_zero)
    dlps = served_params(gm)
    assert all(d.affine is not None and d.codebook_choice["form"] == "affine" for d in dlps)
    path = tmp_path / "m.udnc"
    udnc_fx.save(gm, path)
    header = read_header(path)
    assert all(q["codebook"].get("affine") is not None for q in header["quantized"])
    assert all(q["codebook"]["encoding"] != "f32" for q in header["quantized"])  # no float table in the file
    back = udnc_fx.load(path, DigitsCNN().eval())
    saved = {d.fqn: d for d in dlps}
    for d in served_params(back):
        s = saved[d.fqn]
        assert d.affine == s.affine and _bits(d.codebook) == _bits(s.codebook)
        assert _bits(d.materialize()) == _bits(s.materialize())
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert _bits(back(x)) == _bits(gm(x))


@SLOW
def test_auto_keeps_the_cheap_z1_table_and_drops_the_costly_vector_tables():
    z1 = _tuned("Z", 1, codebook="auto")
    e8 = _tuned("E8", 8, codebook="auto")
    for d in served_params(z1) + served_params(e8):
        c = d.codebook_choice
        saving = 1 - c["affine_bytes"] / c["table_bytes"]
        assert c["form"] == ("affine" if saving >= 0.1 else "table")
        assert (d.affine is not None) == (c["form"] == "affine")
        assert 0.0 <= c["kept"] <= 1.0
    assert {d.codebook_choice["form"] for d in served_params(e8)} == {"affine"}  # E8: nearly every point distinct
    # Z1 at 3 bits: a table of ~9 floats (36 bytes) costs less than the correction's header object
    assert {d.codebook_choice["form"] for d in served_params(z1)} == {"table"}


def test_table_form_and_inspect_show_the_choice(tmp_path, capsys):
    gm = _tuned("D4", 4, codebook="table")
    assert all(d.affine is None and d.codebook_choice["form"] == "table" for d in served_params(gm))
    report = udnc_fx.inspect(gm)
    assert {r.codebook for r in report.layers} == {"table"}
    gm = _tuned("D4", 4, codebook="affine")
    report = udnc_fx.inspect(gm)
    assert {r.codebook for r in report.layers} == {"points+affine"}
    assert all(r.affine is not None and r.codebook_choice["form"] == "affine" for r in report.layers)
    assert "points+affine a=" in str(report) and "keeps" in str(report)
    udnc_fx.save(gm, tmp_path / "m.udnc")
    loaded = udnc_fx.inspect(udnc_fx.load(tmp_path / "m.udnc", DigitsCNN().eval()))
    assert [r.affine for r in loaded.layers] == [r.affine for r in report.layers]
    # the command line's inspect shows the correction per tensor
    from udnc_fx.cli import main

    assert main(["inspect", str(tmp_path / "m.udnc")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("conv", "fc"))]
    assert len(lines) == len(report.layers) and all("+ affine a=" in line for line in lines)


def test_bad_choice_arguments():
    gm = udnc_fx.compress(DigitsCNN().eval(), udnc_fx.CompressConfig(target_bits=3.0))
    with pytest.raises(ConfigError):
        choose_codebooks(gm, "float")
    with pytest.raises(ConfigError):
        choose_codebooks(gm, min_saving=1.5)
    with pytest.raises(ConfigError):
        finetune(gm, _data(), F.cross_entropy, epochs=1, codebook="nope", progress=False)
    assert choose_codebooks(gm) == []  # nothing was trained: nothing to decide


def _weights_in_ort(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    feeds = {i.name: np.zeros([d.dim_value for d in i.type.tensor_type.shape.dim], np.float32)
             for i in model.graph.input if i.name in wanted}
    return dict(zip(names, session.run(names, feeds)))


@pytest.mark.parametrize("lattice,n,sidecar", _matrix({("E88", False)}))
def test_onnx_decodes_the_correction_bit_exact(tmp_path, lattice, n, sidecar):
    from onnx import numpy_helper

    from udnc_fx.export import load_onnx, prepare_model, to_onnx

    gm = _tuned(lattice, n, exact_zero=True)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "m.onnx"
    to_onnx(gm, (x,), path, sidecar=sidecar)
    if not sidecar:  # the graph rebuilds the corrected codebook from the integers: a Mul and an Add per weight
        ops = [node.op_type for node in onnx.load(path).graph.node if "affine" in "".join(node.input)]
        assert ops.count("Mul") == ops.count("Add") == len(served_params(gm))
    expected = {d.fqn: d.materialize().numpy() for d in served_params(gm)}
    numpy_path = prepare_model(path, decode="numpy")
    inits = {i.name: numpy_helper.to_array(i) for i in numpy_path.graph.initializer}
    in_ort = _weights_in_ort(prepare_model(path, decode="ort"), list(expected))
    for fqn, w in expected.items():
        assert inits[fqn].tobytes() == w.tobytes(), fqn
        assert in_ort[fqn].tobytes() == w.tobytes(), fqn
    session = load_onnx(path, intra_op_num_threads=1)
    y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(y, gm(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_a_reader_that_ignores_the_correction_refuses_the_self_contained_file(tmp_path):
    """An ONNX runtime from before the correction ignores the unknown ``affine`` key of a tensor entry: it then finds
    no integer codebook (the entry's top-level ``codebook_int`` is null) and no float one, and refuses the file
    instead of rebuilding the uncorrected points."""
    import json

    from udnc_fx.errors import FormatError
    from udnc_fx.export import load_onnx, to_onnx
    from udnc_fx.export.runtime import KEY_CONTENT, KEY_TENSORS, content_sha256

    gm = _tuned("D4", 4)
    path = tmp_path / "m.onnx"
    to_onnx(gm, (torch.zeros(1, 1, 8, 8),), path, sidecar=False)
    model = onnx.load(path)
    prop = next(p for p in model.metadata_props if p.key == KEY_TENSORS)
    specs = json.loads(prop.value)
    assert all(s["affine"]["codebook_int"] and s["codebook_int"] is None for s in specs)
    for s in specs:
        del s["affine"]
    prop.value = json.dumps(specs)  # what such a reader sees, with the content hash it would then check
    next(p for p in model.metadata_props if p.key == KEY_CONTENT).value = content_sha256(model, prop.value)
    onnx.save(model, tmp_path / "old.onnx")
    with pytest.raises(FormatError, match="initializers .* missing") as info:
        load_onnx(tmp_path / "old.onnx", decode="numpy")
    assert info.value.kind == "bad_header"
