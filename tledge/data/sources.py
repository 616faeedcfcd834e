"""Data sources: turn a [data] recipe table into train/val/test splits at the recipe's size.

Every source is prepared once into the data cache (`tledge.data.cache`) and ends in the same
`Splits`: images [N, H, W, 3] read from the cache on demand and int64 labels, plus a
JSON-able `record` (what was read, how each split was obtained, the cache entry, bad images,
duplicates, a fingerprint) that the caller writes to split.json. Splits the source does not
give are carved out of its training data, stratified by class and seeded, by `carve`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path

import numpy as np

from tledge.data.cache import cache_key, cache_root, files_identity, ImageRows, open_entry
from tledge.data.cifar10 import describe_cifar10
from tledge.data.csv_source import describe_csv
from tledge.data.images import image_files, IMAGE_SUFFIXES, visible_dirs
from tledge.data.leakage import duplicate_line, find_duplicates
from tledge.data.npz_source import describe_npz
from tledge.data.prepare import ArraySplit, FileSplit, prepare
from tledge.data.synthetic import attribute_values, generate, is_default, joint_classes
from tledge.errors import DataError, TledgeError
from tledge.rundir import write_json, write_text
from tledge.schema import to_dict
from tledge.tasks import joint_name

BAD_IMAGES = "bad_images.txt"
DUPLICATES = "duplicates.json"

_SPLITS = ("train", "val", "test")
_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """Train/val/test images (uint8 [N, H, W, 3]) and labels (int64 [N]) of one data source.

    The images are `ImageRows`: rows of the prepared-data cache, read when indexed.

    A split may be empty ([0, H, W, 3]) when its fraction is 0 or a class is too small to
    give it any sample; `record` says how each split was obtained.
    """

    x_train: ImageRows
    y_train: np.ndarray
    x_val: ImageRows
    y_val: np.ndarray
    x_test: ImageRows
    y_test: np.ndarray
    class_names: tuple[str, ...]
    record: dict
    # the training images are already in calibration order (a run's carried copy holds only
    # the ones calibration takes, in the order it takes them: `tledge.run_inputs`)
    calibration_ordered: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_splits(data, *, seed: int, log=None, report_dir=None, progress=None,
                entry=None) -> Splits:
    """Read the data a recipe names, prepared once into the data cache, and split it.

    The images stay on disk: the splits' `x_*` are `ImageRows` that read rows on demand.

    Args:
        data: a `DataRecipe` whose `image_size` is already resolved to (height, width).
        seed: seeds the synthetic generator and the carving of val/test.
        log: where one-line notes go (the preparation, bad images, duplicates); None: silent.
        report_dir: where `bad_images.txt` and `duplicates.json` are written (a run directory).
        progress: show the preparation's progress bar (None: when there are files to decode).
        entry: a cache `Entry` to split instead of the recipe's source as it is now (what a
            later stage of a run reads: the data the run was trained on).

    Raises:
        DataError: the source cannot be read, or has unreadable images and
            `data.on_bad_image = "error"`; the message names the path and the fix.
    """
    size = _resolved_size(data)
    if entry is None:
        entry = prepared_entry(data, seed, log=log, progress=progress)
    where = entry.meta.get("where", data.source)
    given = {split: (part.images, part.labels, part.files) for split, part in entry.splits.items()}
    if "train" not in given or not len(given["train"][1]):
        raise DataError(f"{where}: no readable training images")
    bad = entry.bad_images
    if bad:
        _handle_bad_images(bad, data, where, entry, report_dir, log)
        empty = [name for name, count in zip(entry.class_names, np.bincount(
            given["train"][1], minlength=len(entry.class_names))) if count == 0]
        if empty:
            raise DataError(f"{where}: no readable training image left in class(es) "
                            f"{', '.join(empty)} after skipping unreadable ones; add images")
    splits = _assemble(given, entry.class_names, data, size, seed,
                       {**entry.meta.get("extra", {}),
                        "cache": {"key": entry.key, "root": str(entry.folder.parent)}})
    if bad:
        splits.record["bad_images"] = {"count": len(bad), "file": BAD_IMAGES,
                                       "files": [f"{item['split']}/{item['file']}"
                                                 for item in bad]}
    duplicates = find_duplicates(splits)
    splits.record["duplicates"] = duplicates["summary"]
    if report_dir is not None:  # a list from an earlier build of other data must not stay
        if duplicates["pairs"]:
            write_json(Path(report_dir) / DUPLICATES, duplicates)
        else:
            (Path(report_dir) / DUPLICATES).unlink(missing_ok=True)
        if not bad:
            (Path(report_dir) / BAD_IMAGES).unlink(missing_ok=True)
    if log and duplicates["summary"]["total"]:
        log(duplicate_line(duplicates["summary"]))
    return splits


def in_class_order(splits: Splits, labels, where: str) -> Splits:
    """`splits` with its labels put in the order of `labels` (the same class names, in
    another order: a folder's sorted sub-folders against a recipe's list).

    Raises:
        DataError: the class names differ; the message lists the difference.
    """
    ours, theirs = list(labels), list(splits.class_names)
    if ours == theirs:
        return splits
    if set(ours) != set(theirs):
        missing = [name for name in ours if name not in theirs]
        extra = [name for name in theirs if name not in ours]
        raise DataError(
            f"{where} does not have the run's classes: "
            + "; ".join(part for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"not in the run {', '.join(extra)}" if extra else "") if part)
            + f" (the run knows {', '.join(ours)})")
    order = np.array([ours.index(name) for name in theirs], dtype=np.int64)
    return dataclasses.replace(splits, y_train=order[splits.y_train], y_val=order[splits.y_val],
                               y_test=order[splits.y_test], class_names=tuple(ours))


def _resolved_size(data) -> tuple[int, int]:
    if data.image_size is None:
        raise DataError("data.image_size must be resolved before loading data "
                        "(load the recipe with load_recipe)")
    return tuple(int(side) for side in data.image_size)


def describe_source(data, seed) -> dict:
    """What the cache key is made of, cheaply (a listing, a sha256, settings), and how to
    gather the images when the cache has no entry: {identity, where, extra, gather}."""
    describers = {"synthetic": _synthetic, "folder": _folder, "csv": describe_csv,
                  "npz": describe_npz, "cifar10": describe_cifar10}
    if data.source not in describers:
        raise DataError(f"unknown data source {data.source!r}; expected one of "
                        f"{', '.join(describers)}")
    return describers[data.source](data, seed)


def source_key(data, seed) -> str:
    """The cache key of the recipe's data at its image size (reads listings, not images)."""
    return cache_key(describe_source(data, seed)["identity"], _resolved_size(data))


