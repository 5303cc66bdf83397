"""NNCodec's own virtual environment and the subprocess bridge to it.

NNCodec 2.1.3 (PyPI ``nncodec``, the MPEG NNC reference software) declares ``numpy<2`` and torchvision; the main
environment has NumPy 2, and PyPI's torchvision does not import beside the CPU torch build. So it lives in its own
venv, ``benchmarks/.venv-nncodec`` (git-ignored), created here on first use:

    python3 -m venv benchmarks/.venv-nncodec
    pip install "numpy<2" torch==2.13.0 pandas scikit-learn h5py tqdm     # what its compression path imports
    pip install --no-deps nncodec==2.1.3

(found by trying: the import chain ``nncodec.nnc`` → ``nncodec.framework`` pulls in torch, pandas, scikit-learn,
h5py and tqdm; torchvision and cv2 are imported only by its dataset loaders and image transforms, and
``nncodec_worker.py`` stands in for them, see there). ``torch==2.13.0`` is pinned because an unpinned torch would
pull a multi-GB CUDA build.

Parameters go to the worker as a ``.npz`` (no pickle), decoded parameters come back as ``.npz``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-nncodec"
WORKER = HERE / "nncodec_worker.py"
NNCODEC_VERSION = "2.1.3"
REQUIREMENTS = ["numpy<2", "torch==2.13.0", "pandas", "scikit-learn", "h5py", "tqdm"]
_READY_MARK = VENV / ".udnc-bench-ready"


def python() -> Path:
    return VENV / "bin" / "python"


def _check_import(timeout: float = 300) -> tuple[bool, str]:
    probe = (
        "import sys, runpy; sys.argv = ['w']; "
        f"ns = runpy.run_path({str(WORKER)!r}, run_name='not_main'); ns['_install_stubs_if_needed'](); "
        "from nncodec import nnc; import numpy; print('nncodec ok, numpy', numpy.__version__)"
    )
    try:
        out = subprocess.run([str(python()), "-c", probe], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return out.returncode == 0, (out.stdout + out.stderr).strip()[-2000:]


def ensure_venv(*, log=print) -> dict:
    """Create and check the NNCodec venv if needed. Returns ``{"ok", "seconds", "created", "message"}``; never
    raises (a benchmark without NNCodec still runs, and says why its rows are missing)."""
    t0 = time.perf_counter()
    spec = {"requirements": REQUIREMENTS, "nncodec": NNCODEC_VERSION}
    if _READY_MARK.exists():
        try:
            if json.loads(_READY_MARK.read_text()) == spec and python().exists():
                return {"ok": True, "seconds": time.perf_counter() - t0, "created": False, "message": "present"}
        except (OSError, ValueError):
            pass
    log(f"setting up NNCodec {NNCODEC_VERSION} in {VENV} (first run only; a few minutes) ...")
    if VENV.exists():
        shutil.rmtree(VENV)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    steps = [
        [shutil.which("python3") or sys.executable, "-m", "venv", str(VENV)],
        [str(python()), "-m", "pip", "install", "-q", *REQUIREMENTS],
        [str(python()), "-m", "pip", "install", "-q", "--no-deps", f"nncodec=={NNCODEC_VERSION}"],
    ]
    for cmd in steps:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"ok": False, "seconds": time.perf_counter() - t0, "created": True, "message": f"{cmd[:4]}: {exc}"}
        if out.returncode != 0:
            tail = (out.stdout + out.stderr).strip()[-1500:]
            return {"ok": False, "seconds": time.perf_counter() - t0, "created": True,
                    "message": f"`{' '.join(cmd[:6])}` failed: {tail}"}
    ok, message = _check_import()
    if ok:
        _READY_MARK.write_text(json.dumps(spec))
    return {"ok": ok, "seconds": time.perf_counter() - t0, "created": True, "message": message}


def save_params_npz(path: Path, params: dict[str, np.ndarray]) -> None:
    names = list(params)
    arrays = {f"t{i:04d}": np.ascontiguousarray(params[n]) for i, n in enumerate(names)}
    np.savez(path, __names__=np.array(names), **arrays)


def load_params_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        names = [str(s) for s in z["__names__"]]
        return {name: z[f"t{i:04d}"] for i, name in enumerate(names)}


@dataclass
class NNCodecRun:
    qp: int
    bitstream_bytes: int
    encode_s: float
    decode_s: float
    decoded: dict[str, np.ndarray]
