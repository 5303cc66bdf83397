"""Hostile ``.udnc`` files: each finding of issue 15 (bounded work, only FormatError escapes) as a test.

Files are crafted with valid checksums (``encode_container`` on an edited container, or a header rewritten with its
digests recomputed), so the checks under test are the ones after the checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

import udnc_fx
from udnc_fx import CompressConfig
from udnc_fx.coding import container as C
from udnc_fx.coding import format as fmt
from udnc_fx.coding import payload
from udnc_fx.coding.container import Container, QuantizedTensor, RawTensor, encode_container, read_container
from udnc_fx.coding.header_codec import compress_header, decompress_header, varint
from udnc_fx.coding.limits import DEFAULT_MAX_HEADER_LENGTH, MAX_HEADER_LENGTH
from udnc_fx.errors import FormatError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _tied() -> nn.Module:
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8, bias=False)
            self.b = nn.Linear(8, 8, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    return Tied()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[bytes, nn.Module]:
    model = _net()
    gm = udnc_fx.compress(model, CompressConfig(step=0.05))
    path = tmp_path_factory.mktemp("hostile") / "m.udnc"
    udnc_fx.save(gm, path)
    return path.read_bytes(), model


def _rebuilt(data: bytes, edit) -> bytes:
    c = read_container(data)
    edit(c)
    return encode_container(c)


def _with_header(data: bytes, edit) -> bytes:
    """``data`` with its stored JSON header edited (``edit(dict)``) and every digest and length recomputed (written
    back as plain JSON; save stores it compressed, format 1.5)."""
    h_len = int.from_bytes(data[12:16], "little")
    header = json.loads(decompress_header(data[C.PREAMBLE_SIZE : C.PREAMBLE_SIZE + h_len], C.MAX_HEADER_LENGTH))
    edit(header)
    payload = data[C.PREAMBLE_SIZE + h_len :]
    return _frame(json.dumps(header, separators=(",", ":")).encode(), payload)


def _frame(header_bytes: bytes, payload: bytes) -> bytes:
    digested = fmt.DIGESTED.pack(C.MAGIC, 1, 0, len(header_bytes), len(payload), hashlib.sha256(payload).digest())
    return digested + hashlib.sha256(digested + header_bytes).digest() + header_bytes + payload


def _measured(fn):
    """(result or exception, seconds, traced peak bytes)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - returned for the test to inspect
        out = exc
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, elapsed, peak


# -- bounded work --------------------------------------------------------------------------------------------------


def _bomb(shape, coder="range-adaptive-v1", k=1) -> bytes:
    """A tiny, valid file whose one tensor decodes to prod(shape) copies of symbol 0."""
    count = int(np.prod(shape))
    q = QuantizedTensor(fqn="0.weight", shape=shape, lattice="Z", n=1, step=0.1, key=0, dither="none",
                        indices=np.zeros(1, np.int64), codebook=np.zeros((k, 1), np.float32), coder=coder)
    # encode a 1-symbol stream, then claim `count` symbols: for a constant stream over K=1 the payload is empty
    q.shape = (1,)
    data = encode_container(Container(quantized=[q]))
    return _with_header(data, lambda h: h["quantized"][0].__setitem__("shape", list(shape)))


def test_a_tiny_file_claiming_2_to_26_elements_is_refused_before_decoding(tmp_path):
    data = _bomb([8192, 8192])
    assert len(data) < 300
    assert read_container(data, max_elements=1 << 27).quantized[0].indices.size == 1 << 26  # valid, huge
    path = tmp_path / "bomb.udnc"
    path.write_bytes(data)
    out, seconds, peak = _measured(lambda: udnc_fx.load(path, _net()))
    # refused on its declared size (more elements than the model has) or its shape, never decoded
    assert isinstance(out, FormatError) and out.kind in ("bad_value", "model_mismatch"), out
    assert "0.weight" in str(out)
    assert peak < 20 << 20, f"{peak / 2**20:.0f} MiB"  # was: 2^26 int64 indices and more before the shape check


def test_a_file_whose_shapes_are_not_the_models_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.udnc"
    path.write_bytes(_bomb([64, 64]))
    with pytest.raises(FormatError, match="0.weight") as info:
        udnc_fx.load(path, _net())
    assert info.value.kind == "model_mismatch"


@pytest.mark.parametrize("what", ["read_header", "size_report"])
def test_header_only_readers_never_decode_a_bomb(tmp_path, what):
    path = tmp_path / "bomb.udnc"
    path.write_bytes(_bomb([1 << 14, 1 << 14]))
    fn = udnc_fx.read_header if what == "read_header" else udnc_fx.size_report
    out, seconds, peak = _measured(lambda: fn(path))
    assert not isinstance(out, Exception), out
    assert peak < 5 << 20 and seconds < 2


