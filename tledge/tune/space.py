"""The search space of `[tune.space]`: recipe keys and the values each may take, checked when
the recipe loads, sampled by Optuna for each trial and written into a copy of the recipe.

    [tune.space]
    train.fine_tune.learning_rate = { low = 5e-5, high = 1e-3, log = true }   # a range
    train.fine_tune.schedule = ["constant", "cosine"]                        # a choice
    data.image_size = [[32, 32], [48, 48]]

A key is written as TOML writes it, dotted (which nests tables) or quoted; `flatten` turns
either into dotted key paths. A trial's recipe is the recipe file's own document with each
key set and loaded as any recipe is, so a value is checked, and the defaults that depend on
other keys are filled in, exactly as they would be had the user typed it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path

from tledge.recipe.spec import Recipe

RANGE_KEYS = {"low", "high", "log", "step"}
# what may be searched: how a model is made and trained, and the size of its input
SEARCHABLE = ("model.", "train.", "data.image_size", "data.batch_size", "data.augment.")
# keys that change where or how fast it trains, not what it learns; or the trial set-up
NOT_SEARCHABLE = ("train.distribute", "train.mixed_precision", "train.jit_compile",
                  "train.cache_bottlenecks", "train.compare_single_task", "train.best_by",
                  "model.tasks")


@dataclasses.dataclass(frozen=True)
class Dimension:
    key: str  # a dotted recipe key path
    choices: tuple = ()  # a choice among values, or
    low: float | None = None  # a range
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    @property
    def is_range(self) -> bool:
        return not self.choices

    def describe(self) -> str:
        if not self.is_range:
            return " | ".join(show_value(choice) for choice in self.choices)
        scale = ", log scale" if self.log else (f", step {self.step:g}" if self.step else "")
        return f"{self.low:g} to {self.high:g}{scale}"

    def contains(self, value) -> bool:
        if not self.is_range:
            return any(_same(value, choice) for choice in self.choices)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and \
            self.low <= value <= self.high

    def suggest(self, trial):
        """The trial's value (Optuna's `suggest_*`; a choice of lists goes by its index)."""
        if not self.is_range:
            if all(isinstance(choice, (str, int, float, bool)) for choice in self.choices):
                return trial.suggest_categorical(self.key, list(self.choices))
            shown = [show_value(choice) for choice in self.choices]
            return self.choices[shown.index(trial.suggest_categorical(self.key, shown))]
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def distribution(self):
        """The Optuna distribution `suggest` draws from (what its study records)."""
        import optuna
        if not self.is_range:
            simple = all(isinstance(choice, (str, int, float, bool)) for choice in self.choices)
            return optuna.distributions.CategoricalDistribution(
                list(self.choices) if simple else [show_value(c) for c in self.choices])
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high),
                                                        log=self.log, step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log,
                                                      step=self.step)

    def same_as(self, recorded) -> bool:
        """Whether a study that recorded `recorded` for this key can go on drawing it: the
        same kind and scale, and a choice among the same values (a range may move)."""
        import optuna
        mine = self.distribution()
        if type(mine) is not type(recorded):
            return False
        if isinstance(mine, optuna.distributions.CategoricalDistribution):
            return tuple(mine.choices) == tuple(recorded.choices)
        return mine.log == recorded.log

    def stored(self, value):
        """The value as Optuna stores it in its trial parameters (for `enqueue_trial`)."""
        if not self.is_range and not all(isinstance(choice, (str, int, float, bool))
                                         for choice in self.choices):
            return show_value(value)
        return value

    def nearest(self, target, current):
        """The value of this dimension nearest to `target` that is not `current`, moving from
        `current` towards `target` (None when there is none that way)."""
        if not self.is_range:
            if any(_same(target, choice) for choice in self.choices):
                return None if _same(target, current) else target
            numbers = [choice for choice in self.choices
                       if isinstance(choice, (int, float)) and not isinstance(choice, bool)]
            if not isinstance(target, (int, float)) or not isinstance(current, (int, float)) \
                    or not numbers:
                return None
            way = [choice for choice in numbers
                   if (choice - current) * (target - current) > 0]
            return min(way, key=lambda choice: abs(choice - target)) if way else None
        if not isinstance(target, (int, float)) or isinstance(target, bool):
            return None
        value = min(max(target, self.low), self.high)
        if self.integer:
            value = int(round(value))
        return None if _same(value, current) else value


def show_value(value) -> str:
    """A value as messages show it: lists in brackets, floats short."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(item) for item in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if not isinstance(value, str) else value


def _same(one, other) -> bool:
    if isinstance(one, (list, tuple)) and isinstance(other, (list, tuple)):
        return len(one) == len(other) and all(_same(a, b) for a, b in zip(one, other))
    if isinstance(one, bool) or isinstance(other, bool):
        return one is other
    if isinstance(one, (int, float)) and isinstance(other, (int, float)):
        return math.isclose(one, other, rel_tol=1e-9, abs_tol=1e-12)
    return one == other