def prepared_entry(data, seed, *, log=None, progress=None):
    """The cache entry of the recipe's data as it is now, prepared if the cache has none."""
    size = _resolved_size(data)
    describe = describe_source(data, seed)
    root = cache_root(data.cache_dir)
    key = cache_key(describe["identity"], size)
    damage: list[str] = []
    entry = open_entry(root, key, damage)
    if entry is None:
        if log:
            for line in damage:  # never used: prepared again from the source, replacing it
                log(f"data: {line}; preparing it again from the source")
            log(f"data: preparing {describe['where']} at {size[0]}x{size[1]} into {root / key}")
        given, class_names = describe["gather"](size)
        entry = prepare(root, key, describe={"source": data.source, "where": describe["where"],
                                             "extra": describe["extra"],
                                             "identity": describe["identity"]},
                        class_names=class_names, given=given, size=size, workers=data.workers,
                        progress=progress)
    return entry


def _handle_bad_images(bad, data, where, entry, report_dir, log):
    folder = Path(report_dir) if report_dir is not None else entry.folder
    listing = "".join(f"{item['split']}\t{item['file']}\t{item['reason']}\n" for item in bad)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / BAD_IMAGES, "split\tfile\treason\n" + listing)
        listed_at = f"the full list is in {folder / BAD_IMAGES}"
    except TledgeError:
        listed_at = "the list could not be written"
    shown = "\n".join(f"  {item['split']}/{item['file']}: {item['reason']}" for item in bad[:10])
    more = f"\n  … and {len(bad) - 10} more" if len(bad) > 10 else ""
    if data.on_bad_image == "error" and len(bad) == 1:  # one line, as for any bad input
        item = bad[0]
        raise DataError(f"{where}: {item['split']}/{item['file']}: {item['reason']} ("
                        f"{listed_at}; or set data.on_bad_image = \"skip\" to leave it out)")
    if data.on_bad_image == "error":
        raise DataError(f"{where}: {len(bad)} unreadable image(s) ({listed_at}):\n"
                        f"{shown}{more}\nremove or replace them, or set "
                        "data.on_bad_image = \"skip\" to leave them out")
    if log:
        log(f"data: skipped {len(bad)} unreadable image(s) (data.on_bad_image = \"skip\"; "
            f"{listed_at}):\n{shown}{more}")


