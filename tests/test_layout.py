"""The package's import graph reads as its architecture: no cycles, imports only downwards, small modules.

Layers, bottom to top (a package may import its own modules and those of the layers it lists):
errors, requests -> models, video -> asyncdiff, parataa, eval -> pipelines -> runtime -> api, own_pipeline, bench,
training, cli.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folders and the package each installs as (pyproject's package-dir).
SOURCES = {"asyncvid": ROOT / "asyncvid", "asyncvid.pipelines": ROOT / "pipelines", "asyncvid.cli": ROOT / "cli"}
BASE = {"errors", "requests"}
LOWER = BASE | {"models", "video"}
SAMPLERS = LOWER | {"asyncdiff", "parataa"}
ALLOWED = {
    "errors": set(),
    "requests": {"errors"},
    "models": BASE,
    "video": BASE,
    "asyncdiff": LOWER,
    "parataa": LOWER,
    "eval": BASE | {"video"},
    "pipelines": SAMPLERS,
    "runtime": SAMPLERS | {"pipelines"},
    "api": SAMPLERS | {"pipelines", "runtime"},
    "own_pipeline": SAMPLERS | {"pipelines", "runtime"},
    "evaluate": BASE | {"video", "eval"},
    "bench": SAMPLERS | {"pipelines", "runtime", "eval", "api"},
    "training": LOWER | {"pipelines", "runtime", "eval"},
    "cli": SAMPLERS | {"pipelines", "runtime", "bench", "eval", ""},  # "": asyncvid.__version__
    "": {"api", "own_pipeline", "video", "asyncdiff", "parataa", "runtime", "errors"},  # asyncvid/__init__.py: its lazy names
}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = modules()


def imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported asyncvid module, whether the import sits inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target:
                out.append((target, id(node) in nested))
    return out


GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module):
        state[module] = 1
        path.append(module)
        for target, _ in GRAPH[module]:
            if target == module:
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_imports_point_down_the_layers():
    wrong = [f"{module} imports {target}" for module, targets in GRAPH.items() for target, _ in targets
             if layer(target) != layer(module) and layer(target) not in ALLOWED[layer(module)]]
    assert not wrong, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(set(wrong)))


def test_every_package_has_a_layer():
    assert {layer(m) for m in MODULES} <= set(ALLOWED)


def test_imports_sit_at_the_top_except_where_they_keep_the_cli_fast():
    # The CLI imports torch and diffusers only once it has checked its arguments (`asyncvid --help` stays fast);
    # asyncvid/__init__.py resolves its public names lazily for the same reason.
    late = [f"{module} imports {target} inside a function" for module, targets in GRAPH.items()
            for target, nested in targets if nested and layer(module) not in ("cli", "")]
    assert not late, "\n".join(late)


def test_modules_are_short():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