def flatten(space, prefix: str = "") -> dict:
    """{dotted key: list of values or range table} from `[tune.space]` as TOML read it: a
    dotted key nests tables, so a table that is not a range is walked into."""
    if not isinstance(space, dict):
        return space
    flat = {}
    for key, value in space.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value and not set(value) & RANGE_KEYS:
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def annotation_of(key: str):
    """The type a recipe key path holds (`train.fine_tune.epochs` -> int), or None when the
    path names no key."""
    cls = Recipe
    parts = key.split(".")
    for index, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        fields = {field.name for field in dataclasses.fields(cls) if field.metadata}
        if part not in fields:
            return None
        annotation = hints[part]
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)] \
            if typing.get_origin(annotation) in (typing.Union, types.UnionType) else [annotation]
        tables = [member for member in members if dataclasses.is_dataclass(member)]
        if index == len(parts) - 1:
            return None if tables and len(members) == 1 else annotation
        if not tables:
            return None
        cls = tables[0]
    return None


def _numeric(annotation) -> tuple[bool, bool]:
    """(whether a key of this type takes a number, whether only whole numbers)."""
    members = typing.get_args(annotation) or (annotation,)
    if float in members:
        return True, False
    return int in members, int in members


def dimensions(space) -> tuple[list[Dimension], list[str]]:
    """The dimensions of a flattened `[tune.space]`, and every problem with it (key paths
    under tune.space)."""
    found, problems = [], []
    for key, value in space.items():
        where = f"tune.space.{key}"
        annotation = annotation_of(key)
        if annotation is None:
            problems.append(f"{where}: not a recipe key (keys are written as in the recipe, "
                            "e.g. train.fine_tune.learning_rate)")
            continue
        if not key.startswith(SEARCHABLE) or key.startswith(NOT_SEARCHABLE):
            problems.append(f"{where}: not searchable; a search changes how the model is made "
                            "and trained (model.*, train.*, data.image_size, data.batch_size, "
                            "data.augment.*), not the data it is judged on or how fast it "
                            "trains")
            continue
        if isinstance(value, list):
            if len(value) < 2:
                problems.append(f"{where}: expected at least two values to choose from, found "
                                f"{len(value)}")
                continue
            found.append(Dimension(key, choices=tuple(value)))
            continue
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a list of values or a range table "
                            "{ low = ..., high = ... }, found " + show_value(value))
            continue
        unknown = sorted(set(value) - RANGE_KEYS)
        numeric, whole = _numeric(annotation)
        low, high = value.get("low"), value.get("high")
        if unknown:
            problems.append(f"{where}.{unknown[0]}: unknown key; a range has low, high, log "
                            "and step")
        elif not numeric:
            problems.append(f"{where}: a range needs a numeric key; give a list of values")
        elif not all(isinstance(bound, (int, float)) and not isinstance(bound, bool)
                     for bound in (low, high)):
            problems.append(f"{where}: a range needs numbers low and high")
        elif not low < high:
            problems.append(f"{where}: low must be below high, found {low} and {high}")
        elif value.get("log", False) not in (True, False):
            problems.append(f"{where}.log: expected true or false")
        elif value.get("log") and low <= 0:
            problems.append(f"{where}: a log range needs low > 0")
        elif value.get("log") and value.get("step"):
            problems.append(f"{where}: give log or step, not both")
        elif whole and not (float(low).is_integer() and float(high).is_integer()):
            problems.append(f"{where}: {key} takes whole numbers; low and high must be whole")
        else:
            step = value.get("step")
            if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float))
                                     or step <= 0):
                problems.append(f"{where}.step: expected a number above 0")
                continue
            if whole and step is not None and not float(step).is_integer():
                problems.append(f"{where}.step: {key} takes whole numbers; the step must be "
                                "whole")
                continue
            if whole:
                low, high, step = int(low), int(high), None if step is None else int(step)
            found.append(Dimension(key, low=low, high=high, log=bool(value.get("log")),
                                   step=step, integer=whole))
    return found, problems


# -- a trial's recipe --------------------------------------------------------------------


def set_key(document: dict, key: str, value) -> None:
    """Set a dotted key in a recipe document, making the tables on its way."""
    *tables, last = key.split(".")
    table = document
    for name in tables:
        table = table.setdefault(name, {})
    table[last] = list(value) if isinstance(value, tuple) else value


def get_key(document: dict, key: str):
    table = document
    for name in key.split("."):
        if not isinstance(table, dict) or name not in table:
            return None
        table = table[name]
    return table


def with_values(document: dict, values: dict) -> dict:
    """A copy of a recipe document with `values` ({dotted key: value}) set, and without its
    [tune] table."""
    copied = copy.deepcopy(dict(document))
    copied.pop("tune", None)
    for key, value in values.items():
        set_key(copied, key, value)
    return copied


def source_document(path) -> dict:
    """The recipe file's TOML as a document: what each trial's recipe starts from."""
    import tomllib
    return tomllib.loads(Path(path).read_text(encoding="utf-8"))


def tune_threads(recipe) -> int:
    """The threads [tune] times each trial's artifacts at."""
    return recipe.tune.threads or recipe.bench.threads[0]


def best_recipe_document(recipe, document, values) -> dict:
    """The recipe a study found: the recipe file's own document with the best trial's
    values, without [tune], under a name of its own."""
    best = with_values(document, values)
    best["name"] = f"{recipe.name}_tuned"
    return best
