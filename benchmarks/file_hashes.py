"""SHA-256 of the ``.udnc`` file, the SQNR and the materialized weights of 50 small compress configurations.

Run it with two versions of the code and compare the JSON files: a change meant to leave the bytes alone must give
identical hashes. ``CHUNK=100`` shrinks every chunk/block size of the chunked quantize/encode/decode paths (so the
small layers cross many chunk boundaries).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/file_hashes.py new.json
    (cd /tmp && PYTHONPATH=<old package tree> python <repo>/benchmarks/file_hashes.py old.json)   # the old code
"""

import hashlib, sys, tempfile, json
from pathlib import Path
import torch, numpy as np
torch.set_num_threads(1)
import udnc_fx, os
if os.environ.get("CHUNK"):
    import udnc_fx.quantizer as _q, udnc_fx.record as _r
    _q.QUANTIZE_CHUNK_ELEMENTS = int(os.environ["CHUNK"]); _r.DITHER_CHUNK_ELEMENTS = int(os.environ["CHUNK"]); _q.SUM_BLOCK_ELEMENTS = int(os.environ["CHUNK"])
    import udnc_fx.coding.ans as _a, udnc_fx.coding.payload as _p; _a._COUNT_CHUNK = _p._BINCOUNT_CHUNK = int(os.environ["CHUNK"])

def model(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        m = torch.nn.Sequential(torch.nn.Linear(300, 257), torch.nn.ReLU(), torch.nn.Linear(257, 33), torch.nn.Linear(33, 7))
    else:
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 17, 3), torch.nn.ReLU(), torch.nn.Conv2d(17, 9, 5))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if kind == "mlp":  # some exact zeros (pruned)
            m[0].weight[:, ::3] = 0
    return m.eval()

out = {}
tmp = Path(tempfile.mkdtemp())
cases = []
for kind in ("mlp", "conv"):
    for lat, n in (("Z", 1), ("Z", 3), ("A2", None), ("D4", None), ("E8", None)):
        for kw in ({"relative_step": 0.3}, {"relative_step": 1.5, "exact_zero": True}, {"target_bits": 2.0},
                   {"relative_step": 0.05}, {"relative_step": 0.4, "dithered": False}):
            cases.append((kind, lat, n, kw))
for i, (kind, lat, n, kw) in enumerate(cases):
    m = model(kind)
    cfg = udnc_fx.CompressConfig(lattice=lat, n=n, seed=3, **kw)
    gm = udnc_fx.compress(m, cfg, progress=False)
    p = tmp / f"{i}.udnc"
    udnc_fx.save(gm, p, progress=False)
    h = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    from udnc_fx.passes.materialize import served_params
    sq = [float(d.sqnr_db).hex() for d in served_params(gm)]
    loaded = udnc_fx.load(p, model(kind), progress=False)
    from udnc_fx.passes.materialize import materialize
    mat = materialize(loaded, inplace=True)
    wh = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in mat.state_dict().values())).hexdigest()[:16]
    out[f"{kind}-{lat}{n}-{json.dumps(kw, sort_keys=True)}"] = (h, sq, wh)
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(len(out), "cases")
