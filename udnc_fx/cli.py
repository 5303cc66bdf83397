"""The ``udnc`` command line: ``demo``, ``compress``, ``inspect``."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

from .errors import ConfigError, UdncError

__all__ = ["main"]


def _demo(args) -> int:
    from .demo import run_demo

    # Only what the user set: run_demo's defaults are the measured best pipeline.
    options = {k: v for k, v in (("finetune_epochs", args.finetune_epochs), ("sparsity", args.sparsity)) if v is not None}
    if args.keep_bn:
        options["fold_bn"] = False
    run_demo(
        args.out,
        lattice=args.lattice,
        n=args.n,
        target_bits=args.bits,
        seed=args.seed,
        epochs=args.epochs,
        progress=not args.no_progress,
        **options,
    )
    return 0


def _load_factory(spec: str):
    """``package.module:factory`` -> the float model the factory returns."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"MODEL must look like 'package.module:factory', got {spec!r}")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {spec!r}: {exc}") from None
    finally:
        sys.path.pop(0)
    model = factory()
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _load_weights(model, path: str) -> None:
    """Weights from a ``.safetensors`` file or a state_dict saved by ``torch.save`` (loaded with weights_only)."""
    import torch

    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError("reading .safetensors needs the 'safetensors' package (pip install safetensors)") from None
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ConfigError(f"{path} does not hold a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"the weights in {path} do not fit the model: {exc}") from None


def _compress(args) -> int:
    from . import CompressConfig, compress, inspect, save, size_report

    model = _load_factory(args.model)
    if args.weights:
        _load_weights(model, args.weights)
    model.eval()
    if args.config:
        config = CompressConfig.from_dict(json.loads(Path(args.config).read_text()))
    else:
        step_args = {k: v for k, v in (("step", args.step), ("relative_step", args.relative_step), ("target_bits", args.bits)) if v is not None}
        config = CompressConfig(lattice=args.lattice, n=args.n, seed=args.seed, fallback=args.fallback, **step_args)
    gm = compress(model, config)
    print(inspect(gm))
    size = save(gm, args.out, raw_float_dtype=args.raw_dtype, **({"coder": args.coder} if args.coder else {}))
    report = size_report(args.out)
    print(f"\nwrote {args.out}: {size} bytes; whole-file ratio {report['file_ratio']:.2f}x, "
          f"compressed weights only {report['weights_ratio']:.2f}x")
    return 0


def _inspect(args) -> int:
    from . import read_header, size_report

    path = args.file
    if path.endswith(".onnx"):
        return _inspect_onnx(path, as_json=args.json)
    header = read_header(path)
    report = size_report(path)
    if args.json:
        # allow_nan=False: the output must be JSON; the reader refuses non-finite numbers, so this never fires
        print(json.dumps({"header": header, "sizes": report}, indent=2, allow_nan=False))
        return 0
    head = ["tensor", "shape", "lattice", "K", "coder", "bytes", "bits/w", "ratio"]
    rows = []
    for r in report["rows"]:
        if r["kind"] == "quantized":
            lat = f"{r['lattice']}{r['n']}" if r["lattice"] == "Z" else r["lattice"]
            k = f"coords ({r['layout']})" if r["codewords"] is None else str(r["codewords"])  # no table of points
            bits = "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            rows.append([r["name"], "x".join(map(str, r["shape"])), lat, k, str(r["coder"]), str(r["bytes"]), bits, ratio])
    raw = [r for r in report["rows"] if r["kind"] == "raw"]
    rows.append(["(raw tensors)", f"{len(raw)} tensors", "", "", "", str(sum(r["bytes"] for r in raw)), "", ""])
    rows.append(["(preamble + shared header)", "", "", "", "", str(report["shared_bytes"]), "", ""])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"\nfile: {report['file_bytes']} bytes")
    weights_ratio = "-" if report["weights_ratio"] is None else f"{report['weights_ratio']:.2f}x"
    file_ratio = "-" if report["file_ratio"] is None else f"{report['file_ratio']:.2f}x"
    print(f"compressed weights only: {report['weights_float_bytes']} float32 bytes -> {report['weights_bytes']} bytes "
          f"(indices + codebooks + their header entries) = {weights_ratio}")
    print(f"whole file: {report['all_float_bytes']} float32 bytes of every stored tensor -> {report['file_bytes']} "
          f"bytes = {file_ratio}")
    return 0


