"""The one verb, ``compress``, and ``inspect``."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn

from .config import CompressConfig
from .errors import ConfigError, UnsupportedModelError
from .passes.materialize import served_params
from .passes.quantize import quantize
from .passes.trace import trace_model

__all__ = ["compress", "inspect", "LayerReport", "InspectReport", "compression_record"]


def compression_record(model: nn.Module) -> dict[str, Any] | None:
    """The ``{"config", "changes", "trace"}`` record a compressed model carries, or None."""
    if isinstance(model, fx.GraphModule):
        return model.meta.get("udnc")
    return getattr(model, "_udnc_record", None)


def compress(
    model: nn.Module, config: CompressConfig | None = None, *, example_inputs: Any = None
) -> nn.Module:
    """Compress ``model``'s Conv/Linear weights with randomized lattice quantization.

    The model is deep-copied first (never changed), traced with torch.fx, and each selected weight is replaced by a
    ``DitheredLatticeParam`` feeding the original op. Every decision is recorded (see :func:`inspect`).

    Args:
        model: any ``nn.Module``.
        config: a :class:`CompressConfig` (default: Z^1, target 3 bits/weight, seed 0).
        example_inputs: optional tuple of inputs; when given, the compressed model is run once on them to check
            that it executes (errors surface here rather than at first use).

    Returns:
        An ``fx.GraphModule``; under ``fallback="module_swap"`` with an untraceable model, the deep-copied module
        with its weights served by parametrizations (no graph).

    Raises:
        ConfigError: invalid settings or weights (NaN/Inf, empty layers, unreachable target rate).
        UnsupportedModelError: the model cannot be traced and no fallback was asked for.
    """
    config = CompressConfig() if config is None else config
    if not isinstance(config, CompressConfig):
        raise ConfigError(f"config must be a CompressConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"compress() needs an nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model)  # fx.symbolic_trace shares submodules with the original: never touch the user's
    trace_note = "torch.fx symbolic trace"
    try:
        target: nn.Module = trace_model(work, leaf_modules=config.leaf_modules)
    except UnsupportedModelError as exc:
        if config.fallback != "module_swap":
            raise
        target = work
        trace_note = f"module-swap fallback (no graph): {exc}"
    was_training = target.training
    result = quantize(target, config)
    out = result.graph_module
    _refuse_non_float32(out)
    compression_record(out)["trace"] = trace_note
    out.train(was_training)
    if example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        # A trial run must not change the result: in train mode it would update BatchNorm running statistics
        # (and num_batches_tracked), so run it in eval mode without autograd, then restore the mode.
        try:
            with torch.no_grad():
                out.eval()
                out(*args)
        except Exception as exc:
            raise UnsupportedModelError(f"the compressed model failed on example_inputs: {exc}") from exc
        finally:
            out.train(was_training)
    return out


def _refuse_non_float32(model: nn.Module) -> None:
    """A model whose weights are all float16/bfloat16/float64 would "compress" nothing (the format decodes weights
    to float32: codebooks and the dither are float32 by contract, and serving a float32 weight to a float16 op fails)
    and :func:`udnc_fx.save` would then refuse it: say so here, with the remedy. A model with some float32 layers
    compresses those and records why the others were skipped."""
    if served_params(model):
        return
    others = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                     if p.is_floating_point() and p.dtype != torch.float32})
    if others:
        raise UnsupportedModelError(
            f"no weight was compressed: the model's parameters are {', '.join(others)} and udnc-fx compresses "
            "float32 weights only (they decode to float32 by format); convert the model with model.float() first"
        )


@dataclass
class LayerReport:
    fqn: str
    shape: tuple[int, ...]
    lattice: str
    n: int
    step: float
    codewords: int
    entropy_bits: float
    sqnr_db: float | None
    numel: int
    #: estimated coded rate (bits/weight) of the stored form: what ``target_bits`` solves for (``rate_bits``)
    rate_bits: float = math.nan


@dataclass
class InspectReport:
    """Per-layer rows plus the recorded decisions; ``str()`` is a table, ``to_json()`` machine-readable."""

    layers: list[LayerReport]
    changes: list[dict]
    trace: str | None

    @property
    def total_weights(self) -> int:
        return sum(r.numel for r in self.layers)

    @property
    def mean_entropy_bits(self) -> float:
        total = self.total_weights
        return sum(r.entropy_bits * r.numel for r in self.layers) / total if total else 0.0

    @property
    def mean_rate_bits(self) -> float:
        """Weighted mean of the layers' estimated coded rates: what ``target_bits`` aims at."""
        total = self.total_weights
        return sum(r.rate_bits * r.numel for r in self.layers) / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(r) for r in self.layers],
            "changes": self.changes,
            "trace": self.trace,
            "total_weights": self.total_weights,
            "mean_entropy_bits": self.mean_entropy_bits,
            "mean_rate_bits": self.mean_rate_bits,
        }

    def to_json(self, **kwargs) -> str:
        def clean(x):
            return None if isinstance(x, float) and not math.isfinite(x) else x

        data = self.to_dict()
        for row in data["layers"]:
            row.update({k: clean(v) for k, v in row.items()})
        return json.dumps(data, **kwargs)

    def __str__(self) -> str:
        head = ["fqn", "shape", "lattice", "step", "K", "bits/w", "SQNR dB", "weights"]
        rows = [
            [
                r.fqn,
                "x".join(map(str, r.shape)),
                f"{r.lattice}{r.n}" if r.lattice == "Z" else r.lattice,
                f"{r.step:.4g}",
                str(r.codewords),
                f"{r.entropy_bits:.3f}",
                "n/a" if r.sqnr_db is None else f"{r.sqnr_db:.2f}",
                str(r.numel),
            ]
            for r in self.layers
        ]
        rows.append(["total", "", "", "", "", f"{self.mean_entropy_bits:.3f}", "", str(self.total_weights)])
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        skipped = [c for c in self.changes if c["action"] == "skipped"]
        if skipped:
            lines.append("")
            lines += [f"skipped {c['fqn']}: {c['reason']}" for c in skipped]
        if self.trace:
            lines.append(f"traced by: {self.trace}")
        return "\n".join(lines)


def inspect(model: nn.Module) -> InspectReport:
    """Per-layer view of a compressed model: fqn, shape, lattice, n, step, codewords used, entropy of the index
    stream (bits per weight), and SQNR (dB) of the decoded weight against the original at quantization time
    (``None`` when unknown, e.g. after loading)."""
    rows = []
    for dlp in served_params(model):
        used = int((dlp.codeword_counts() > 0).sum())
        sqnr = getattr(dlp, "sqnr_db", None)
        rows.append(
            LayerReport(
                fqn=getattr(dlp, "fqn", "?"),
                shape=dlp.shape,
                lattice=dlp.lattice,
                n=dlp.n,
                step=dlp.step,
                codewords=used,
                entropy_bits=dlp.entropy_bits(),
                sqnr_db=None if sqnr is None else float(sqnr),
                numel=dlp.numel,
                rate_bits=dlp.rate_bits(),
            )
        )
    record = compression_record(model) or {}
    changes = [c.to_dict() for c in record.get("changes", [])]
    return InspectReport(rows, changes, record.get("trace"))
