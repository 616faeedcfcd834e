"""The figures every judge of a classifier reads, computed one way: accuracy, accuracy per
class, agreement between two models' predictions, the confusion matrix, and how much a rate
measured on a few images can show (the Wilson lower bound, `images_needed`).

Pure numpy, and nothing else of tledge: host validation (`tledge.parity`), int8 repair,
training's validation accuracy, domains, tasks, the report and a device's own check
(`tledge.core.device`, in a bundle) read these figures from here, so a figure measured on the
build machine and the same figure measured on a device are compared like with like.

A multi-task model's classes come as [N, tasks] (one column per task): its accuracy is the
mean of its tasks' accuracies, its agreement the lowest task's (a task that lost its way is
not averaged away by one that kept it).
"""

from __future__ import annotations

import math
import statistics

import numpy as np

CONFIDENCE = 0.95  # one-sided: "at least this", right 95 times in 100


def accuracy(predicted, labels) -> float:
    """Top-1 accuracy: the share of `predicted` class indices equal to `labels`; for [N, tasks]
    classes the mean of the tasks' accuracies."""
    return float(np.mean(np.asarray(predicted) == np.asarray(labels)))


def agreement(predicted, reference_predicted) -> float:
    """The share of images on which two models predict the same class; for [N, tasks] classes
    the lowest task's share."""
    same = np.asarray(predicted) == np.asarray(reference_predicted)
    return float(same.mean(axis=0).min()) if same.ndim == 2 else float(np.mean(same))


def confusion_matrix(labels, predicted, classes: int) -> list:
    """Counts [true class][predicted class]."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predicted)), 1)
    return counts.tolist()


def per_class_accuracy(confusion) -> list:
    """Each class's accuracy (its recall) from a confusion matrix [true][predicted]; None for a
    class with no image."""
    if not len(confusion):
        return []
    counts = np.asarray(confusion, dtype=np.int64)
    totals = counts.sum(axis=1)
    return [float(counts[index, index] / total) if total else None
            for index, total in enumerate(totals)]


def wilson_lower_bound(rate: float, images: int, confidence: float = CONFIDENCE) -> float:
    """The one-sided Wilson lower bound of a rate (a top-1 agreement, an accuracy) measured on
    `images` images.

    The int8 judge sees a few hundred validation images; the validate stage judges other
    images. A candidate that agrees on 189 of 192 (0.984) can agree on 0.965 of the test
    split, as the quickstart did: its 95 % lower bound, 0.962, said it was a narrow pass."""
    z = statistics.NormalDist().inv_cdf(confidence)
    n = max(images, 1)
    centre = rate + z * z / (2 * n)
    spread = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def images_needed(threshold: float, confidence: float = CONFIDENCE) -> int | None:
    """The fewest images on which an agreement of 1 (every image agreeing) has its lower bound
    at `threshold` or above: on fewer, no result can show the threshold. None when no number
    of images can (a threshold of 1: the bound never reaches it).

    With every image agreeing the bound is n / (n + z^2), so n >= threshold z^2 / (1 -
    threshold): 88 images for 0.97, 133 for 0.98, 268 for 0.99 at 95 %."""
    if threshold >= 1.0:
        return None
    z = statistics.NormalDist().inv_cdf(confidence)
    count = max(1, math.ceil(max(threshold, 0.0) * z * z / (1.0 - threshold)))
    while count > 1 and wilson_lower_bound(1.0, count - 1, confidence) >= threshold:
        count -= 1  # the closed form, checked against the bound itself (rounding)
    while wilson_lower_bound(1.0, count, confidence) < threshold:
        count += 1
    return count


def enough_images(images: int, threshold: float, confidence: float = CONFIDENCE) -> bool:
    """Whether `images` images can show a rate of at least `threshold` at all."""
    needed = images_needed(threshold, confidence)
    return needed is not None and images >= needed
