"""The ``udnc`` command line: ``demo``, ``compress``, ``compress-checkpoint``, ``decompress``, ``export``,
``inspect``."""

from __future__ import annotations

import argparse
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


# Flags whose values a --config file replaces (a note names the ones the user set), with their defaults.
_COMPRESS_DEFAULTS = {"lattice": "Z", "n": None, "seed": 0, "bits": None, "step": None, "relative_step": None,
                      "fallback": "auto", "leaf_module": None}
_CONFIG_FLAGS = tuple(_COMPRESS_DEFAULTS)


def _say(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text)


def _note(text: str) -> None:
    print(f"udnc: note: {text}", file=sys.stderr)


def _validate_compress(args) -> None:
    """Every argument checked before any work (one clean line and exit status 2 on the first bad one)."""
    from .cli_inputs import check_coder, check_output_path

    check_output_path(args.out, replaces="udnc")
    check_coder(args.coder)
    if args.prune is not None and not 0 <= args.prune < 1:
        raise ConfigError(f"--prune takes a fraction of the weights in [0, 1), got {args.prune}")
    if args.finetune_epochs is not None:
        if args.finetune_epochs < 0:
            raise ConfigError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
        if args.finetune_epochs and not args.calibration:
            raise ConfigError("--finetune-epochs needs data: give --calibration FILE (the float model is the teacher)")
    if args.allocate == "probe" and not args.calibration:
        raise ConfigError("--allocate probe measures sensitivities on data: give --calibration FILE")
    if args.max_loss is not None:
        if not (math.isfinite(args.max_loss) and args.max_loss > 0):
            raise ConfigError(f"--max-loss must be a number > 0, got {args.max_loss}")
        if not args.calibration:
            raise ConfigError("--max-loss measures the loss on data: give --calibration FILE")
        if args.step is not None or args.relative_step is not None or args.bits is not None:
            raise ConfigError("--max-loss searches the rate itself: drop --bits/--step/--relative-step")
    if args.plot:
        if args.max_loss is None:
            raise ConfigError("--plot draws the curve that --max-loss explores: give --max-loss")
        check_output_path(args.plot, what="--plot")
    if (args.step is not None or args.relative_step is not None) and args.allocate not in (None, "uniform"):
        raise ConfigError("--allocate chooses per-layer steps for a --bits target; it cannot be combined with "
                          "--step or --relative-step")


def _flags_config(args):
    from .config import CompressConfig

    step_args = {k: v for k, v in (("step", args.step), ("relative_step", args.relative_step),
                                   ("target_bits", args.bits)) if v is not None}
    return CompressConfig(lattice=args.lattice, n=args.n, seed=args.seed, fallback=args.fallback,
                          leaf_modules=tuple(args.leaf_module or ()), **step_args)


def _relative_loss(reference, output_fn, batch):
    """``quality_fn`` for --max-loss: the output's squared error relative to the float model's,
    ``‖y − ŷ‖² / ‖y‖²`` on the calibration batch."""
    import torch

    with torch.no_grad():
        want = output_fn(reference, batch).double()
    denom = float((want**2).sum()) or 1.0

    def loss(model) -> float:
        with torch.no_grad():
            got = output_fn(model, batch).double()
        return float(((got - want) ** 2).sum()) / denom

    return loss


