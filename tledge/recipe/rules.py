"""Recipe rules that involve more than one key (the single-key ones live in the schema).

Each rule returns its problems as `key.path: message` lines; `check_together` runs them all,
skipping a rule whose own inputs are invalid, so every problem is reported in one go.
"""

from __future__ import annotations

import functools
import re
import tomllib
from pathlib import Path

from tledge.backbones import BACKBONES
from tledge.data.synthetic import ATTRIBUTES
from tledge.model import RESERVED_NAMES
from tledge.recipe.spec import Recipe
from tledge.schema import Parser
from tledge.tasks import MEAN

_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")  # a folder's name: never "..", ".x"
_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def check_together(recipe, *, stored=False, more=()) -> list[str]:
    """Rules that involve more than one key, each run on its own.

    A rule whose inputs are themselves invalid (None after a type error) is skipped; the
    others still run, so every problem is reported in one go. A `stored` recipe (the copy in
    a run directory) is not asked for its data to exist: later stages read the data cache.
    `more` are rules that load other recipes (an ensemble's members: `tledge.recipe.load`).
    """
    problems = []
    check_data = functools.partial(_check_data, need_path=not stored)
    check_weights = functools.partial(_check_weights, need_file=not stored)
    rules = (_check_name, check_data, check_weights, _check_training, _check_bench,
             _check_model_backbone, _check_baseline, _check_tasks)
    if recipe.ensemble is not None:  # its models are its members'
        rules = (_check_name, check_data, _check_bench, _check_baseline, _check_tasks)
    for rule in (*rules, *more):
        try:
            problems += rule(recipe)
        except (TypeError, AttributeError, KeyError):
            continue
    return problems


def name_problem(name) -> str | None:
    """Why `name` cannot name a run directory (None when it can): letters, digits, '_', '-'
    and '.', not starting with '.', so it stays one folder inside the folder it is made in."""
    if not isinstance(name, str) or not _NAME.match(name):
        return (f"expected letters, digits, '_', '-' or '.' (not starting with '.'), found "
                f"{name!r}")
    return None


def _check_name(recipe) -> list[str]:
    problem = name_problem(recipe.name)
    if problem:
        return [f"name: {problem}"]
    return []


def _check_data(recipe, need_path=True) -> list[str]:
    problems, data = [], recipe.data
    if data.source in ("folder", "csv", "npz") and not data.path:
        kind = {"folder": "a folder of class sub-folders", "csv": "a .csv file",
                "npz": "an .npz file"}[data.source]
        problems.append(f"data.path: is required for source '{data.source}' ({kind})")
    elif not need_path:
        pass
    elif data.source == "folder" and not Path(data.path).is_dir():
        problems.append(f"data.path: no such folder '{data.path}' (relative paths are read from "
                        "the recipe's folder)")
    elif data.source in ("npz", "csv") and not Path(data.path).is_file():
        problems.append(f"data.path: no such file '{data.path}' (relative paths are read from "
                        "the recipe's folder)")
    if data.source in ("synthetic", "cifar10") and data.path:
        problems.append(f"data.path: not used by source '{data.source}'; remove it")
    if data.source == "synthetic" and len(set(data.synthetic.classes)) < 2:
        problems.append("data.synthetic.classes: expected at least 2 different classes")
    if data.val_fraction + data.test_fraction >= 0.9:
        problems.append("data.val_fraction + data.test_fraction: expected less than 0.9 "
                        f"together, so training keeps most of the data, found "
                        f"{data.val_fraction + data.test_fraction:g}")
    return problems


_TASK_SOURCES = ("csv", "synthetic")