def _inspect_onnx(path: str, *, as_json: bool) -> int:
    """List the dequantize subgraphs of an exported ONNX file and the sizes involved."""
    import os

    from .export.runtime import read_udnc_onnx, sidecar_candidates

    info = read_udnc_onnx(path)
    sidecar = None
    if info.has_sidecar:
        candidates = sidecar_candidates(info)
        sidecar = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    init_bytes = {t.name: len(t.raw_data) or t.ByteSize() for t in info.model.graph.initializer}
    rows = []
    for spec in info.specs:
        numel = math.prod(spec.shape)
        stored = sum(b for name, b in init_bytes.items() if name.startswith(f"udnc/{spec.fqn}/"))
        rows.append({"fqn": spec.fqn, "shape": list(spec.shape), "lattice": spec.lattice, "n": spec.n,
                     "weights": numel, "bytes_in_onnx": stored})
    summary = {
        "onnx_file": path,
        "onnx_bytes": os.path.getsize(path),
        "sidecar": sidecar,
        "sidecar_bytes": os.path.getsize(sidecar) if sidecar and os.path.exists(sidecar) else None,
        "opset": [(o.domain or "ai.onnx", o.version) for o in info.model.opset_import],
        "dequantize_subgraphs": rows,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    head = ["weight", "shape", "lattice", "weights", "bytes in .onnx"]
    table = [[r["fqn"], "x".join(map(str, r["shape"])), f"{r['lattice']}{r['n']}" if r["lattice"] == "Z" else r["lattice"],
              str(r["weights"]), str(r["bytes_in_onnx"])] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"\n{len(rows)} dequantize subgraphs; {path}: {summary['onnx_bytes']} bytes; opset {summary['opset']}")
    if sidecar:
        print(f"sidecar {sidecar}: {summary['sidecar_bytes']} bytes (entropy-coded indices and codebooks)")
    else:
        print("self-contained: indices stored as small-integer initializers in the .onnx file")
    return 0


def _export(args) -> int:
    import torch

    from .export import to_onnx
    from .io import load

    from .export.files import check_replaceable

    check_replaceable(args.out)  # before the model is built and loaded: a directory or a foreign file is refused
    model = _load_factory(args.model).eval()
    gm = load(args.file, model)
    shapes = []
    for text in args.example_shape:
        try:
            shapes.append(tuple(int(d) for d in text.lower().split("x")))
        except ValueError:
            raise ConfigError(f"--example-shape must look like 1x3x32x32, got {text!r}") from None
    dtype = getattr(torch, args.example_dtype)
    example = tuple(torch.zeros(s, dtype=dtype) if not dtype.is_floating_point else torch.randn(s, dtype=dtype)
                    for s in shapes)
    result = to_onnx(gm, example if len(example) > 1 else example[0], args.out, sidecar=not args.self_contained)
    print(f"wrote {result.onnx_path} ({result.onnx_bytes} bytes)"
          + (f" and sidecar {result.sidecar_path} ({result.sidecar_bytes} bytes)" if result.sidecar_path else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="udnc", description="Universal DNN compression as a torch.fx pass")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a CNN on scikit-learn's digits, compress it, report")
    demo.add_argument("--out", default="udnc-out/demo", help="artefact folder (default: udnc-out/demo)")
    demo.add_argument("--lattice", default="Z", help="Z, A2, D4 or E8 (default Z)")
    demo.add_argument("--n", type=int, default=None, help="lattice dimension (Z only; default 1)")
    demo.add_argument("--bits", type=float, default=None, help="target entropy in bits/weight (default 3)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=30, help="float training epochs")
    demo.add_argument("--finetune-epochs", type=int, default=None, help="codeword fine-tuning epochs (default 8; 0: none)")
    demo.add_argument("--sparsity", type=float, default=None,
                      help="magnitude-prune this fraction of the weights and retrain, before quantizing (default 0.8)")
    demo.add_argument("--keep-bn", action="store_true", help="do not fold BatchNorm into the convolutions")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    comp = sub.add_parser("compress", help="compress a model given as package.module:factory")
    comp.add_argument("model", help="package.module:factory (a function returning the float nn.Module)")
    comp.add_argument("--out", required=True, help="the .udnc file to write")
    comp.add_argument("--weights", help="a .safetensors file or a torch.save'd state_dict (loaded weights_only)")
    comp.add_argument("--config", help="a JSON file with a CompressConfig (overrides the flags below)")
    comp.add_argument("--lattice", default="Z")
    comp.add_argument("--n", type=int, default=None)
    comp.add_argument("--seed", type=int, default=0)
    steps = comp.add_mutually_exclusive_group()
    steps.add_argument("--bits", type=float, default=None, help="target entropy in bits/weight (default 3)")
    steps.add_argument("--step", type=float, default=None, help="absolute step for every layer")
    steps.add_argument("--relative-step", type=float, default=None, help="step = value x std(W) per layer")
    comp.add_argument("--fallback", choices=["error", "module_swap"], default="error")
    comp.add_argument("--coder", default=None, help="index coder (default ans-dither-v1, static ANS conditioned on the dither; see udnc_fx.coding.available_coders)")
    comp.add_argument("--raw-dtype", choices=["float32", "float16"], default="float32",
                      help="storage of uncompressed tensors (biases, norms)")
    comp.set_defaults(func=_compress)

    exp = sub.add_parser("export", help="lower a .udnc model to ONNX (dequantize subgraphs + sidecar)")
    exp.add_argument("file", help="the .udnc file")
    exp.add_argument("--model", required=True, help="package.module:factory building the float architecture")
    exp.add_argument("--example-shape", required=True, nargs="+", help="input shape(s) to trace with, e.g. 1x1x8x8")
    exp.add_argument("--example-dtype", default="float32", help="dtype of the example inputs (e.g. int64 for token ids)")
    exp.add_argument("--out", required=True, help="the .onnx file to write (the sidecar goes beside it)")
    exp.add_argument("--self-contained", action="store_true", help="indices inside the .onnx file, no sidecar")
    exp.set_defaults(func=_export)

    ins = sub.add_parser("inspect", help="per-tensor sizes of a .udnc file (or the dequantize subgraphs of a .onnx)")
    ins.add_argument("file")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UdncError as exc:
        print(f"udnc: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a missing or unreadable file: say which, no traceback
        print(f"udnc: error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
