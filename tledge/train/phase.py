"""What a training phase is made of, shared by `fit_phase` (Keras' fit, one machine) and
`fit_across_workers` (the multi-worker loop): its result, its optimizer and schedule."""

from __future__ import annotations

import dataclasses

import numpy as np

# Keras is imported inside the functions that use it: the CLI imports this
# module at start-up, and it takes seconds to load.


@dataclasses.dataclass
class PhaseResult:
    name: str
    epochs: list  # one dict per epoch: loss, accuracy, val_loss, val_accuracy, learning_rate
    best_epoch: int | None
    best_val_accuracy: float | None
    wall_seconds: float
    images_per_second: float
    trainable_params: int
    total_params: int
    skipped: str | None = None
    unfrozen_layers: int | None = None
    bottlenecks: str | None = None  # "cached" | "computed" when the head trained on features
    feature_seconds: float | None = None  # computing (or reading) those features, once
    stopped_early: bool = False
    resumed_from_epoch: int | None = None


def skipped(name, reason) -> PhaseResult:
    return PhaseResult(name, [], None, None, 0.0, 0.0, 0, 0, skipped=reason)


def make_optimizer(name: str, learning_rate):
    import keras
    optimizers = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW,
                  "sgd": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
                  "rmsprop": keras.optimizers.RMSprop}
    return optimizers[name](learning_rate)


def learning_rate(phase, steps_per_epoch: int):
    """A float, or a keras schedule for `cosine` (with linear warm-up when asked)."""
    import keras
    if phase.schedule != "cosine":
        return phase.learning_rate
    warmup = phase.warmup_epochs * steps_per_epoch
    total = max(phase.epochs * steps_per_epoch - warmup, 1)
    if warmup:
        return keras.optimizers.schedules.CosineDecay(0.0, total, warmup_target=phase.learning_rate,
                                                      warmup_steps=warmup)
    return keras.optimizers.schedules.CosineDecay(phase.learning_rate, total)


def current_learning_rate(optimizer) -> float:
    """The optimizer's learning rate now (a schedule's current value), or NaN."""
    try:
        return float(np.asarray(optimizer.learning_rate))
    except (TypeError, ValueError):
        return float("nan")
