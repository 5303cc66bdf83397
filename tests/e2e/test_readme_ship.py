"""The README's "Save, load, ship" code runs as written and loses nothing (issue 15: it used to replace
model.udnc with the ONNX sidecar)."""

import re
from pathlib import Path

import numpy as np
import torch

import udnc_fx
from udnc_fx.demo import DigitsCNN

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- save-load-ship: run as written by tests/e2e/test_readme_ship.py"


def _block() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(re.escape(MARKER) + r"[^\n]*\n```python\n(.*?)\n```", readme, re.S)
    assert match, "the README's save/load/ship block (and its marker) is missing"
    return match.group(1)


def test_readme_save_load_ship_block_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    gm = udnc_fx.compress(DigitsCNN().eval(), udnc_fx.CompressConfig(relative_step=0.5)).eval()
    example_input = torch.randn(2, 1, 8, 8)
    namespace = {"udnc_fx": udnc_fx, "gm": gm, "Model": lambda: DigitsCNN().eval(), "example_input": example_input}
    exec(compile(_block(), "README.md", "exec"), namespace)

    # model.udnc is still the model container, and loads; the sidecar has a name of its own.
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.udnc" in files and "model.onnx" in files and len(files) == 3, files
    reloaded = udnc_fx.load("model.udnc", DigitsCNN().eval())
    with torch.no_grad():
        reference = gm(example_input).numpy()
        assert np.array_equal(reloaded(example_input).numpy(), reference)
        assert np.array_equal(namespace["gm2"](example_input).numpy(), reference)
    session = namespace["session"]
    got = session.run(None, {session.get_inputs()[0].name: example_input.numpy()})[0]
    np.testing.assert_allclose(got, reference, atol=1e-5)
    assert Path(namespace["export"].sidecar_path).name in files
