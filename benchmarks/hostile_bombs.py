"""Hostile-file bombs against ``udnc_fx.load`` (issue 15): time and peak RSS of loading a tiny crafted file.

    .venv/bin/python benchmarks/hostile_bombs.py onesym     # ~200 bytes claiming 2^28 elements of one symbol
    .venv/bin/python benchmarks/hostile_bombs.py alphabet   # ~700 bytes declaring an alphabet of 2^24 - 2

For the figures before the fix, run the same file with ``PYTHONPATH`` pointing at an older checkout's ``udnc_fx``
(the script prints which ``udnc_fx`` it imported). Peak RSS is VmHWM after a ``clear_refs`` reset (Linux only);
torch alone is about 220 MiB. One case per process, so the peaks do not mix.
"""

import os
import tempfile

import hashlib, json, struct, sys, time
import udnc_fx
from udnc_fx.coding import container as C
# The digested part of the preamble (docs/FORMAT.md), spelled out so that the script runs against any checkout.
DIGESTED = struct.Struct("<8sHHIQ32s")
from torch import nn
print("udnc_fx from", udnc_fx.__file__)
def framed(header, payload=b""):
    hb = json.dumps(header, separators=(",", ":")).encode()
    d = DIGESTED.pack(C.MAGIC, 1, 0, len(hb), len(payload), hashlib.sha256(payload).digest())
    return d + hashlib.sha256(d + hb).digest() + hb + payload
kind = sys.argv[1]
if kind == "onesym":
    header = {"quantized": [{"fqn": "0.weight", "shape": [1 << 14, 1 << 14], "step": 0.1, "indices": {"alphabet_size": 1, "length": 0}}]}
    data = framed(header, bytes(4))
elif kind == "alphabet":
    import numpy as np
    from udnc_fx.coding.coders import get_coder
    k = (1 << 24) - 2
    stream = np.arange(128) % 3
    payload = get_coder("range-adaptive-v1").encode(stream, k)
    header = {"coder": "range-adaptive-v1", "quantized": [{"fqn": "0.weight", "shape": [8, 16], "step": 0.1,
              "codebook": {"encoding": "lattice-int-coded", "alphabet_size": 1, "length": 0},
              "indices": {"alphabet_size": k, "length": len(payload)}}]}
    data = framed(header, payload)
path = os.path.join(tempfile.mkdtemp(), f"{kind}.udnc"); open(path, "wb").write(data)
print(kind, "file bytes", len(data))
model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
open("/proc/self/clear_refs", "w").write("5")
t = time.perf_counter()
try:
    udnc_fx.load(path, model); r = "loaded"
except Exception as e:
    r = f"{type(e).__name__}: {str(e)[:150]}"
dt = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(f"load: {dt:.2f} s, peak RSS {hwm:.0f} MiB -> {r}")
