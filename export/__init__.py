"""Lowering compressed models to ONNX and running them in onnxruntime (installed as ``udnc_fx.export``).

``to_onnx(model, example_inputs, "model.onnx")`` writes ``model.onnx`` with a dequantize subgraph per compressed
weight (the dither is regenerated in the graph from a per-tensor key) and the ``model.udnc`` sidecar holding the
entropy-coded indices; ``load_onnx("model.onnx")`` checks that the two belong together and opens an
``onnxruntime.InferenceSession``. ``sidecar=False`` gives one self-contained file plain onnxruntime can run.
"""

from .onnx import DEFAULT_OPSET, MIN_OPSET, OnnxExport, build_decode_model, build_dither_model, to_onnx
from .runtime import DECODE_PATHS, DEFAULT_DECODE, ONNX_FORMAT_ID, decode_weight_np, load_onnx, prepare_model

__all__ = [
    "to_onnx",
    "load_onnx",
    "prepare_model",
    "OnnxExport",
    "build_dither_model",
    "build_decode_model",
    "decode_weight_np",
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "DEFAULT_DECODE",
    "DECODE_PATHS",
    "ONNX_FORMAT_ID",
]
