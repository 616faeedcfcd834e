"""The tf.data input pipeline for training: batches, one-hot labels, class weights, augmentation.

Images stream from the prepared-data cache a batch at a time (positioned reads in parallel
map calls, prefetched), so training memory does not grow with the size of the data set.

Augmentation is a stack of Keras preprocessing layers applied here, to training batches
only: calibration, validation and test images never pass through it, and exported graphs
carry no inactive random layers.
"""

from __future__ import annotations

import numpy as np

from tledge.data.cache import ImageRows
from tledge.tasks import targets

# TensorFlow and Keras are imported inside the functions that use them: the CLI imports this
# module at start-up, and they take seconds to load.


def augmentation(augment, seed: int):
    """The training-only augmentation layers of an `AugmentRecipe`, or None when it is off."""
    if not augment.active:
        return None
    import keras
    layers = []
    if augment.flip != "none":
        layers.append(keras.layers.RandomFlip(augment.flip, seed=seed))
    if augment.rotation:
        layers.append(keras.layers.RandomRotation(augment.rotation, seed=seed))
    if augment.zoom:
        layers.append(keras.layers.RandomZoom((-augment.zoom, augment.zoom), seed=seed))
    if augment.translation:
        layers.append(keras.layers.RandomTranslation(augment.translation, augment.translation,
                                                     seed=seed))
    if augment.contrast:
        layers.append(keras.layers.RandomContrast(augment.contrast, value_range=(0, 255),
                                                  seed=seed))
    if augment.brightness:
        layers.append(keras.layers.RandomBrightness(augment.brightness, value_range=(0, 255),
                                                    seed=seed))
    return keras.Sequential(layers, name="augment")


def class_weights(labels, num_classes: int) -> np.ndarray:
    """'balanced' weights: n / (classes * count), so every class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes, dtype=np.float32)
    present = counts > 0
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


def training_batches(splits, features, *, batch_size, seed, augment=None, weights=None,
                     shard=None, tasks=()):
    """The training split's shuffled batches (`features`: its images, or their bottlenecks);
    with `tasks`, one one-hot target per task."""
    return make_dataset(features, *_targets(splits, splits.y_train, tasks),
                        batch_size=batch_size, seed=seed, shuffle=True, augment=augment,
                        weights=weights, shard=shard)


def validation_batches(splits, features, *, batch_size, seed, tasks=()):
    """The validation split's batches, in order; None when the split is empty."""
    if not len(splits.y_val):
        return None
    return make_dataset(features, *_targets(splits, splits.y_val, tasks),
                        batch_size=batch_size, seed=seed)


def _targets(splits, labels, tasks):
    """(labels, classes) for `make_dataset`: one task's (a model of one task: Keras takes a
    one-output model's targets plain), or every task's by name."""
    if not tasks:
        return labels, splits.num_classes
    labels = targets(labels, tasks, splits.class_names)
    if len(tasks) == 1:
        return labels[:, 0], len(tasks[0]["labels"])
    return labels, {task["name"]: len(task["labels"]) for task in tasks}


def make_dataset(features, labels, num_classes, *, batch_size, seed, shuffle=False,
                 augment=None, weights=None, shard=None):
    """Batches of (float32 inputs, one-hot labels[, sample weights]).

    `labels` [N] with `num_classes` an int, or [N, tasks] with `num_classes` {task name:
    classes}: then the labels are {task name: one-hot} (a multi-task model's targets).

    `features` are images of the data cache (`ImageRows`), streamed: the dataset holds row
    numbers and labels, and each batch's rows are read from disk when it is due, so no
    split is ever in memory whole. Float feature vectors (cached bottlenecks) and plain
    arrays are sliced from memory.

    Args:
        weights: a weight per class (see `class_weights`), given to each sample.
        shard: (count, index): read only every count-th row, starting at index (this
            worker's share under multi-worker training); every shard gets the same number
            of rows, so workers run the same number of steps.
    """
    import tensorflow as tf
    labels = np.asarray(labels, dtype=np.int64)
    positions = np.arange(len(labels), dtype=np.int64)
    if shard is not None:
        count, index = shard
        positions = positions[index::count][:len(labels) // count]
    if isinstance(features, ImageRows):
        data = tf.data.Dataset.from_tensor_slices(positions)
    else:
        features = np.asarray(features)[positions]
        data = tf.data.Dataset.from_tensor_slices((features, np.arange(len(positions))))
        labels = labels[positions]
    if shuffle:
        data = data.shuffle(len(positions), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size)
    label_table = tf.constant(labels)
    weight_table = tf.constant(weights, tf.float32) if weights is not None else None

    def columns(x, rows):
        label = tf.gather(label_table, rows)
        if isinstance(num_classes, dict):
            target = {name: tf.one_hot(label[:, index], count, dtype=tf.float32)
                      for index, (name, count) in enumerate(num_classes.items())}
            return tf.cast(x, tf.float32), target
        out = (tf.cast(x, tf.float32), tf.one_hot(label, num_classes, dtype=tf.float32))
        return out + ((tf.gather(weight_table, label),) if weight_table is not None else ())

    if isinstance(features, ImageRows):
        def read(rows):
            images = tf.numpy_function(features.read, [rows], tf.uint8, stateful=False)
            images.set_shape([None, *features.shape[1:]])
            return columns(images, rows)
        data = data.map(read, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        data = data.map(columns)
    if augment is not None:
        def augmented(x, *rest):
            return (tf.clip_by_value(augment(x, training=True), 0.0, 255.0), *rest)
        # in order: the random layers draw from one seeded state, so that a recipe trains
        # the same twice (in parallel calls the batches would take their draws in any order)
        data = data.map(augmented)
    return data.prefetch(tf.data.AUTOTUNE)
