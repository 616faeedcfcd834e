"""One training phase across the workers of a MultiWorkerMirroredStrategy cluster.

Keras 3's `model.fit` cannot train across several workers with MultiWorkerMirroredStrategy
(its first-batch build and its per-step metric reduction hand nested or scalar per-replica
values to collective reductions that refuse them; keras-team/keras#20585), so this is the
loop that `fit` would run, written on the strategy itself: each worker reads its own shard
of the cached training rows (`per_worker_input`), each step's gradients are summed across
all replicas by the optimizer, and loss and accuracy are summed across workers. Validation
runs on every worker over the whole split, after BatchNorm's moving statistics are averaged
across workers at the end of each epoch, so every worker holds, scores and keeps the same
model. What it keeps from `fit_phase`: the optimizer and schedule, label smoothing, sample
weights, early stopping and the best weights by validation accuracy. What it does not do:
per-epoch checkpoints for resuming a killed run, and mixed precision.
"""

from __future__ import annotations

import time

import numpy as np

from tledge.errors import TrainError
from tledge.train.phase import PhaseResult, current_learning_rate, learning_rate, make_optimizer

# TensorFlow and Keras are imported inside the functions that use them: the CLI imports this
# module at start-up, and they take seconds to load.


def fit_across_workers(model, name, phase, train_data, val_data, *, train_count,
                       steps_per_epoch, initial_epoch=0, log=print) -> PhaseResult:
    """Train `model` for `phase` on a distributed dataset; the same result as `fit_phase`."""
    import keras
    import tensorflow as tf
    strategy = tf.distribute.get_strategy()
    if keras.mixed_precision.global_policy().name != "float32":
        raise TrainError("train.mixed_precision is not supported with distribute = "
                         "\"multi_worker\"; remove one of them")
    optimizer = make_optimizer(phase.optimizer, learning_rate(phase, steps_per_epoch))
    loss_fn = keras.losses.CategoricalCrossentropy(label_smoothing=phase.label_smoothing,
                                                   reduction=None)
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))

    def replica_step(x, y, *weight):
        with tf.GradientTape() as tape:
            probabilities = model(x, training=True)
            per_example = loss_fn(y, probabilities)
            loss = tf.nn.compute_average_loss(per_example,
                                              sample_weight=weight[0] if weight else None)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probabilities, -1),
                                                 tf.argmax(y, -1)), tf.float32))
        return tf.reduce_sum(per_example), correct, tf.cast(tf.shape(y)[0], tf.float32)

    @tf.function
    def train_step(batch):
        sums = strategy.run(replica_step, args=batch)
        return [strategy.reduce("SUM", value, axis=None) for value in sums]

    @tf.function
    def mean_across_workers(values):
        """Every worker gets the mean of everyone's `values` (a list of tensors)."""
        per_replica = strategy.run(lambda *parts: [tf.identity(part) for part in parts],
                                   args=tuple(values))
        return [strategy.reduce("MEAN", value, axis=None) for value in per_replica]

    def synchronize_statistics():
        """BatchNorm's moving statistics follow each worker's own shard; average them, so
        every worker validates, keeps and hands over the same model."""
        variables = model.non_trainable_variables
        if variables:
            for variable, value in zip(variables, mean_across_workers(
                    [variable.value for variable in variables])):
                variable.assign(value)

    @tf.function
    def score(x, y):
        probabilities = model(x, training=False)
        per_example = keras.losses.categorical_crossentropy(y, probabilities)
        correct = tf.equal(tf.argmax(probabilities, -1), tf.argmax(y, -1))
        return tf.reduce_sum(per_example), tf.reduce_sum(tf.cast(correct, tf.float32))

    rows, best, best_epoch, best_weights, waited = [], -1.0, None, None, 0
    monitor = "val_accuracy" if val_data is not None else "accuracy"
    start = time.perf_counter()
    for epoch in range(initial_epoch, initial_epoch + phase.epochs):
        totals = np.zeros(3)
        for batch in train_data:
            totals += [float(value) for value in train_step(batch)]
        synchronize_statistics()
        row = {"epoch": epoch + 1, "loss": totals[0] / max(totals[2], 1),
               "accuracy": totals[1] / max(totals[2], 1)}
        if val_data is not None:
            val_totals, count = np.zeros(2), 0
            for x, y, *_ in val_data:
                val_totals += [float(value) for value in score(x, y)]
                count += int(x.shape[0])
            # The same on every worker up to float rounding; averaged, so that every worker
            # picks the same best epoch even on machines whose kernels round differently
            val_totals = [float(value) for value in mean_across_workers(
                [tf.constant(value, tf.float64) for value in val_totals])]
            row["val_loss"], row["val_accuracy"] = np.asarray(val_totals) / max(count, 1)
        row["learning_rate"] = current_learning_rate(optimizer)
        rows.append(row)
        log(f"  epoch {epoch + 1}: " + "  ".join(f"{key} {value:.4f}" for key, value in
                                                 row.items() if key != "epoch"))
        if row[monitor] > best:
            best, best_epoch, waited = float(row[monitor]), epoch + 1, 0
            best_weights = model.get_weights()
        else:
            waited += 1
            if phase.early_stopping and waited >= phase.early_stopping:
                break
    wall = time.perf_counter() - start
    if best_weights is not None:
        model.set_weights(best_weights)
    return PhaseResult(name, rows, best_epoch, best if best_weights is not None else None,
                       round(wall, 3), round(train_count * len(rows) / max(wall, 1e-9), 1),
                       trainable, int(model.count_params()),
                       stopped_early=len(rows) < phase.epochs)

