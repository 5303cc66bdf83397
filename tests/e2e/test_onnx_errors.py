"""Bad input to to_onnx / load_onnx raises ExportError or FormatError(kind) saying what and where."""

from __future__ import annotations

import shutil

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import udnc_fx
from udnc_fx.demo import DigitsCNN
from udnc_fx.errors import ConfigError, ExportError, FormatError
from udnc_fx.export import load_onnx, to_onnx


def _export(tmp_path, name="model", seed=0, sidecar=True):
    torch.manual_seed(0)
    gm = udnc_fx.compress(DigitsCNN().eval(), udnc_fx.CompressConfig(lattice="E8", relative_step=0.5, seed=seed))
    path = tmp_path / f"{name}.onnx"
    to_onnx(gm.eval(), torch.randn(2, 1, 8, 8), path, sidecar=sidecar)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two exports of the same architecture with different seeds (so different sidecars), and a self-contained one."""
    d = tmp_path_factory.mktemp("exports")
    return {"a": _export(d, "a", seed=0), "b": _export(d, "b", seed=1), "self": _export(d, "self", sidecar=False)}


def _side(onnx_path):
    """The sidecar an export records (a plain name beside it), or None."""
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    return onnx_path.parent / props["udnc.sidecar"] if "udnc.sidecar" in props else None


def _copy(src, tmp_path, name="model"):
    dst = tmp_path / f"{name}.onnx"
    shutil.copy(src, dst)
    side = _side(src)
    if side is not None:
        shutil.copy(side, tmp_path / side.name)  # under its recorded name
    return dst


def test_sidecar_of_another_export(exported, tmp_path):
    path = _copy(exported["a"], tmp_path)
    side = _side(path)
    shutil.copy(_side(exported["b"]), side)
    with pytest.raises(FormatError) as info:
        load_onnx(path)
    assert info.value.kind == "model_mismatch"
    assert side.name in str(info.value) and "b.onnx" in str(info.value) and "model.onnx" in str(info.value)
    # the same through an explicit sidecar_path
    with pytest.raises(FormatError) as info:
        load_onnx(exported["a"], _side(exported["b"]))
    assert info.value.kind == "model_mismatch"


def test_missing_sidecar(exported, tmp_path):
    path = tmp_path / "lonely.onnx"
    shutil.copy(exported["a"], path)
    with pytest.raises(FormatError) as info:
        load_onnx(path)
    assert info.value.kind == "missing_sidecar"
    assert _side(exported["a"]).name in str(info.value) and "lonely.onnx" in str(info.value)
    with pytest.raises(FormatError, match="missing_sidecar"):
        load_onnx(path, tmp_path / "nowhere.udnc")


@pytest.mark.parametrize("which", ["a", "self"])
def test_onnx_edited_after_export(exported, tmp_path, which):
    path = _copy(exported[which], tmp_path)
    model = onnx.load(str(path))
    bias = next(i for i in model.graph.initializer if i.name == "fc2.bias")
    arr = numpy_helper.to_array(bias).copy()
    arr[0] += 1.0
    bias.CopyFrom(numpy_helper.from_array(arr, "fc2.bias"))
    onnx.save(model, str(path))
    with pytest.raises(FormatError) as info:
        load_onnx(path)
    assert info.value.kind == "checksum_mismatch" and "modified after export" in str(info.value)
    assert "model.onnx" in str(info.value)


def test_tensor_table_edited(exported, tmp_path):
    path = _copy(exported["a"], tmp_path)
    model = onnx.load(str(path))
    prop = next(p for p in model.metadata_props if p.key == "udnc.tensors")
    prop.value = prop.value.replace('"lattice":"E8"', '"lattice":"Z"', 1)
    onnx.save(model, str(path))
    with pytest.raises(FormatError, match="checksum_mismatch"):
        load_onnx(path)


def test_sidecar_edited_after_export(exported, tmp_path):
    path = _copy(exported["a"], tmp_path)
    side = _side(path)
    data = bytearray(side.read_bytes())
    data[-3] ^= 0x40
    side.write_bytes(bytes(data))
    with pytest.raises(FormatError) as info:
        load_onnx(path)
    assert info.value.kind in ("checksum_mismatch", "bad_value") and side.name in str(info.value)


def test_sidecar_rewritten_with_same_binding(exported, tmp_path):
    """A well-formed container that claims the right binding but is not the exported one (e.g. re-encoded with
    other indices): caught by the sidecar digest recorded in the ONNX file."""
    from udnc_fx.coding.container import decode_container, encode_container

    path = _copy(exported["a"], tmp_path)
    side = _side(path)
    container = decode_container(side.read_bytes())
    q = container.quantized[0]
    q.indices = q.indices.copy()
    q.indices[0] = (int(q.indices[0]) + 1) % (len(q.codebook) if q.codebook is not None else len(q.codebook_int))
    side.write_bytes(encode_container(container))
    with pytest.raises(FormatError) as info:
        load_onnx(path)
    assert info.value.kind == "checksum_mismatch" and "sidecar" in str(info.value)


def test_sidecar_given_to_self_contained(exported):
    with pytest.raises(FormatError, match="model_mismatch.*self-contained"):
        load_onnx(exported["self"], _side(exported["a"]))


def test_unsupported_format_version(exported, tmp_path):
    path = _copy(exported["self"], tmp_path)
    model = onnx.load(str(path))
    next(p for p in model.metadata_props if p.key == "udnc.format").value = "udnc-onnx-v9"
    onnx.save(model, str(path))
    with pytest.raises(FormatError, match="unsupported_version"):
        load_onnx(path)


def test_not_onnx_and_missing_file(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x89UDNC not an onnx file at all" * 3)
    with pytest.raises(FormatError) as info:
        load_onnx(junk)
    assert info.value.kind == "bad_value" and "junk.onnx" in str(info.value)
    with pytest.raises(FormatError, match="missing_file"):
        load_onnx(tmp_path / "absent.onnx")


def test_bad_options(exported):
    with pytest.raises(ConfigError, match="decode"):
        load_onnx(exported["self"], decode="gpu")
    with pytest.raises(ConfigError, match="no option"):
        load_onnx(exported["self"], intra_op_threads=1)


class _Cummax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.cummax(self.fc(x), dim=-1)[0]


def test_op_the_exporter_cannot_handle(tmp_path):
    gm = udnc_fx.compress(_Cummax(), udnc_fx.CompressConfig(relative_step=0.5))
    with pytest.raises(ExportError) as info:
        to_onnx(gm, torch.randn(2, 8), tmp_path / "m.onnx")
    assert "aten::cummax" in str(info.value) and "opset 18" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_opset_too_old(tmp_path):
    gm = udnc_fx.compress(_Cummax(), udnc_fx.CompressConfig(relative_step=0.5))
    with pytest.raises(ExportError, match="opset must be an integer >= 18"):
        to_onnx(gm, torch.randn(2, 8), tmp_path / "m.onnx", opset=17)
