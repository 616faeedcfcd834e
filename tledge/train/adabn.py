"""AdaBN: adapt a trained model to another domain without a single label.

A BatchNorm layer normalizes with the mean and variance its inputs had in training. On images
from another camera or light those statistics are wrong, and every layer after it sees
inputs it was never trained on. AdaBN (Li et al. 2016, "Revisiting Batch Normalization For
Practical Domain Adaptation") re-estimates them on the target domain's images: no labels, no
gradient, the weights untouched.

As in the paper's and the usual implementations, the backbone runs over the target images
with every BatchNorm layer normalizing by the statistics of the batch in front of it (as in
training), so each layer sees what the layers before it make of target images; the mean and
variance of every BatchNorm layer's input are accumulated over all the images (streamed in
batches) and become its statistics. One pass; a second one measures how settled they are.
"""

from __future__ import annotations

import numpy as np

from tledge.errors import TrainError

# Keras and TensorFlow are imported inside the functions that use them: the CLI imports this
# module at start-up, and they take seconds to load.


def batchnorm_layers(model) -> list:
    """Every BatchNormalization layer of `model`, nested models included, in graph order."""
    import keras
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found += batchnorm_layers(layer)
    return found


def adabn_batch(image_size) -> int:
    """How many images normalize each other: the more, the closer each batch's statistics
    to the population's (on the quickstart, 256 gained 2 points of target accuracy over 64),
    as many as fit the memory a 256-image batch of 64x64 images takes."""
    height, width = image_size
    return int(max(16, min(256, 256 * 64 * 64 // (height * width))))


def adapt_batchnorm(model, images, *, batch: int | None = None, log=None) -> dict:
    """Re-estimate every BatchNorm layer's moving statistics on `images` (uint8, unlabeled).

    Returns what was done: the number of layers and images, and how far the statistics moved
    (the largest change of a layer's mean, in its old standard deviations).

    Raises:
        TrainError: the model has no BatchNorm layer, or its BatchNorm layers sit in more
            than one nested model (a fused ensemble: adapt its members instead).
    """
    import keras
    import tensorflow as tf
    layers = batchnorm_layers(model)
    if not layers:
        raise TrainError("this model has no BatchNorm layer, so AdaBN has no statistics to "
                         "re-estimate; adapt it with a few labelled target images instead "
                         "(a recipe with model.weights = the source recipe and "
                         "model.head = \"keep\")")
    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    outer = [layer for layer in model.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    if len(inner) > 1 or (inner and outer):
        raise TrainError("AdaBN adapts a model with one backbone; this one has "
                         f"{len(inner)} nested models (a fused ensemble?): adapt its members")
    if inner:  # the backbone: its input is what the layers before it make of the pixels
        graph = inner[0]
        before = model.layers[1:model.layers.index(graph)]
    else:
        graph, before = model, []
    probe = keras.Model(graph.inputs, [layer.input for layer in layers])
    batch = batch or adabn_batch(tuple(model.inputs[0].shape[1:3]))
    frozen = [layer.trainable for layer in layers]
    for layer in layers:  # a frozen BatchNorm layer ignores training=True
        layer.trainable = True

    @tf.function(reduce_retracing=True)
    def moments(x):
        x = tf.cast(x, tf.float32)
        for layer in before:
            x = layer(x, training=False)
        outputs = probe(x, training=True)  # each BatchNorm layer by its batch's statistics
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        sums, squares, counts = [], [], []
        for output in outputs:
            output = tf.cast(output, tf.float64)
            axes = list(range(len(output.shape) - 1))
            sums.append(tf.reduce_sum(output, axes))
            squares.append(tf.reduce_sum(tf.square(output), axes))
            counts.append(tf.cast(tf.size(output) // tf.shape(output)[-1], tf.float64))
        return sums, squares, counts

    def measure():
        totals = None
        for start in range(0, len(images), batch):
            parts = moments(np.asarray(images[start:start + batch]))
            parts = [[np.asarray(t) for t in group] for group in parts]
            totals = parts if totals is None else \
                [[a + b for a, b in zip(old, new)] for old, new in zip(totals, parts)]
        sums, squares, counts = totals
        means = [total / count for total, count in zip(sums, counts)]
        variances = [np.maximum(square / count - mean * mean, 0.0)
                     for square, count, mean in zip(squares, counts, means)]
        return means, variances

    old = [(np.asarray(layer.moving_mean), np.asarray(layer.moving_variance))
           for layer in layers]
    try:
        means, variances = measure()
    finally:
        for layer, trainable in zip(layers, frozen):
            layer.trainable = trainable
    change = max(float(np.max(np.abs(mean - old_mean) / np.sqrt(old_variance + 1e-3)))
                 for mean, (old_mean, old_variance) in zip(means, old))
    for layer, mean, variance in zip(layers, means, variances):
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(variance.astype(np.float32))
    if log:
        log(f"adapt: {len(layers)} BatchNorm layers re-estimated on {len(images)} target "
            f"images (their means moved by up to {change:.2f} of the source's standard "
            "deviations)")
    return {"method": "adabn", "batchnorm_layers": len(layers), "images": int(len(images)),
            "largest_change": round(change, 4)}
