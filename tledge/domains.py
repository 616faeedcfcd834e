"""How far is the world a model runs in from the one it was trained in? `tledge evaluate`.

A run's models are judged on its own test split: its domain. `evaluate_run` runs the trained
model and every artifact that passed parity on other data (a folder, a .csv or .npz file with
the run's classes, or another recipe's [data] table) through the runners, and writes beside the
source figures: accuracy, per-class accuracy, confusion, agreement with the Keras model. The
difference between the two accuracies is the domain shift, in one number.

Results are kept in the run's `domains.json` (written by evaluation and adaptation alone), by
domain name, and shown in the report's Domains section.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from tledge.data import load_splits
from tledge.data.sources import in_class_order
from tledge.errors import DataError
from tledge.formats import FORMATS
from tledge.core.metrics import accuracy, agreement, confusion_matrix, per_class_accuracy
from tledge.parity import predict_all
from tledge.pipeline import validated_rows
from tledge.recipe.load import load_recipe
from tledge.recipe.spec import CsvRecipe, DataRecipe
from tledge.records import read_domains, read_parity
from tledge.rundir import (DOMAINS, artifacts, find_artifact, read_manifest, write_json)
from tledge.run_inputs import run_recipe
from tledge.runners import load, runtimes_for


@dataclasses.dataclass
class Target:
    """Data from another domain: how to read it, which of its images are judged, its name."""
    data: DataRecipe
    seed: int
    name: str
    where: str  # one line for the user and the report
    judged: str  # "test" (a recipe's test split) | "all" (every image of a folder or file)


def target_data(data_arg, recipe, name=None) -> Target:
    """The target named on the command line: a recipe .toml (its [data] table: its test split
    is judged, its training split may adapt), or a folder, .csv or .npz of images with the
    run's classes (every image is judged). Images are read at the run's image size."""
    path = Path(data_arg)
    size = tuple(recipe.data.image_size)
    if path.suffix == ".toml":
        other = load_recipe(path)
        data = dataclasses.replace(other.data, image_size=size)
        return Target(data, other.seed, name or other.name,
                      f"the [data] of {path.name} ({other.data.source})", "test")
    if path.is_dir():
        source = "folder"
    elif path.suffix in (".csv", ".npz") and path.is_file():
        source = path.suffix[1:]
    else:
        raise DataError(f"{path}: expected a recipe .toml, a folder of class sub-folders, or a "
                        ".csv or .npz file" + ("" if path.exists() else " (it does not exist)"))
    data = DataRecipe(source=source, path=str(path.resolve()), image_size=size,
                      val_fraction=0.0, test_fraction=0.0, batch_size=recipe.data.batch_size,
                      csv=CsvRecipe() if source != "csv" else recipe.data.csv,
                      on_bad_image=recipe.data.on_bad_image, cache_dir=recipe.data.cache_dir,
                      workers=recipe.data.workers)
    return Target(data, recipe.seed, name or path.stem or path.name, str(path), "all")


def target_splits(target: Target, labels, *, log=None, fractions=None):
    """The target's splits, its labels put in the run's class order.

    Raises:
        DataError: the target's classes are not the run's (the message lists the difference).
    """
    data = target.data if fractions is None else dataclasses.replace(target.data, **fractions)
    return in_class_order(load_splits(data, seed=target.seed, log=log), labels, target.where)


def judged_parts(target: Target, splits) -> tuple[list, str]:
    """([(images, labels)] the target is judged on, which): its test split (a recipe's, or a
    folder's own test/ sub-folder) as "test", else every image it has as "all"."""
    given = splits.record["splits"]["test"].get("obtained") == "given"
    if target.judged == "test" or (given and len(splits.y_test)):
        if not len(splits.y_test):
            raise DataError(f"{target.where} has no test split to evaluate on; set its "
                            "data.test_fraction > 0")
        return [(splits.x_test, splits.y_test)], "test"
    return [(x, y) for x, y in ((splits.x_train, splits.y_train), (splits.x_val, splits.y_val),
                                (splits.x_test, splits.y_test)) if len(y)], "all"


def predict_parts(runner, parts) -> np.ndarray:
    return np.concatenate([predict_all(runner, images) for images, _ in parts])


def scores(probabilities, labels, reference, classes) -> dict:
    """Accuracy, per-class accuracy, confusion, and agreement with the reference."""
    predicted = probabilities.argmax(1)
    confusion = confusion_matrix(labels, predicted, len(classes))
    return {"accuracy": accuracy(predicted, labels),
            "per_class": dict(zip(classes, per_class_accuracy(confusion))),
            "confusion": confusion, "agreement": agreement(predicted, reference.argmax(1))}


def source_figures(run_dir) -> dict:
    """Accuracy and per-class accuracy of each (artifact, runtime) on the run's own test split,
    from its parity record."""
    parity = read_parity(run_dir)
    return {(row.artifact, row.runtime): {
        "accuracy": row.accuracy, "per_class": per_class_accuracy(row.confusion or []),
        "split": parity.split} for row in (parity.rows if parity else [])
        if row.accuracy is not None}


def evaluate_run(run_dir, data_arg, *, name=None, log=print) -> dict:
    """Evaluate a run's Keras model and every artifact that passed parity on other data;
    store the result under the domain's name in `domains.json`; return that entry."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest.get("tasks"):
        raise DataError(f"{run_dir} is a multi-task model; `tledge evaluate` judges single-task "
                        "models only (evaluate each task's labelling with a single-task run)")
    recipe = run_recipe(run_dir)
    target = target_data(data_arg, recipe, name)
    splits = target_splits(target, manifest["labels"], log=log)
    parts, judged = judged_parts(target, splits)
    labels = np.concatenate([y for _, y in parts])
    log(f"evaluate: {len(labels)} images of {target.where} ({target.name})")
    reference_entry = find_artifact(manifest, "keras")
    runner = load(reference_entry, run_dir)
    try:
        reference = predict_parts(runner, parts)
    finally:
        runner.close()
    source = source_figures(run_dir)
    rows = [_row("keras", "keras", reference, labels, reference, manifest["labels"], source)]
    current = validated_rows(run_dir, manifest)  # rows of the files as they are now
    passed = {key for key, row in current.items()  # met its thresholds, on however few
              if row.status in ("passed", "insufficient")}
    for entry in artifacts(manifest):
        if entry["name"] != "keras" and not any(key[0] == entry["name"] for key in current):
            log(f"evaluate: {entry['name']} is left out: not validated as it is now (run "
                f"`tledge validate {run_dir}`)")
    for entry in artifacts(manifest):
        for artifact, runtime in sorted(passed):
            if artifact != entry["name"]:
                continue
            runner = load(entry, run_dir, runtime)
            try:
                probabilities = predict_parts(runner, parts)
            finally:
                runner.close()
            rows.append(_row(entry["name"], runtime, probabilities, labels, reference,
                             manifest["labels"], source))
    for row in rows:
        log(line(row))
    result = {"data": target.where, "judged": judged, "images": int(len(labels)),
              "fingerprint": splits.record.get("fingerprint"),
              "classes": list(manifest["labels"]), "rows": rows,
              "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    store_domain(run_dir, target.name, result)
    return result


def _row(artifact, runtime, probabilities, labels, reference, classes, source) -> dict:
    own = source.get((artifact, runtime), {})
    return {"artifact": artifact, "runtime": runtime,
            **scores(probabilities, labels, reference, classes),
            "source_accuracy": own.get("accuracy"), "source_split": own.get("split"),
            "source_per_class": dict(zip(classes, own.get("per_class") or []))}


def line(row) -> str:
    """One evaluated (artifact, runtime) as `tledge evaluate` prints it."""
    shift = ""
    if row.get("source_accuracy") is not None:
        shift = (f"  (source {row['source_split']} {row['source_accuracy']:.1%}, "
                 f"{100 * (row['accuracy'] - row['source_accuracy']):+.1f} points)")
    name = row["artifact"] if row["runtime"] in (row["artifact"], _own(row["artifact"])) \
        else f"{row['artifact']} on {row['runtime']}"
    return (f"  {name:<26} accuracy {row['accuracy']:.1%}{shift}  agreement with Keras "
            f"{row['agreement']:.3f}")


def _own(artifact: str) -> str:
    fmt = FORMATS.get(artifact)
    return runtimes_for(fmt.family)[0] if fmt else ""


def store_domain(run_dir, name: str, result: dict) -> None:
    """Keep `result` under `name` in the run's domains.json (replacing one of that name)."""
    path = Path(run_dir) / DOMAINS
    domains = read_domains(run_dir)
    domains[name] = result
    write_json(path, {"domains": domains})


def load_domains(run_dir) -> dict:
    """The domains a run was evaluated on, by name ({} before any)."""
    return read_domains(run_dir)