def _compress(args) -> int:
    import inspect as pyinspect
    import warnings

    import torch

    from . import compress, inspect, save, size_report
    from .cli_inputs import load_model, read_calibration, read_config
    from .hf_io import hf_metadata
    from .passes.allocate import allocate, default_output_fn

    _validate_compress(args)
    config = read_config(args.config) if args.config else None
    if config is not None:
        given = [f"--{name.replace('_', '-')}" for name in _CONFIG_FLAGS
                 if getattr(args, name) != _COMPRESS_DEFAULTS.get(name)]
        if given:
            _note(f"--config {args.config} sets the compression; ignoring {', '.join(given)}")
    else:
        config = _flags_config(args)
    if args.quiet:
        from .hf_io import import_transformers

        if Path(args.model).is_dir():
            import_transformers().utils.logging.disable_progress_bar()
    model, is_checkpoint, random_weights = load_model(args.model, args.weights)
    model.eval()
    calibration = read_calibration(args.calibration, checkpoint=args.model if is_checkpoint else None) \
        if args.calibration else None
    if random_weights:
        _note(f"no --weights given: compressing the random initial weights that {args.model} returns "
              "(pass --weights FILE for trained ones)")
    metadata = dict(hf_metadata(model) or {})
    cli_steps = {}
    if args.fold_bn:
        from .passes.fold import fold_batchnorm, fold_report

        try:
            model = fold_batchnorm(model, leaf_modules=config.leaf_modules).eval()
        except UdncError as exc:
            raise ConfigError(f"--fold-bn: {exc}") from None
        cli_steps["fold_bn"] = True
        _say(args, f"folded {len(fold_report(model))} BatchNorm layers into the layers before them")
    if args.prune:
        from .passes.prune import mask_sparsity, prune

        model, masks = prune(model, args.prune, config=config)
        config = config.replace(exact_zero=True)
        cli_steps["prune"] = args.prune
        _say(args, f"pruned to sparsity {mask_sparsity(masks):.3f} (smallest-magnitude vectors set to 0)")
    float_model = model
    output_fn = default_output_fn
    compress_kwargs = {"progress": False if args.quiet else None}
    if calibration is not None and "calibration" in pyinspect.signature(compress).parameters:
        compress_kwargs["calibration"] = [calibration]  # error-compensating rounding, where compress supports it
    with warnings.catch_warnings():
        # The CLI says how it traced in its own words below (and names --fallback), not as a Python warning.
        warnings.filterwarnings("ignore", message="torch.fx could not trace")
        if args.max_loss is not None:
            from .rate import compress_to

            search = compress_to(
                model, _relative_loss(float_model, output_fn, calibration), args.max_loss, config,
                calibration_inputs=calibration, output_fn=output_fn,
                method=args.allocate or ("probe" if calibration is not None else "weights"),
                save_kwargs=_save_kwargs(args), compress_kwargs=compress_kwargs,
                progress=False if args.quiet else None,
            )
            gm = search.model
            _say(args, str(search))
            if args.plot:
                search.plot(args.plot)
                _say(args, f"wrote the curve to {args.plot}")
        else:
            if args.allocate is not None or (calibration is not None and config.step_mode == "target_bits"):
                method = args.allocate or "probe"
                allocation = allocate(model, config, calibration_inputs=calibration, output_fn=output_fn,
                                      method=method, progress=False if args.quiet else None)
                config = allocation.config
                _say(args, f"step allocation: {method}, {len(allocation.layers)} layers, mean "
                           f"{allocation.mean_bits:.3f} bits/weight")
            gm = compress(model, config, **compress_kwargs)
    record_trace = inspect(gm).trace or ""
    if record_trace.startswith("module-swap fallback") and config.fallback == "auto":
        _note("torch.fx could not trace this model: compressed by module swap (no graph); "
              "--fallback module_swap silences this, --fallback error refuses")
    if args.finetune_epochs:
        from .passes.finetune import finetune
        from .passes.allocate import first_tensor
        from .cli_inputs import split_batch

        data = [b for b in split_batch(calibration, args.batch_size)]

        def distill(student, teacher):
            return torch.nn.functional.mse_loss(first_tensor(student), first_tensor(teacher))

        result = finetune(gm, data, teacher=float_model, distill=distill, epochs=args.finetune_epochs,
                          progress=not args.quiet, keep="last", lr=args.finetune_lr)
        cli_steps["finetune_epochs"] = args.finetune_epochs
        _say(args, f"fine-tuned the codewords for {args.finetune_epochs} epochs on the calibration data "
                   f"(distillation from the float model; final loss {result.history[-1].get('loss')})")
    if calibration is not None:
        loss = _relative_loss(float_model, output_fn, calibration)(gm.eval())
        _say(args, f"relative output error on the calibration data: {loss:.3g}")
    if cli_steps:
        metadata["udnc_cli"] = cli_steps
    if not args.quiet:
        print(inspect(gm))
    try:
        size = save(gm, args.out, metadata=metadata, progress=False if args.quiet else None, **_save_kwargs(args))
    except OSError as exc:  # the write failed after all (disk full, permissions changed): name the user's path
        raise ConfigError(f"--out {args.out}: cannot write it: {exc.strerror or exc}") from None
    report = size_report(args.out)
    print(f"wrote {args.out}: {size} bytes; whole-file ratio {report['file_ratio']:.2f}x, "
          f"compressed weights only {report['weights_ratio']:.2f}x")
    return 0