def _check_tasks(recipe) -> list[str]:
    """[[data.tasks]]: where multi-task labels come from, and what a multi-task model may
    not (yet) be combined with."""
    tasks, model, train = recipe.data.tasks, recipe.model, recipe.train
    names = [task.name for task in tasks]
    if not tasks:
        problems = [f"{key}: only for a multi-task recipe (set [[data.tasks]])"
                    for key, used in (("model.tasks", model.tasks),
                                      ("train.best_by", train.best_by != MEAN),
                                      ("train.compare_single_task", train.compare_single_task))
                    if used]
        return problems
    problems = []
    if recipe.data.source not in _TASK_SOURCES:
        problems.append(f"data.tasks: source '{recipe.data.source}' has one label per image; "
                        "several tasks need the csv source (a column per task) or synthetic")
    for index, task in enumerate(tasks):
        if not _TASK_NAME.match(task.name or ""):
            problems.append(f"data.tasks[{index}].name: expected a letter, then letters, "
                            f"digits or '_' (it names the model's output), found {task.name!r}")
        elif task.name in RESERVED_NAMES:
            problems.append(f"data.tasks[{index}].name: {task.name!r} names a layer of every "
                            "tledge model; choose another")
        if recipe.data.source == "synthetic" and task.labels not in ATTRIBUTES:
            problems.append(f"data.tasks[{index}].labels: the synthetic source labels "
                            f"{', '.join(ATTRIBUTES)}, not {task.labels!r}")
    for name in sorted({name for name in names if names.count(name) > 1}):
        problems.append(f"data.tasks: task name {name!r} is used twice")
    labels = [task.labels for task in tasks]
    for label in sorted({label for label in labels if labels.count(label) > 1}):
        problems.append(f"data.tasks: two tasks read the same labels {label!r}")
    if recipe.data.source == "synthetic":
        synthetic = recipe.data.synthetic
        for kind, values in (("colour", synthetic.colours), ("size", synthetic.sizes)):
            if kind in labels and len(set(values)) < 2:
                problems.append(f"data.synthetic.{kind}s: a task labels {kind}; expected at "
                                "least 2 different values")
    unknown = [name for name in model.tasks if name not in names]
    if unknown:
        problems.append(f"model.tasks: no task {', '.join(map(repr, unknown))} in data.tasks "
                        f"({', '.join(names)})")
    answered = list(model.tasks) or names
    if train.best_by != MEAN and train.best_by not in answered:
        problems.append(f"train.best_by: expected \"mean\" or one of the model's tasks "
                        f"({', '.join(answered)}), found {train.best_by!r}")
    if train.compare_single_task and len(answered) < 2:
        problems.append("train.compare_single_task: the model answers one task; there is "
                        "nothing to compare with")
    for key, used, why in (
            ("ensemble", recipe.ensemble is not None, "fuses single-task members"),
            ("baseline", recipe.baseline is not None,
             "is single-task; train.compare_single_task = true compares per task"),
            ("model.head", model.head == "keep", "keeps a single-task head"),
            ("train.class_weight", train.class_weight == "balanced",
             "weighs one task's classes"),
            ("train.distribute", train.distribute == "multi_worker",
             "runs a single-output training loop")):
        if used:
            problems.append(f"{key}: not available with [[data.tasks]] (it {why})")
    return problems


def _check_weights(recipe, need_file=True) -> list[str]:
    """A `stored` recipe (a run's copy) is not asked for its weights file: only training reads
    it, and a run copied alone has no checkout beside it."""
    weights = recipe.model.weights
    if recipe.model.head == "keep" and Path(weights).suffix not in (".toml", ".keras"):
        return [f"model.head: \"keep\" keeps the head of a trained model; set model.weights to "
                f"the recipe that trained it or its .keras file, found {weights!r}"]
    if weights in ("imagenet", "none"):
        return []
    weights_path = Path(weights)
    if weights_path.suffix not in (".h5", ".keras", ".toml"):
        return [f"model.weights: expected 'imagenet', 'none', a .h5/.weights.h5/.keras file or "
                f"a recipe .toml, found {weights!r}"]
    if not need_file:
        return []
    if not weights_path.is_file():
        return [f"model.weights: no such file '{weights}' (relative paths are read from the "
                "recipe's folder)"]
    if weights_path.suffix != ".toml":
        return []
    if recipe.path and weights_path.resolve() == Path(recipe.path).resolve():
        return ["model.weights: a recipe cannot take its weights from itself"]
    cycle = recipe_cycle(Path(recipe.path), weights_path) if recipe.path else None
    if cycle:
        return ["model.weights: recipes refer to each other in a cycle: "
                + " -> ".join(path.name for path in cycle)]
    try:
        document = tomllib.loads(weights_path.read_text(encoding="utf-8"))
        parser = Parser(weights_path.resolve().parent)
        parser.parse(Recipe, document)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        return [f"model.weights: {weights_path.name} is not valid TOML: {error}"]
    if parser.problems:
        return [f"model.weights: {weights_path.name} has {len(parser.problems)} problem(s); run "
                f"`tledge check {weights}` (first: {parser.problems[0]})"]
    return []


