"""Multi-task models: one backbone, one output per task ([[data.tasks]]).

How a multi-task run holds its labels and outputs, so that every stage reads them one way:

- **Labels.** A multi-task data source labels each image with one *joint* class: the
  combination of its labels, named as a JSON list (`["circle", "red"]`). Splitting,
  stratification, the data cache and every fingerprint work on joint classes as on any
  classes, so every split holds every combination. A task's labels are a column of the
  joint names (`targets`).
- **Tasks in the manifest.** `manifest["tasks"]` lists the model's tasks in output order:
  name, class names (`labels`), the column of the joint name it reads, and its loss weight.
  A single-task run has no "tasks" key, and none of this applies to it.
- **Outputs.** Every artifact has one probabilities output per task, named after it; the
  artifact's `output` spec is then a list of per-output specs in task order. Runners return
  the outputs side by side, concatenated along the class axis in task order
  ([batch, sum of the tasks' classes]); `blocks` cuts them apart again.
"""

from __future__ import annotations

import json

import numpy as np

MEAN = "mean"


def joint_name(values) -> str:
    """The class name of one combination of labels."""
    return json.dumps([str(value) for value in values], ensure_ascii=False)


def split_joint(name: str) -> list[str]:
    return [str(value) for value in json.loads(name)]


def model_tasks(recipe, class_names) -> list[dict]:
    """The tasks a recipe's model answers, in output order; [] for a single-task recipe."""
    declared = recipe.data.tasks
    if not declared:
        return []
    chosen = recipe.model.tasks or tuple(task.name for task in declared)
    columns = [split_joint(name) for name in class_names]
    tasks = []
    for column, task in enumerate(declared):
        if task.name not in chosen:
            continue
        labels = list(dict.fromkeys(parts[column] for parts in columns))  # first seen first
        tasks.append({"name": task.name, "labels": labels, "column": column,
                      "loss_weight": float(task.loss_weight)})
    return sorted(tasks, key=lambda task: chosen.index(task["name"]))


def targets(labels, tasks, class_names) -> np.ndarray:
    """Joint labels [N] as each task's class index [N, tasks]; unchanged without tasks."""
    labels = np.asarray(labels, dtype=np.int64)
    if not tasks:
        return labels
    tables = np.array([[task["labels"].index(split_joint(name)[task["column"]])
                        for task in tasks] for name in class_names], dtype=np.int64)
    return tables[labels] if len(labels) else np.zeros((0, len(tasks)), np.int64)


def widths(tasks) -> list[int]:
    return [len(task["labels"]) for task in tasks]


def blocks(probabilities, tasks) -> list[np.ndarray]:
    """Outputs side by side [N, sum of classes] cut into one array per task."""
    edges = np.cumsum([0, *widths(tasks)])
    return [probabilities[:, start:end] for start, end in zip(edges[:-1], edges[1:])]


def score(accuracies: dict, best_by: str = MEAN) -> float:
    """The number that ranks a multi-task model: one task's accuracy, or their mean."""
    if best_by != MEAN and best_by in accuracies:
        return float(accuracies[best_by])
    return float(np.mean(list(accuracies.values())))


def task_names(tasks) -> list[str]:
    return [task["name"] for task in tasks]


def tasks_problem(tasks, labels) -> str | None:
    """What is wrong with a manifest's "tasks" (against its joint `labels`), or None."""
    if not isinstance(tasks, list) or not tasks:
        return "'tasks' is not a list of tasks"
    for number, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("name"), str) or \
                not isinstance(task.get("labels"), list) or \
                not all(isinstance(label, str) for label in task["labels"]) or \
                not isinstance(task.get("column"), int) or isinstance(task["column"], bool):
            return f"tasks[{number}] is not a task (name, labels, column)"
    try:
        targets(np.arange(len(labels)), tasks, labels)
    except (ValueError, TypeError, IndexError, AttributeError, json.JSONDecodeError):
        return "'tasks' does not match the labels"
    return None
