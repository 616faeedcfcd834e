"""Quantization-aware fine-tuning: the int8 remedy past post-training quantization.

When no calibration setting and no layer kept in float brings an int8 file close enough to
the Keras model, the model's own weights are nudged to suit int8: a copy of the model is
fine-tuned for a few hundred steps with the rounding of int8 simulated in its graph, learning
to reproduce the Keras model's probabilities (distillation: the trained model is the teacher,
no label is used), and that copy is then quantized as usual. What is simulated:

- weights: rounded per output channel, symmetric, on 8 bits (7 with `reduce_range`, what
  ONNX Runtime needs on x86 without VNNI), as both exporters quantize convolutions and dense
  layers. Per channel, the rounding is the same before and after the exporters fold a
  BatchNorm into the convolution (the fold scales each channel). Float master weights take
  the updates (the straight-through estimator); the copy ends with its weights on the grid.
  Per-tensor weights (`per_channel = False`) are not simulated (the fold changes that grid).
- activations: every tensor the exporters quantize (the output of a layer, unless the layer
  feeds only one that the converter fuses into it: a convolution into its BatchNorm, either
  into its ReLU) is rounded to 8 bits on the min-max range the calibration images give it,
  fixed during the fine-tune, as the exporters' min-max calibration sets it.

Why not the usual tools: TensorFlow Model Optimization's QAT (0.8.1) takes Keras 2 models
only (it needs tf-keras, which cannot read a Keras 3 `.keras` file); NNCF's bias correction
on the ONNX graph left 39 of the quickstart's 52 convolutions in float. This module is plain
Keras 3 and TensorFlow, so both exporters read its result like any other model.

The fine-tuned copy is a different model from the one the run trained: its int8 file is
judged, like every candidate, against the Keras model's own probabilities, and the manifest
records the remedy (`qat` in the artifact's quantization settings).
"""

from __future__ import annotations

import time

import numpy as np

STEPS = 300           # fine-tuning steps at most (export.int8_qat_steps)
LEARNING_RATE = 3e-5  # Adam, on float master weights
BATCH = 32
RANGE_IMAGES = 200    # calibration images the activation ranges are measured on
CHECK_EVERY = 50      # steps between two measures of the simulated agreement (best kept)
IMAGES = 1000         # training images at most (a large split is sampled: memory and time)
SCORE_IMAGES = 500    # of them, the images the simulated agreement is measured on

# layers whose output is their input's quantization (no rounding of their own), and the
# layers a converter fuses into the layer before them
_PASS_THROUGH = ("InputLayer", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
                 "Reshape", "Flatten", "ZeroPadding2D", "MaxPooling2D", "Identity",
                 "Functional", "Sequential", "Model")
_KERNELS = ("kernel", "depthwise_kernel", "pointwise_kernel")


