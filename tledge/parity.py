"""Parity numbers of one artifact against the reference: the row, the comparison and the
batched prediction that produce it. The validate stage judges every artifact with them, and
int8 repair judges each candidate the same way (so it sits below both)."""

from __future__ import annotations

import dataclasses

import numpy as np

from tledge.tasks import blocks

BATCH = 64


@dataclasses.dataclass
class ParityRow:
    artifact: str
    runtime: str
    status: str  # "reference" | "passed" | "failed" | "skipped"
    accuracy: float | None = None
    accuracy_drop: float | None = None
    agreement: float | None = None
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    thresholds: dict | None = None
    problems: list = dataclasses.field(default_factory=list)
    sha256: str | None = None  # of the artifact file judged: a re-export makes the row stale
    confusion: list | None = None  # counts [true class][predicted class] on the split
    executed: str | None = None  # how the runtime ran it, where it says (OpenVINO's precision)
    machine: str | None = None  # the CPU and its vector ISA that produced the row: int8
    # kernels differ between CPUs, and so, at times, do their results
    tasks: dict | None = None  # a multi-task artifact: each task's own figures, by name; the
    # row's accuracy is then their mean, its agreement the lowest, its difference the largest


def predict_all(runner, images, batch=BATCH) -> np.ndarray:
    """Probabilities for all `images`, in batches through one runner."""
    return np.concatenate([runner.predict(images[start:start + batch])
                           for start in range(0, len(images), batch)])


def confusion_matrix(labels, predicted, classes: int) -> list:
    """Counts [true class][predicted class]."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predicted)), 1)
    return counts.tolist()


def accuracy_of(probabilities, labels, tasks=None) -> float:
    """Top-1 accuracy; a multi-task output's is the mean of its tasks' (labels [N, tasks])."""
    if not tasks:
        return float(np.mean(probabilities.argmax(axis=1) == labels))
    return float(np.mean([np.mean(block.argmax(axis=1) == labels[:, index])
                          for index, block in enumerate(blocks(probabilities, tasks))]))


def reference_row(probabilities, labels, tasks=None, **facts) -> ParityRow:
    """The Keras model's own row: its accuracy (and each task's) and confusion."""
    row = ParityRow("keras", "keras", "reference",
                    accuracy=accuracy_of(probabilities, labels, tasks), **facts)
    if not tasks:
        row.confusion = confusion_matrix(labels, probabilities.argmax(axis=1),
                                         probabilities.shape[1])
        return row
    row.tasks = {task["name"]: {
        "accuracy": float(np.mean(block.argmax(axis=1) == labels[:, index])),
        "confusion": confusion_matrix(labels[:, index], block.argmax(axis=1), block.shape[1])}
        for index, (task, block) in enumerate(zip(tasks, blocks(probabilities, tasks)))}
    return row


def compare(probabilities, reference, labels, reference_accuracy, thresholds,
            tasks=None) -> ParityRow:
    """Parity numbers of one artifact's output against the reference output.

    A multi-task artifact (`tasks`, labels [N, tasks]) is judged task by task, each against
    the thresholds; it passes when every task does (`reference_accuracy` is then the mean)."""
    if tasks:
        return _compare_tasks(probabilities, reference, labels, reference_accuracy,
                              thresholds, tasks)
    predicted = probabilities.argmax(axis=1)
    accuracy = float(np.mean(predicted == labels))
    difference = np.abs(probabilities - reference)
    row = ParityRow("", "", "passed", accuracy=accuracy,
                    accuracy_drop=reference_accuracy - accuracy,
                    agreement=float(np.mean(predicted == reference.argmax(axis=1))),
                    max_abs_diff=float(difference.max()), mean_abs_diff=float(difference.mean()),
                    thresholds=dict(thresholds),
                    confusion=confusion_matrix(labels, predicted, reference.shape[1]))
    if row.accuracy_drop > thresholds["max_accuracy_drop"] + 1e-12:
        row.problems.append(f"accuracy drop {row.accuracy_drop:.4f} > "
                            f"{thresholds['max_accuracy_drop']}")
    if row.agreement < thresholds["min_agreement"] - 1e-12:
        row.problems.append(f"agreement {row.agreement:.4f} < {thresholds['min_agreement']}")
    if thresholds.get("max_abs_diff") is not None and \
            row.max_abs_diff > thresholds["max_abs_diff"] + 1e-12:
        row.problems.append(f"max abs diff {row.max_abs_diff:.2e} > "
                            f"{thresholds['max_abs_diff']}")
    row.status = "failed" if row.problems else "passed"
    return row


def _compare_tasks(probabilities, reference, labels, reference_accuracy, thresholds,
                   tasks) -> ParityRow:
    parts = {}
    for index, (task, mine, theirs) in enumerate(zip(tasks, blocks(probabilities, tasks),
                                                     blocks(reference, tasks))):
        expected = labels[:, index]
        parts[task["name"]] = compare(mine, theirs, expected,
                                      float(np.mean(theirs.argmax(axis=1) == expected)),
                                      thresholds)
    accuracy = float(np.mean([part.accuracy for part in parts.values()]))
    difference = np.abs(probabilities - reference)
    row = ParityRow("", "", "passed", accuracy=accuracy,
                    accuracy_drop=reference_accuracy - accuracy,
                    agreement=min(part.agreement for part in parts.values()),
                    max_abs_diff=float(difference.max()), mean_abs_diff=float(difference.mean()),
                    thresholds=dict(thresholds),
                    problems=[f"{name}: {problem}" for name, part in parts.items()
                              for problem in part.problems],
                    tasks={name: {key: getattr(part, key) for key in (
                        "accuracy", "accuracy_drop", "agreement", "max_abs_diff", "confusion")}
                        for name, part in parts.items()})
    row.status = "failed" if row.problems else "passed"
    return row
