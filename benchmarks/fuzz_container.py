"""Structured fuzzing of ``.udnc`` readers against hostile files, with a memory and time guard (issue 15).

Every case takes a valid file of a small real model, applies one mutation *class* -- most of them edit the header
or one payload section and then recompute every length and checksum, as an attacker would, so the case reaches the
validator, the model check and the decoders rather than the digests -- and runs what a user runs on an untrusted
file: ``read_header``, ``size_report``, ``load(path, model)``, and ``read_container`` with a model-sized element
cap. A case's outcome per reader is ``ok``, ``FormatError:<kind>`` or ``BUG:<exception type>`` (anything else
escaping, or a FormatError that only wraps an unexpected exception). Each case's peak memory (growth of the peak
RSS, reset per case through ``/proc/self/clear_refs``; tracemalloc where that is missing) and wall time are
measured; the worst are reported.

    .venv/bin/python benchmarks/fuzz_container.py --cases 100000 --seed 0 [--mem-limit-mb 2048] [--json out.json]

Exit status 0 when no case escaped with another exception type and every case stayed within ``--max-case-mb`` and
``--max-case-s``; 1 otherwise. Importable: ``tests/property/test_hostile_fuzz.py`` runs a few hundred cases by
default and the full run under ``pytest -m slow``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import struct
import sys
import tempfile
import time
import tracemalloc
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import udnc_fx  # noqa: E402
from udnc_fx import CompressConfig  # noqa: E402
from udnc_fx.coding import container as C  # noqa: E402
from udnc_fx.coding.coders import available_coders  # noqa: E402
from udnc_fx.coding.header_codec import decompress_header  # noqa: E402
from udnc_fx.errors import FormatError  # noqa: E402

# ------------------------------------------------------------------------------------------------------------------
# Corpus: valid files of small real models
# ------------------------------------------------------------------------------------------------------------------


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 40, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.relu(self.fc(self.emb(x))))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 6))


def _pruned_mlp() -> nn.Module:
    """Whole output units nearly dead, others dense: the row structure range-context-v1's mode 1 codes."""
    model = _mlp()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            keep = torch.rand(layer.weight.shape[0], 1) < 0.3
            layer.weight.mul_(keep | (torch.rand(layer.weight.shape) < 0.05))
    return model


def build_corpus() -> list[tuple[str, bytes, nn.Module]]:
    """``(name, file bytes, float model)``: every coder, every lattice, pruned streams, tied weights, float16."""
    corpus = []
    specs = [("mlp", _mlp, CompressConfig(step=0.05), {})]
    for coder in available_coders():
        specs.append((f"cnn-{coder}", _cnn, CompressConfig(step=0.08), {"coder": coder}))
    specs += [
        ("mlp-E8", _mlp, CompressConfig(step=0.1, lattice="E8"), {"raw_float_dtype": "float16"}),
        ("mlp-D4", _mlp, CompressConfig(step=0.1, lattice="D4"), {}),
        ("mlp-A2", _mlp, CompressConfig(step=0.1, lattice="A2"), {}),
        ("mlp-pruned", _pruned_mlp, CompressConfig(step=0.02, exact_zero=True), {}),
        ("tied", _Tied, CompressConfig(step=0.05, min_numel=1), {}),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, factory, config, options) in enumerate(specs):
            torch.manual_seed(i)
            model = factory().eval()
            try:
                gm = udnc_fx.compress(model, config)
            except udnc_fx.ConfigError:  # pragma: no cover - an option this tree refuses: leave that file out
                continue
            path = Path(tmp) / f"{name}.udnc"
            udnc_fx.save(gm, path, **options)
            corpus.append((name, path.read_bytes(), model))
    return corpus


# ------------------------------------------------------------------------------------------------------------------
# Mutations
# ------------------------------------------------------------------------------------------------------------------


def split(data: bytes) -> tuple[bytes, dict, bytes]:
    """(preamble, header as a dict, payload); a compressed header (format 1.5) is decoded (``frame`` writes the
    mutated header back as plain JSON, which a 1.5 reader also takes)."""
    h = struct.unpack_from("<I", data, 12)[0]
    header = json.loads(decompress_header(data[C.PREAMBLE_SIZE : C.PREAMBLE_SIZE + h], C.MAX_HEADER_LENGTH))
    return data[: C.PREAMBLE_SIZE], header, data[C.PREAMBLE_SIZE + h :]