def _compress_checkpoint(args) -> int:
    from .checkpoint import compress_checkpoint
    from .cli_inputs import check_coder, check_output_path, read_config
    from .storage import size_report

    check_output_path(args.out, replaces="none")
    check_coder(args.coder)
    config = read_config(args.config) if args.config else _flags_config(args)
    if args.config:
        given = [f"--{name.replace('_', '-')}" for name in _CONFIG_FLAGS
                 if getattr(args, name, None) != _COMPRESS_DEFAULTS.get(name)]
        if given:
            _note(f"--config {args.config} sets the compression; ignoring {', '.join(given)}")
    try:
        size = compress_checkpoint(args.checkpoint, args.out, config, progress=False if args.quiet else None,
                                   **_save_kwargs(args))
    except OSError as exc:
        raise ConfigError(f"--out {args.out}: cannot write it: {exc.strerror or exc}") from None
    report = size_report(args.out)
    print(f"wrote {args.out}: {size} bytes; whole-file ratio {report['file_ratio']:.2f}x, "
          f"compressed weights only {report['weights_ratio']:.2f}x")
    return 0


def _save_kwargs(args) -> dict:
    return {"raw_float_dtype": args.raw_dtype, **({"coder": args.coder} if args.coder else {})}


def _decompress(args) -> int:
    from . import hf_io
    from .cli_inputs import check_output_path
    from .storage import read_header

    header = read_header(args.file)
    is_hf = isinstance(header.get("metadata", {}).get(hf_io.HF_METADATA_KEY), dict)
    if is_hf:
        check_output_path(args.out, directory=True)
        out = hf_io.write_checkpoint_dir(args.file, args.out)
        print(f"wrote {out}/ (config.json + model.safetensors): from_pretrained('{out}') loads it")
    else:
        if not args.out.endswith(".safetensors"):
            raise ConfigError(f"{args.file} is not a Hugging Face model: --out must be a .safetensors file, got {args.out}")
        check_output_path(args.out, replaces="none")
        out = hf_io.write_state_dict(args.file, args.out)
        print(f"wrote {out}: the decoded state_dict (load_state_dict on the float model)")
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
    head = ["tensor", "shape", "lattice", "K", "codebook", "coder", "bytes", "bits/w", "ratio"]
    rows = []
    for r in report["rows"]:
        if r["kind"] == "quantized":
            lat = f"{r['lattice']}{r['n']}" if r["lattice"] == "Z" else r["lattice"]
            k = f"coords ({r['layout']})" if r["codewords"] is None else str(r["codewords"])  # no table of points
            bits = "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            cb = str(r["codebook_encoding"])
            if r.get("affine") is not None:  # integer points under the fine-tuned per-layer correction (format 1.3)
                cb += f" + affine a={r['affine'][0]:.5g} b={r['affine'][1]:.3g}"
            rows.append([r["name"], "x".join(map(str, r["shape"])), lat, k, cb, str(r["coder"]), str(r["bytes"]), bits,
                         ratio])
    raw = [r for r in report["rows"] if r["kind"] == "raw"]
    rows.append(["(raw tensors)", f"{len(raw)} tensors", "", "", "", "", str(sum(r["bytes"] for r in raw)), "", ""])
    rows.append(["(preamble + shared header)", "", "", "", "", "", str(report["shared_bytes"]), "", ""])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"\nfile: {report['file_bytes']} bytes")
    stored, plain = header["header_length"], header.get("header_json_length", header["header_length"])
    print(f"header: {stored} bytes" + (f" (udnc-hcm-v1, {plain} bytes of JSON)" if stored != plain else " (plain JSON)"))
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

    from . import hf_io
    from .cli_inputs import check_output_path, load_factory, parse_dtype, parse_shapes
    from .export import to_onnx
    from .storage import load, read_header

    # Arguments first: nothing is loaded or traced until every one of them is known to be usable.
    check_output_path(args.out)
    shapes = parse_shapes(args.example_shape)
    dtype = parse_dtype(args.example_dtype)
    input_names = _names(args.input_names, "--input-names")
    output_names = _names(args.output_names, "--output-names")
    if input_names is not None and len(input_names) != len(shapes):
        raise ConfigError(f"--input-names gives {len(input_names)} names for {len(shapes)} --example-shape inputs")
    dynamic_axes = _dynamic_axes(args, input_names, output_names, len(shapes))
    from .export.files import check_replaceable

    check_replaceable(args.out)  # before the model is built and loaded: a directory or a foreign file is refused
    header = read_header(args.file)
    metadata = header.get("metadata", {})
    if args.model is None:
        if not isinstance(metadata.get(hf_io.HF_METADATA_KEY), dict):
            raise ConfigError(f"{args.file} is not a Hugging Face model: give --model package.module:factory")
        gm = hf_io.tensor_io(hf_io.from_udnc(args.file, materialize=False))  # tensors in, one tensor out
    else:
        model = load_factory(args.model).eval()
        if isinstance(metadata.get("udnc_cli"), dict) and metadata["udnc_cli"].get("fold_bn"):
            from .passes.fold import fold_batchnorm

            model = fold_batchnorm(model).eval()  # the file was compressed after folding (udnc compress --fold-bn)
        gm = load(args.file, model)
    example = tuple(torch.zeros(s, dtype=dtype) if not dtype.is_floating_point else torch.randn(s, dtype=dtype)
                    for s in shapes)
    result = to_onnx(gm, example if len(example) > 1 else example[0], args.out, sidecar=not args.self_contained,
                     input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                     **({"decoded": True} if args.self_contained == "decoded" else {}))
    print(f"wrote {result.onnx_path} ({result.onnx_bytes} bytes)"
          + (f" and sidecar {result.sidecar_path} ({result.sidecar_bytes} bytes)" if result.sidecar_path else ""))
    return 0


