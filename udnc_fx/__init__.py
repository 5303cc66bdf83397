"""udnc-fx: universal deep neural network compression as a torch.fx pass.

Randomized (dithered) lattice quantization of Conv/Linear weights (Choi, El-Khamy, Lee, arXiv 1802.02271),
served by ``DitheredLatticeParam`` modules in a rewritten ``fx.GraphModule``.

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
    "compress": "udnc_fx.api",
    "inspect": "udnc_fx.api",
    "InspectReport": "udnc_fx.api",
    "LayerReport": "udnc_fx.api",
    "compression_record": "udnc_fx.record_store",
    "CompressConfig": "udnc_fx.config",
    "LayerConfig": "udnc_fx.config",
    "DitheredLatticeParam": "udnc_fx.param",
    "materialize": "udnc_fx.passes.materialize",
    "save": "udnc_fx.io",
    "load": "udnc_fx.io",
    "read_header": "udnc_fx.io",
    "size_report": "udnc_fx.io",
    "finetune": "udnc_fx.passes.finetune",
    "finetune_float": "udnc_fx.passes.finetune",
    "FinetuneResult": "udnc_fx.passes.finetune",
    "TrainOptions": "udnc_fx.passes.train",
    "average_codeword_gradients": "udnc_fx.passes.finetune",
    "prune": "udnc_fx.passes.prune",
    "mask_sparsity": "udnc_fx.passes.prune",
    "fold_batchnorm": "udnc_fx.passes.fold",
    "round_for_storage": "udnc_fx.io",
    "allocate": "udnc_fx.passes.allocate",
    "allocate_steps": "udnc_fx.passes.allocate",
    "compress_to": "udnc_fx.rate",
    "RateSearch": "udnc_fx.rate",
    "from_udnc": "udnc_fx.hf_io",
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
    from .api import InspectReport, LayerReport, compress, inspect
    from .config import CompressConfig, LayerConfig
    from .io import load, read_header, round_for_storage, save, size_report
    from .param import DitheredLatticeParam
    from .record_store import compression_record
    from .passes.finetune import FinetuneResult, average_codeword_gradients, finetune, finetune_float
    from .passes.train import TrainOptions
    from .passes.materialize import materialize
    from .passes.allocate import allocate, allocate_steps
    from .passes.fold import fold_batchnorm
    from .passes.prune import mask_sparsity, prune
    from .rate import RateSearch, compress_to
    from .hf_io import from_udnc


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'udnc_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
