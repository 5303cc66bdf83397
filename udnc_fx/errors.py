"""One error hierarchy for udnc-fx.

Every failure a user can cause (bad config, a model we cannot handle, a corrupt file) raises a subclass of
:class:`UdncError`, so callers can catch one type; the subclasses say what went wrong.

One type per kind of failure, whichever verb meets it:

- :class:`ConfigError`: an argument is wrong — a config value, an option, a batch that does not fit, and a "model"
  that is not an ``nn.Module`` at all (every verb: ``compress``, ``allocate``, ``prune``, ``fold_batchnorm``,
  ``finetune``, ``materialize``, ``inspect``, ``load``).
- :class:`UnsupportedModelError`: a real ``nn.Module`` that cannot be handled as asked — torch.fx cannot trace it
  and ``fallback="error"``, it has no float32 weight to compress, it fails on ``example_inputs``.
- :class:`PassError`: a pass could not do its work on this model (strict mode's skips, nothing to prune or train).
- :class:`ExportError`, :class:`FormatError`: lowering to ONNX, and malformed files.
"""

from __future__ import annotations

__all__ = [
    "UdncError",
    "ConfigError",
    "UnsupportedModelError",
    "PassError",
    "ExportError",
    "FormatError",
]


class UdncError(Exception):
    """Base class of every error udnc-fx raises on purpose."""


class ConfigError(UdncError, ValueError):
    """An argument or configuration value is invalid (raised before anything is changed), including a model argument
    that is not an ``nn.Module``. A ``ValueError``, so code that caught the bare ``ValueError`` still works."""


class UnsupportedModelError(UdncError):
    """The ``nn.Module`` cannot be handled as asked (for example torch.fx cannot trace it and fallback is off)."""


class PassError(UdncError):
    """A pass could not do what it was asked (in strict mode, a layer that would have been skipped)."""


class ExportError(UdncError):
    """Lowering to ONNX or running the lowered model failed."""


class FormatError(UdncError):
    """A container or sidecar is malformed. ``kind`` names the failure for programs.

    Kinds: ``bad_magic``, ``unsupported_version``, ``truncated``, ``bad_header``, ``bad_offsets``,
    ``checksum_mismatch``, ``model_mismatch``, ``bad_value``, ``unknown_codec``, ``corrupt_payload``, ``missing_file``, ``missing_sidecar``, ``onnx_sidecar`` (an ONNX
    export's sidecar given where a model container is expected).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(f"[{kind}] {message}")
        self.kind = kind
        self.message = message