def frame(prefix: bytes, header_bytes: bytes, payload: bytes) -> bytes:
    """A file with every length and checksum recomputed (magic and version taken from ``prefix``)."""
    head = prefix[:12] + struct.pack("<IQ32s", len(header_bytes), len(payload), hashlib.sha256(payload).digest())
    return head + hashlib.sha256(head + header_bytes).digest() + header_bytes + payload


def dumps(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()


HOSTILE_INTS = [0, 1, -1, 2, 3, 255, 256, 65535, 65536, 1 << 20, (1 << 24) - 2, 1 << 24, 1 << 28, 1 << 31,
                1 << 32, (1 << 32) + 1, 1 << 40, 1 << 63, 1 << 64, -(1 << 63), 10 ** 30]
HOSTILE_VALUES = HOSTILE_INTS + [None, True, False, "", "x", "Z", "E8", "none", "lattice-int-coded", "f16",
                                 "range-adaptive-v1", "bz2-v1", 0.5, -0.0, 1e308, 5e-324, [], [None], [1 << 30] * 3,
                                 {}, {"a": 1}, [[[]]], "re:a{99999999999}", "../../etc/passwd"]


def _nodes(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _nodes(v, path + (i,))


def _set(root, path, value):
    for p in path[:-1]:
        root = root[p]
    root[path[-1]] = value


def _quantized(header: dict, rng: random.Random) -> dict | None:
    q = header.get("quantized") or []
    return rng.choice(q) if q else None


def m_header_value(data, rng):
    prefix, header, payload = split(data)
    path = rng.choice([p for p in _nodes(header) if p])
    _set(header, path, copy.deepcopy(rng.choice(HOSTILE_VALUES)))
    return frame(prefix, dumps(header), payload)


def m_header_delete(data, rng):
    prefix, header, payload = split(data)
    paths = [p for p in _nodes(header) if p]
    path = rng.choice(paths)
    parent = header
    for p in path[:-1]:
        parent = parent[p]
    del parent[path[-1]]
    return frame(prefix, dumps(header), payload)


def m_shape_bomb(data, rng):
    prefix, header, payload = split(data)
    q = _quantized(header, rng)
    entries = [q] if q and rng.random() < 0.7 else []
    if entries:
        e = rng.randint(10, 40)
        dims = rng.choice([[1 << e], [1 << (e // 2), 1 << (e - e // 2)], [rng.randint(1, 1 << 16)] * rng.randint(1, 4)])
        q["shape"] = dims
    elif header.get("raw"):
        r = rng.choice(header["raw"])
        r[1] = [1 << rng.randint(10, 36)]
    return frame(prefix, dumps(header), payload)


def m_alphabet_bomb(data, rng):
    prefix, header, payload = split(data)
    q = _quantized(header, rng)
    if q is None:
        return data
    value = rng.choice([1 << 16, (1 << 16) + 7, 1 << 20, (1 << 24) - 2, 1 << 24, 1 << 31, rng.randint(1, 1 << 24)])
    if rng.random() < 0.5 or not isinstance(q.get("codebook"), dict) or "alphabet_size" not in q["codebook"]:
        q["indices"]["alphabet_size"] = value
    else:
        q["codebook"]["alphabet_size"] = value
    return frame(prefix, dumps(header), payload)


def m_section_edit(data, rng):
    """Insert, delete or replace bytes inside one coded section, fixing its stored length and the digests."""
    prefix, header, payload = split(data)
    resolved = C.read_header(data, max_header_length=C.MAX_HEADER_LENGTH)
    sections = []
    for i, q in enumerate(resolved["quantized"]):
        sections.append((("quantized", i, "indices"), q["indices"]["offset"], q["indices"]["length"]))
        if q["codebook"].get("encoding") == "lattice-int-coded":
            sections.append((("quantized", i, "codebook"), q["codebook"]["offset"], q["codebook"]["length"]))
    if not sections:
        return data
    path, offset, length = rng.choice(sections)
    body = bytearray(payload[offset : offset + length])
    op = rng.choice(["flip", "insert", "delete", "truncate", "extend", "zero", "drop_word"])
    if op == "flip" and body:
        for _ in range(rng.randint(1, 4)):
            body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
    elif op == "insert":
        pos = rng.randint(0, len(body))
        body[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif op == "delete" and body:
        pos = rng.randrange(len(body))
        del body[pos : pos + rng.randint(1, 8)]
    elif op == "truncate":
        body = body[: rng.randint(0, len(body))]
    elif op == "extend":
        body += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif op == "zero":
        body = bytearray(len(body))
    elif op == "drop_word" and len(body) >= 4:
        body = body[:-4]
    new_payload = payload[:offset] + bytes(body) + payload[offset + length :]
    holder = header["quantized"][path[1]]
    if path[2] == "indices":
        holder["indices"]["length"] = len(body)
    else:
        holder["codebook"]["length"] = len(body)
    return frame(prefix, dumps(header), new_payload)


def m_coder_swap(data, rng):
    prefix, header, payload = split(data)
    q = _quantized(header, rng)
    if q is None:
        return data
    q["indices"]["coder"] = rng.choice(available_coders() + ["nope-v9"])
    return frame(prefix, dumps(header), payload)


def m_meta_config(data, rng):
    prefix, header, payload = split(data)
    choice = rng.randrange(4)
    if choice == 0 and header.get("quantized"):
        _quantized(header, rng)["meta"] = {"aliases": copy.deepcopy(rng.choice(
            [5, True, [None], "a", [1], [""], ["0.weight"], ["fc.weight", "fc.weight"], {"x": 1}, [[]]]))}
    elif choice == 1:
        depth = rng.choice([10, 200, 3000])
        pattern = rng.choice(["re:a{99999999999}", "re:" + "(" * depth + "a" + ")" * depth, "re:(", "re:[", "re:.*"])
        header["config"] = {"overrides": {pattern: None}}
    elif choice == 2:
        header["config"] = rng.choice([{"leaf_modules": 5}, {"fallback": "x"}, {"version": 99}, {"lattice": None},
                                       {"step": -1}, {"seed": 1 << 70}, {"nope": 1}, []])
    else:
        nested = value = []
        for _ in range(rng.choice([10, 1000, 5000])):
            value.append([])
            value = value[0]
        header["metadata"] = {"deep": nested}
    try:
        return frame(prefix, dumps(header), payload)
    except RecursionError:  # too deep for our own json.dumps: write it by hand
        text = dumps({k: v for k, v in header.items() if k != "metadata"})
        deep = b'"metadata":{"deep":' + b"[" * 5000 + b"]" * 5000 + b"}"
        return frame(prefix, text[:-1] + b"," + deep + b"}", payload)


def m_raw_dtype(data, rng):
    prefix, header, payload = split(data)
    raws = header.get("raw") or []
    if not raws:
        return data
    r = rng.choice(raws)
    dtype = rng.choice(["int32", "bool", "float64", "float16", "uint8", "int64", "bfloat16", "complex64", 7])
    if len(r) == 3:
        r[2] = dtype
    else:
        r.append(dtype)
    return frame(prefix, dumps(header), payload)


def m_number_text(data, rng):
    """Numbers JSON allows but float64 or int parsing cannot hold: 1e400, -1e400, a 5000-digit integer."""
    prefix, header, payload = split(data)
    text = dumps(header)
    token = rng.choice([b"1e400", b"-1e400", b"1" + b"0" * 5000, b"1.5e-400", b"-0"])
    target = rng.choice([b'"step":', b'"alphabet_size":', b'"length":', b'"seed":'])
    pos = text.find(target)
    if pos < 0:
        text = text[:-1] + b',"x":' + token + b"}"
    else:
        end = pos + len(target)
        stop = end
        while stop < len(text) and text[stop : stop + 1] not in (b",", b"}"):
            stop += 1
        text = text[:end] + token + text[stop:]
    return frame(prefix, text, payload)


def m_header_size(data, rng):
    prefix, header, payload = split(data)
    header.setdefault("metadata", {})["pad"] = "x" * rng.choice([1 << 10, 1 << 20, 3 << 20, 5 << 20])
    return frame(prefix, dumps(header), payload)


def m_blind(data, rng):
    """Blind damage (no checksum recomputed): flips, truncation, garbage tails."""
    b = bytearray(data)
    op = rng.randrange(3)
    if op == 0:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == 1:
        b = b[: rng.randrange(len(b))]
    else:
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(b)


MUTATIONS = {
    "header_value": m_header_value,
    "header_delete": m_header_delete,
    "shape_bomb": m_shape_bomb,
    "alphabet_bomb": m_alphabet_bomb,
    "section_edit": m_section_edit,
    "coder_swap": m_coder_swap,
    "meta_config": m_meta_config,
    "raw_dtype": m_raw_dtype,
    "number_text": m_number_text,
    "header_size": m_header_size,
    "blind": m_blind,
}
#: Relative frequency of each class (the big-header class is slow by design: a few are enough).
WEIGHTS = {"header_value": 20, "header_delete": 8, "shape_bomb": 10, "alphabet_bomb": 8, "section_edit": 25,
           "coder_swap": 6, "meta_config": 6, "raw_dtype": 6, "number_text": 5, "header_size": 0.2, "blind": 6}


# ------------------------------------------------------------------------------------------------------------------
# Running a case
# ------------------------------------------------------------------------------------------------------------------

_CLEAR_REFS = "/proc/self/clear_refs"


def _hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """Peak memory growth of a block: peak RSS after a reset (Linux), else tracemalloc's peak."""

    def __init__(self):
        self.rss = _reset_peak() and _hwm_kib() is not None

    def __enter__(self):
        if self.rss:
            _reset_peak()
            self._base = _hwm_kib()
        else:
            tracemalloc.start()
        return self

    def __exit__(self, *exc):
        if self.rss:
            self.peak = max(0, (_hwm_kib() - self._base)) * 1024
        else:
            self.peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        return False


def _classify(exc: BaseException) -> str:
    if isinstance(exc, FormatError):
        if exc.message.startswith("unexpected "):  # container.py's wrapper around an exception it did not expect
            return f"BUG:wrapped {exc.__cause__.__class__.__name__}"
        return f"FormatError:{exc.kind}"
    return f"BUG:{type(exc).__name__}"


def run_case(data: bytes, model: nn.Module, path: Path, max_elements: int) -> dict[str, str]:
    """Each reader's outcome on ``data``."""
    path.write_bytes(data)
    out = {}
    readers = {
        "read_header": lambda: udnc_fx.read_header(path),
        "size_report": lambda: udnc_fx.size_report(path),
        "read_container": lambda: C.read_container(data, max_elements=max_elements),
        "load": lambda: udnc_fx.load(path, model),
    }
    for name, fn in readers.items():
        try:
            fn()
            out[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - classified, that is the point
            out[name] = _classify(exc)
    return out


def fuzz(cases: int, seed: int = 0, *, progress: bool = False) -> dict:
    """Runs ``cases`` mutated files; returns counts per class and outcome, bugs, and the worst case's figures."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    corpus = build_corpus()
    # cap for read_container (no model): what the corpus's largest valid file decodes to, 16x
    max_elements = 16 * max(
        sum(math.prod(q["shape"]) + q["indices"]["alphabet_size"] * q["n"] for q in h["quantized"])
        + sum(math.prod(r["shape"]) for r in h["raw"])
        for h in (C.read_header(d) for _, d, _ in corpus)
    )
    names, weights = list(WEIGHTS), list(WEIGHTS.values())
    counts: dict[str, Counter] = defaultdict(Counter)
    bugs: list[dict] = []
    worst_mem = {"bytes": 0}
    worst_time = {"seconds": 0.0}
    baseline = {}
    meter = PeakMeter()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        path = Path(tmp) / "case.udnc"
        for name, data, model in corpus:  # the valid files: what a case is compared with
            start = time.perf_counter()
            with meter:
                outcome = run_case(data, model, path, max_elements)
            assert set(outcome.values()) == {"ok"}, (name, outcome)
            baseline[name] = {"seconds": time.perf_counter() - start, "peak_bytes": meter.peak}
        started = time.perf_counter()
        for i in range(cases):
            kind = rng.choices(names, weights)[0]
            name, data, model = corpus[rng.randrange(len(corpus))]
            try:
                mutated = MUTATIONS[kind](data, rng)
            except Exception as exc:  # a mutation that does not apply to this file: count it, do not hide it
                counts[kind][f"skipped:{type(exc).__name__}"] += 1
                continue
            start = time.perf_counter()
            with meter:
                outcome = run_case(mutated, model, path, max_elements)
            seconds = time.perf_counter() - start
            for reader, result in outcome.items():
                counts[kind][f"{reader}={result.split(':')[0] if result != 'ok' else 'ok'}"] += 1
                counts[kind][result] += 1
            counts[kind]["cases"] += 1
            label = {"case": i, "class": kind, "file": name, "file_bytes": len(mutated)}
            if meter.peak > worst_mem["bytes"]:
                worst_mem = {**label, "bytes": meter.peak, "outcome": outcome}
            if seconds > worst_time["seconds"]:
                worst_time = {**label, "seconds": seconds, "outcome": outcome}
            if any(v.startswith("BUG") for v in outcome.values()):
                bugs.append({**label, "outcome": outcome})
            if progress and (i + 1) % 5000 == 0:
                print(f"  {i + 1} cases, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return {
        "cases": cases,
        "seed": seed,
        "files": [n for n, _, _ in corpus],
        "baseline": baseline,
        "counts": {k: dict(v) for k, v in counts.items()},
        "bugs": bugs,
        "worst_memory": worst_mem,
        "worst_time": worst_time,
        "peak_measure": "peak RSS growth (clear_refs)" if meter.rss else "tracemalloc peak",
    }


def print_report(result: dict) -> None:
    print(f"{result['cases']} cases, seed {result['seed']}, files: {', '.join(result['files'])}")
    readers = ["read_header", "size_report", "read_container", "load"]
    head = ["class", "cases"] + [f"{r} ok/FormatError/BUG" for r in readers]
    rows = []
    for kind in MUTATIONS:
        c = result["counts"].get(kind, {})
        cells = [kind, str(c.get("cases", 0))]
        for r in readers:
            cells.append("/".join(str(c.get(f"{r}={o}", 0)) for o in ("ok", "FormatError", "BUG")))
        rows.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    for row in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    kinds = Counter()
    for c in result["counts"].values():
        for key, v in c.items():
            if key.startswith(("FormatError:", "BUG:", "skipped:")):
                kinds[key] += v
    print("outcomes by kind (all readers):", ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    base = result["baseline"]
    print(f"valid files: worst {max(b['seconds'] for b in base.values()) * 1e3:.1f} ms, "
          f"{max(b['peak_bytes'] for b in base.values()) / 2**20:.1f} MiB ({result['peak_measure']})")
    wm, wt = result["worst_memory"], result["worst_time"]
    print(f"worst memory: {wm['bytes'] / 2**20:.1f} MiB (case {wm.get('case')}, {wm.get('class')}, {wm.get('file')})")
    print(f"worst time: {wt['seconds'] * 1e3:.1f} ms (case {wt.get('case')}, {wt.get('class')}, {wt.get('file')})")
    print(f"bugs (another exception type escaped): {len(result['bugs'])}")
    for bug in result["bugs"][:10]:
        print("  ", bug)


def merge(results: list[dict]) -> dict:
    """One report from several runs (different seeds): counts added, the worst cases kept."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        for kind, c in r["counts"].items():
            counts[kind].update(c)
    baseline = {}
    for r in results:
        for name, b in r["baseline"].items():
            old = baseline.get(name, {"seconds": 0.0, "peak_bytes": 0})
            baseline[name] = {k: max(old[k], b[k]) for k in old}
    return {
        "cases": sum(r["cases"] for r in results),
        "seed": ",".join(str(r["seed"]) for r in results),
        "files": results[0]["files"],
        "baseline": baseline,
        "counts": {k: dict(v) for k, v in counts.items()},
        "bugs": [b for r in results for b in r["bugs"]],
        "worst_memory": max((r["worst_memory"] for r in results), key=lambda w: w["bytes"]),
        "worst_time": max((r["worst_time"] for r in results), key=lambda w: w["seconds"]),
        "peak_measure": results[0]["peak_measure"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mem-limit-mb", type=int, default=0,
                        help="RLIMIT_AS headroom above the address space in use after start-up (0: none)")
    parser.add_argument("--max-case-mb", type=float, default=256.0)
    parser.add_argument("--max-case-s", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="print the combined report of runs saved with --json (e.g. parallel seeds) and exit")
    args = parser.parse_args(argv)
    if args.merge:
        result = merge([json.loads(p.read_text()) for p in args.merge])
        print_report(result)
        return 1 if result["bugs"] else 0
    if args.mem_limit_mb:
        import resource

        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
        limit = vm + (args.mem_limit_mb << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    result = fuzz(args.cases, args.seed, progress=True)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    over = (result["worst_memory"]["bytes"] > args.max_case_mb * 2**20
            or result["worst_time"]["seconds"] > args.max_case_s)
    if over:
        print(f"a case went over the guard ({args.max_case_mb} MiB, {args.max_case_s} s)")
    return 1 if result["bugs"] or over else 0


if __name__ == "__main__":
    sys.exit(main())
