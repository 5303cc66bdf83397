"""Every example runs (``--smoke``) in a fresh interpreter, and the README's quickstart is still an excerpt."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if p.name != "__init__.py")


def _block(text: str, start: str, end: str) -> str:
    match = re.search(re.escape(start) + r"\n(.*?)\n[ \t]*" + re.escape(end), text, re.S)
    assert match, f"markers {start!r} … {end!r} not found"
    return match.group(1)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_in_smoke_mode(example, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(example), "--smoke"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_readme_quickstart_is_an_excerpt_of_the_example():
    readme = (ROOT / "README.md").read_text()
    block = _block(readme, "<!-- quickstart: excerpt of examples/quickstart.py, checked by tests/e2e/test_examples.py -->\n```python", "```")
    source = (ROOT / "examples" / "quickstart.py").read_text()
    excerpt = _block(source, "# --8<-- [start:quickstart]", "# --8<-- [end:quickstart]")
    dedented = "\n".join(line[4:] if line.startswith("    ") else line for line in excerpt.splitlines())
    assert block.strip() == dedented.strip()


def test_readme_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    fence = lines.index("```bash")
    commands = lines[fence + 1 : lines.index("```", fence + 1)]
    assert [c.split("#")[0].strip() for c in commands] == ["./dev.sh demo", "./dev.sh test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./dev.sh test" in ci
