"""The house rules of docs/architecture.md, read from the code: tledge's import graph has no
cycle and no upward arrow, its own imports are at module top, and the stages that judge and
time artifacts reach runtimes only through the runners."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tledge"

# Bottom to top. A module may import modules of its own layer and of the layers below, never
# above. Patterns are module names or prefixes ending in ".".
LAYERS = [
    ("base", ["tledge.errors", "tledge.schema", "tledge.formats", "tledge.quiet",
              "tledge.parity", "tledge.bench.core", "tledge.tasks", "tledge.metrics"]),
    ("run directory", ["tledge.rundir"]),
    ("libraries", ["tledge.data", "tledge.data.", "tledge.backbones", "tledge.model",
                   "tledge.flops", "tledge.recipe", "tledge.recipe.", "tledge.runners",
                   "tledge.runners.", "tledge.plots", "tledge.run_inputs"]),
    ("stages", ["tledge.train", "tledge.train.", "tledge.export", "tledge.export.",
                "tledge.validate", "tledge.bench", "tledge.bench.", "tledge.explain",
                "tledge.report", "tledge.report.", "tledge.predict", "tledge.inspection",
                "tledge.domains"]),
    ("orchestration", ["tledge.stages"]),
    ("interface", ["tledge.cli", "tledge.__main__", "tledge"]),
]
RUNTIME_MODULES = ("onnxruntime", "ai_edge_litert", "tflite_runtime", "openvino")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, path: Path | None = None):
    """([(imported tledge module, line, at module top?)], third-party top-level names) of one
    module (read from `path` when given)."""
    tree = ast.parse((path or MODULES[module]).read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found, third_party = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            # `from package import submodule` imports the submodule
            names = [sub for sub in subs if sub in MODULES] or [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] != "tledge":
                third_party.add(name.split(".")[0])
                continue
            target = resolve(name)
            if target and target != module:
                found.append((target, node.lineno, id(node) in top))
    return found, third_party


GRAPH = {module: imports(module) for module in MODULES}


def layer_of(module: str) -> int:
    best = None
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".") and module.startswith(pattern)):
                length = len(pattern)
                if best is None or length > best[1]:
                    best = (index, length)
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py"
    return best[0]


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_cycles():
    edges = {module: {target for target, _, _ in GRAPH[module][0] if target != "tledge"}
             for module in MODULES}
    cycles = []
    state = {}

    def visit(module, chain):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(chain[chain.index(target):] + [target])
            elif target not in state:
                visit(target, chain + [target])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_upward_imports():
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
              f"({LAYERS[layer_of(target)][0]}), line {line}"
              for module in MODULES for target, line, _ in GRAPH[module][0]
              if target != "tledge" and layer_of(target) > layer_of(module)]
    assert not upward, "\n".join(upward)


def test_tledge_imports_are_at_module_top():
    # the package's public face resolves `tledge.build` on first use: every `import
    # tledge.<module>` runs tledge/__init__.py first and must not load every stage
    nested = [f"{module} line {line}: {target}" for module in MODULES if module != "tledge"
              for target, line, top in GRAPH[module][0] if not top]
    assert not nested, "\n".join(nested)


# (the int8 export's diagnosis uses ONNX Runtime's quantization tools on graphs it is making;
# it judges the files it keeps through the runners, like validate)
@pytest.mark.parametrize("module", ["tledge.validate", "tledge.bench.stage", "tledge.bench.worker",
                                    "tledge.bench.bundle", "tledge.predict", "tledge.explain"])
def test_stages_reach_runtimes_only_through_the_runners(module):
    assert not GRAPH[module][1] & set(RUNTIME_MODULES), \
        f"{module} imports a runtime directly; load artifacts with tledge.runners.load"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("tledge.runners")])
def test_runners_import_neither_training_nor_export(module):
    bad = [target for target, _, _ in GRAPH[module][0]
           if target.startswith(("tledge.train", "tledge.export", "tledge.stages"))]
    assert not bad, f"{module} imports {bad}"


def test_the_device_script_stands_alone():
    # tledge/bench/core.py is copied verbatim into every bundle as bench_device.py
    assert not GRAPH["tledge.bench.core"][0]


def test_the_reader_sees_what_the_rules_judge(tmp_path):
    """An upward, a nested and a runtime import planted in a copy of a module are all seen."""
    planted = tmp_path / "errors.py"
    planted.write_text("import onnxruntime\nfrom tledge.stages import build\n\n\n"
                       "def f():\n    from tledge import cli\n", encoding="utf-8")
    found, third_party = imports("tledge.errors", planted)
    assert ("tledge.stages", 2, True) in found and ("tledge.cli", 6, False) in found
    assert "onnxruntime" in third_party
    assert layer_of("tledge.stages") > layer_of("tledge.errors")
