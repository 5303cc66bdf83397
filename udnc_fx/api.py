"""The one verb, ``compress``, and ``inspect``."""

from __future__ import annotations

import json
import math
import statistics
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn

from .config import CompressConfig
from .errors import ConfigError, UnsupportedModelError
from .passes.allocate import first_tensor
from .passes import calibrate
from .passes.calibrate import (
    Calibration, as_batches, collect_inputs, output_mask, output_sensitivity, probe_scales, run_batch,
)
from .passes.materialize import served_params
from .passes.quantize import quantize
from .passes.select import refuse_non_float32, select_weights
from .passes.trace import FALLBACK_PREFIX, hollow_copy, prepare, restore_hollow
from .progress import progress_bar
from .record_store import compression_record, update_record

__all__ = ["compress", "inspect", "LayerReport", "InspectReport", "compression_record"]


def _calibrate(model: nn.Module, config: CompressConfig, batches: list) -> Calibration:
    """Layer inputs (and, by default, a probed step allocation) from the calibration batches, on a float copy."""
    target, _ = prepare(model, config)
    gm = target if isinstance(target, fx.GraphModule) else None
    candidates, _ = select_weights(target, config, gm)
    probing = config.allocate and config.step_mode == "target_bits"
    # the probe's batches' share of H is kept apart: the probe rounds with an H that never saw them (probe_scales).
    # Not for exact_zero (pruned) models: there it lost 1-3 test images per seed against the plain probe in the
    # pruned digits pipeline at 1, 1.25 and 1.5 bits per kept weight (benchmarks/digits_pipeline.py; README)
    held_out = (probing and config.compensate and not config.exact_zero and calibrate.PROBE_HELD_OUT
                and len(batches) > 1)
    held = min(calibrate.PROBE_BATCHES, len(batches)) if held_out else 0
    calib = collect_inputs(target, candidates, batches, mask_padding=config.mask_padding, held=held)
    if config.compensate and config.compensate_embeddings:
        output_sensitivity(target, candidates, calib)  # Embedding weights: H from the output's sensitivity
    calib.model = target if config.sequential else None  # sequential compensation re-measures H on this copy
    if probing:
        probe_scales(target, candidates, config, calib)
    elif config.allocate:
        calib.allocation_note = f"no allocation: the config fixes the steps ({config.step_mode})"
    return calib


def _score(out: nn.Module, config: CompressConfig, calib: Calibration | None) -> float:
    """Lower is better: ``score_fn(out)``, else the mean squared output change over the calibration batches (the
    real tokens' only with ``mask_padding``, as the allocation probe counts them)."""
    was_training = out.training
    out.eval()
    try:
        with torch.no_grad():
            if config.score_fn is not None:
                value = config.score_fn(out)
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise ConfigError(f"score_fn must return a number, got {type(value).__name__}") from None
                if not math.isfinite(value):
                    raise ConfigError(f"score_fn returned {value}: it must be a finite number (lower is better)")
                return value
            total = 0.0
            for i, (batch, reference) in enumerate(zip(calib.batches, calib.outputs)):
                if reference is None:
                    raise ConfigError("seed_trials: the model's output has no tensor to compare; give a score_fn")
                test = first_tensor(run_batch(out, batch)).detach().to(torch.float64)
                sq = (test - reference) ** 2
                keep = output_mask(calib, i)  # padded tokens' states are never used (mask_padding)
                total += float((sq if keep is None else sq[keep]).mean())
            return total / len(calib.batches)
    finally:
        out.train(was_training)


