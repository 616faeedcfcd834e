"""Parity numbers of one artifact against the reference: the row, the comparison and the
batched prediction that produce it. The validate stage judges every artifact with them, and
int8 repair judges each candidate the same way (so it sits below both). The figures
themselves (accuracy, agreement, confusion, the Wilson bound) are `tledge.core.metrics`'.

A row's status: "reference" (the Keras model), "passed", "failed" (a threshold missed),
"skipped" (the runtime cannot run here), or "insufficient": every threshold met, but on
fewer images than can show its `min_agreement` at all (`judge_evidence`): not enough
evidence, never a pass."""

from __future__ import annotations

import dataclasses

import numpy as np

from tledge.core.metrics import (accuracy, agreement, CONFIDENCE, confusion_matrix, images_needed,
                            wilson_lower_bound)
from tledge.tasks import blocks

BATCH = 64


@dataclasses.dataclass
class ParityRow:
    artifact: str
    runtime: str
    status: str  # "reference" | "passed" | "failed" | "skipped" | "insufficient"
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
    evidence: dict | None = None  # an "insufficient" row: {images, threshold, lower_bound,
    # images_needed}: its split was too small to show its min_agreement (`judge_evidence`)


NOT_EXPORTED = "export failed"  # a row's problem where the export could not write the file


def not_exported(row) -> bool:
    """Whether a failed row is of a file the export never wrote (not a parity failure)."""
    return bool(row.problems) and str(row.problems[0]).startswith(NOT_EXPORTED + ":")


def predict_all(runner, images, batch=BATCH) -> np.ndarray:
    """Probabilities for all `images`, in batches through one runner."""
    return np.concatenate([runner.predict(images[start:start + batch])
                           for start in range(0, len(images), batch)])


def accuracy_of(probabilities, labels, tasks=None) -> float:
    """Top-1 accuracy; a multi-task output's is the mean of its tasks' (labels [N, tasks])."""
    if not tasks:
        return accuracy(probabilities.argmax(axis=1), labels)
    return float(np.mean([accuracy(block.argmax(axis=1), labels[:, index])
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
        "accuracy": accuracy(block.argmax(axis=1), labels[:, index]),
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
    correct = accuracy(predicted, labels)
    difference = np.abs(probabilities - reference)
    row = ParityRow("", "", "passed", accuracy=correct,
                    accuracy_drop=reference_accuracy - correct,
                    agreement=agreement(predicted, reference.argmax(axis=1)),
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
                                      accuracy(theirs.argmax(axis=1), expected), thresholds)
    predicted, reference_predicted = (
        np.stack([block.argmax(axis=1) for block in blocks(outputs, tasks)], axis=1)
        for outputs in (probabilities, reference))
    mean = accuracy(predicted, labels)  # the figures a device's check computes (one function)
    difference = np.abs(probabilities - reference)
    row = ParityRow("", "", "passed", accuracy=mean,
                    accuracy_drop=reference_accuracy - mean,
                    agreement=agreement(predicted, reference_predicted),
                    max_abs_diff=float(difference.max()), mean_abs_diff=float(difference.mean()),
                    thresholds=dict(thresholds),
                    problems=[f"{name}: {problem}" for name, part in parts.items()
                              for problem in part.problems],
                    tasks={name: {key: getattr(part, key) for key in (
                        "accuracy", "accuracy_drop", "agreement", "max_abs_diff", "confusion")}
                        for name, part in parts.items()})
    row.status = "failed" if row.problems else "passed"
    return row


def judge_evidence(row: ParityRow, images: int) -> ParityRow:
    """A row that met its thresholds on fewer images than can show its `min_agreement` (the
    agreement's one-sided 95 % Wilson lower bound stays below it even with every image
    agreeing) becomes "insufficient", with its figures kept and `evidence` saying how many
    images would do. A failed, skipped or reference row is left as it is: a threshold missed
    on few images is still missed.

    The validate stage calls it on every row it judges; int8 repair does not (its judge knows
    its own split's size, and a narrow pass there is `tledge.export.int8.confident`'s)."""
    threshold = (row.thresholds or {}).get("min_agreement")
    if row.status != "passed" or threshold is None:
        return row
    needed = images_needed(threshold)
    if needed is not None and images >= needed:
        return row
    row.status = "insufficient"
    row.evidence = {"images": int(images), "threshold": float(threshold),
                    "lower_bound": round(wilson_lower_bound(1.0, images), 4),
                    "images_needed": needed}
    return row


def evidence_text(evidence: dict, split: str | None = None) -> str:
    """Why a row is "insufficient", in words (after "not enough evidence: "): "6 test images
    cannot show agreement >= 0.97 (95 % lower bound 0.689 with every image agreeing); at
    least 88 would"."""
    images = f"{evidence['images']} {split + ' ' if split else ''}images"
    text = (f"{images} cannot show agreement >= {evidence['threshold']:g} ({CONFIDENCE:.0%} "
            f"lower bound {evidence['lower_bound']:.3f} with every image agreeing)")
    if evidence.get("images_needed") is None:
        return text + "; no number of images can show an agreement of 1, only one below it"
    return text + f"; at least {evidence['images_needed']} would"


def row_is_current(row, entry) -> bool:
    """Whether a `ParityRow` judged the file a manifest entry (`entry`, or None when the
    manifest has none of that name) records now: both carry the same sha256. A row of an
    earlier file is stale: its verdict is not the file's. A row that judged no file (skipped,
    export failed) is never current."""
    return bool(row.sha256) and entry is not None and entry.get("sha256") == row.sha256
