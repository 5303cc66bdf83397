"""Where the vector lattices' coded rate exceeds their space-filling loss (issue 12, theory target), per sample.

For each source and lattice at one nominal rate (the quantizer, keys and samples of ``theory.py``), it prints the
gap above the Shannon lower bound of:

* ``file``: the real sections the writer produces (default coder ``ans-dither-v1``; no header);
* ``ideal, file's contexts``: the empirical conditional entropy of the symbols, per symbol column, with the
  contexts the writer gives them, with no table cost: ``file − ideal`` is the coder's side information (count
  tables) and overhead. For ``A2``, ``D4`` and ``E8`` (format 1.4, the ``-u`` layouts): the parity bits the reader
  knows and the 4-bit bin of the coordinate's own dither ``u_i`` (``lattice_coords.own_dither_codes``, ``A2``'s
  ``b`` first); for ``Z^n``: the top bits of the hash code ``floor(16·r_i)`` of the uniform variate behind the
  dither (for ``Z``, ``u = r − round(r)``: the same bins);
* ``ideal, hash codes (1.2)``: the same with the format 1.2 contexts, the hash codes ``floor(16·r_i)`` in place of
  the bins of ``u_i`` (for ``A2``, ``D4`` and ``E8``, ``u = x − Q(x)`` with ``x = r ⊙ box`` only loosely follows
  ``r_i``);
* ``order 0``: the same without any context.

Empirical conditional entropies are biased low by about ``(contexts · alphabet) / (2 ln 2 · symbols)`` bits per
symbol (a few thousandths here); the columns are comparable with each other, not exact.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/theory_gap.py [--samples 1000000] [--rate 3]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import theory  # noqa: E402


def entropy_bits(symbols: np.ndarray, context: np.ndarray | None = None) -> float:
    """Total empirical (conditional) entropy in bits of ``symbols`` (given ``context``)."""
    symbols = np.asarray(symbols, np.int64)
    if context is None:
        counts = np.bincount(symbols)
        p = counts[counts > 0] / symbols.size
        return float(-(p * np.log2(p)).sum()) * symbols.size
    context = np.asarray(context, np.int64)
    return entropy_bits(context * (int(symbols.max()) + 1) + symbols) - entropy_bits(context)


def parity_bits(lattice: str, column: int, symbols: np.ndarray, own: bool = False) -> list[np.ndarray]:
    """The parity bits the reader knows before symbol column ``column`` (docs/FORMAT.md, *lattice-coords*)."""
    from udnc_fx.coding.lattice_coords import zigzag_decode

    if own and lattice == "A2" and column == 1:
        return [zigzag_decode(symbols[:, 0].astype(np.uint64)) & 1]
    if lattice == "D4" and column == 3:
        return [zigzag_decode(symbols[:, :3].astype(np.uint64)).sum(axis=1) & 1]
    if lattice == "E8" and 1 <= column <= 7:
        return [symbols[:, 0]]
    if lattice == "E8" and column == 8:
        return [symbols[:, 0], zigzag_decode(symbols[:, 1:8].astype(np.uint64)).sum(axis=1) & 1]
    return []


def measure(x: np.ndarray, h: float, lattice: str, n: int, rate: float, key: int) -> dict:
    from udnc_fx.coding import lattice_coords as lc
    from udnc_fx.coding.ans import dither_codes
    from udnc_fx.coding.entries import entry_from_record
    from udnc_fx.coding.format import DEFAULT_MAX_ELEMENTS
    from udnc_fx.coding.payload import encode_quantized
    from udnc_fx.lattice import get_lattice
    from udnc_fx.quantizer import quantize_array

    lat = get_lattice(lattice, n)
    q = quantize_array(x, lattice=lattice, n=n, step=2.0 ** (h - rate), key=key)
    distortion = float(np.mean((q.decode().reshape(-1).astype(np.float64) - x) ** 2))
    slb = h - 0.5 * math.log2(2 * math.pi * math.e * distortion)
    entry, indices, codebook = encode_quantized(entry_from_record(q, fqn="x"), "float32", DEFAULT_MAX_ELEMENTS)
    points = np.asarray(q.codebook_int)[np.asarray(q.indices)]
    m = points.shape[0]
    own = lattice in lc.OWN_DITHER_LATTICES  # the writer's -u layouts (ans-dither-v1, hash dither)
    order0 = file_ctx = hashed = 0.0
    for rule in (False, True) if own else (False,):
        symbols = lc.vector_symbols(lattice, points, rule)
        columns = lc.dither_columns(lattice, n, rule)
        if rule:
            codes = lc.own_dither_codes(key, m, lattice, n)[:, columns].astype(np.int64)
        else:
            codes = dither_codes(key, m * n, 1).reshape(m, n)[:, columns].astype(np.int64)
        total = 0.0
        for i in range(symbols.shape[1]):
            col = symbols[:, i]
            bits = parity_bits(lattice, i, symbols, rule)
            if not rule:
                order0 += entropy_bits(col)
            ctx = codes[:, i] >> len(bits)  # the file's context: parity bits on top of the dither code's top bits
            for b in bits:
                ctx = ctx * 2 + b
            total += entropy_bits(col, ctx)
        if rule or not own:
            file_ctx = total
        if not rule:
            hashed = total
    count = x.size
    return {"lattice": lat.label, "loss": theory.space_filling_loss(lat.G), "encoding": entry["codebook"]["encoding"],
            "layout": entry["codebook"].get("layout", ""),
            "file": 8 * (len(indices) + len(codebook)) / count - slb, "file_ctx": file_ctx / count - slb,
            "order0": order0 / count - slb, "hashed": hashed / count - slb,
            "low_rate": 0.5 * math.log2(1 + distortion)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=3.0)
    parser.add_argument("--sources", default="gaussian,laplacian,student-t3")
    args = parser.parse_args(argv)
    print(f"Gap above the Shannon lower bound, bits per sample, at {args.rate:g} bits nominal, {args.samples:,} samples "
          "(keys and samples as theory.py)\n")
    print("| source | lattice | space-filling loss | ½·log2(1+D) | file | file − loss | ideal, file's contexts "
          "| ideal, hash codes (1.2) | order 0 | encoding |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for source in args.sources.split(","):
        si = theory.SOURCES.index(source)
        h = theory.differential_entropy_bits(source)
        x = theory.sample(source, args.samples, si)
        for lattice, n in theory.LATTICES:
            key = 0x5EED0000 + 97 * si + 7 * n + int(args.rate * 10)
            r = measure(x, h, lattice, n, args.rate, key)
            enc = r["encoding"] + (f" {r['layout']}" if r["layout"] else "")
            print(f"| {source} | {r['lattice']} | {r['loss']:.3f} | {r['low_rate']:.3f} | {r['file']:.3f} | "
                  f"{r['file'] - r['loss']:+.3f} | {r['file_ctx']:.3f} | {r['hashed']:.3f} | {r['order0']:.3f} | "
                  f"{enc} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
