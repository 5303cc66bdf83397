"""Fuzzing the ONNX side (issue 15 point 5): forged ONNX files and sidecars raise only ``FormatError`` or
``ExportError`` from ``load_onnx``/``prepare_model``/``read_udnc_onnx``.

Not only blind flips: the tensor table, the udnc metadata, the index/codebook initializers and the model-local
functions are edited with the content hash recomputed (what a forger would do), and the sidecar is edited with its
recorded SHA-256 recomputed, so the edits reach the validation behind the hashes. Each class runs ``FAST`` cases by
default; ``-m slow`` runs ``SLOW`` per class and prints the outcome counts (``-s`` to see them).
"""

from __future__ import annotations

import collections
import json
import shutil
import time

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import udnc_fx
from udnc_fx.demo import DigitsCNN
from udnc_fx.errors import ExportError, FormatError
from udnc_fx.export import load_onnx, prepare_model, to_onnx
from udnc_fx.export import runtime as rt

FAST = 40
SLOW = 2500
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
WORST: dict[str, float] = collections.defaultdict(float)

FIELDS = ["fqn", "aliases", "output", "shape", "lattice", "n", "step", "key", "dither", "num_vectors",
          "num_codewords", "index_dtype", "zero_index", "indices", "codebook", "prefix", "codebook_int", "extra"]
META_KEYS = ["udnc.format", "udnc.tensors", "udnc.content_sha256", "udnc.sidecar", "udnc.sidecar_sha256"]

hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 255, 256, 2**15, 2**31, 2**32, 2**63, 2**64, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=24),
    st.sampled_from(["../x.udnc", "/dev/zero", "/etc/passwd", "E8", "Z", "D4", "A2", "uint8", "int16", "int32",
                     "udnc/", "udnc/x/", "0" * 16, "f" * 16, "F" * 16, "udnc-hash32-v1", "nan", "inf"]),
    st.lists(st.integers(min_value=-3, max_value=2**40), max_size=9),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
names = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["../side.udnc", "/dev/zero", "/dev/urandom", "sub/side.udnc", "..", ".", "", "fifo",
                     "a\0b", "C:side.udnc", "\\\\server\\share", "x" * 300, "side.udnc"]),
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A self-contained export and a sidecar export of the demo CNN (E8 and Z lattices), as bytes."""
    d = tmp_path_factory.mktemp("onnx-fuzz")
    torch.manual_seed(0)
    config = udnc_fx.CompressConfig(
        lattice="E8", relative_step=0.5, overrides={"fc1": udnc_fx.LayerConfig(lattice="Z", n=1, relative_step=0.5)}
    )
    gm = udnc_fx.compress(DigitsCNN().eval(), config).eval()
    x = torch.randn(1, 1, 8, 8)
    to_onnx(gm, x, d / "self.onnx", sidecar=False)
    result = to_onnx(gm, x, d / "side.onnx")
    work = d / "case"
    work.mkdir()
    (work / "sub").mkdir()
    import os

    os.mkfifo(work / "fifo")
    sidecar = (d / result.sidecar_path.split("/")[-1]).read_bytes()
    shutil.copy(d / result.sidecar_path.split("/")[-1], work / "sub" / "side.udnc")
    if result.sidecar_path.split("/")[-1] != "side.udnc":  # bait for "../side.udnc"
        shutil.copy(d / result.sidecar_path.split("/")[-1], d / "side.udnc")
    return {
        "self": (d / "self.onnx").read_bytes(),
        "side": (d / "side.onnx").read_bytes(),
        "sidecar": sidecar,
        "sidecar_name": result.sidecar_path.split("/")[-1],
        "work": work,
    }


def _rehash(model: onnx.ModelProto) -> None:
    import inspect

    props = {p.key: p for p in model.metadata_props}
    old = next(iter(inspect.signature(rt.content_sha256).parameters)) == "graph"  # pre-issue-15, for comparisons
    if "udnc.tensors" in props and "udnc.content_sha256" in props:
        props["udnc.content_sha256"].value = rt.content_sha256(model.graph if old else model, props["udnc.tensors"].value)


def _attempt(cls: str, base, model_bytes: bytes, sidecar: bytes | None, sidecar_name: str | None, how: str):
    """Write the case and open it; record the outcome. Only FormatError/ExportError may escape."""
    work = base["work"]
    path = work / "m.onnx"
    path.write_bytes(model_bytes)
    for p in work.glob("*.udnc"):
        p.unlink()
    if sidecar is not None:
        (work / sidecar_name).write_bytes(sidecar)
    start = time.perf_counter()
    result = None
    try:
        if how == "read":
            result = rt.read_udnc_onnx(path)
        elif how == "prepare":
            result = prepare_model(path, decode_threads=1)
        else:
            result = load_onnx(path, decode=how, decode_threads=1, intra_op_num_threads=1)
        outcome = "loaded"
    except FormatError as exc:
        outcome = f"FormatError[{exc.kind}]"
    except ExportError:
        outcome = "ExportError"
    finally:
        WORST[cls] = max(WORST[cls], time.perf_counter() - start)
    OUTCOMES[cls][outcome] += 1
    if result is not None:
        _check_loaded(path, how, result)


def _check_loaded(path, how: str, result) -> None:
    """A forged file that loads must hold what its (verified) tensor table says: one index per vector of each
    weight, and, decoded, a float32 weight of the recorded shape."""
    info = result if how == "read" else rt.read_udnc_onnx(path)
    for spec in info.specs:
        assert spec.n >= 1 and spec.num_vectors == -(-int(np.prod(spec.shape, dtype=object)) // spec.n), spec
    if how == "prepare":  # decode="numpy": each dequantize subgraph became an initializer holding the weight
        inits = {i.name: i for i in result.graph.initializer}
        for spec in info.specs:
            weight = numpy_helper.to_array(inits[spec.output])
            assert weight.dtype == np.float32 and weight.shape == tuple(spec.shape), spec


def _how(data):
    return data.draw(st.sampled_from(["read", "prepare", "prepare", "numpy", "ort"]), label="how")


def _case(kind: str, slow: bool):
    n = SLOW if slow else FAST
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def _table_case(base, data, which):
    model = onnx.load_from_string(base[which])
    prop = next(p for p in model.metadata_props if p.key == "udnc.tensors")
    table = json.loads(prop.value)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        op = data.draw(st.sampled_from(["set", "set", "set", "del", "dup", "drop", "swap", "replace"]), label="op")
        if not table or op == "replace":
            table = data.draw(st.one_of(hostile, st.lists(hostile, max_size=3)), label="table")
            break
        i = data.draw(st.integers(0, len(table) - 1), label="entry")
        if not isinstance(table[i], dict):
            continue
        if op == "set":
            table[i][data.draw(st.sampled_from(FIELDS), label="field")] = data.draw(hostile, label="value")
        elif op == "del":
            table[i].pop(data.draw(st.sampled_from(FIELDS), label="field"), None)
        elif op == "dup":
            table.append(dict(table[i]))
        elif op == "drop":
            table.pop(i)
        else:
            j = data.draw(st.integers(0, len(table) - 1), label="other")
            f = data.draw(st.sampled_from(FIELDS[:-1]), label="field")
            if isinstance(table[j], dict) and f in table[i] and f in table[j]:
                table[i][f], table[j][f] = table[j][f], table[i][f]
    prop.value = json.dumps(table)
    _rehash(model)
    return model


def _run_table(base, data):
    which = data.draw(st.sampled_from(["self", "side"]), label="which")
    model = _table_case(base, data, which)
    _attempt("table (rehashed)", base, model.SerializeToString(), base["sidecar"] if which == "side" else None,
             base["sidecar_name"], _how(data))


def _run_metadata(base, data):
    which = data.draw(st.sampled_from(["self", "side"]), label="which")
    model = onnx.load_from_string(base[which])
    props = {p.key: p for p in model.metadata_props}
    key = data.draw(st.sampled_from(META_KEYS), label="key")
    if data.draw(st.booleans(), label="delete") and key in props:
        kept = [p for p in model.metadata_props if p.key != key]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
    else:
        value = data.draw(names if key == "udnc.sidecar" else st.one_of(st.text(max_size=80), names), label="value")
        entry = props.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, value
    if data.draw(st.booleans(), label="rehash"):
        _rehash(model)
    _attempt("metadata", base, model.SerializeToString(), base["sidecar"] if which == "side" else None,
             base["sidecar_name"], _how(data))


def _run_initializer(base, data):
    model = onnx.load_from_string(base["self"])
    inits = [i for i in model.graph.initializer if i.name.startswith("udnc/")]
    init = data.draw(st.sampled_from(inits), label="init")
    op = data.draw(st.sampled_from(["dims", "dtype", "raw", "truncate", "clear", "values"]), label="op")
    if op == "dims":
        del init.dims[:]
        init.dims.extend(data.draw(st.lists(st.integers(-2, 2**33), max_size=4), label="dims"))
    elif op == "dtype":
        init.data_type = data.draw(st.integers(0, 22), label="dtype")
    elif op == "raw":
        init.raw_data = data.draw(st.binary(max_size=64), label="raw")
    elif op == "truncate" and init.raw_data:
        init.raw_data = init.raw_data[: data.draw(st.integers(0, len(init.raw_data) - 1), label="cut")]
    elif op == "clear":
        init.ClearField("raw_data")
    else:
        arr = numpy_helper.to_array(init).copy()
        if arr.size:
            flat = arr.reshape(-1)
            value = data.draw(st.integers(-(2**31), 2**31 - 1), label="v")
            # wraps into the initializer's dtype, as a forger writing raw bytes would
            flat[data.draw(st.integers(0, flat.size - 1), label="at")] = np.asarray(value, np.int64).astype(arr.dtype)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    _rehash(model)
    _attempt("initializer (rehashed)", base, model.SerializeToString(), None, None, _how(data))


def _run_function(base, data):
    which = data.draw(st.sampled_from(["self", "side"]), label="which")
    model = onnx.load_from_string(base[which])
    fn = data.draw(st.sampled_from(list(model.functions)), label="function")
    node = data.draw(st.sampled_from(list(fn.node)), label="node")
    op = data.draw(st.sampled_from(["op_type", "drop", "input", "constant"]), label="op")
    if op == "op_type":
        node.op_type = data.draw(st.sampled_from(["Add", "Sub", "Mul", "Identity", "Nope", "Round", "Cast"]), label="t")
    elif op == "drop":
        fn.node.remove(node)
    elif op == "input" and node.input:
        node.input[0] = data.draw(st.sampled_from(["key", "count", "h", "r", "missing"]), label="i")
    elif node.op_type == "Constant":
        arr = numpy_helper.to_array(node.attribute[0].t)
        value = data.draw(st.integers(0, 2**31), label="c")
        node.attribute[0].t.CopyFrom(numpy_helper.from_array((arr * 0 + value % 7).astype(arr.dtype), node.output[0]))
    if data.draw(st.booleans(), label="rehash"):
        _rehash(model)
    how = data.draw(st.sampled_from(["prepare", "ort"]), label="how")
    _attempt("function", base, model.SerializeToString(), base["sidecar"] if which == "side" else None,
             base["sidecar_name"], how)


def _run_sidecar(base, data):
    import hashlib

    blob = bytearray(base["sidecar"])
    op = data.draw(st.sampled_from(["flip", "truncate", "append", "splice"]), label="op")
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 8), label="n")):
            blob[data.draw(st.integers(0, len(blob) - 1), label="at")] ^= data.draw(st.integers(1, 255), label="x")
    elif op == "truncate":
        del blob[data.draw(st.integers(0, len(blob) - 1), label="cut"):]
    elif op == "append":
        blob += data.draw(st.binary(min_size=1, max_size=256), label="tail")
    else:
        at = data.draw(st.integers(0, len(blob)), label="at")
        blob[at : at + data.draw(st.integers(0, 16), label="len")] = data.draw(st.binary(max_size=16), label="b")
    model = onnx.load_from_string(base["side"])
    rehash = data.draw(st.booleans(), label="rehash")
    if rehash:  # the ONNX file records the edited sidecar's digest: the bytes reach the container decoder
        next(p for p in model.metadata_props if p.key == "udnc.sidecar_sha256").value = hashlib.sha256(blob).hexdigest()
    how = data.draw(st.sampled_from(["prepare", "numpy", "ort"]), label="how")  # each reads the sidecar
    _attempt("sidecar bytes" + (" (digest recomputed)" if rehash else ""), base, model.SerializeToString(),
             bytes(blob), base["sidecar_name"], how)


def _run_blind(base, data):
    which = data.draw(st.sampled_from(["self", "side"]), label="which")
    blob = bytearray(base[which])
    for _ in range(data.draw(st.integers(1, 4), label="n")):
        blob[data.draw(st.integers(0, len(blob) - 1), label="at")] ^= data.draw(st.integers(1, 255), label="x")
    if data.draw(st.booleans(), label="truncate"):
        del blob[data.draw(st.integers(0, len(blob) - 1), label="cut"):]
    _attempt("blind ONNX bytes", base, bytes(blob), base["sidecar"] if which == "side" else None,
             base["sidecar_name"], _how(data))


RUNNERS = {"table": _run_table, "metadata": _run_metadata, "initializer": _run_initializer,
           "function": _run_function, "sidecar": _run_sidecar, "blind": _run_blind}


def _report():
    total = sum(sum(c.values()) for c in OUTCOMES.values())
    print(f"\nONNX fuzz: {total} cases")
    for cls, counter in sorted(OUTCOMES.items()):
        print(f"  {cls}: {sum(counter.values())} cases, worst {WORST[cls] * 1e3:.0f} ms: {dict(counter.most_common())}")


@pytest.mark.parametrize("kind", list(RUNNERS))
def test_forged_onnx_raises_only_project_errors(base, kind):
    @_case(kind, slow=False)
    @given(data=st.data())
    def run(data):
        RUNNERS[kind](base, data)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(RUNNERS))
def test_forged_onnx_raises_only_project_errors_slow(base, kind):
    @_case(kind, slow=True)
    @given(data=st.data())
    def run(data):
        RUNNERS[kind](base, data)

    run()
    _report()
