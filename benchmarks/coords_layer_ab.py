"""One synthetic layer per vector lattice, saved with the format 1.4 ``-u`` layouts and with the 1.2 layouts, side by
side in one process: file bytes and the CPU time of encode and decode (issue 12).

Same points both ways (the quantizer runs once); the 1.2 form is the writer with ``OWN_DITHER_LATTICES`` emptied.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/coords_layer_ab.py [--rows 1536] [--cols 384] [--bits 3.4]
        [--source gaussian|laplacian|student-t3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1536)
    parser.add_argument("--cols", type=int, default=384)
    parser.add_argument("--bits", type=float, default=3.4)
    parser.add_argument("--source", default="gaussian")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from udnc_fx.coding import lattice_coords as lc
    from udnc_fx.coding.container import Container, QuantizedTensor, decode_container, encode_container
    from udnc_fx.quantizer import quantize_array

    rng = np.random.default_rng(0)
    shape = (args.rows, args.cols)
    w = {"gaussian": lambda: rng.standard_normal(shape), "laplacian": lambda: rng.laplace(size=shape),
         "student-t3": lambda: rng.standard_t(3, shape)}[args.source]()
    h = 0.5 * math.log2(2 * math.pi * math.e * float(np.var(w)))  # a Gaussian's entropy at this variance
    print(f"{args.source} {shape[0]}x{shape[1]} weights, step 2^(h - {args.bits:g}); CPU seconds, best of "
          f"{args.repeats}\n")
    print("| lattice | 1.4 bytes | 1.2 bytes | saved | encode 1.4 / 1.2 | decode 1.4 / 1.2 |")
    print("|---|---|---|---|---|---|")
    own_lattices = lc.OWN_DITHER_LATTICES
    for lattice, n in (("A2", 2), ("D4", 4), ("E8", 8)):
        step = 2.0 ** (h - args.bits)
        qa = quantize_array(w, lattice=lattice, n=n, step=step, key=99)
        q = QuantizedTensor("w", shape, lattice, n, step, 99, "udnc-hash32-v1", qa.indices, None,
                            codebook_int=qa.codebook_int)
        out = {}
        for name, own in (("new", own_lattices), ("old", frozenset())):
            lc.OWN_DITHER_LATTICES = own
            enc, dec = math.inf, math.inf
            for _ in range(args.repeats):
                t = time.process_time()
                data = encode_container(Container([q]))
                enc = min(enc, time.process_time() - t)
                t = time.process_time()
                back = decode_container(data).quantized[0]
                dec = min(dec, time.process_time() - t)
            assert np.array_equal(back.codebook_int, qa.codebook_int)
            out[name] = (len(data), enc, dec)
        lc.OWN_DITHER_LATTICES = own_lattices
        (nb, ne, nd), (ob, oe, od) = out["new"], out["old"]
        print(f"| {lattice} | {nb:,} | {ob:,} | {100 * (ob - nb) / ob:.2f} % | {ne / oe:.2f}x | {nd / od:.2f}x |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