def compress(
    model: nn.Module,
    config: CompressConfig | None = None,
    *,
    example_inputs: Any = None,
    calibration: Any = None,
    progress: bool | None = None,
) -> nn.Module:
    """Compress ``model``'s Conv/Linear weights with randomized lattice quantization.

    The model is deep-copied first (never changed; the copy does not duplicate the float weights it replaces, which
    are read from ``model``), traced with torch.fx, and each selected weight is replaced by a
    ``DitheredLatticeParam`` feeding the original op. Every decision is recorded (see :func:`inspect`).

    With ``calibration``, the batches run once through the float model (hooks on the selected layers) and are used
    for: error-compensating rounding of every Linear/Conv1d/Conv2d weight whose inputs were seen (``compensate``;
    the others get plain dithered rounding, recorded), a step allocation by measured sensitivity when the goal is
    ``target_bits`` (``allocate``; probe on the first batch), and the choice among ``seed_trials`` dither seeds.
    The file format and the decoder are the same either way.

    Args:
        model: any ``nn.Module``.
        config: a :class:`CompressConfig` (default: Z^1, target 3 bits/weight, seed 0).
        example_inputs: optional tuple of inputs; when given, the compressed model is run once on them to check
            that it executes (errors surface here rather than at first use).
        calibration: optional iterable of batches (a list, a DataLoader...), each a tensor, a tuple of positional
            inputs or a mapping of keyword inputs (what ``model(*batch)`` / ``model(**batch)`` / ``model(batch)``
            takes). A few hundred samples (images, or sentences' tokens) are plenty.
        progress: bars over the layers being quantized and the seed trials: ``None`` (default) on a terminal only,
            ``False`` never, ``True`` always.

    Returns:
        An ``fx.GraphModule``; for a model torch.fx cannot trace (unless ``fallback="error"``), the deep-copied
        module with its weights served by parametrizations (no graph), with a warning under the default
        ``fallback="auto"``.

    Raises:
        ConfigError: invalid settings or weights (NaN/Inf, empty layers, unreachable target rate), calibration
            batches that do not fit the model (naming the batch and the layer), ``seed_trials > 1`` with neither
            calibration nor ``score_fn``.
        UnsupportedModelError: the model cannot be traced and ``fallback="error"``.
    """
    config = CompressConfig() if config is None else config
    if not isinstance(config, CompressConfig):
        raise ConfigError(f"config must be a CompressConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"compress() needs an nn.Module, got {type(model).__name__}")
    batches = as_batches(calibration) if calibration is not None else None
    if config.seed_trials > 1 and batches is None and config.score_fn is None:
        raise ConfigError("seed_trials > 1 needs calibration batches or a score_fn to choose the seed by")
    calib = _calibrate(model, config, batches) if batches is not None else None
    was_training = model.training
    best = None
    trials: list[dict] = []
    seeds = [(config.seed + i) % 2**64 for i in range(config.seed_trials)]
    for seed in progress_bar(seeds, desc="seed trials", unit="seed", progress=progress) if len(seeds) > 1 else seeds:
        trial_config = config if seed == config.seed else config.replace(seed=seed)
        # The copy does not copy the float weights: quantize reads the selected ones from the user's model, and the
        # placeholders of the weights that stay float get their values afterwards (about the float model's bytes
        # saved at the peak).
        work, sources = hollow_copy(model)
        target, how = prepare(work, trial_config, inplace=True)
        out = quantize(target, trial_config, calibration=calib, progress=progress, how=how,
                       sources=sources).graph_module
        restore_hollow(out, sources)
        del work, sources
        _refuse_non_float32(out)
        out.train(was_training)
        if len(seeds) > 1:
            score = _score(out, trial_config, calib)
            trials.append({"seed": seed, "score": score})
            if best is None or score < best[0]:
                best = (score, out)
        else:
            best = (None, out)
    out = best[1]
    record = compression_record(out)
    if calib is not None or trials:
        # the seed choice spans every trial: known only now, so the one later addition to the record
        record = update_record(out, calibration=_calibration_summary(record, calib, trials, config))
    if str(record.get("trace") or "").startswith(FALLBACK_PREFIX) and config.fallback == "auto":
        # The model still compresses (every selected weight served by a parametrization); say so once, since
        # the result is a plain module rather than a GraphModule.
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__}; compressed it by module swap instead (no graph). "
            "Pass CompressConfig(fallback='module_swap') to silence this, or fallback='error' to refuse. "
            f"Reason: {record['trace'].split('. Remedy:')[0]}",
            UserWarning,
            stacklevel=2,
        )
    if not isinstance(out, fx.GraphModule):
        from .hf_io import guard_save_pretrained

        guard_save_pretrained(out)  # a transformers model: save_pretrained writes decoded weights, not a crash
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


def _calibration_summary(record: dict, calib: Calibration | None, trials: list[dict], config) -> dict:
    """What the calibration was used for, as stored in the record and shown by :func:`inspect`."""
    used = []
    summary: dict[str, Any] = {"batches": 0 if calib is None else len(calib.batches)}
    if calib is not None:
        rounding = [c for c in record["changes"] if c.action == "quantized"]
        compensated = [c.fqn for c in rounding if "; compensated rounding" in c.reason]
        summary["compensated_layers"] = compensated
        summary["plain_layers"] = [c.fqn for c in rounding if "; plain rounding" in c.reason]
        if compensated:
            used.append(f"error-compensating rounding of {len(compensated)} of {len(rounding)} layers")
        if calib.scales is not None:
            used.append("step allocation by measured sensitivity")
        if calib.allocation_note:
            summary["allocation"] = calib.allocation_note
    if trials:
        scores = [t["score"] for t in trials]
        chosen = min(trials, key=lambda t: t["score"])
        what = "score_fn" if config.score_fn is not None else "calibration output error"
        used.append(f"seed choice among {len(trials)} seeds by {what}")
        summary["seed_trials"] = trials
        summary["chosen_seed"] = chosen["seed"]
        summary["score_spread"] = [min(scores), statistics.median(scores), max(scores)]
    summary["used_for"] = used
    return summary


