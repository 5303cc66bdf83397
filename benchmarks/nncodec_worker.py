"""Runs NNCodec (the MPEG NNC reference software) on a parameter set; executed by the NNCodec venv's Python.

This file is run as a script by ``benchmarks/.venv-nncodec/bin/python`` (see :mod:`benchmarks.nncodec_env`), never
imported by the main environment: NNCodec 2.1.3 needs ``numpy<2`` and imports torchvision, which does not import
beside the CPU torch build. It does not import udnc_fx.

Protocol (no pickle anywhere):

    python nncodec_worker.py PARAMS.npz OUT_DIR --qps=-38,-32 [--qp-density 2] [--nonweight-qp -75]

* ``PARAMS.npz``: one array per tensor, keyed by tensor name, float32 or int32 (``np.savez``; names are encoded as
  ``t0000``, ``t0001``... with the real names in the ``__names__`` array, since npz keys may not hold every
  character).
* For every qp: ``nncodec.nnc.compress(params, bitstream_path=None, qp=qp, return_bitstream=True, ...)``, then
  ``nncodec.nnc.decompress(bytearray(bitstream))``; the decoded parameters go to ``OUT_DIR/qp<qp>.npz`` (same key
  scheme) and the bitstream to ``OUT_DIR/qp<qp>.nnc``.
* ``OUT_DIR/summary.json``: ``{"nncodec_version", "import_s", "runs": [{"qp", "bitstream_bytes", "encode_s",
  "decode_s", "types": {name: "weight"|"unspecified"}}]}``.

NNCodec's generic (dict) path classifies every tensor with more than one dimension as a ``weight`` (quantized at
``qp``) and every other tensor as ``unspecified`` (quantized at ``nonweight_qp``, -75 by default: a step of
2**-18.75, practically lossless); all of them are in the one bitstream.

torchvision and cv2: NNCodec's package ``__init__`` chain imports its dataset loaders and image transforms, which
``import torchvision`` / ``cv2`` at module level; the dict-of-arrays compression path used here never calls them.
PyPI's torchvision fails to import beside the CPU torch build ("operator torchvision::nms does not exist"), so,
only when the real import fails, this script installs inert stand-ins for those two packages. Any *call* into
them returns an inert object, and the compress/decompress results are checked against the input (shapes, and the
reconstruction error reported), so a stub leaking into the coding path would show up as a failure, not silently.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

_STUBBED: list[str] = []


class _InertMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(f"{cls.__qualname__}.{name}")


def _inert(name: str) -> type:
    # A class, so that module-level code may subclass it (``class X(datasets.ImageFolder)``) or call it
    # (``transforms.Compose([...])``) at import time.
    return _InertMeta(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: self})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(f"{self.__name__}.{name}")


class _StubFinder:
    def __init__(self, roots: set[str]):
        self.roots = roots

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _install_stubs_if_needed() -> None:
    roots = set()
    for name in ("torchvision", "cv2"):
        try:
            __import__(name)
        except Exception:  # ImportError, or torchvision's RuntimeError about torchvision::nms
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[key]
            roots.add(name)
    if roots:
        _STUBBED.extend(sorted(roots))
        sys.meta_path.insert(0, _StubFinder(roots))


def _load_npz(path: Path):
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        names = [str(s) for s in z["__names__"]]
        return {name: z[f"t{i:04d}"] for i, name in enumerate(names)}


def _save_npz(path: Path, params: dict) -> None:
    import numpy as np

    names = list(params)
    arrays = {f"t{i:04d}": np.asarray(params[n]) for i, n in enumerate(names)}
    np.savez(path, __names__=np.array(names), **arrays)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="NNCodec compress/decompress worker")
    parser.add_argument("params", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--qps", required=True, help="comma-separated qp values")
    parser.add_argument("--qp-density", type=int, default=2)
    parser.add_argument("--nonweight-qp", type=int, default=-75)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    _install_stubs_if_needed()
    import numpy as np
    import nncodec
    from nncodec import nnc

    import_s = time.perf_counter() - t0
    params = _load_npz(args.params)
    for name, a in params.items():
        if a.dtype not in (np.float32, np.int32):
            raise SystemExit(f"{name}: NNCodec takes float32 or int32 arrays, got {a.dtype}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for qp in [int(q) for q in args.qps.split(",") if q.strip()]:
        t1 = time.perf_counter()
        bitstream = nnc.compress(
            params,
            bitstream_path=None,
            qp=qp,
            qp_density=args.qp_density,
            nonweight_qp=args.nonweight_qp,
            use_dq=True,
            param_opt=True,
            opt_qp=False,
            return_bitstream=True,
            verbose=False,
        )
        t2 = time.perf_counter()
        decoded = nnc.decompress(bytearray(bitstream))
        t3 = time.perf_counter()
        missing = sorted(set(params) - set(decoded))
        if missing:
            raise SystemExit(f"qp {qp}: NNCodec did not return {missing[:5]}")
        out = {}
        for name, a in params.items():
            d = np.asarray(decoded[name]).reshape(a.shape).astype(a.dtype)
            out[name] = d
        _save_npz(args.out_dir / f"qp{qp}.npz", out)
        (args.out_dir / f"qp{qp}.nnc").write_bytes(bytes(bitstream))
        runs.append(
            {
                "qp": qp,
                "bitstream_bytes": len(bitstream),
                "encode_s": t2 - t1,
                "decode_s": t3 - t2,
                "types": {n: ("weight" if a.ndim > 1 else "unspecified") for n, a in params.items()},
            }
        )
        print(f"qp {qp}: {len(bitstream)} bytes, encode {t2 - t1:.2f} s, decode {t3 - t2:.2f} s", flush=True)
    summary = {
        "nncodec_version": getattr(nncodec, "__version__", None) or _dist_version("nncodec"),
        "numpy_version": np.__version__,
        "stubbed_imports": _STUBBED,
        "import_s": import_s,
        "runs": runs,
    }
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
