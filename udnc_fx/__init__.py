"""udnc-fx: universal deep neural network compression as a torch.fx pass.

Randomized (dithered) lattice quantization of Conv/Linear weights (Choi, El-Khamy, Lee, arXiv 1802.02271),
served by ``DitheredLatticeParam`` modules in a rewritten ``fx.GraphModule``.
"""

from .api import InspectReport, LayerReport, compress, inspect
from .config import CompressConfig, LayerConfig
from .errors import (
    ConfigError,
    ExportError,
    FormatError,
    PassError,
    UdncError,
    UnsupportedModelError,
)
from .io import load, read_header, save, size_report
from .param import DitheredLatticeParam
from .passes.materialize import materialize

__version__ = "0.1.0"

__all__ = [
    "compress",
    "inspect",
    "materialize",
    "save",
    "load",
    "read_header",
    "size_report",
    "CompressConfig",
    "LayerConfig",
    "DitheredLatticeParam",
    "InspectReport",
    "LayerReport",
    "UdncError",
    "ConfigError",
    "UnsupportedModelError",
    "PassError",
    "ExportError",
    "FormatError",
]