def _refuse_non_float32(model: nn.Module) -> None:
    """Nothing was served compressed: if that is because the weights are not float32, say so (the shared rule)."""
    if not served_params(model):
        refuse_non_float32(model)


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
    #: how the codewords are stored: ``"points"`` (integer lattice points), ``"points+affine"`` (integer points under
    #: the per-layer affine correction ``affine``), ``"table"`` (a float table: fine-tuned codewords)
    codebook: str = "points"
    #: ``(a, b)`` of the affine correction, or ``None``
    affine: tuple[float, float] | None = None
    #: fine-tuning's per-layer decision (``passes.finetune.choose_codebooks``: form, both forms' bytes, ``kept``), or
    #: ``None`` when the layer was not fine-tuned in this session (a loaded model shows ``codebook`` only)
    codebook_choice: dict | None = None


def _codebook_text(r: LayerReport) -> str:
    """The ``codebook`` column: the stored form, the correction and, after fine-tuning, the bytes behind the choice."""
    text = r.codebook
    if r.affine is not None:
        text += f" a={r.affine[0]:.5g} b={r.affine[1]:.3g}"
    c = r.codebook_choice
    if c is not None and c.get("affine_bytes") is not None:
        text += f" (table {c['table_bytes']} B, affine {c['affine_bytes']} B, keeps {c['kept']:.0%} of the move)"
    return text


@dataclass
class InspectReport:
    """Per-layer rows plus the recorded decisions; ``str()`` is a table, ``to_json()`` machine-readable."""

    layers: list[LayerReport]
    changes: list[dict]
    trace: str | None
    calibration: dict | None = None

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
            "calibration": self.calibration,
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
        head = ["fqn", "shape", "lattice", "step", "K", "bits/w", "SQNR dB", "weights", "codebook"]
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
                _codebook_text(r),
            ]
            for r in self.layers
        ]
        rows.append(["total", "", "", "", "", f"{self.mean_entropy_bits:.3f}", "", str(self.total_weights), ""])
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
        if self.calibration:
            cal = self.calibration
            used = "; ".join(cal.get("used_for") or []) or "nothing (no layer could use it)"
            lines.append(f"calibration ({cal.get('batches', 0)} batches) used for: {used}")
            if cal.get("allocation"):
                lines.append(f"  {cal['allocation']}")
            for fqn in cal.get("plain_layers", []):
                reason = next((c["reason"] for c in self.changes if c["fqn"] == fqn), "")
                lines.append(f"  {fqn}: {reason.split('; ', 1)[-1]}")
            if cal.get("seed_trials"):
                lo, med, hi = cal["score_spread"]
                lines.append(
                    f"  seed {cal['chosen_seed']} kept of {len(cal['seed_trials'])}: score min {lo:.4g}, "
                    f"median {med:.4g}, max {hi:.4g}"
                )
        return "\n".join(lines)


def inspect(model: nn.Module) -> InspectReport:
    """Per-layer view of a compressed model: fqn, shape, lattice, n, step, codewords used, entropy of the index
    stream (bits per weight), and SQNR (dB) of the decoded weight against the original at quantization time
    (``None`` when unknown, e.g. after loading).

    Raises:
        ConfigError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"inspect() needs an nn.Module, got {type(model).__name__}")
    rows = []
    for dlp in served_params(model):
        used = int((dlp.codeword_counts() > 0).sum())
        sqnr = getattr(dlp, "sqnr_db", None)
        record = dlp.record()  # what save() would store: integer points (with the correction) or a float table
        form = "table" if record.codebook_int is None else ("points" if record.affine is None else "points+affine")
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
                codebook=form,
                affine=record.affine,
                codebook_choice=getattr(dlp, "codebook_choice", None),
            )
        )
    record = compression_record(model) or {}
    changes = [c.to_dict() for c in record.get("changes", [])]
    return InspectReport(rows, changes, record.get("trace"), record.get("calibration"))