def test_a_huge_alphabet_is_refused_on_the_header():
    q = QuantizedTensor(fqn="w", shape=(64,), lattice="Z", n=1, step=0.1, key=0, dither="none",
                        indices=np.arange(64) % 3, codebook=np.zeros((3, 1), np.float32))
    data = encode_container(Container(quantized=[q]))
    hostile = _with_header(data, lambda h: h["quantized"][0]["indices"].__setitem__("alphabet_size", (1 << 24) - 2))
    out, seconds, _ = _measured(lambda: C.read_header(hostile))
    # the codebook's derived length no longer matches either, but the alphabet is refused first, on its own
    assert isinstance(out, FormatError) and out.kind == "bad_value" and "alphabet_size" in str(out), out
    assert seconds < 1


def test_the_writer_obeys_the_same_alphabet_rule():
    q = QuantizedTensor(fqn="w", shape=(4,), lattice="Z", n=1, step=0.1, key=0, dither="none",
                        indices=np.zeros(4, np.int64), codebook=np.zeros((4 + (1 << 16) + 1, 1), np.float32))
    with pytest.raises(FormatError, match="codewords for 4 indices"):
        encode_container(Container(quantized=[q]))


def test_the_header_is_capped_by_default_and_on_request():
    raws = [[f"t{i}", [0]] for i in range(DEFAULT_MAX_HEADER_LENGTH // 10)]
    data = _frame(json.dumps({"raw": raws}, separators=(",", ":")).encode(), b"")
    assert DEFAULT_MAX_HEADER_LENGTH < len(data) < MAX_HEADER_LENGTH
    out, seconds, _ = _measured(lambda: C.read_header(data))
    assert isinstance(out, FormatError) and out.kind == "bad_value" and "max_header_length" in str(out), out
    assert seconds < 0.5
    assert len(C.read_header(data, max_header_length=MAX_HEADER_LENGTH)["raw"]) == len(raws)


def test_load_caps_the_header_by_the_model(tmp_path, saved):
    data, model = saved
    padded = _with_header(data, lambda h: h.setdefault("metadata", {}).__setitem__("pad", "x" * (3 << 20)))
    path = tmp_path / "padded.udnc"
    path.write_bytes(padded)
    udnc_fx.read_header(path)  # under the 4 MiB default: fine without a model
    with pytest.raises(FormatError, match="header"):  # far more than a file of a 3-tensor model needs
        udnc_fx.load(path, model)


def test_load_caps_a_compressed_header_before_decoding_it(tmp_path, saved):
    """Format 1.5: a compressed header declares its JSON's length; a length past what the model allows (or past the
    reader's limit without a model) is refused before a byte is decoded, however short the stream."""
    data, model = saved
    h_len = int.from_bytes(data[12:16], "little")
    payload = data[C.PREAMBLE_SIZE + h_len :]
    assert data[C.PREAMBLE_SIZE : C.PREAMBLE_SIZE + 2] == b"\x00\x01"  # save stored it compressed
    bomb = _frame(b"\x00\x01" + varint(3 << 20) + b"\xff" * 8, payload)
    path = tmp_path / "bomb.udnc"
    path.write_bytes(bomb)
    result, seconds, peak = _measured(lambda: udnc_fx.load(path, model))
    assert isinstance(result, FormatError) and result.kind == "bad_value" and "max_header_length" in str(result)
    assert peak < 1 << 20, peak  # refused from the declared length: no tables, no output buffer
    result, _, _ = _measured(lambda: C.read_header(bomb, max_header_length=1 << 20))
    assert isinstance(result, FormatError) and result.kind == "bad_value"
    # within the limit, the junk stream is refused as soon as it runs out
    result, seconds, _ = _measured(lambda: C.read_header(bomb))
    assert isinstance(result, FormatError) and result.kind == "bad_header", result
    # the same header compressed as save does it reads back
    plain = decompress_header(data[C.PREAMBLE_SIZE : C.PREAMBLE_SIZE + h_len], 1 << 20)
    assert C.read_header(_frame(compress_header(plain), payload))["header_json_length"] == len(plain)


def test_load_refuses_a_payload_larger_than_the_model_allows(tmp_path, saved):
    data, model = saved

    def grow(c):
        c.metadata = {}
        c.raw.append(RawTensor("junk", np.zeros(1 << 20, np.float32)))

    path = tmp_path / "big.udnc"
    path.write_bytes(_rebuilt(data, grow))
    with pytest.raises(FormatError) as info:
        udnc_fx.load(path, model)
    assert info.value.kind == "model_mismatch" and "payload" in str(info.value)


# -- only FormatError escapes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("aliases", [5, True, [None], "a", [1], {"x": 1}])
def test_bad_stored_aliases_are_a_format_error(tmp_path, saved, aliases):
    data, model = saved

    def edit(c):
        c.quantized[0].meta = {"aliases": aliases}

    path = tmp_path / "m.udnc"
    path.write_bytes(_rebuilt(data, edit))
    with pytest.raises(FormatError):
        udnc_fx.load(path, model)


def test_aliases_that_disagree_with_the_model_are_a_mismatch(tmp_path):
    model = _tied()
    gm = udnc_fx.compress(model, CompressConfig(step=0.05, min_numel=1))
    path = tmp_path / "t.udnc"
    udnc_fx.save(gm, path)
    x = torch.randn(2, 8)
    assert torch.equal(udnc_fx.load(path, model)(x), gm(x))
    path.write_bytes(_rebuilt(path.read_bytes(), lambda c: setattr(c.quantized[0], "meta", {"aliases": ["0.weight"]})))
    with pytest.raises(FormatError, match="ties it") as info:
        udnc_fx.load(path, model)
    assert info.value.kind == "model_mismatch"


@pytest.mark.parametrize("pattern", ["re:a{99999999999}", "re:" + "(" * 3000 + "a" + ")" * 3000])
def test_a_stored_override_that_breaks_the_regex_engine_is_a_format_error(tmp_path, saved, pattern):
    data, model = saved
    path = tmp_path / "m.udnc"
    path.write_bytes(_rebuilt(data, lambda c: setattr(c, "config", {"overrides": {pattern: None}})))
    with pytest.raises(FormatError) as info:
        udnc_fx.load(path, model)
    assert info.value.kind == "bad_header"


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.float64, np.float16])
def test_a_raw_tensor_of_another_dtype_is_a_model_mismatch(tmp_path, saved, dtype):
    data, model = saved

    def edit(c):
        r = next(r for r in c.raw if r.name == "0.bias")
        r.array = r.array.astype(dtype)

    path = tmp_path / "m.udnc"
    path.write_bytes(_rebuilt(data, edit))
    with pytest.raises(FormatError, match="0.bias") as info:
        udnc_fx.load(path, model)
    assert info.value.kind == "model_mismatch"


