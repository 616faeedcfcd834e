"""Loading a recipe: read the TOML, check every key and rule, resolve the defaults that depend
on other keys, and follow its references to other recipes (a weights recipe, the members of
an ensemble), which are recipes loaded the same way.

`load_recipe(path)` raises one `RecipeError` listing every problem (file, key path, expected,
found). Relative paths are resolved against the recipe file's folder. The result is frozen.

An ensemble member is either another recipe file or an inline `[[ensemble.members]]` table.
Either way it becomes a full `Recipe` that shares the ensemble's data source (each member at
its own image size), so training a member is training a recipe, and a member built before
is reused from its run directory.
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
from pathlib import Path
from typing import Mapping

from tledge.backbones import BACKBONES
from tledge.errors import RecipeError
from tledge.formats import RUNTIME_ROWS
from tledge.recipe.rules import check_together, recipe_cycle
from tledge.recipe.spec import Recipe
from tledge.schema import Parser, to_dict
from tledge.tune.space import dimensions, flatten, show_value, with_values

def load_recipe(path, *, stored=False) -> Recipe:
    """Read, check and resolve a recipe file.

    Raises:
        RecipeError: listing every problem found, each with its key path.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(path, ["no such recipe file; check the path "
                                 "(recipes live in recipes/, e.g. recipes/quickstart.toml)"])
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise RecipeError(path, [f"not valid TOML: {error}"]) from None
    return parse_recipe(document, path, stored=stored)


def parse_recipe(document: Mapping, path, *, stored=False) -> Recipe:
    """Check a recipe already read into a dict; `path` anchors relative paths and messages."""
    path = Path(path)
    parser = Parser(path.resolve().parent)
    document = _flat_space(document)
    recipe = dataclasses.replace(parser.parse(Recipe, dict(document)),
                                 path=str(path.resolve()))  # for the self-reference check
    problems = list(parser.problems)
    if recipe.tune is not None and not problems:
        problems += check_tune(recipe, document, stored=stored)
    if "ensemble" in document:
        problems += [f"{key}: an ensemble recipe takes its models from [[ensemble.members]] "
                     f"(each may have its own {key} table); remove [{key}]"
                     for key in ("model", "train") if key in document]
    ensemble_rules = (check_ensemble,) if recipe.ensemble is not None else ()
    joint = check_together(recipe, stored=stored, more=ensemble_rules)
    reported = {problem.split(":")[0].split("[")[0] for problem in problems}
    problems += [problem for problem in joint if problem.split(":")[0] not in reported]
    if problems:
        raise RecipeError(path, problems)
    return _resolve(recipe, path)


def _flat_space(document: Mapping) -> Mapping:
    """`[tune.space]` with its keys as dotted paths (TOML nests a dotted key's tables)."""
    tune = document.get("tune")
    if not isinstance(tune, dict) or not isinstance(tune.get("space"), dict):
        return document
    return {**document, "tune": {**tune, "space": flatten(tune["space"])}}


def check_tune(recipe, document, *, stored=False) -> list[str]:
    """Every problem with [tune]: each key of its space must be a searchable recipe key and
    each value must make a valid recipe when set alone."""
    if recipe.ensemble is not None:
        return ["tune: an ensemble recipe is not searched; search each member's recipe"]
    if not recipe.tune.space:
        return ["tune.space: expected at least one key to search, e.g. "
                "train.fine_tune.learning_rate = { low = 1e-5, high = 1e-3, log = true }"]
    found, problems = dimensions(recipe.tune.space)
    tune, export = recipe.tune, recipe.export
    exported = {"keras", *(family for family in ("tflite", "onnx", "openvino")
                           if getattr(export, family)), *(("savedmodel",) if export.savedmodel
                                                          else ())}
    runs = next(row.families for row in RUNTIME_ROWS if row.name == tune.runtime)
    if not exported & set(runs):
        problems.append(f"tune.runtime: {tune.runtime} runs {' or '.join(runs)} files, and "
                        "[export] makes none; export them, or time the trials on another "
                        "runtime")
    if tune.max_memory_mb is not None and not recipe.bench.isolate:
        problems.append("tune.max_memory_mb: the memory a runtime adds is measured with each "
                        "combination in a process of its own; set bench.isolate = true")
    if not problems and not stored:  # a stored copy was checked when it was written
        problems += check_dimensions(recipe, document, found)
    return problems


