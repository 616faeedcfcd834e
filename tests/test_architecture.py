"""The house rules of docs/architecture.md, read from the code: tledge's import graph has no
cycle and no upward arrow, its own imports are at module top, and the stages that judge and
time artifacts reach runtimes only through the runners."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tledge"

# Bottom to top. A module may import modules of its own layer and of the layers below, never
# above. Every module is named: a new module takes a layer by being placed here, not by the
# folder it lands in.
LAYERS = [
    ("core", ["tledge.core", "tledge.core.classify", "tledge.core.metrics",
              "tledge.core.engines", "tledge.core.machine", "tledge.core.timing",
              "tledge.core.device"]),
    ("base", ["tledge.errors", "tledge.schema", "tledge.formats", "tledge.quiet",
              "tledge.parity", "tledge.tasks"]),
    ("run directory", ["tledge.rundir", "tledge.records"]),
    ("libraries", ["tledge.data", "tledge.data.cache", "tledge.data.cifar10",
                   "tledge.data.corruptions", "tledge.data.csv_source", "tledge.data.feed",
                   "tledge.data.images", "tledge.data.leakage", "tledge.data.npz_source",
                   "tledge.data.prepare", "tledge.data.prepare_worker", "tledge.data.sources",
                   "tledge.data.synthetic", "tledge.backbones", "tledge.model", "tledge.flops",
                   "tledge.recipe", "tledge.recipe.dump", "tledge.recipe.load",
                   "tledge.recipe.rules", "tledge.recipe.spec", "tledge.runners",
                   "tledge.runners.keras_runner", "tledge.runners.litert_runner",
                   "tledge.runners.openvino_runner", "tledge.runners.ort_runner",
                   "tledge.runners.web_runner",
                   "tledge.plots", "tledge.run_inputs", "tledge.tune", "tledge.tune.space"]),
    ("pipeline", ["tledge.pipeline"]),
    ("stages", ["tledge.train", "tledge.train.adabn", "tledge.train.bottlenecks",
                "tledge.train.distribute", "tledge.train.ensemble", "tledge.train.loop",
                "tledge.train.multi_worker", "tledge.train.phase", "tledge.train.stage",
                "tledge.export", "tledge.export.int8", "tledge.export.metadata",
                "tledge.export.onnx", "tledge.export.openvino", "tledge.export.qat",
                "tledge.export.savedmodel",
                "tledge.export.stage",
                "tledge.export.tflite", "tledge.export.tflite_standard", "tledge.validate",
                "tledge.bench", "tledge.bench.bundle", "tledge.bench.emulate",
                "tledge.bench.single_task", "tledge.bench.stage", "tledge.bench.worker",
                "tledge.explain", "tledge.report", "tledge.report.document",
                "tledge.report.deploy", "tledge.report.domains", "tledge.report.int8",
                "tledge.report.tasks",
                "tledge.predict", "tledge.inspection", "tledge.domains", "tledge.doctor"]),
    ("orchestration", ["tledge.stages", "tledge.tune.study", "tledge.tune.results"]),
    ("interface", ["tledge.api", "tledge.cli", "tledge.__main__", "tledge"]),
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
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package, up level - 1
                parts = module.split(".")
                if (path or MODULES[module]).name != "__init__.py":
                    parts = parts[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names]
            # `from package import submodule` imports the submodule
            names = [sub for sub in subs if sub in MODULES] or [base]
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
    found = [index for index, (_, names) in enumerate(LAYERS) if module in names]
    assert len(found) == 1, f"{module} is in {len(found)} layers of tests/test_architecture.py " \
                            "(place it in one: which layer may it import?)"
    return found[0]


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_every_layer_names_modules_that_exist():
    named = [name for _, names in LAYERS for name in names]
    assert sorted(set(named) - set(MODULES)) == []


def test_no_import_cycles():
    edges = {module: {target for target, _, _ in GRAPH[module][0]} for module in MODULES}
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
              if layer_of(target) > layer_of(module)]
    assert not upward, "\n".join(upward)


def test_tledge_imports_are_at_module_top():
    # the package's public face resolves `tledge.build` on first use: every `import
    # tledge.<module>` runs tledge/__init__.py first and must not load every stage
    nested = [f"{module} line {line}: {target}" for module in MODULES if module != "tledge"
              for target, line, top in GRAPH[module][0] if not top]
    assert not nested, "\n".join(nested)


# Who may import a runtime itself: the runners, the engines every process shares (the device
# script among them), and the exporters (the int8 export's diagnosis uses ONNX Runtime's
# quantization tools on graphs it is making; it judges the files it keeps through the runners)
RUNTIME_USERS = ("tledge.runners.", "tledge.core.", "tledge.export.")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_other_module_reaches_runtimes_only_through_the_runners(module):
    if module.startswith(RUNTIME_USERS):
        return
    assert not GRAPH[module][1] & set(RUNTIME_MODULES), \
        f"{module} imports a runtime directly; load artifacts with tledge.runners.load"


def test_the_runtime_table_loads_only_runner_modules():
    """The runtime table names the modules it imports by string (importlib): each is a runner
    module (libraries layer) with the loader it names."""
    from tledge.formats import RUNTIME_ROWS
    for row in RUNTIME_ROWS:
        assert row.module.startswith("tledge.runners.") and row.module in MODULES, row
        tree = ast.parse(MODULES[row.module].read_text(encoding="utf-8"))
        assert row.loader in {node.name for node in tree.body
                              if isinstance(node, ast.FunctionDef)}, row


def test_a_recipe_imports_no_runner():
    bad = [target for module in MODULES if module.startswith("tledge.recipe")
           for target, _, _ in GRAPH[module][0] if target.startswith("tledge.runners")]
    assert not bad, bad


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("tledge.runners")])
def test_runners_import_neither_training_nor_export(module):
    bad = [target for target, _, _ in GRAPH[module][0]
           if target.startswith(("tledge.train", "tledge.export", "tledge.stages"))]
    assert not bad, f"{module} imports {bad}"


CORE = [module for module in MODULES if module == "tledge.core" or module.startswith("tledge.core.")]


@pytest.mark.parametrize("module", CORE)
def test_the_package_every_process_needs_stands_alone(module):
    """tledge.core is copied whole into every bundle as tledge_core/: it imports nothing of
    tledge but itself, and only relatively (`from .engines import ...`), so the copy imports
    the copy."""
    outside = [target for target, _, _ in GRAPH[module][0] if target not in CORE]
    assert not outside, f"{module} imports {outside}"
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    absolute = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and not node.level and (node.module or "").startswith("tledge")]
    absolute += [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Import)
                 and any(alias.name.startswith("tledge") for alias in node.names)]
    assert not absolute, f"{module}: absolute tledge imports at lines {absolute}"


@pytest.mark.parametrize("module", ["tledge.rundir", "tledge.pipeline"])
def test_the_store_does_not_import_the_benchmark_package(module):
    bad = [target for target, _, _ in GRAPH[module][0] if target.startswith("tledge.bench")]
    assert not bad, f"{module} imports {bad}"


def test_the_reader_sees_what_the_rules_judge(tmp_path):
    """Upward, nested, relative, package-level and runtime imports planted in a copy of a
    module are all seen."""
    planted = tmp_path / "stage.py"
    planted.write_text("import onnxruntime\nfrom tledge.stages import build\n"
                       "from ..report import document\nfrom . import worker\n"
                       "from tledge import build as also\n\n\n"
                       "def f():\n    from tledge import cli\n", encoding="utf-8")
    found, third_party = imports("tledge.bench.stage", planted)
    assert ("tledge.stages", 2, True) in found and ("tledge.cli", 9, False) in found
    assert ("tledge.report.document", 3, True) in found
    assert ("tledge.bench.worker", 4, True) in found
    assert ("tledge", 5, True) in found  # the interface layer: upward from a stage
    assert "onnxruntime" in third_party
    assert layer_of("tledge.stages") > layer_of("tledge.bench.stage")
    assert layer_of("tledge") > layer_of("tledge.bench.stage")


RESULT_RECORDS = {"PARITY", "BENCH", "DEVICES", "HISTORY", "DOMAINS", "parity.json",
                  "bench.json", "devices.json", "history.json", "domains.json"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_results_record_has_one_reader(module):
    """parity, bench, devices, history and domains are read through tledge.records alone (its
    typed rows and helpers), never by a module of its own with its own defaults."""
    if module in ("tledge.records", "tledge.rundir"):
        return
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(
                node.func, "attr", None)) in ("read_record", "read_json", "loads", "load"):
            names = {child.id for child in ast.walk(node) if isinstance(child, ast.Name)} | {
                child.value for child in ast.walk(node)
                if isinstance(child, ast.Constant) and isinstance(child.value, str)}
            found += [f"line {node.lineno}: {name}" for name in sorted(names & RESULT_RECORDS)]
    assert not found, f"{module} reads a results record itself: {found}"