def quantization_aware_copy(model, images, *, bits: int = 8, per_channel: bool = True,
                            steps: int = STEPS, learning_rate: float = LEARNING_RATE,
                            seed: int = 0, max_seconds: float | None = None):
    """A copy of `model` fine-tuned with int8 rounding simulated, distilling `model`.

    Args:
        model: the trained Keras model (left untouched).
        images: uint8 training images [N, H, W, 3] (never the images that judge the result;
            at most `IMAGES` are worth giving, the first `SCORE_IMAGES` measure the copy).
        bits: the weights' bits (7 for ONNX Runtime's `reduce_range`).
        steps: fine-tuning steps at most; `max_seconds` ends it earlier.

    Returns:
        (copy, facts): the fine-tuned model and what was done (`steps` run, `seconds`, the
        copy's agreement with the model under simulated int8 on `images`, before and at its
        best). Every `CHECK_EVERY` steps that agreement is measured and the copy keeps the
        weights of its best measure (`best_step`; 0: no step improved it, the copy is the
        model with its weights on the grid).
    """
    import keras
    import tensorflow as tf
    began = time.perf_counter()
    images = np.asarray(images)
    if not len(images):
        raise ValueError("a quantization-aware fine-tune needs training images")
    student = keras.models.clone_model(model)
    student.set_weights(model.get_weights())
    student.trainable = True
    scored = images[:SCORE_IMAGES]
    teacher = _outputs(_predict(model, scored))
    layers = _all_layers(student)
    points = [layer for layer in layers if _quantized_output(layer)]
    ranges: dict[int, list[float]] = {}
    mode = {"now": "record"}

    def patch(layer):
        original = layer.call

        def call(*args, **kwargs):
            out = original(*args, **kwargs)
            if mode["now"] == "record":
                low, high = float(tf.reduce_min(out)), float(tf.reduce_max(out))
                seen = ranges.setdefault(id(layer), [low, high])
                seen[0], seen[1] = min(seen[0], low), max(seen[1], high)
                return out
            if mode["now"] == "quantize" and id(layer) in ranges:
                low, high = ranges[id(layer)]
                return tf.quantization.fake_quant_with_min_max_args(
                    out, min=min(low, 0.0), max=max(high, 0.0, min(low, 0.0) + 1e-6),
                    num_bits=8)
            return out
        layer.call = call
    for layer in points:
        patch(layer)
    try:
        for start in range(0, min(len(images), RANGE_IMAGES), BATCH):  # eager: ranges read
            student(tf.constant(images[start:start + BATCH], tf.float32), training=False)
        kernels = _kernels(layers) if per_channel else []
        masters = [keras.Variable(variable.numpy(), name=f"master_{index}")
                   for index, (variable, _) in enumerate(kernels)]
        rounded = {id(variable) for variable, _ in kernels}
        others = [variable for variable in student.trainable_variables
                  if id(variable) not in rounded]
        optimizer = keras.optimizers.Adam(learning_rate)
        optimizer.build(masters + others)

        def round_weights():
            for (variable, depthwise), master in zip(kernels, masters):
                variable.assign(_round_per_channel(master, bits, depthwise))

        @tf.function(reduce_retracing=True)
        def step(x):
            x = _augmented(x)
            targets = _outputs(model(x, training=False))  # the teacher's probabilities
            round_weights()
            with tf.GradientTape() as tape:
                predicted = _outputs(student(x, training=False))
                loss = tf.add_n([tf.reduce_mean(-tf.reduce_sum(
                    target * tf.math.log(tf.clip_by_value(p, 1e-7, 1.0)), axis=-1))
                    for target, p in zip(targets, predicted)])
            watched = [variable for variable, _ in kernels] + others
            gradients = tape.gradient(loss, watched)
            optimizer.apply(gradients, masters + others)
            return loss

        mode["now"] = "quantize"
        trained = masters + others

        def score():
            round_weights()
            return _agreement(teacher, _outputs(_predict(student, scored)))
        before = best = score()
        best_step, kept = 0, [variable.numpy() for variable in trained]
        rng = np.random.default_rng(seed)
        done, order = 0, np.array([], int)
        while done < steps and (max_seconds is None or
                                time.perf_counter() - began < max_seconds):
            if len(order) < BATCH:
                order = np.concatenate([order, rng.permutation(len(images))])
            chosen, order = order[:BATCH], order[BATCH:]
            step(tf.constant(images[chosen], tf.float32))
            done += 1
            if done % CHECK_EVERY == 0 or done == steps:
                now = score()
                if now > best:
                    best, best_step = now, done
                    kept = [variable.numpy() for variable in trained]
        for variable, value in zip(trained, kept):  # the best weights, as training keeps them
            variable.assign(value)
        round_weights()
    finally:
        for layer in points:
            del layer.call  # the class's own call again: the exporters see a plain model
    return student, {"steps": done, "seconds": round(time.perf_counter() - began, 1),
                     "bits": bits, "learning_rate": learning_rate, "best_step": best_step,
                     "simulated_agreement": [round(before, 4), round(best, 4)]}


