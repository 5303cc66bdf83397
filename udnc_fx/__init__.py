"""udnc-fx: universal deep neural network compression as a torch.fx pass.

Randomized (dithered) lattice quantization of Conv/Linear weights (Choi, El-Khamy, Lee, arXiv 1802.02271),
served by ``DitheredLatticeParam`` modules in a rewritten ``fx.GraphModule``.

What is public here, and why (issue 13): the top level holds what a user calls and what those calls hand back.

- **Verbs** — ``compress``, ``inspect``, ``compression_record`` (what ``compress`` recorded on a model: config, trace,
  changes), ``materialize``; ``save``, ``load``, ``read_header``, ``size_report``;
  ``allocate``, ``compress_to``; ``prune``, ``fold_batchnorm``, ``finetune``, ``finetune_float``; ``from_udnc``
  (a ``.udnc`` file of a Hugging Face model back to a ``transformers`` model); ``compress_checkpoint`` (a
  ``.safetensors`` checkpoint, sharded too, to a ``.udnc`` file tensor by tensor, without the float model).
- **Configs** — ``CompressConfig`` and its per-layer ``LayerConfig``; ``TrainOptions`` (``finetune``,
  ``finetune_float``).
- **Result types, where a verb here returns them** — ``InspectReport`` (``inspect``), ``Allocation``
  (``allocate``), ``FinetuneResult`` (``finetune``, ``finetune_float``), ``RateSearch`` (``compress_to``), and
  ``DitheredLatticeParam``, the module that serves every compressed weight of ``compress``'s model.
- **Errors** — the one hierarchy of :mod:`udnc_fx.errors`.

Workflow helpers stay in the module of the step they serve, imported from there:
``udnc_fx.passes.finetune.average_codeword_gradients``, ``udnc_fx.passes.prune.mask_sparsity``,
``udnc_fx.passes.allocate.allocate_steps``, ``udnc_fx.storage.round_for_storage``; so do the parts of a result
(``udnc_fx.api.LayerReport``, ``udnc_fx.passes.allocate.LayerAllocation``, ``udnc_fx.rate.RatePoint``), ONNX
(``udnc_fx.export``), the command line (``udnc_fx.cli``) and the Hugging Face helpers (``udnc_fx.hf``,
``udnc_fx.hf_io``).

The public names are imported lazily, so the NumPy-only parts (``udnc_fx.coding``, ``udnc_fx.dither``,
``udnc_fx.lattice``) can decode a container on a machine without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    ConfigError,
    ExportError,
    FormatError,
    PassError,
    UdncError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

_LAZY = {
    # verbs
    "compress": "udnc_fx.api",
    "inspect": "udnc_fx.api",
    "compression_record": "udnc_fx.record_store",
    "materialize": "udnc_fx.passes.materialize",
    "save": "udnc_fx.storage",
    "load": "udnc_fx.storage",
    "read_header": "udnc_fx.storage",
    "size_report": "udnc_fx.storage",
    "allocate": "udnc_fx.passes.allocate",
    "compress_to": "udnc_fx.rate",
    "prune": "udnc_fx.passes.prune",
    "fold_batchnorm": "udnc_fx.passes.fold",
    "finetune": "udnc_fx.passes.finetune",
    "finetune_float": "udnc_fx.passes.finetune",
    "from_udnc": "udnc_fx.hf_io",
    "compress_checkpoint": "udnc_fx.checkpoint",
    # configs
    "CompressConfig": "udnc_fx.config",
    "LayerConfig": "udnc_fx.config",
    "TrainOptions": "udnc_fx.passes.train",
    # result types
    "InspectReport": "udnc_fx.api",
    "Allocation": "udnc_fx.passes.allocate",
    "FinetuneResult": "udnc_fx.passes.finetune",
    "RateSearch": "udnc_fx.rate",
    "DitheredLatticeParam": "udnc_fx.param",
}

# Names this package exported before issue 13 put them in their own modules: a clear pointer instead of a bare
# AttributeError.
_MOVED = {
    "average_codeword_gradients": "udnc_fx.passes.finetune",
    "mask_sparsity": "udnc_fx.passes.prune",
    "allocate_steps": "udnc_fx.passes.allocate",
    "round_for_storage": "udnc_fx.storage",
    "LayerReport": "udnc_fx.api",
}

__all__ = [
    *_LAZY,
    "UdncError",
    "ConfigError",
    "UnsupportedModelError",
    "PassError",
    "ExportError",
    "FormatError",
]

if TYPE_CHECKING:  # pragma: no cover
    from .api import InspectReport, compress, inspect
    from .checkpoint import compress_checkpoint
    from .config import CompressConfig, LayerConfig
    from .hf_io import from_udnc
    from .storage import load, read_header, save, size_report
    from .param import DitheredLatticeParam
    from .passes.allocate import Allocation, allocate
    from .passes.finetune import FinetuneResult, finetune, finetune_float
    from .passes.fold import fold_batchnorm
    from .passes.materialize import materialize
    from .passes.prune import prune
    from .passes.train import TrainOptions
    from .rate import RateSearch, compress_to
    from .record_store import compression_record


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        if name in _MOVED:
            raise AttributeError(f"udnc_fx.{name} is not a top-level name: import it from {_MOVED[name]}")
        raise AttributeError(f"module 'udnc_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
