"""Parity numbers of one artifact against the reference: the row, the comparison and the
batched prediction that produce it. The validate stage judges every artifact with them, and
int8 repair judges each candidate the same way (so it sits below both)."""

from __future__ import annotations

import dataclasses

import numpy as np

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


def predict_all(runner, images, batch=BATCH) -> np.ndarray:
    """Probabilities for all `images`, in batches through one runner."""
    return np.concatenate([runner.predict(images[start:start + batch])
                           for start in range(0, len(images), batch)])


def confusion_matrix(labels, predicted, classes: int) -> list:
    """Counts [true class][predicted class]."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predicted)), 1)
    return counts.tolist()


def compare(probabilities, reference, labels, reference_accuracy, thresholds) -> ParityRow:
    """Parity numbers of one artifact's output against the reference output."""
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