def _check_training(recipe) -> list[str]:
    problems, train = [], recipe.train
    if train.feature_extraction.epochs + train.fine_tune.epochs == 0:
        problems.append("train: both phases have 0 epochs; nothing would be trained (set "
                        "train.feature_extraction.epochs or train.fine_tune.epochs)")
    elif recipe.model.weights == "none" and train.feature_extraction.epochs == 0:
        problems.append("train.feature_extraction.epochs: with weights = \"none\" this phase "
                        "trains the whole network from scratch (fine-tuning does not apply); "
                        "expected at least 1, found 0")
    for name in ("feature_extraction", "fine_tune"):
        phase = getattr(train, name)
        if phase.warmup_epochs and phase.schedule != "cosine":
            problems.append(f"train.{name}.warmup_epochs: warm-up belongs to the cosine "
                            f"schedule; set train.{name}.schedule = \"cosine\" or remove it")
        elif phase.warmup_epochs >= max(phase.epochs, 1) and phase.epochs:
            problems.append(f"train.{name}.warmup_epochs: expected fewer than the phase's "
                            f"{phase.epochs} epochs, found {phase.warmup_epochs}")
    return problems


def _check_bench(recipe) -> list[str]:
    if not recipe.bench.runtimes:
        return ["bench.runtimes: expected at least one runtime, found []"]
    return []


def _check_model_backbone(recipe) -> list[str]:
    backbone = BACKBONES.get(recipe.model.backbone)
    return _check_backbone(recipe, backbone) if backbone is not None else []


def _check_baseline(recipe) -> list[str]:
    if recipe.baseline is None:
        return []
    backbone = BACKBONES.get(recipe.baseline.backbone)
    size = recipe.data.image_size
    if backbone is not None and size is not None and min(size) < backbone.min_size:
        return [f"baseline.backbone: '{backbone.name}' needs at least {backbone.min_size}x"
                f"{backbone.min_size}, found {size[0]}x{size[1]}"]
    return []


def _check_backbone(recipe, backbone) -> list[str]:
    """Rules that need the backbone: width multiplier, input size, weights, layer count."""
    problems = []
    data, model = recipe.data, recipe.model
    if model.alpha is not None and not backbone.alphas:
        problems.append(f"model.alpha: backbone '{model.backbone}' has no width multiplier; "
                        "remove alpha")
    elif model.alpha is not None and model.alpha not in backbone.alphas:
        problems.append(f"model.alpha: expected one of {', '.join(map(str, backbone.alphas))} "
                        f"for '{model.backbone}', found {model.alpha}")
    if data.image_size is not None and min(data.image_size) < backbone.min_size:
        problems.append(f"data.image_size: '{model.backbone}' needs at least "
                        f"{backbone.min_size}x{backbone.min_size}, found "
                        f"{data.image_size[0]}x{data.image_size[1]}")
    if model.weights == "imagenet" and backbone.imagenet_file is None:
        problems.append(f"model.weights: '{model.backbone}' has no ImageNet weights; use "
                        "\"none\", a weights file or a recipe")
    unfreeze = recipe.train.fine_tune.unfreeze
    if isinstance(unfreeze, int) and unfreeze > backbone.layers:
        problems.append(f"train.fine_tune.unfreeze: '{model.backbone}' has {backbone.layers} "
                        f"layers, found {unfreeze}; use a smaller count or 'all'")
    return problems


def recipe_cycle(start: Path, path: Path, seen=()) -> list | None:
    """The chain of recipe files that leads from `path` back to `start`, if there is one."""
    seen = seen + (path.resolve(),)
    if path.resolve() == start.resolve():
        return [start, *[Path(p) for p in seen]]
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    references = [document.get("model", {}).get("weights", "")]
    references += [member.get("recipe", "") for member in
                    document.get("ensemble", {}).get("members", []) if isinstance(member, dict)]
    for reference in references:
        if isinstance(reference, str) and reference.endswith(".toml"):
            target = (path.resolve().parent / reference).resolve()
            if target in seen:
                continue
            found = recipe_cycle(start, target, seen)
            if found:
                return found
    return None