# Each source describes itself with a dict: identity (what the cache key is made of), where
# (one line for the user), extra (fields for split.json) and gather(size) -> ({split:
# FileSplit | ArraySplit}, class names). "train" is always given.

def _synthetic(data, seed):
    recipe = data.synthetic
    settings = {"classes": list(recipe.classes), "samples_per_class": recipe.samples_per_class,
                "noise": recipe.noise}
    if not is_default(recipe.domain):  # a default domain keeps the cache key it always had
        settings["domain"] = to_dict(recipe.domain)

    values = {"shape": recipe.classes, "colour": recipe.colours, "size": recipe.sizes}
    attributes = [(task.labels, tuple(values[task.labels])) for task in data.tasks] or None
    class_names = tuple(joint_name(combination) for combination in joint_classes(attributes)) \
        if attributes else tuple(recipe.classes)
    if attributes:  # labels several ways: the generator's attributes are what it draws
        settings["tasks"] = [[kind, list(names)] for kind, names in attributes]
        settings["attributes"] = attribute_values(attributes)

    def gather(size):
        x, y = generate(recipe.classes, recipe.samples_per_class, size, recipe.noise, seed,
                        recipe.domain, attributes)
        return {"train": ArraySplit(x, y)}, class_names
    return {"identity": {"source": "synthetic", **settings, "seed": seed},
            "where": f"synthetic shapes ({len(class_names)} classes)",
            "extra": {"generator": settings}, "gather": gather}


def _folder(data, seed):
    root = Path(data.path)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; data.path must be a folder with one "
                        "sub-folder of images per class")
    folders = visible_dirs(root)
    split_dirs = {split: [root / name for name in names if (root / name) in folders]
                  for split, names in _SPLIT_FOLDERS.items()}
    if any(split_dirs.values()):
        trees = _split_trees(root, folders, split_dirs)
    else:
        trees = {"train": root}
    listings = {split: _list_classes(tree) for split, tree in trees.items()}
    class_names = tuple(listings["train"])
    for split, listing in listings.items():
        if tuple(listing) != class_names:
            only_train = sorted(set(class_names) - set(listing))
            only_here = sorted(set(listing) - set(class_names))
            raise DataError(
                f"{trees['train']} and {trees[split]} have different class folders "
                f"(only in train: {', '.join(only_train) or '-'}; only in {split}: "
                f"{', '.join(only_here) or '-'}); give every split the same class folders")
    given = {}
    for split, listing in listings.items():
        files, labels = [], []
        for label, name in enumerate(class_names):
            files += listing[name]
            labels += [label] * len(listing[name])
        relative = [file.relative_to(root).as_posix() for file in files]
        given[split] = FileSplit(files, relative, np.asarray(labels, dtype=np.int64))
    return {"identity": {"source": "folder", "classes": list(class_names),
                         "files": files_identity(given)},
            "where": str(root), "extra": {"path": str(root)},
            "gather": lambda size: (given, class_names)}