def check_dimensions(recipe, document, found) -> list[str]:
    """Each value of each dimension (a range's ends) set alone into the recipe must load:
    one problem line per value that does not, under tune.space."""
    problems = []
    for dimension in found:
        values = dimension.choices if not dimension.is_range else (dimension.low, dimension.high)
        # a value valid with other dimensions' choices counts (model.alpha with a MobileNet
        # among the backbones searched): every combination of them, or each alone where
        # they are too many
        others = [other for other in found if other is not dimension and other.choices]
        combinations = [dict(zip([other.key for other in others], values))
                        for values in itertools.islice(
                            itertools.product(*(other.choices for other in others)), 65)]
        companions = [{}] + (combinations if len(combinations) <= 64 else
                             [{other.key: choice} for other in others
                              for choice in other.choices])
        for index, value in enumerate(values):
            error = None
            for companion in companions:
                try:
                    parse_recipe(with_values(document, {**companion, dimension.key: value}),
                                 recipe.path)
                    error = None
                    break
                except RecipeError as refused:
                    error = error or refused
            if error is not None:
                mine = [problem for problem in error.problems
                        if problem.split(":")[0].startswith(dimension.key)] or error.problems
                label = f"[{index}]" if not dimension.is_range else \
                    (".low" if index == 0 else ".high")
                problems.append(f"tune.space.{dimension.key}{label}: {show_value(value)} makes the "
                                f"recipe invalid: {mine[0]}")
    return problems


def _resolve(recipe: Recipe, path: Path) -> Recipe:
    """Fill in the defaults that depend on other keys."""
    if recipe.ensemble is not None:
        return dataclasses.replace(resolve_ensemble(recipe), path=str(path.resolve()))
    backbone = BACKBONES[recipe.model.backbone]
    data = recipe.data
    if data.image_size is None:
        data = dataclasses.replace(data, image_size=backbone.default_size)
    model = recipe.model
    if backbone.alphas and model.alpha is None:
        model = dataclasses.replace(model, alpha=1.0)
    train = recipe.train
    if train.fine_tune.unfreeze is None:
        train = dataclasses.replace(train, fine_tune=dataclasses.replace(
            train.fine_tune, unfreeze=backbone.default_unfreeze))
    return dataclasses.replace(recipe, data=data, model=model, train=train,
                               path=str(path.resolve()))


# -- ensemble members -----------------------------------------------------------------------

IGNORED_IN_COMPARISON = ("image_size", "batch_size", "augment")


def member_recipes(recipe) -> list:
    """The resolved recipe of every member of an ensemble recipe, in order.

    Raises:
        RecipeError: a member recipe file is missing or invalid.
    """
    members = []
    for member in recipe.ensemble.members:
        if member.recipe:
            members.append(load_recipe(member.recipe))
        else:
            members.append(inline_recipe(recipe, member))
    return members


def inline_recipe(recipe, member):
    """An inline member as a recipe of its own, resolved like a recipe file would be."""
    # an inline member without a size of its own sees the ensemble's images as they are
    data = dataclasses.replace(recipe.data, image_size=member.image_size or recipe.data.image_size)
    inline = Recipe(name=f"{recipe.name}.{member.name}", seed=recipe.seed,
                    description=f"member {member.name} of {recipe.name}", data=data,
                    model=member.model, train=member.train, export=recipe.export,
                    validate=recipe.validate, bench=recipe.bench, path=recipe.path)
    return _resolve(inline, Path(recipe.path or "."))


