"""The layering rule, read from the source: every import statement of the package is parsed (module-level and
inside functions), relative imports resolved, so no import can dodge it.

    engine/, data/   import nothing else of ndtrain
    cluster/         imports engine/ and data/ only
    launch/          may import everything

A function-level import is for an optional or heavy third-party dependency (ray, mpi4py, matplotlib, tqdm,
tensorboardX, scipy, ...), never a way around a cycle: no function imports ndtrain, and in cluster/ and launch/
every function-level import says why on its line (a comment)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {"engine": {"engine"}, "data": {"data"}, "cluster": {"cluster", "engine", "data"},
           "launch": {"launch", "cluster", "engine", "data"}}
COMMENTED = ("cluster", "launch")  # layers whose function-level imports must carry their reason


def package_files(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["ndtrain", *parts])


def imported_modules(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute names an import statement brings in (`from ndtrain import data` -> ndtrain.data)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    if prefix == "ndtrain":  # from ndtrain import data, engine
        return [f"ndtrain.{a.name}" for a in node.names]
    return [prefix]


def function_level(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside a function body."""
    inner = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inner


def violations(source: str, path: str, layer: str, module: str, is_package: bool = False) -> list[str]:
    """Every breach of the rule (see the module docstring) in one file's source."""
    tree = ast.parse(source)
    lines = source.splitlines()
    inner = function_level(tree)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        names = imported_modules(node, module, is_package)
        ours = [m for m in names if m == "ndtrain" or m.startswith("ndtrain.")]
        for m in ours:
            target = m.split(".")[1] if "." in m else None
            if target not in ALLOWED[layer]:
                out.append(f"{path}:{node.lineno}: {layer}/ imports {m}")
        if id(node) in inner:
            if ours:
                out.append(f"{path}:{node.lineno}: function-level import of {', '.join(ours)} (import at the top)")
            elif layer in COMMENTED and "#" not in lines[node.lineno - 1]:
                out.append(f"{path}:{node.lineno}: function-level import of {', '.join(names)} without a comment "
                           f"saying why (optional or heavy)")
    return out


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_the_rule_allows(layer):
    found = []
    for f in package_files(layer):
        found += violations(f.read_text(), str(f.relative_to(ROOT)), layer, module_name(f), f.name == "__init__.py")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("layer, source, expect", [
    ("engine", "from ndtrain.data.info import PAD\n", "engine/ imports ndtrain.data.info"),
    ("data", "from ndtrain import engine\n", "data/ imports ndtrain.engine"),
    ("cluster", "def f():\n    from ndtrain.launch.config import Config\n", "cluster/ imports ndtrain.launch.config"),
    ("cluster", "def f():\n    from ...launch import rundir\n", "cluster/ imports ndtrain.launch"),
    ("launch", "def f():\n    from ndtrain.cluster import trainer\n", "function-level import of ndtrain.cluster"),
    ("launch", "def f():\n    import tomli_w\n", "without a comment"),
])
def test_the_checker_finds_each_kind_of_breach(layer, source, expect):
    """The rule's checker on planted breaches: a module-level, a function-level and a relative import across the
    line, and a function-level import of our own code or without its reason."""
    found = violations(source, "x.py", layer, f"ndtrain.{layer}.sub.mod")
    assert len(found) >= 1 and expect in found[0], found


def test_the_checker_accepts_what_the_rule_allows():
    ok = ("from ndtrain.engine.params import ParamStore\nfrom . import checkpoint\n"
          "def f():\n    import ray  # optional: only the Ray backend needs it\n")
    assert violations(ok, "x.py", "cluster", "ndtrain.cluster.mod") == []