def _round_per_channel(master, bits, depthwise):
    """`master` rounded symmetrically on `bits` bits, one scale per output channel."""
    import tensorflow as tf
    value = tf.convert_to_tensor(master)
    shape = tf.shape(value)
    if depthwise:  # [h, w, in, multiplier]: the output channel is in x multiplier
        value = tf.reshape(value, tf.concat([shape[:2], [-1]], 0))
    flat = tf.reshape(value, [-1, tf.shape(value)[-1]])
    bound = tf.maximum(tf.reduce_max(tf.abs(flat), axis=0), 1e-8)
    rounded = tf.quantization.fake_quant_with_min_max_vars_per_channel(
        value, -bound, bound, num_bits=bits, narrow_range=True)
    return tf.reshape(rounded, shape)


def _kernels(layers) -> list[tuple]:
    """(variable, whether it is a depthwise kernel) of every weight the exporters round."""
    found = []
    for layer in layers:
        for name in _KERNELS:
            variable = getattr(layer, name, None)
            if variable is not None and hasattr(variable, "assign") and \
                    len(variable.shape) >= 2:
                found.append((variable, name == "depthwise_kernel"))
    return found


def _all_layers(model) -> list:
    """Every layer, nested models' included."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found += _all_layers(layer)
    return found


def _kind(layer) -> str:
    return type(layer).__name__


def _activation(layer) -> str | None:
    """The activation a layer applies: its own `activation` argument, or what it is."""
    kind = _kind(layer)
    if kind == "ReLU":
        return "relu"
    if kind in ("Activation", "Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense",
                "Conv1D"):
        function = getattr(layer, "activation", None)
        return getattr(function, "__name__", None) if function is not None else None
    return None


def _consumers(layer) -> list:
    return [node.operation for node in getattr(layer, "_outbound_nodes", [])]


def _quantized_output(layer) -> bool:
    """Whether the exporters quantize this layer's output (not fused into its consumer)."""
    kind = _kind(layer)
    if kind in _PASS_THROUGH or hasattr(layer, "layers"):
        return False
    consumers = _consumers(layer)
    if len(consumers) != 1:
        return True
    consumer = consumers[0]
    weighted = any(getattr(layer, name, None) is not None for name in _KERNELS)
    linear = _activation(layer) in (None, "linear")
    if weighted and linear and _kind(consumer) == "BatchNormalization":
        return False  # folded into the convolution
    if (weighted and linear or kind == "BatchNormalization") and \
            _activation(consumer) in ("relu", "relu6"):
        return False  # the ReLU fused into the layer before it
    return True


def _predict(model, images, batch=64):
    import tensorflow as tf
    parts = [model(tf.constant(images[start:start + batch], tf.float32), training=False)
             for start in range(0, len(images), batch)]
    if isinstance(parts[0], (list, tuple)):
        return [np.concatenate([np.asarray(part[i]) for part in parts])
                for i in range(len(parts[0]))]
    return np.concatenate([np.asarray(part) for part in parts])


def _augmented(x):
    """New images from a batch, for the teacher to label: flipped, shifted by up to an
    eighth of the side, and half the time blended pairwise (the teacher's answer on any
    image is a target: the copy learns the model's function, not 400 answers)."""
    import tensorflow as tf
    height, width = x.shape[1], x.shape[2]
    x = tf.where(tf.random.uniform([tf.shape(x)[0], 1, 1, 1]) < 0.5, x, x[:, :, ::-1])
    pad_h, pad_w = max(height // 8, 1), max(width // 8, 1)
    padded = tf.pad(x, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]], mode="REFLECT")
    top = tf.random.uniform([], 0, 2 * pad_h + 1, tf.int32)
    left = tf.random.uniform([], 0, 2 * pad_w + 1, tf.int32)
    x = padded[:, top:top + height, left:left + width]
    weight = tf.random.uniform([tf.shape(x)[0], 1, 1, 1], 0.5, 1.0)
    blended = weight * x + (1 - weight) * tf.reverse(x, [0])
    return tf.cond(tf.random.uniform([]) < 0.5, lambda: blended, lambda: x)


def _outputs(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _agreement(teacher, student) -> float:
    same = np.ones(len(teacher[0]), bool)
    for t, s in zip(teacher, student):
        same &= np.asarray(t).argmax(-1) == np.asarray(s).argmax(-1)
    return float(same.mean())
