"""Where ``udnc_fx.load`` and ``udnc_fx.save`` spend their time on all-MiniLM-L6-v2 outside the index coder, under
cProfile.

One process compresses MiniLM once (``transformer_config(target_bits=...)``) and saves it, then profiles ``load``
and ``save`` ``--repeats`` times each and prints, for the repeat with the least non-coder time: the total, the
coder's share (cumulative time in ``coder_base.decode_stream`` / ``encode_stream``: the entropy coder with its
contexts and tables), what is left, and the largest items of what is left (the model copy, ``install``, the rebuild
of lattice-coords tensors, parameter construction, the payload digest...). The saved file's SHA-256 is printed, so
two revisions can be compared on the same bytes: run it once with ``PYTHONPATH`` on an unpacked older tree.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/save_load_profile.py [--bits 3.75] [--repeats 3]

cProfile adds a per-call cost: Python-heavy steps (the model's deep copy: tens of thousands of small calls) weigh
more here than in wall time. Compare revisions under the same profiler, not these figures with wall times.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import tempfile
from pathlib import Path

import torch

import udnc_fx

#: (file name part, function name) of the non-coder steps reported one by one.
ITEMS = [
    ("copy.py", "deepcopy"), ("trace.py", "hollow_copy"), ("trace.py", "prepare"), ("quantize.py", "install"),
    ("param.py", "entropy_bits"), ("quantizer.py", "rank_rows"), ("param.py", "from_record"),
    ("entries.py", "record_from_entry"), ("container.py", "_chunks"), ("param.py", "record"),
    ("payload.py", "_in_reader_order"), ("lattice_coords.py", "_prepare"),
]


def _cumulative(stats: pstats.Stats, file_part: str, func: str) -> float:
    return sum(v[3] for k, v in stats.stats.items() if file_part in k[0] and k[2] == func)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=float, default=3.75)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from udnc_fx.hf import drop_pooler, load_minilm, transformer_config

    model = drop_pooler(load_minilm()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "minilm.udnc"
        udnc_fx.save(udnc_fx.compress(model, transformer_config(target_bits=args.bits), progress=False), source,
                     progress=False)
        compressed = udnc_fx.load(source, model, progress=False)
        out = Path(tmp) / "again.udnc"
        for what in ("load", "save"):
            runs = []
            for _ in range(args.repeats):
                profile = cProfile.Profile()
                if what == "load":
                    profile.runcall(udnc_fx.load, source, model, progress=False)
                else:
                    out.unlink(missing_ok=True)
                    profile.runcall(udnc_fx.save, compressed, out, progress=False)
                stats = pstats.Stats(profile)
                coder = _cumulative(stats, "coder_base.py", f"{'de' if what == 'load' else 'en'}code_stream")
                runs.append((stats.total_tt, coder, {f: _cumulative(stats, a, f) for a, f in ITEMS}))
            total, coder, items = min(runs, key=lambda r: r[0] - r[1])
            shown = " ".join(f"{name} {t:.3f}" for name, t in items.items() if t >= 0.0005)
            print(f"{what}: total {total:.3f} s, coder {coder:.3f} s, non-coder {total - coder:.3f} s ({shown})",
                  flush=True)
        digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()[:16]  # noqa: E731
        print(f"file SHA-256 {digest(source)}, saved again {digest(out)}; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