def check_ensemble(recipe) -> list[str]:
    """Every problem with an ensemble's members, each with its key path."""
    ensemble = recipe.ensemble
    problems = []
    if ensemble.fusion == "weighted" and recipe.data.val_fraction == 0 and \
            recipe.data.source in ("synthetic", "cifar10"):
        problems.append("ensemble.fusion: \"weighted\" fits its weights on the validation "
                        "split; set data.val_fraction > 0 or use fusion = \"mean\"")
    if len(ensemble.members) < 2:
        problems.append(f"ensemble.members: an ensemble needs at least 2 members, found "
                        f"{len(ensemble.members)}")
    names = [member.name for member in ensemble.members if member.name]
    for duplicate in sorted({name for name in names if names.count(name) > 1}):
        problems.append(f"ensemble.members: the name {duplicate!r} is used twice")
    for index, member in enumerate(ensemble.members):
        key = f"ensemble.members[{index}]"
        if member.recipe and member.name:
            problems.append(f"{key}: give either recipe = \"file.toml\" or an inline model "
                            "(name, model, train), not both")
            continue
        if not member.recipe and not member.name:
            problems.append(f"{key}: expected recipe = \"file.toml\" or an inline member with a "
                            "name")
            continue
        if member.recipe:
            problems += _check_member_file(recipe, member.recipe, f"{key}.recipe")
            continue
        inline = inline_recipe(recipe, member) if member.model.backbone else None
        if inline is not None:
            problems += [f"{key}.{problem}" for problem in check_together(inline)
                         if not problem.startswith(("name:", "data."))]
    if not problems:
        try:
            members = member_recipes(recipe)
        except RecipeError as error:
            return problems + [f"ensemble.members: {error}"]
        problems += _check_same_data(recipe, members)
    return problems


def _check_member_file(recipe, path, key) -> list[str]:
    path = Path(path)
    if path.suffix != ".toml":
        return [f"{key}: expected a recipe .toml file, found {path.name!r}"]
    if not path.is_file():
        return [f"{key}: no such recipe '{path}' (relative paths are read from the recipe's "
                "folder)"]
    cycle = recipe_cycle(Path(recipe.path), path)
    if cycle:
        return [f"{key}: recipes refer to each other in a cycle: "
                + " -> ".join(p.name for p in cycle)]
    try:
        member = load_recipe(path)
    except RecipeError as error:
        return [f"{key}: {path.name} is not a valid recipe ({len(error.problems)} problem(s); "
                f"run `tledge check {path}`; first: {error.problems[0]})"]
    if member.ensemble is not None:
        return [f"{key}: {path.name} is itself an ensemble; list its members here instead"]
    return []


def _check_same_data(recipe, members) -> list[str]:
    """Members must read the same data, with the same classes in the same order."""
    ours = {key: value for key, value in to_dict(recipe.data).items()
            if key not in IGNORED_IN_COMPARISON}
    problems = []
    for index, member in enumerate(members):
        theirs = {key: value for key, value in to_dict(member.data).items()
                  if key not in IGNORED_IN_COMPARISON}
        different = sorted(key for key in ours.keys() | theirs.keys()
                           if ours.get(key) != theirs.get(key))
        if member.seed != recipe.seed:
            different.append("seed")
        if different:
            problems.append(
                f"ensemble.members[{index}]: {Path(member.path).name} and "
                f"{Path(recipe.path).name} must share the data source and split, but differ in "
                + ", ".join("data." + key if key != "seed" else key for key in different)
                + (" (the classes or their order differ)" if "synthetic" in different else ""))
    return problems


def resolve_ensemble(recipe):
    """An ensemble recipe with its members resolved and its image size filled in."""
    ensemble = recipe.ensemble
    members = []
    for member in ensemble.members:
        if member.recipe:
            members.append(member)
        else:
            inline = inline_recipe(recipe, member)
            members.append(dataclasses.replace(member, image_size=inline.data.image_size,
                                               model=inline.model, train=inline.train))
    resolved = [*member_recipes(recipe)]
    size = recipe.data.image_size or tuple(max(r.data.image_size[axis] for r in resolved)
                                           for axis in (0, 1))
    return dataclasses.replace(
        recipe, data=dataclasses.replace(recipe.data, image_size=size),
        ensemble=dataclasses.replace(ensemble, members=tuple(members)))
