"""MiniLM's file with and without the format 1.4 ``-u`` contexts, same quantized model (issue 12).

Compresses all-MiniLM-L6-v2 once per seed exactly as ``encoder_screen.py`` does (default encoder, calibration,
``target_bits``), saves it with the writer as it is (A2/D4/E8 coordinates in the ``-u`` layouts: contexts from each
coordinate's own dither, grouped streams) and again with those layouts switched off (format 1.2 layouts: hash-code
contexts), and prints both file sizes and the ratio of each (raw tensors float16, as the screen counts). Both files
must decode to the same weights (checked). The gain at equal quantization is what the new contexts buy; the screen
turns it into a finer step at the same ``target_bits`` (the solver's estimate follows the writer).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/coords_context_ab.py [--bits 3.35] [--lattice E8] [--seeds 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import encoder  # noqa: E402
import peers  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=float, default=3.35)
    parser.add_argument("--lattice", default="E8")
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args(argv)

    import udnc_fx
    from udnc_fx.api import _calibrate
    from udnc_fx.coding import lattice_coords as lc
    from udnc_fx.coding.container import read_container
    from udnc_fx.passes.quantize import quantize
    from udnc_fx.passes.trace import prepare

    task = peers.minilm_task()
    batches = encoder._calibration(task, encoder.MINILM_DOC_SENTENCES)
    cfg0 = udnc_fx.CompressConfig(target_bits=args.bits, lattice=args.lattice, **task.udnc_fields)
    calib = _calibrate(task.float_model, cfg0, batches)
    print(f"| seed | lattice | bits | 1.4 (-u) bytes | 1.2 layouts bytes | saved | ratio 1.4 | ratio 1.2 |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmpdir:
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = cfg0.replace(seed=seed)
            target, how = prepare(task.float_model, cfg)
            out = quantize(target, cfg, calibration=calib, progress=False, how=how).graph_module
            sizes, weights = [], []
            for own in (lc.OWN_DITHER_LATTICES, frozenset()):
                lc.OWN_DITHER_LATTICES = own
                path = Path(tmpdir) / f"m{len(sizes)}.udnc"
                sizes.append(udnc_fx.save(out, path, raw_float_dtype=peers.RAW_FLOAT_DTYPE))
                c = read_container(path)
                weights.append({q.fqn: (q.indices.tobytes(), q.codebook_int.tobytes()) for q in c.quantized})
            lc.OWN_DITHER_LATTICES = frozenset({"A2", "D4", "E8"})
            assert weights[0] == weights[1], "the two files decode to different points"
            new, old = sizes
            print(f"| {seed} | {args.lattice} | {args.bits:g} | {new:,} | {old:,} | {100 * (old - new) / old:.2f} % | "
                  f"{task.numerator / new:.3f}x | {task.numerator / old:.3f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
