"""Structured fuzzing of the readers on files of real models (issue 15), with memory and time guards.

The mutation classes and the runner live in ``benchmarks/fuzz_container.py`` (also a script: the full run prints
counts per class and outcome and the worst case's memory and time). Here: a fast Hypothesis profile over every
class, bombs run in a subprocess under ``RLIMIT_AS``, and the 100,000-case run under ``pytest -m slow``.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import fuzz_container as F  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))

#: Per case, on files of models with a few thousand weights: the fixed allowance of the target (no reader may use
#: more, whatever the file says).
CASE_MB = 64
CASE_S = 5.0


@pytest.fixture(scope="module")
def corpus():
    return F.build_corpus()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(deadline=None, derandomize=True, database=None, max_examples=80,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(F.MUTATIONS)), which=st.integers(0, 99), seed=st.integers(0, 2**32 - 1))
def test_only_format_errors_escape_within_bounds(corpus, workdir, kind, which, seed):
    name, data, model = corpus[which % len(corpus)]
    mutated = F.MUTATIONS[kind](data, random.Random(seed))
    meter = F.PeakMeter()
    import time

    start = time.perf_counter()
    with meter:
        outcome = F.run_case(mutated, model, workdir / "case.udnc", max_elements=1 << 20)
    seconds = time.perf_counter() - start
    assert not any(v.startswith("BUG") for v in outcome.values()), (kind, name, outcome)
    if mutated == data:
        assert set(outcome.values()) == {"ok"}
    assert meter.peak < CASE_MB << 20, (kind, name, meter.peak)
    assert seconds < CASE_S, (kind, name, seconds)


def test_the_runner_counts_every_class(corpus):
    result = F.fuzz(30, seed=1)
    assert not result["bugs"]
    assert sum(c.get("cases", 0) for c in result["counts"].values()) + sum(
        v for c in result["counts"].values() for k, v in c.items() if k.startswith("skipped")
    ) == 30
    assert result["worst_memory"]["bytes"] < CASE_MB << 20


BOMBS = textwrap.dedent(
    """
    import hashlib, json, resource, sys, time
    import numpy as np, torch
    from torch import nn
    import udnc_fx
    from udnc_fx.coding import container as C
    from udnc_fx.coding.format import DIGESTED
    from udnc_fx.cli import main

    def vm(key):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024

    limit = vm("VmSize:") + (1 << 30)  # 1 GiB of headroom: a 2^30-element decode needs 8+ GiB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    tmp = sys.argv[1]

    def framed(header, payload=b""):
        hb = json.dumps(header, separators=(",", ":")).encode()
        d = DIGESTED.pack(C.MAGIC, 1, 0, len(hb), len(payload), hashlib.sha256(payload).digest())
        return d + hashlib.sha256(d + hb).digest() + hb + payload

    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    bombs = {
        # K = 1: an empty stream decodes to any count
        "one-symbol": {"quantized": [{"fqn": "0.weight", "shape": [1 << 15, 1 << 15], "step": 0.1,
                                      "indices": {"alphabet_size": 1, "length": 0}}]},
        "alphabet": {"quantized": [{"fqn": "0.weight", "shape": [8, 16], "step": 0.1,
                                    "indices": {"alphabet_size": (1 << 24) - 2, "length": 0}}]},
        "raw": {"raw": [["0.bias", [1 << 31]]]},
    }
    payloads = {"one-symbol": bytes(4)}  # the one float32 codeword
    worst, kinds = 0.0, []
    for name, header in bombs.items():
        path = f"{tmp}/{name}.udnc"
        open(path, "wb").write(framed(header, payloads.get(name, b"")))
        assert udnc_fx.read_header(path) if name == "one-symbol" else True  # a valid header: the bomb is real
        for fn in (lambda: udnc_fx.read_header(path), lambda: udnc_fx.size_report(path),
                   lambda: udnc_fx.load(path, model), lambda: main(["inspect", path]),
                   lambda: main(["inspect", "--json", path])):
            start = time.perf_counter()
            try:
                fn()
            except udnc_fx.UdncError as exc:
                kinds.append(exc.kind)
            worst = max(worst, time.perf_counter() - start)
    print("worst_s", worst, "peak_rss", vm("VmHWM:"), "kinds", ",".join(kinds))
    """
)


def test_bombs_under_an_address_space_limit(tmp_path):
    run = subprocess.run([sys.executable, "-c", BOMBS, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    fields = run.stdout.split()
    worst_s, peak = float(fields[fields.index("worst_s") + 1]), int(fields[fields.index("peak_rss") + 1])
    assert worst_s < 2.0
    assert peak < 1 << 30  # torch and the test's own model included
    kinds = fields[fields.index("kinds") + 1].split(",")
    assert kinds[0] in ("bad_value", "model_mismatch")  # load of the one-symbol bomb: refused, not decoded


@pytest.mark.slow
def test_fuzz_100k_cases():
    """The full run (about half an hour on one core): prints the counts per class, the worst case's figures."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fuzz_container.py"), "--cases", "100000", "--seed", "0",
         "--mem-limit-mb", "2048", "--max-case-mb", str(CASE_MB), "--max-case-s", str(CASE_S)],
        capture_output=True, text=True, timeout=4 * 3600,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert "bugs (another exception type escaped): 0" in run.stdout
