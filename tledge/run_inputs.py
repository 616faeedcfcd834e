"""What later stages read back from a run directory: its recipe and its data split.

A run carries the images its later stages read (`inputs.npz`): its validation and test
splits, and the training images int8 calibration takes, in the order it takes them. When the
prepared-data cache no longer holds the run's data (a run copied to another machine, a
cleared cache), export, validate, bench, bundle and explain read those, checked against the
manifest; only training needs the data source itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tledge.data.cache import cache_root, open_entry
from tledge.data.sources import (calibration_order, in_class_order, load_splits,
                                 prepared_entry, Splits)
from tledge.errors import DataError, first_line, RunDirError
from tledge.recipe.load import load_recipe
from tledge.rundir import (atomic_path, check_run_dir, checked_sha256, read_manifest,
                           read_record, RECIPE, sha256, SPLIT)


def run_recipe(run_dir):
    """The resolved recipe a run was made from (stored in the run directory); its data
    need not exist any more, since later stages read the prepared-data cache."""
    return load_recipe(check_run_dir(run_dir) / RECIPE, stored=True)


def run_splits(run_dir, recipe=None, *, log=None):
    """The run's data split, read from the prepared-data cache entry it was trained on.

    No image file is decoded again while that entry exists, even if the source has changed
    since (the run is judged on the data it was trained on). When the entry is gone, the
    source is prepared again and must hold the same images and labels (its files may have
    moved or been copied: content counts, not modification times).

    Raises:
        RunDirError: the entry is gone and the source is unreadable or holds other data.
    """
    recipe = recipe or run_recipe(run_dir)
    recorded = read_record(Path(run_dir) / SPLIT)
    cache = recorded.get("cache") if isinstance(recorded, dict) else None
    key = cache.get("key") if isinstance(cache, dict) else None
    entry, damage = None, []
    if key:
        for root in dict.fromkeys([cache_root(recipe.data.cache_dir), Path(cache.get("root", ""))]):
            entry = open_entry(root, key, damage) if str(root) else None
            if entry is not None:
                break
    if entry is None:
        if log:
            for line in damage:  # named, never used
                log(f"data: {line}")
        try:
            carried = carried_splits(run_dir, recorded)
        except RunDirError as error:  # gone or damaged: the source, as a last resort
            carried = None
            if log:
                log(f"data: {first_line(error).split('; ')[0]}")
        if carried is not None:
            if log:
                log(f"data: the prepared data of {run_dir} is not in the cache; reading the "
                    f"images the run carries ({INPUTS})")
            return in_class_order(carried, read_manifest(run_dir)["labels"], str(run_dir))
        if log:
            log(f"data: the prepared data of {run_dir} is not in the cache; preparing it again "
                "from its source")
        try:
            entry = prepared_entry(recipe.data, recipe.seed, log=log)
        except DataError as error:
            raise RunDirError(f"the prepared data {run_dir} was trained on (cache entry {key}) "
                              f"is gone, and its source cannot be read ({first_line(error)}); "
                              "put the data where the run's recipe.toml says, or retrain") \
                from None
    splits = load_splits(recipe.data, seed=recipe.seed, entry=entry)
    if recorded.get("fingerprint") != splits.record.get("fingerprint"):
        raise RunDirError(f"the data of the {recipe.data.source} source changed since {run_dir} "
                          "was trained (its images or labels differ from split.json's "
                          "fingerprint); retrain with `tledge build` so validation compares "
                          "like with like")
    # the labels in the model's class order (an adapted run's target may list them otherwise)
    try:
        return in_class_order(splits, read_manifest(run_dir)["labels"], str(run_dir))
    except DataError as error:
        raise RunDirError(f"{first_line(error)}; rebuild the run") from None


def evaluation_split(splits):
    """(images, labels, name) of the split parity is judged on: test, else validation."""
    if len(splits.y_test):
        return splits.x_test, splits.y_test, "test"
    if len(splits.y_val):
        return splits.x_val, splits.y_val, "val"
    raise RunDirError("the run has neither a test nor a validation split to validate on; "
                      "set data.test_fraction > 0")


INPUTS = "inputs.npz"
CARRY_CAP = 5000  # images of the validation and of the test split a run carries at most
CALIBRATION_FACTOR = 4  # int8 repair calibrates with up to 4x export.calibration_samples


def carry_inputs(folder, splits, recipe) -> dict:
    """Write the images later stages read into `folder/inputs.npz`; returns its manifest
    record ({"file", "sha256", "counts"}). A split larger than `CARRY_CAP` is carried as a
    seeded sample, every class in its proportion (and the record says so)."""
    folder = Path(folder)
    calibration, repair = int8_order(splits, recipe)
    order = np.concatenate([calibration[:CALIBRATION_FACTOR *
                                        max(recipe.export.calibration_samples, 1)], repair])
    arrays = {"x_cal": np.asarray(splits.x_train[order]) if len(order) else
              np.zeros((0, *splits.x_train.shape[1:]), np.uint8),
              "y_cal": np.asarray(splits.y_train)[order],
              "train_count": np.asarray(len(splits.y_train)),
              "class_names": np.asarray(list(splits.class_names))}
    counts = {"calibration": int(len(order) - len(repair)), "repair": int(len(repair)),
              "train": int(len(splits.y_train))}
    for name, images, labels in (("val", splits.x_val, splits.y_val),
                                 ("test", splits.x_test, splits.y_test)):
        rows = np.arange(len(labels))
        if len(rows) > CARRY_CAP:
            rows = np.sort(np.random.default_rng(recipe.seed).choice(len(rows), CARRY_CAP,
                                                                   replace=False))
        arrays[f"x_{name}"] = np.asarray(images[rows]) if len(rows) else \
            np.zeros((0, *images.shape[1:]), np.uint8)
        arrays[f"y_{name}"] = np.asarray(labels)[rows]
        counts[name] = int(len(rows))
        counts[f"{name}_total"] = int(len(labels))
    with atomic_path(folder / INPUTS) as temporary:
        with open(temporary, "wb") as handle:
            np.savez_compressed(handle, **arrays)
    return {"file": INPUTS, "sha256": sha256(folder / INPUTS), "counts": counts}


def repair_count(train_images: int, export) -> int:
    """How many training images the int8 repair split holds apart from calibration:
    `export.int8_repair_images`, fewer where the training split cannot spare them beside
    twice `export.calibration_samples` (the repair's first calibration remedy: a small split
    keeps it, and the repair is judged on the validation split beside what is held)."""
    return max(0, min(export.int8_repair_images,
                      train_images - 2 * export.calibration_samples))


def int8_order(splits, recipe) -> tuple[np.ndarray, np.ndarray]:
    """(the training images calibration may take, in the order it takes them; the repair
    split's): the repair split is the tail of the calibration order over the whole training
    split, so calibration (a prefix) never reaches it and the plain calibration set is the one
    `calibration_images` gives. A carried split (`carry_inputs`) holds both, repair last."""
    total = len(splits.y_train)
    if splits.calibration_ordered:
        held = int(((splits.record or {}).get("carried") or {}).get("repair") or 0)
        return np.arange(total - held), np.arange(total - held, total)
    order = calibration_order(splits.y_train, total, recipe.seed)
    held = repair_count(total, recipe.export)
    return order[:total - held], order[total - held:]


def carried_splits(run_dir, recorded: dict):
    """The splits a run carries (`carry_inputs`), checked against its manifest; None when the
    run carries none (made before tledge carried them)."""
    run_dir = Path(run_dir)
    record = (read_manifest(run_dir).get("data") or {}).get("inputs")
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        return None
    path = run_dir / record["file"]
    if Path(record["file"]).is_absolute() or checked_sha256(path) != record.get("sha256"):
        raise RunDirError(f"{path} is missing or not the file the manifest records, and the "
                          f"run's data is not in the cache; put the data where "
                          f"{run_dir / RECIPE} says, or retrain")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            data = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError, KeyError) as error:
        raise RunDirError(f"{path} cannot be read ({first_line(error)}); retrain the run") \
            from None
    return Splits(x_train=data["x_cal"], y_train=data["y_cal"], x_val=data["x_val"],
                  y_val=data["y_val"], x_test=data["x_test"], y_test=data["y_test"],
                  class_names=tuple(str(name) for name in data["class_names"]),
                  record={**recorded, "carried": record.get("counts")},
                  calibration_ordered=True)
