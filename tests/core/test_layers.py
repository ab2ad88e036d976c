"""The import rule: graphopt's packages form layers, and a module imports only its own layer or lower ones.

    cli                      click commands; may import anything below
    evaluate                 compare, gate, bisect, diff: build and measure many recipes
    build                    trace, run a recipe, write the artifact atomically
    measure                  fidelity and benchmarks of an artifact
    runtime                  engines, scheduler, sampler, LLM, server
    targets                  what each target needs: recipes, checks, manifest fields, post-build step, engine
    passes                   graph passes and the pipeline that runs them
    quant, plugins, sources  quantization maths, custom ops with references, model sources
    core                     errors, progress, the I/O contract, the manifest

Every import counts, function-level ones included: a lazy import still ties the layers together.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = [("core", "models"), ("quant", "plugins", "sources"), ("passes",), ("targets",), ("runtime",),
          ("measure",), ("build",), ("evaluate",), ("cli",), ("api",)]
PUBLIC = {"LLM", "LLMConfig", "SamplingParams"}  # graphopt's public names (loaded by name in graphopt/__init__.py)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
FOLDERS = {"passes": ROOT / "passes", "plugins": ROOT / "plugins", "runtime": ROOT / "runtime",
           "models": ROOT / "models"}


def package_files() -> dict[str, Path]:
    """graphopt's modules by dotted name (passes/, plugins/, runtime/ and models/ install as graphopt.*)."""
    files = {}
    for path in (ROOT / "graphopt").rglob("*.py"):
        files[".".join(("graphopt",) + path.relative_to(ROOT).with_suffix("").parts[1:])] = path
    for name, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            files[".".join(("graphopt", name) + path.relative_to(folder).with_suffix("").parts)] = path
    return {name.removesuffix(".__init__"): path for name, path in files.items()}


def imports_of(path: Path) -> set[str]:
    """The graphopt modules ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("graphopt")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("graphopt"):
            if node.module == "graphopt":  # from graphopt import x: a module, __version__, or a public name
                found |= {"graphopt" if a.name == "__version__" else "graphopt.api" if a.name in PUBLIC
                          else f"graphopt.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return found


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "core"  # the root: __version__ (its public names are "api")


def import_edges() -> list[tuple[str, str]]:
    return [(name, target) for name, path in sorted(package_files().items()) for target in sorted(imports_of(path))]


def test_every_area_has_a_layer():
    assert {area(name) for name in package_files()} <= set(RANK)


def test_imports_flow_down_the_layers():
    upward = [f"{name} ({area(name)}) imports {target} ({area(target)})" for name, target in import_edges()
              if RANK[area(target)] > RANK[area(name)]]
    assert upward == [], "imports against the layering:\n" + "\n".join(upward)


def test_passes_and_runtime_never_import_the_top_layers():
    top = {"cli", "build", "evaluate", "measure"}
    bad = [(n, t) for n, t in import_edges() if area(n) in {"passes", "runtime"} and area(t) in top]
    assert bad == []


def test_the_rule_catches_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from graphopt.cli.main import main\n    import graphopt.build.artifact\n"
                      "    from graphopt import LLM, __version__\n")
    assert imports_of(module) == {"graphopt.cli.main", "graphopt.build.artifact", "graphopt.api", "graphopt"}
    assert RANK[area("graphopt.cli.main")] > RANK["runtime"] and RANK[area("graphopt.api")] > RANK["cli"]


def test_the_public_names_are_the_ones_the_package_exports():
    import graphopt

    assert PUBLIC == set(graphopt.__all__) - {"__version__"}


def test_tests_mirror_the_layout():
    """Each test file sits in the folder of the area it tests (tests/<area>/), helpers at tests/ top."""
    misplaced = [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                 if p.parent.name not in RANK or p.parent.parent != ROOT / "tests"]
    assert misplaced == []