def _names(text: str | None, flag: str) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"{flag} takes distinct comma-separated names, got {text!r}")
    return names


def _dynamic_axes(args, input_names, output_names, n_inputs) -> dict | None:
    """``--dynamic-batch`` and ``--dynamic-axis NAME:AXIS[=LABEL]`` -> ``torch.onnx.export``'s ``dynamic_axes``."""
    axes: dict[str, dict[int, str]] = {}
    inputs = input_names or [f"input_{i}" for i in range(n_inputs)]
    outputs = output_names or ["output"]
    if args.dynamic_batch:
        if input_names is None or output_names is None:
            raise ConfigError("--dynamic-batch needs --input-names and --output-names (the axes are set by name)")
        for name in [*inputs, *outputs]:
            axes.setdefault(name, {})[0] = "batch"
    for text in args.dynamic_axis or ():
        name, sep, rest = text.partition(":")
        axis_text, _, label = rest.partition("=")
        if not sep or not axis_text.isdigit():
            raise ConfigError(f"--dynamic-axis takes NAME:AXIS[=LABEL], e.g. input_ids:1=sequence; got {text!r}")
        if name not in [*(input_names or ()), *(output_names or ())]:
            raise ConfigError(f"--dynamic-axis {text!r}: {name!r} is not in --input-names or --output-names")
        axes.setdefault(name, {})[int(axis_text)] = label or f"{name}_dim{axis_text}"
    return axes or None


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

    comp = sub.add_parser(
        "compress",
        help="compress a save_pretrained directory or a model given as package.module:factory",
        description="Compress a model to a .udnc file. Every argument is checked before any work starts.",
    )
    comp.add_argument("model", help="a Hugging Face save_pretrained directory (config.json + safetensors), or "
                                    "package.module:factory (a function returning the float nn.Module)")
    comp.add_argument("--out", required=True, help="the .udnc file to write")
    comp.add_argument("--weights", help="for a factory: a .safetensors file or a torch.save'd state_dict "
                                        "(loaded weights_only); without it the factory's random weights are used")
    comp.add_argument("--config", help="a JSON file with a CompressConfig (replaces --lattice/--n/--seed/--bits/"
                                       "--step/--relative-step/--fallback/--leaf-module, with a warning)")
    comp.add_argument("--lattice", default="Z", help="Z, A2, D4 or E8 (default Z)")
    comp.add_argument("--n", type=int, default=None, help="lattice dimension (Z only; default 1)")
    comp.add_argument("--seed", type=int, default=0, help="dither seed (default 0)")
    steps = comp.add_mutually_exclusive_group()
    steps.add_argument("--bits", type=float, default=None, help="target entropy in bits/weight (default 3)")
    steps.add_argument("--step", type=float, default=None, help="absolute step for every layer")
    steps.add_argument("--relative-step", type=float, default=None, help="step = value x std(W) per layer")
    comp.add_argument("--fallback", choices=["auto", "module_swap", "error"], default="auto",
                      help="a model torch.fx cannot trace: auto (default) compresses it by module swap with a note; "
                           "module_swap does so silently; error refuses")
    comp.add_argument("--leaf-module", action="append", metavar="CLASS",
                      help="a module class name the tracer keeps whole (repeatable)")
    comp.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the preceding conv/linear first")
    comp.add_argument("--prune", type=float, default=None, metavar="SPARSITY",
                      help="magnitude-prune this fraction of the selected weights first (pruned weights decode to 0)")
    comp.add_argument("--allocate", choices=["probe", "weights", "uniform"], default=None,
                      help="per-layer steps for the --bits target: probe (measured on --calibration; the default "
                           "when it is given), weights (data-free), uniform (one relative step)")
    comp.add_argument("--calibration", metavar="FILE",
                      help="inputs: a .txt file of sentences (tokenized with the checkpoint's tokenizer), or a "
                           ".safetensors / .npy tensor file (pickled .pt is refused)")
    comp.add_argument("--finetune-epochs", type=int, default=None,
                      help="fine-tune the codewords on --calibration, distilling from the float model")
    comp.add_argument("--finetune-lr", type=float, default=1e-4, help="codeword fine-tuning learning rate")
    comp.add_argument("--batch-size", type=int, default=16, help="fine-tuning batch size (calibration samples)")
    comp.add_argument("--max-loss", type=float, default=None,
                      help="search the rate: the smallest file whose relative output error "
                           "|y - y_hat|^2 / |y|^2 on --calibration stays <= this")
    comp.add_argument("--plot", metavar="PNG", help="with --max-loss: draw the explored rate-quality curve")
    comp.add_argument("--coder", default=None,
                      help="index coder (default auto: per tensor the smaller of ans-dither-v2, static rANS "
                           "conditioned on the dither, and, on small tensors, range-context-v1; see "
                           "udnc_fx.coding.available_coders)")
    comp.add_argument("--raw-dtype", choices=["float32", "float16"], default="float32",
                      help="storage of uncompressed tensors (biases, norms)")
    comp.add_argument("--quiet", action="store_true", help="only errors, notes and the final line; no progress bars")
    comp.set_defaults(func=_compress)

    ckp = sub.add_parser(
        "compress-checkpoint",
        help="compress a .safetensors checkpoint (sharded too) tensor by tensor, without building the model",
        description="Compress a .safetensors file, a model.safetensors.index.json with its shards, or their folder "
                    "(a save_pretrained directory) to a .udnc file, reading one tensor at a time: memory stays at "
                    "one tensor's working set. A folder with config.json selects the weights as 'udnc compress' "
                    "does (the model is built on the meta device); a bare checkpoint compresses every float32 "
                    "tensor named *.weight with 2+ dimensions. No calibration, pruning or fine-tuning.",
    )
    ckp.add_argument("checkpoint", help="a .safetensors file, a *.safetensors.index.json, or their folder")
    ckp.add_argument("--out", required=True, help="the .udnc file to write (must not exist)")
    ckp.add_argument("--config", help="a JSON file with a CompressConfig (replaces the flags below, with a note)")
    ckp.add_argument("--lattice", default="Z", help="Z, A2, D4 or E8 (default Z)")
    ckp.add_argument("--n", type=int, default=None, help="lattice dimension (Z only; default 1)")
    ckp.add_argument("--seed", type=int, default=0, help="dither seed (default 0)")
    ckp_steps = ckp.add_mutually_exclusive_group()
    ckp_steps.add_argument("--bits", type=float, default=None, help="target entropy in bits/weight (default 3)")
    ckp_steps.add_argument("--step", type=float, default=None, help="absolute step for every layer")
    ckp_steps.add_argument("--relative-step", type=float, default=None, help="step = value x std(W) per layer")
    ckp.add_argument("--fallback", choices=["auto", "module_swap", "error"], default="auto",
                     help="for a folder with config.json: how a model torch.fx cannot trace is handled (as compress)")
    ckp.add_argument("--leaf-module", action="append", metavar="CLASS",
                     help="a module class name the tracer keeps whole (repeatable)")
    ckp.add_argument("--coder", default=None, help="index coder (default auto, as for compress)")
    ckp.add_argument("--raw-dtype", choices=["float32", "float16"], default="float32",
                     help="storage of uncompressed tensors (biases, norms)")
    ckp.add_argument("--quiet", action="store_true", help="only errors, notes and the final line; no progress bars")
    ckp.set_defaults(func=_compress_checkpoint)

    dec = sub.add_parser("decompress", help="decode a .udnc file to a standard checkpoint")
    dec.add_argument("file", help="the .udnc file")
    dec.add_argument("--out", required=True,
                     help="a new directory (Hugging Face model: config.json + model.safetensors) or a .safetensors "
                          "file (any other model: its decoded state_dict)")
    dec.set_defaults(func=_decompress)

    exp = sub.add_parser("export", help="lower a .udnc model to ONNX (dequantize subgraphs + sidecar)")
    exp.add_argument("file", help="the .udnc file")
    exp.add_argument("--model", default=None,
                     help="package.module:factory building the float architecture (not needed for a Hugging Face model)")
    exp.add_argument("--example-shape", required=True, nargs="+", help="input shape(s) to trace with, e.g. 1x1x8x8")
    exp.add_argument("--example-dtype", default="float32", help="dtype of the example inputs (e.g. int64 for token ids)")
    exp.add_argument("--out", required=True, help="the .onnx file to write (the sidecar goes beside it)")
    exp.add_argument("--self-contained", nargs="?", const="decoded", choices=["decoded", "compact"], default=None,
                     help="one .onnx file that plain onnxruntime runs, no sidecar: 'decoded' (the default) holds "
                          "the decoded float weights and opens as fast as the float model; 'compact' holds the "
                          "indices and dequantize subgraphs (smaller; onnxruntime folds them at session start)")
    exp.add_argument("--input-names", help="comma-separated names of the graph inputs (default: the exporter's)")
    exp.add_argument("--output-names", help="comma-separated names of the graph outputs")
    exp.add_argument("--dynamic-batch", action="store_true", help="axis 0 of every named input and output is dynamic")
    exp.add_argument("--dynamic-axis", action="append", metavar="NAME:AXIS[=LABEL]",
                     help="one more dynamic axis, e.g. input_ids:1=sequence (repeatable)")
    exp.set_defaults(func=_export)

    ins = sub.add_parser("inspect", help="per-tensor sizes of a .udnc file (or the dequantize subgraphs of a .onnx)")
    ins.add_argument("file")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .cli_inputs import cli_remedy

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UdncError as exc:
        print(f"udnc: error: {cli_remedy(str(exc))}", file=sys.stderr)
        return 2
    except ImportError as exc:  # an optional dependency (transformers, safetensors, onnx...): say which
        print(f"udnc: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a missing or unreadable file: say which, no traceback
        print(f"udnc: error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
