"""Peak memory and wall time of ``compress_checkpoint`` on a sharded ``.safetensors`` checkpoint (1e8, 1e9 weights)
next to ``safetensors`` loading the same checkpoint, in the same run.

The checkpoint is a stack of 4096x4096 ``nn.Linear`` weights (with their biases) of synthetic Gaussian values (std
1/sqrt(fan_in)), written as shards of at most 256 MiB with a ``model.safetensors.index.json``, as ``save_pretrained``
writes them. Each step runs in its own subprocess; the table gives its peak resident memory (``VmHWM``), the peak
minus the resident size just before the step (imports), that as a multiple of the checkpoint's float bytes, and the
wall time. ``safetensors load`` is ``safetensors.torch.load_file`` on every shard into one state dict, every value
read once (a sum: load_file maps the file, so untouched tensors would not be resident; this is what building the
float model costs at least); ``compress_checkpoint`` compresses it at one relative step (``relative_step=0.25``,
about 4 bits per weight on Gaussian weights) or at ``--bits``.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/checkpoint_scale.py --sizes 1e8 [1e9] [--bits 3]
        [--with-compress]   # also compress + save of the float model built from the checkpoint, side by side
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYER = 4096
SIZES = {"1e7": 1, "1e8": 6, "1e9": 60}  # 4096x4096 layers: 16.8M weights each
SHARD_BYTES = 256 << 20  # 256 MiB shards: 2 at 1e8, 20 at 1e9


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def build(path: Path, layers: int) -> int:
    """Writes the sharded checkpoint (one layer in memory at a time). Returns its float bytes."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, shards, total = {}, {}, 0, [], 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(path / name))
            shards.append(name)
            for k in shard:
                weight_map[k] = name
            shard, shard_bytes = {}, 0

    for i in range(layers):
        w = torch.randn(LAYER, LAYER, generator=gen) / LAYER**0.5
        b = torch.randn(LAYER, generator=gen) / LAYER**0.5
        if shard_bytes + (w.numel() + b.numel()) * 4 > SHARD_BYTES:
            flush()
        shard[f"layers.{i}.weight"], shard[f"layers.{i}.bias"] = w, b
        shard_bytes += (w.numel() + b.numel()) * 4
        total += (w.numel() + b.numel()) * 4
    flush()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def worker(phase: str, ckpt: Path, out: Path, bits: float | None) -> dict:
    import torch  # noqa: F401  (imports count in the baseline, not in the step)
    from safetensors.torch import load_file

    import udnc_fx
    from udnc_fx import CompressConfig

    base = _status("VmRSS")
    t0 = time.perf_counter()
    if phase == "safetensors":
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(str(ckpt / shard)))
        checksum = sum(float(t.double().sum()) if t.numel() < 1 << 20 else float(t.sum()) for t in state.values())
        extra = {"tensors": len(state), "checksum": checksum}  # every value read: the float model is in memory
    elif phase == "compress+save":  # the in-memory path on the same checkpoint: float model, compress, save
        import torch
        from torch import nn

        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        layers = len(index["weight_map"]) // 2
        with torch.device("meta"):
            model = nn.Module()
            model.layers = nn.ModuleList(nn.Linear(LAYER, LAYER) for _ in range(layers))
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(str(ckpt / shard)))
        model.load_state_dict(state, assign=True)
        del state
        config = CompressConfig(target_bits=bits) if bits else CompressConfig(relative_step=0.25)
        compressed = udnc_fx.compress(model, config, progress=False)
        size = udnc_fx.save(compressed, out, progress=False)
        extra = {"file_bytes": size}
    else:
        config = CompressConfig(target_bits=bits) if bits else CompressConfig(relative_step=0.25)
        size = udnc_fx.compress_checkpoint(ckpt, out, config, progress=False)
        header = udnc_fx.read_header(out)
        weights = sum(int(q["indices"]["count"]) * int(q["n"]) for q in header["quantized"])
        extra = {"file_bytes": size, "compressed_weights": weights}
    wall = time.perf_counter() - t0
    if out.exists():  # compress_checkpoint's file must be compress + save's, byte for byte
        import hashlib

        digest = hashlib.sha256()
        with open(out, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        extra["sha256"] = digest.hexdigest()
    return {"phase": phase, "wall_s": wall, "peak": _status("VmHWM"), "base": base, **extra}


def run_worker(phase: str, ckpt: Path, out: Path, bits: float | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", phase, "--ckpt", str(ckpt), "--out-file", str(out)]
    if bits:
        cmd += ["--bits", str(bits)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["1e8"], choices=sorted(SIZES))
    parser.add_argument("--bits", type=float, default=None, help="target_bits instead of relative_step=0.25")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--worker", choices=["safetensors", "compress_checkpoint", "compress+save"])
    parser.add_argument("--with-compress", action="store_true",
                        help="also time compress + save of the float model built from the same checkpoint")
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--out-file", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.ckpt, args.out_file, args.bits)))
        return 0
    rows = []
    for size in args.sizes:
        scratch = Path(tempfile.mkdtemp(prefix=f"ckpt-{size}-", dir=args.dir))
        try:
            ckpt, out = scratch / "ckpt", scratch / "model.udnc"
            float_bytes = build(ckpt, SIZES[size])
            shards = len(list(ckpt.glob("*.safetensors")))
            phases = ["safetensors", "compress_checkpoint"] + (["compress+save"] if args.with_compress else [])
            for phase in phases:
                if out.exists():
                    out.unlink()
                r = run_worker(phase, ckpt, out, args.bits)
                r.update(size=size, float_bytes=float_bytes, shards=shards, load=os.getloadavg()[0])
                rows.append(r)
                print(json.dumps(r), flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n| weights | step | shards | peak RSS MiB | added MiB | added / float bytes | wall s | file ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        added = r["peak"] - r["base"]
        ratio = f"{r['float_bytes'] / r['file_bytes']:.2f}x" if "file_bytes" in r else "-"
        print(f"| {r['size']} ({r['float_bytes'] // 4:,}) | {r['phase']} | {r['shards']} | {r['peak'] / 2**20:.0f} | "
              f"{added / 2**20:.0f} | {added / r['float_bytes']:.2f} | {r['wall_s']:.1f} | {ratio} |")
    for size in args.sizes:
        digests = {r["phase"]: r.get("sha256") for r in rows if r["size"] == size and r.get("sha256")}
        if len(digests) > 1:
            print(f"{size}: the files of {' and '.join(digests)} are "
                  f"{'identical' if len(set(digests.values())) == 1 else 'DIFFERENT'}")
    print(f"\nload average at the end: {os.getloadavg()}; cores: {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