def _split_trees(root: Path, folders: list[Path], split_dirs: dict) -> dict:
    """The train/val/test sub-trees of a folder that uses them, checked."""
    if len(split_dirs["val"]) > 1:
        raise DataError(f"{root}: has both val/ and validation/; keep one")
    if not split_dirs["train"]:
        present = ", ".join(f"{path.name}/" for paths in split_dirs.values() for path in paths)
        raise DataError(f"{root}: has {present} but no train/; add train/ with one "
                        "sub-folder per class")
    known = {path for paths in split_dirs.values() for path in paths}
    others = sorted(path.name for path in folders if path not in known)
    if others:
        raise DataError(f"{root}: mixes split folders (train/, val/, test/) with other "
                        f"folders ({', '.join(others)}); use either class folders or "
                        "train/val/test each holding class folders")
    return {split: paths[0] for split, paths in split_dirs.items() if paths}


def _list_classes(tree: Path) -> dict[str, list[Path]]:
    """{class name: sorted image files} for a folder of class folders, checked."""
    classes = {folder.name: image_files(folder) for folder in visible_dirs(tree)}
    if not classes:
        raise DataError(f"{tree}: no class sub-folders; put the images of each class in "
                        "their own sub-folder, e.g. cats/ and dogs/")
    for name, files in classes.items():
        if not files:
            raise DataError(f"{tree / name}: class folder '{name}' has no images "
                            f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder")
    if len(classes) < 2:
        raise DataError(f"{tree}: found only one class folder ({next(iter(classes))}); "
                        "a classifier needs at least 2 classes")
    return classes


def _assemble(given, class_names, data, size, seed, extra) -> Splits:
    """Carve the splits the source did not give, then describe the result."""
    x_train, y_train, files_train = given["train"]
    rng = np.random.default_rng(seed)
    fractions = {"val": data.val_fraction, "test": data.test_fraction}
    wanted = {split: fractions[split] for split in ("val", "test") if split not in given}
    parts = carve(y_train, wanted, rng)
    arrays, obtained = {}, {}
    for split in _SPLITS:
        if split in given:
            arrays[split] = given[split]
            obtained[split] = {"obtained": "given"}
            continue
        indices = parts[split]
        files = [files_train[i] for i in indices] if files_train is not None else None
        arrays[split] = (x_train.subset(indices), y_train[indices], files)
        obtained[split] = {"obtained": "carved", "from": "train", "fraction": wanted[split]}
    if wanted:
        indices = parts["train"]
        files = [files_train[i] for i in indices] if files_train is not None else None
        arrays["train"] = (x_train.subset(indices), y_train[indices], files)
    for split, (_, y, _) in arrays.items():
        if len(y) and y.max() >= len(class_names):
            raise DataError(f"{split} labels go up to {int(y.max())} but there are only "
                            f"{len(class_names)} classes")

    record = {"source": data.source, **extra, "image_size": list(size), "seed": seed,
              "class_names": list(class_names), "splits": {}}
    for split in _SPLITS:
        _, y, files = arrays[split]
        counts = np.bincount(y, minlength=len(class_names))
        entry = {"count": int(len(y)), **obtained[split],
                 "per_class": {name: int(n) for name, n in zip(class_names, counts)}}
        if files is not None:
            entry["files"] = list(files)
        record["splits"][split] = entry
    record["fingerprint"] = fingerprint(arrays, class_names)  # of the splits as carved
    if data.train_per_class:
        arrays["train"] = _first_per_class(arrays["train"], data.train_per_class, seed)
        _, y, files = arrays["train"]
        counts = np.bincount(y, minlength=len(class_names))
        record["splits"]["train"].update(
            {"count": int(len(y)), "limited_to_per_class": data.train_per_class,
             "per_class": {name: int(n) for name, n in zip(class_names, counts)}},
            **({"files": list(files)} if files is not None else {}))
    return Splits(x_train=arrays["train"][0], y_train=arrays["train"][1],
                  x_val=arrays["val"][0], y_val=arrays["val"][1],
                  x_test=arrays["test"][0], y_test=arrays["test"][1],
                  class_names=tuple(class_names), record=record)


def _first_per_class(split, count: int, seed: int):
    """At most `count` images of each class of a split, a seeded choice (`data.
    train_per_class`: how far a few labels go, the other splits as they were carved)."""
    images, labels, files = split
    rng = np.random.default_rng([seed, 11])
    chosen = np.sort(np.concatenate(
        [rng.permutation(np.flatnonzero(labels == label))[:count] for label in np.unique(labels)]
        or [np.zeros(0, dtype=np.int64)])).astype(np.int64)
    return (images.subset(chosen), labels[chosen],
            [files[i] for i in chosen] if files is not None else None)


def carve(labels: np.ndarray, fractions: dict[str, float],
          rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Stratified, seeded split of `labels` indices into "train" and the named splits.

    Each class gives round(n * fraction) of its n samples to each named split, but always
    keeps at least one sample in train (so a class with a single sample stays in train,
    and small classes may give a split nothing). Indices come back sorted.
    """
    parts = {split: [] for split in ("train", *fractions)}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for split, fraction in fractions.items():
            take = min(int(np.floor(len(members) * fraction + 0.5)),
                       len(members) - 1 - start)
            take = max(take, 0)
            parts[split].append(members[start:start + take])
            start += take
        parts["train"].append(members[start:])
    return {split: np.sort(np.concatenate(chunks)).astype(np.int64) if chunks
            else np.zeros(0, dtype=np.int64) for split, chunks in parts.items()}


def fingerprint(arrays: dict, class_names) -> str:
    """sha256 over test, val and train labels and pixel digests (with their counts) and the
    class names: equal fingerprints mean a later stage sees the same images in each split."""
    digest = hashlib.sha256()
    digest.update("\n".join(class_names).encode())
    for split in ("test", "val", "train"):
        images, labels = arrays[split][0], arrays[split][1]
        for array in (np.ascontiguousarray(images.digests, dtype=np.uint8),
                      np.ascontiguousarray(labels, dtype=np.int64)):
            digest.update(f"{split}{list(array.shape)}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def calibration_order(labels, count: int, seed: int) -> np.ndarray:
    """Indices of up to `count` training images in the order calibration takes them: classes
    round-robin in a seeded order, each giving its next image in a seeded order. A smaller
    count takes a prefix of a larger one's order."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(np.flatnonzero(labels == label)))
              for label in rng.permutation(np.unique(labels))]
    picked = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return np.asarray(picked, dtype=np.int64)


def calibration_images(splits: Splits, count: int, seed: int) -> np.ndarray:
    """Training images for int8 calibration, spread evenly over the classes.

    Classes are visited round-robin in a seeded random order, each giving its next image
    in a seeded random order; no augmentation. Never touches val or test.

    Returns:
        uint8 [min(count, training images), H, W, 3].

    Raises:
        DataError: the training split is empty, or count < 1.
    """
    if count < 1:
        raise DataError(f"calibration needs at least 1 image, asked for {count}")
    if len(splits.y_train) == 0:
        raise DataError("no training images to calibrate int8 with; lower "
                        "data.val_fraction/test_fraction or add training data")
    picked = np.arange(min(count, len(splits.y_train))) if splits.calibration_ordered \
        else calibration_order(splits.y_train, count, seed)
    if len(picked) < count:
        warnings.warn(f"asked for {count} calibration images but the training split has "
                      f"only {len(picked)}; calibrating with {len(picked)}", stacklevel=2)
    return splits.x_train[np.asarray(picked, dtype=np.int64)]
