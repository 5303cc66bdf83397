"""The layer rules, read from the code's own imports (issue 13, point 4).

Every module of the installed package is parsed with :mod:`ast` (never imported), relative imports are resolved, and
each import is checked against the layer map below. A failure names the file, the line and the import.

Layer map (module → layer), lowest first:

- **Core** — the math and the compressed parameter: ``udnc_fx.{errors, dither, kernels, lattice, quantizer, record, param,
  config, progress, record_store}``. It imports no pass, export, storage or face module. It may reach into Coding
  for a rate estimate (``quantizer`` asks ``coding.lattice_coords`` what a lattice-coordinate stream costs).
- **Coding** — ``udnc_fx.coding.*``: coders and the ``.udnc`` container, NumPy only so a deployment decodes without
  torch. It imports no torch (not directly, nor through any project module it imports), no pass, no export, no storage,
  no face; it may use the NumPy parts of Core (errors, dither, lattice, quantizer, record, progress).
- **Passes** — ``udnc_fx.passes.*`` (``passes/``): graph and model rewrites. They never import Export, Storage or Face.
- **Storage** — ``udnc_fx.storage``: save/load, model ↔ container. It imports no Export.
- **Export** — ``udnc_fx.export.*`` (``export/``): ONNX lowering and ``load_onnx``. It imports no Face module.
- **Face** — what users call: ``udnc_fx`` (the package's public API), ``api``, ``cli``, ``cli_inputs``, ``hf_io``,
  ``hf``, ``demo`` and ``rate``. ``rate`` (``compress_to``) is listed in the issue's Core, but it is a workflow on top of
  ``compress``, ``allocate`` and ``save`` (it imports api, storage and a pass), so it sits with the verbs it drives.

And for every module: it imports no other module's underscore-private names (``from x import _y``, ``x._y`` on an
imported module ``x``). A name two modules share is public in the module that owns it.

A module added to ``udnc_fx/`` (top level) must be given a layer here; the subpackages take theirs from the folder.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The installed package layout ([tool.setuptools.package-dir] in pyproject.toml): dotted package → folder.
PACKAGE_DIRS = {
    "udnc_fx": REPO / "udnc_fx",
    "udnc_fx.coding": REPO / "udnc_fx" / "coding",
    "udnc_fx.passes": REPO / "passes",
    "udnc_fx.export": REPO / "export",
}

CORE, CODING, PASSES, STORAGE, EXPORT, FACE = "Core", "Coding", "Passes", "Storage", "Export", "Face"

# Top-level modules of udnc_fx, by layer. The subpackages are placed by SUBPACKAGE_LAYERS.
TOP_LEVEL_LAYERS = {
    "udnc_fx.errors": CORE,
    "udnc_fx.dither": CORE,
    "udnc_fx.kernels": CORE,  # numba twins of the quantizer's per-weight loops (h11-1e9); loaded lazily by dither
    "udnc_fx.lattice": CORE,
    "udnc_fx.quantizer": CORE,
    "udnc_fx.record": CORE,
    "udnc_fx.record_store": CORE,  # the compression record on a model (h13-prepare): passes write it
    "udnc_fx.param": CORE,
    "udnc_fx.config": CORE,
    "udnc_fx.progress": CORE,
    "udnc_fx.storage": STORAGE,
    "udnc_fx": FACE,
    "udnc_fx.api": FACE,
    "udnc_fx.cli": FACE,
    "udnc_fx.cli_inputs": FACE,
    "udnc_fx.hf_io": FACE,
    "udnc_fx.hf": FACE,
    "udnc_fx.demo": FACE,
    "udnc_fx.rate": FACE,
    "udnc_fx.checkpoint": FACE,  # compress_checkpoint: a verb over passes, quantizer and storage (h11-st)
}
SUBPACKAGE_LAYERS = {"udnc_fx.coding": CODING, "udnc_fx.passes": PASSES, "udnc_fx.export": EXPORT}

# Layer → the layers it must not import.
FORBIDDEN = {
    CORE: {PASSES, STORAGE, EXPORT, FACE},
    CODING: {PASSES, STORAGE, EXPORT, FACE},
    PASSES: {STORAGE, EXPORT, FACE},
    STORAGE: {EXPORT},
    EXPORT: {FACE},
    FACE: set(),
}

# Known violations, each a (file relative to the repository, imported name) pair with the reason it is tolerated.
# Empty since issue 13: the test fails on any violation NOT listed here, and on an entry that no longer occurs.
ALLOWLIST: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    """One imported name: ``target`` is the dotted module (or ``module.attribute``) it resolves to."""

    path: Path
    line: int
    target: str
    text: str
    lazy: bool  # inside a function: runs when called, not when the module is imported


def _import_nodes(tree: ast.Module):
    """Every import statement with whether it is lazy (inside a function body)."""

    def visit(node: ast.AST, lazy: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, lazy
            yield from visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    yield from visit(tree, False)


def _module_files(package_dirs: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name → source file, for every ``.py`` file of the installed packages (no recursion into folders
    that are not listed packages)."""
    modules = {}
    for package, folder in package_dirs.items():
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` statement reads from."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _lazy_names(init_file: Path) -> dict[str, str]:
    """``udnc_fx``'s lazy public names (its ``_LAZY`` table): name → the module that defines it."""
    for node in ast.parse(init_file.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def collect_imports(package_dirs: dict[str, Path]) -> tuple[dict[str, Path], dict[str, list[Import]], list[Import]]:
    """Parse every module; return (modules, imports per module, private-name accesses).

    An imported name that is a module of ours resolves to that module; ``from udnc_fx import compress`` resolves
    through the package's lazy table to ``udnc_fx.api``. Private accesses are ``from x import _y`` and ``x._y``
    where ``x`` is bound by an import statement in the same file.
    """
    modules = _module_files(package_dirs)
    root_init = package_dirs["udnc_fx"] / "__init__.py"
    lazy_names = _lazy_names(root_init) if root_init.exists() else {}
    imports: dict[str, list[Import]] = {}
    private: list[Import] = []
    for module, path in modules.items():
        is_package = path.stem == "__init__"
        tree = ast.parse(path.read_text(), filename=str(path))
        found: list[Import] = []
        bound_modules: dict[str, str] = {}  # local name → module it is bound to
        for node, lazy in _import_nodes(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    text = f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
                    found.append(Import(path, node.lineno, alias.name, text, lazy))
                    if alias.asname:
                        bound_modules[alias.asname] = alias.name
                    else:
                        bound_modules[alias.name.split(".")[0]] = alias.name.split(".")[0]
                continue
            source = _resolve_from(module, is_package, node)
            if source == "__future__":
                continue
            for alias in node.names:
                text = f"from {'.' * node.level}{node.module or ''} import {alias.name}"
                text += f" as {alias.asname}" if alias.asname else ""
                sub = f"{source}.{alias.name}"
                if sub in modules:
                    target = sub
                    bound_modules[alias.asname or alias.name] = sub
                elif source == "udnc_fx" and alias.name in lazy_names:
                    target = lazy_names[alias.name]
                else:
                    target = source
                found.append(Import(path, node.lineno, target, text, lazy))
                if alias.name.startswith("_") and not alias.name.startswith("__") and source != module:
                    private.append(Import(path, node.lineno, f"{source}.{alias.name}", text, lazy))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            chain = _dotted(node.value)  # "_dither" or "udnc_fx.quantizer" (after ``import udnc_fx.quantizer``)
            if chain is None or chain.split(".")[0] not in bound_modules:
                continue
            head, _, rest = chain.partition(".")
            owner = bound_modules[head] + (f".{rest}" if rest else "")
            if owner in modules and owner != module:
                private.append(Import(path, node.lineno, f"{owner}.{node.attr}", f"{chain}.{node.attr}", False))
        imports[module] = found
    return modules, imports, private


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of attribute reads on a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def layer_of(module: str) -> str | None:
    """The layer of one of our modules, or None for a module outside the package (numpy, torch, ...)."""
    if module in TOP_LEVEL_LAYERS:
        return TOP_LEVEL_LAYERS[module]
    for package, layer in SUBPACKAGE_LAYERS.items():
        if module == package or module.startswith(package + "."):
            return layer
    return None


def _owning_module(target: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``target`` that is one of our modules."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def _where(imp: Import) -> str:
    return f"{_rel(imp.path)}:{imp.line}: {imp.text!r}"


def layer_violations(package_dirs: dict[str, Path]) -> list[tuple[str, str, str]]:
    """Every import that breaks a rule, as (file, imported name, message)."""
    modules, imports, private = collect_imports(package_dirs)
    out = []
    for module, found in imports.items():
        layer = layer_of(module)
        if layer is None:
            message = f"{_rel(modules[module])}: module {module} has no layer: add it to the layer map in {__file__}"
            out.append((_rel(modules[module]), module, message))
            continue
        for imp in found:
            if layer == CODING and (imp.target == "torch" or imp.target.startswith("torch.")):
                out.append((_rel(imp.path), imp.target, f"{_where(imp)}: Coding imports torch"))
                continue
            owner = _owning_module(imp.target, modules)
            if owner is None:
                continue
            other = layer_of(owner)
            if other in FORBIDDEN[layer]:
                out.append((_rel(imp.path), owner, f"{_where(imp)}: {layer} module {module} imports {owner} ({other})"))
    # Coding must decode without torch: importing it must not import torch through any project module on the way
    # (imports inside functions run only when called: udnc_fx.dither's torch twin imports torch when it is used).
    graph = {
        m: {o for imp in found if not imp.lazy and (o := _owning_module(imp.target, modules))}
        for m, found in imports.items()
    }
    torch_users = {
        m for m, found in imports.items() if any(i.target.split(".")[0] == "torch" and not i.lazy for i in found)
    }
    for module in modules:
        if layer_of(module) != CODING:
            continue
        path = _reach(module, graph, torch_users)
        if path:
            where = _rel(modules[module])
            out.append((where, path[-1], f"{where}: Coding module {module} reaches torch through {' -> '.join(path)}"))
    for imp in private:
        out.append((_rel(imp.path), imp.target, f"{_where(imp)}: imports {imp.target}, another module's private name"))
    return out


def _reach(start: str, graph: dict[str, set[str]], targets: set[str]) -> list[str]:
    """A shortest import path from ``start`` to a module in ``targets`` (``[]`` when there is none)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for m in frontier:
            for o in sorted(graph.get(m, ())):
                if o in paths:
                    continue
                paths[o] = paths[m] + [o]
                if o in targets:
                    return paths[o]
                nxt.append(o)
        frontier = nxt
    return []


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def test_every_import_respects_the_layer_map():
    found = layer_violations(PACKAGE_DIRS)
    new = [message for file, target, message in found if (file, target) not in ALLOWLIST]
    assert not new, "layer rule broken (see the layer map in tests/unit/test_layers.py):\n" + "\n".join(new)


def test_allowlist_has_no_stale_entries():
    found = {(file, target) for file, target, _ in layer_violations(PACKAGE_DIRS)}
    stale = sorted(set(ALLOWLIST) - found)
    assert not stale, f"fixed, so delete from ALLOWLIST in tests/unit/test_layers.py: {stale}"


def test_every_package_folder_is_scanned():
    """The scan covers every installed package (a package added to pyproject.toml must be added here)."""
    text = (REPO / "pyproject.toml").read_text()
    for package in PACKAGE_DIRS:
        assert f'"{package}"' in text
    modules = _module_files(PACKAGE_DIRS)
    assert {"udnc_fx.api", "udnc_fx.coding.container", "udnc_fx.passes.quantize", "udnc_fx.export.onnx"} <= set(modules)


# The checker itself, on a small made-up package: each rule must catch its own kind of import.


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    dirs = {
        "udnc_fx": tmp_path / "udnc_fx",
        "udnc_fx.coding": tmp_path / "udnc_fx" / "coding",
        "udnc_fx.passes": tmp_path / "passes",
        "udnc_fx.export": tmp_path / "export",
    }
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text("")
    for rel, source in files.items():
        (tmp_path / rel).write_text(source)
    return dirs


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"udnc_fx/lattice.py": "from .passes.quantize import quantize\n", "passes/quantize.py": ""},
         "udnc_fx/lattice.py:1: 'from .passes.quantize import quantize': Core module udnc_fx.lattice imports "
         "udnc_fx.passes.quantize (Passes)"),
        ({"udnc_fx/dither.py": "def f():\n    from udnc_fx import storage\n", "udnc_fx/storage.py": ""},
         "udnc_fx/dither.py:2: 'from udnc_fx import storage': Core module udnc_fx.dither imports udnc_fx.storage (Storage)"),
        ({"udnc_fx/config.py": "from . import compress\n", "udnc_fx/api.py": "",
          "udnc_fx/__init__.py": "_LAZY = {'compress': 'udnc_fx.api'}\n"},
         "Core module udnc_fx.config imports udnc_fx.api (Face)"),
        ({"udnc_fx/coding/container.py": "import torch\n"}, "Coding imports torch"),
        ({"udnc_fx/coding/ans.py": "def f():\n    from torch import nn\n"},
         "udnc_fx/coding/ans.py:2: 'from torch import nn': Coding imports torch"),
        ({"udnc_fx/coding/container.py": "from udnc_fx.param import P\n", "udnc_fx/param.py": "import torch\n"},
         "Coding module udnc_fx.coding.container reaches torch through udnc_fx.coding.container -> udnc_fx.param"),
        ({"passes/prune.py": "from ..export.onnx import to_onnx\n", "export/onnx.py": ""},
         "Passes module udnc_fx.passes.prune imports udnc_fx.export.onnx (Export)"),
        ({"passes/prune.py": "from .select import _owners\n", "passes/select.py": ""},
         "passes/prune.py:1: 'from .select import _owners': imports udnc_fx.passes.select._owners, another module's "
         "private name"),
        ({"export/onnx.py": "from .. import lattice as L\nx = L._SQRT3\n", "udnc_fx/lattice.py": ""},
         "export/onnx.py:2: 'L._SQRT3': imports udnc_fx.lattice._SQRT3, another module's private name"),
        ({"udnc_fx/coding/ans.py": "import udnc_fx.dither\nh = udnc_fx.dither._fmix(1)\n", "udnc_fx/dither.py": ""},
         "udnc_fx/coding/ans.py:2: 'udnc_fx.dither._fmix': imports udnc_fx.dither._fmix, another module's private name"),
        ({"udnc_fx/newthing.py": ""}, "module udnc_fx.newthing has no layer"),
    ],
)
def test_checker_names_file_line_and_import(tmp_path, monkeypatch, files, expected):
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    messages = [m for _, _, m in layer_violations(_tree(tmp_path, files))]
    assert any(expected in m for m in messages), messages


def test_checker_accepts_the_allowed_directions(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    files = {
        "udnc_fx/errors.py": "class E(Exception):\n    pass\n",
        "udnc_fx/lattice.py": "from .errors import E\nimport numpy as np\n",
        "udnc_fx/dither.py": "def uniform_torch():\n    import torch\n",  # lazy: importing dither imports no torch
        "udnc_fx/coding/container.py": "from udnc_fx import lattice as _lattice, dither\nfrom udnc_fx.errors import E\n"
        "x = _lattice.get\n",
        "passes/quantize.py": "import torch\nfrom ..lattice import get\nfrom ..coding.container import x\n",
        "export/onnx.py": "from ..passes.quantize import q\nfrom ..coding import container as _c\nfrom . import spec\n",
        "export/spec.py": "",
        "udnc_fx/storage.py": "from .passes.quantize import q\nfrom .coding.container import x\n",
        "udnc_fx/api.py": "from .export.onnx import to_onnx\nfrom .storage import save\nfrom .passes.quantize import _x\n",
    }
    messages = [m for _, _, m in layer_violations(_tree(tmp_path, files))]
    # Only the one private import: every cross-layer import above points down the map.
    assert messages == [
        "udnc_fx/api.py:3: 'from .passes.quantize import _x': imports udnc_fx.passes.quantize._x, another module's "
        "private name"
    ]
