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
from tledge.tasks import joint_name

_SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def describe_csv(data, seed):
    """The csv source for the data cache: {identity, where, extra, gather}."""
    path = Path(data.path)
    columns = data.csv
    label_columns = [(f"data.tasks[{index}].labels", task.labels)
                     for index, task in enumerate(data.tasks)] \
        or [("data.csv.label_column", columns.label_column)]
    rows = _read_rows(path, columns, label_columns)
    if not data.tasks:
        rows = [(image, labels[0], split) for image, labels, split in rows]
        class_names = _class_names([label for _, label, _ in rows])
        if len(class_names) < 2:
            raise DataError(f"{path}: column '{label_columns[0][1]}' names only one class "
                            f"({class_names[0]}); a classifier needs at least 2")
    else:
        rows, class_names = _joint_rows(path, rows, data.tasks)
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
                "columns": [columns.image_column, *(name for _, name in label_columns),
                            columns.split_column],
                "files": files_identity(given)}
    return {"identity": identity, "where": str(path), "extra": {"path": str(path)},
            "gather": lambda size: (given, class_names)}


def _joint_rows(path, rows, tasks):
    """Rows labelled with their combination of the tasks' labels (see `tledge.tasks`), and
    the combinations that occur, ordered by each task's sorted class names in turn."""
    per_task = [_class_names([labels[index] for _, labels, _ in rows])
                for index in range(len(tasks))]
    single = [f"task '{task.name}' (column '{task.labels}') has only one class "
              f"({names[0]})" for task, names in zip(tasks, per_task) if len(names) < 2]
    if single:
        raise DataError(f"{path}: " + "; ".join(single) + "; every task needs at least 2")
    combinations = sorted({labels for _, labels, _ in rows},
                          key=lambda labels: [names.index(label)
                                              for names, label in zip(per_task, labels)])
    return ([(image, joint_name(labels), split) for image, labels, split in rows],
            tuple(joint_name(labels) for labels in combinations))


def _read_rows(path: Path, columns, label_columns) -> list[tuple[str, tuple, str]]:
    """[(image path, (label per label column), split)] of every row, checked; every problem
    at once."""
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
    wanted = [("data.csv.image_column", columns.image_column), *label_columns]
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
        labels = tuple((record.get(name) or "").strip() for _, name in label_columns)
        split = "train"
        if columns.split_column:
            value = (record.get(columns.split_column) or "").strip().lower()
            split = _SPLIT_NAMES.get(value)
            if split is None:
                bad_split.append(f"{line} ({value!r})" if value else f"{line} (empty)")
        if not image:
            empty_image.append(str(line))
        empty_label += [f"{line} ('{name}')" if len(label_columns) > 1 else str(line)
                        for (_, name), label in zip(label_columns, labels) if not label]
        rows.append((image, labels, split))
    for what, lines in ((f"no image path in '{columns.image_column}'", empty_image),
                        ("missing label" + (f" in '{label_columns[0][1]}'"
                                            if len(label_columns) == 1 else ""), empty_label),
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
