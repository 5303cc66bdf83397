"""Import contracts: the subpackages are installed under udnc_fx, and decoding needs no torch."""

import subprocess
import sys


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_numpy_only_parts_import_without_torch():
    out = _run(
        "import sys, udnc_fx.coding.container, udnc_fx.coding.coders, udnc_fx.dither, udnc_fx.lattice;"
        "print('torch' in sys.modules)"
    )
    assert out == "False"


def test_public_api_resolves_lazily():
    out = _run("import udnc_fx; print(udnc_fx.compress.__module__, udnc_fx.CompressConfig.__name__)")
    assert out == "udnc_fx.api CompressConfig"
