"""The `csv` source: a CSV file with one row per image (path, class, optionally split).

What many real projects have instead of class folders: an export from a labelling tool or a
spreadsheet. Image paths are relative to the CSV file (absolute paths work too). The class
order is the sorted class names (numerically when every name is a number), as the folder
source sorts its class folders. Unreadable or missing image files are bad images, collected
with every other one in the same pass (see `data.on_bad_image`).
"""

from __future__ import annotations

import csv
import difflib
from pathlib import Path

import numpy as np

from tledge.data.cache import file_sha256, files_identity
from tledge.data.prepare import FileSplit
from tledge.errors import DataError

_SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def describe_csv(data, seed):
    """The csv source for the data cache: {identity, where, extra, gather}."""
    path = Path(data.path)
    columns = data.csv
    rows = _read_rows(path, columns)
    class_names = _class_names([label for _, label, _ in rows])
    if len(class_names) < 2:
        raise DataError(f"{path}: column '{columns.label_column}' names only one class "
                        f"({class_names[0]}); a classifier needs at least 2")
    index = {name: label for label, name in enumerate(class_names)}
    by_split: dict[str, list] = {}
    for image, label, split in rows:
        by_split.setdefault(split, []).append((image, index[label]))
    if "train" not in by_split:
        raise DataError(f"{path}: no row has split 'train' in column '{columns.split_column}'; "
                        "tledge trains on the train rows")
    train_classes = {label for _, label in by_split["train"]}
    for split, items in by_split.items():
        missing = sorted({class_names[label] for _, label in items} - {class_names[label] for
                                                                        label in train_classes})
        if missing:
            raise DataError(f"{path}: class(es) {', '.join(missing)} appear in {split} rows but "
                            "not in train rows; every class needs training images")
    base = path.resolve().parent
    given = {}
    for split in ("train", "val", "test"):
        if split not in by_split:
            continue
        items = by_split[split]
        given[split] = FileSplit([(base / image) for image, _ in items],
                                 [image for image, _ in items],
                                 np.asarray([label for _, label in items], dtype=np.int64))
    identity = {"source": "csv", "sha256": file_sha256(path),
                "columns": [columns.image_column, columns.label_column, columns.split_column],
                "files": files_identity(given)}
    return {"identity": identity, "where": str(path), "extra": {"path": str(path)},
            "gather": lambda size: (given, class_names)}


def _read_rows(path: Path, columns) -> list[tuple[str, str, str]]:
    """[(image path, class name, split)] of every row, checked; every problem at once."""
    if not path.is_file():
        raise DataError(f"{path}: no such .csv file; check data.path")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            records = list(reader)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the CSV as UTF-8") from None
    except (OSError, csv.Error) as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None
    if not header:
        raise DataError(f"{path}: empty; expected a header row with columns "
                        f"'{columns.image_column}' and '{columns.label_column}'")
    wanted = [("data.csv.image_column", columns.image_column),
              ("data.csv.label_column", columns.label_column)]
    if columns.split_column:
        wanted.append(("data.csv.split_column", columns.split_column))
    problems = []
    for key, name in wanted:
        if name not in header:
            close = difflib.get_close_matches(name, header, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"no column '{name}' ({key}); the columns are "
                            f"{', '.join(map(repr, header))}{hint}")
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems))
    if not records:
        raise DataError(f"{path}: has a header but no rows; add one row per image")
    rows, empty_image, empty_label, bad_split = [], [], [], []
    for line, record in enumerate(records, start=2):  # line 1 is the header
        image = (record.get(columns.image_column) or "").strip()
        label = (record.get(columns.label_column) or "").strip()
        split = "train"
        if columns.split_column:
            value = (record.get(columns.split_column) or "").strip().lower()
            split = _SPLIT_NAMES.get(value)
            if split is None:
                bad_split.append(f"{line} ({value!r})" if value else f"{line} (empty)")
        if not image:
            empty_image.append(str(line))
        if not label:
            empty_label.append(str(line))
        rows.append((image, label, split))
    for what, lines in ((f"no image path in '{columns.image_column}'", empty_image),
                        (f"missing label in '{columns.label_column}'", empty_label),
                        (f"split in '{columns.split_column}' is not train, val, validation or "
                         "test", bad_split)):
        if lines:
            shown = ", ".join(lines[:10]) + (f" and {len(lines) - 10} more" if len(lines) > 10
                                             else "")
            problems.append(f"{what} on line(s) {shown}")
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems))
    return rows


def _class_names(labels) -> tuple[str, ...]:
    names = set(labels)
    try:
        return tuple(sorted(names, key=float))
    except ValueError:
        return tuple(sorted(names))
