"""The tf.data input pipeline for training: batches, one-hot labels, class weights, augmentation.

Augmentation is a stack of Keras preprocessing layers applied here, to training batches
only: calibration, validation and test images never pass through it, and exported graphs
carry no inactive random layers.
"""

from __future__ import annotations

import numpy as np


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


def make_dataset(features, labels, num_classes, *, batch_size, seed, shuffle=False,
                 augment=None, weights=None):
    """Batches of (float32 inputs, one-hot labels[, sample weights]).

    `features` are uint8 images or float feature vectors (cached bottlenecks).
    """
    import tensorflow as tf
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    columns = [features, one_hot]
    if weights is not None:
        columns.append(weights[labels])
    data = tf.data.Dataset.from_tensor_slices(tuple(columns))
    if shuffle:
        data = data.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size)

    def to_float(x, *rest):
        return (tf.cast(x, tf.float32), *rest)
    data = data.map(to_float)
    if augment is not None:
        def augmented(x, *rest):
            return (tf.clip_by_value(augment(x, training=True), 0.0, 255.0), *rest)
        data = data.map(augmented, num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)