def test_loading_onto_a_model_of_another_dtype_is_a_model_mismatch(tmp_path, saved):
    data, model = saved
    path = tmp_path / "m.udnc"
    path.write_bytes(data)
    with pytest.raises(FormatError) as info:
        udnc_fx.load(path, _net().double())
    assert info.value.kind == "model_mismatch"


def test_load_checks_before_decoding(tmp_path, saved, monkeypatch):
    """The model check runs on the header: a mismatched file never reaches a decoder."""
    data, model = saved
    calls = []
    original = payload.decode_stream  # every index stream and coded codebook goes through it
    monkeypatch.setattr(payload, "decode_stream", lambda *a, **kw: calls.append(a[0]) or original(*a, **kw))
    path = tmp_path / "m.udnc"
    path.write_bytes(data)
    udnc_fx.load(path, model)
    assert calls
    calls.clear()
    with pytest.raises(FormatError):
        udnc_fx.load(path, nn.Sequential(nn.Linear(16, 9), nn.ReLU(), nn.Linear(9, 4)))
    assert calls == []


def test_non_finite_numbers_in_the_header_are_refused():
    data = encode_container(Container(metadata={"x": 1.0}))
    hostile = data.replace(b'"x":1.0', b'"x":1e400')
    hostile = _with_header(hostile, lambda h: None) if hostile == data else _frame(
        hostile[C.PREAMBLE_SIZE:], b""
    )
    with pytest.raises(FormatError) as info:
        C.read_header(hostile)
    assert info.value.kind == "bad_header" and "float64" in str(info.value)


def test_cli_inspect_json_on_a_non_finite_header_is_a_clean_error(tmp_path, capsys):
    from udnc_fx.cli import main

    data = encode_container(Container(metadata={"x": 1.0}))
    path = tmp_path / "inf.udnc"
    path.write_bytes(_frame(data[C.PREAMBLE_SIZE:].replace(b"1.0", b"1e400"), b""))
    assert main(["inspect", "--json", str(path)]) == 2
    assert "Infinity" not in capsys.readouterr().out


def test_size_report_and_inspect_on_an_empty_quantized_tensor(tmp_path, capsys):
    from udnc_fx.cli import main

    q = QuantizedTensor(fqn="w", shape=(0, 4), lattice="Z", n=1, step=0.1, key=0, dither="none",
                        indices=np.zeros(0, np.int64), codebook=np.zeros((1, 1), np.float32))
    path = tmp_path / "empty.udnc"
    path.write_bytes(encode_container(Container(quantized=[q])))
    report = udnc_fx.size_report(path)
    assert report["rows"][0]["bits_per_weight"] is None
    assert main(["inspect", str(path)]) == 0
    assert "\nw " in capsys.readouterr().out
    assert main(["inspect", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["sizes"]["rows"][0]["bits_per_weight"] is None


# -- stale temp files of an interrupted save -----------------------------------------------------------------------


def _age(path, seconds=60.0):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_killed_saves_temp_file_is_removed_by_the_next_save(tmp_path, saved):
    import subprocess
    import sys

    data, _ = saved
    target = tmp_path / "model.udnc"
    # a writer killed mid-write: it created and locked its temp file, wrote half, and died without cleaning up
    code = (
        "import os, sys\n"
        "from udnc_fx.coding.tempfiles import create_temp\n"
        "fd, tmp = create_temp(sys.argv[1], 'model.udnc')\n"
        "os.write(fd, b'x' * 4096)\n"
        "print(tmp, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    leftover = run.stdout.strip()
    assert run.returncode == -9 and os.path.exists(leftover)
    _age(leftover)
    keep = [tmp_path / name for name in (
        ".model.udnc.tmp", ".model.udnc.0123456789ab.tmp.bak", ".other.udnc.0123456789ab.tmp",
        ".model.udnc.0123456789AB.tmp", "model.udnc.0123456789ab.tmp", ".model.udnc.0123456789abc.tmp",
    )]
    for p in keep:
        p.write_bytes(b"user data")
        _age(p)
    os.symlink(tmp_path / "elsewhere", tmp_path / ".model.udnc.aaaaaaaaaaaa.tmp")
    C.write_container(target, read_container(data))
    assert not os.path.exists(leftover)
    assert all(p.read_bytes() == b"user data" for p in keep)
    assert os.path.islink(tmp_path / ".model.udnc.aaaaaaaaaaaa.tmp")
    assert read_container(target).quantized


def test_a_live_writers_temp_file_is_left_alone(tmp_path, saved):
    from udnc_fx.coding.tempfiles import create_temp

    data, _ = saved
    fd, tmp = create_temp(str(tmp_path), "model.udnc")  # held (locked) by this live "writer"
    try:
        _age(tmp)
        C.write_container(tmp_path / "model.udnc", read_container(data))
        assert os.path.exists(tmp)
    finally:
        os.close(fd)
    fresh_fd, fresh = create_temp(str(tmp_path), "model.udnc")
    os.close(fresh_fd)  # unlocked but just written: could be a writer between create and lock
    C.write_container(tmp_path / "model.udnc", read_container(data))
    assert os.path.exists(fresh)
    assert not os.path.exists(tmp)  # its writer is gone (lock released) and it is old: removed


@pytest.mark.parametrize("what", ["read_header", "load", "size_report"])
def test_a_fifo_or_device_is_refused_without_blocking(tmp_path, what):
    fifo = tmp_path / "model.udnc"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    for path in (fifo, "/dev/zero"):
        fn = {"read_header": lambda: udnc_fx.read_header(path), "size_report": lambda: udnc_fx.size_report(path),
              "load": lambda: udnc_fx.load(path, _net())}[what]
        with pytest.raises(FormatError, match="not a regular file"):
            fn()


@pytest.mark.parametrize("coder", ["huffman-static-v1", "bz2-v1", "zstd-v1", "range-context-v1"])
def test_constant_stream_bombs_of_every_coder_are_refused_before_decoding(tmp_path, coder):
    """Tiny valid files (a Huffman one-symbol table, a bz2 run) that decode to 2^22 indices."""
    from udnc_fx.coding.coders import get_coder

    count = 1 << 22
    payload = get_coder(coder).encode(np.zeros(count, np.int64), 2)
    header = {"coder": coder, "quantized": [{"fqn": "0.weight", "shape": [2048, 2048], "step": 0.1,
                                             "indices": {"alphabet_size": 2, "length": len(payload)}}]}
    data = _frame(json.dumps(header).encode(), payload + bytes(8))
    assert len(read_container(data).quantized[0].indices) == count  # a valid file
    path = tmp_path / "bomb.udnc"
    path.write_bytes(data)
    out, seconds, peak = _measured(lambda: udnc_fx.load(path, _net()))
    assert isinstance(out, FormatError) and out.kind in ("bad_value", "model_mismatch"), out
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB"
