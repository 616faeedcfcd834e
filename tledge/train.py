"""Transfer training in two phases: feature extraction, then fine-tuning.

The phase where hand-written pipelines break is fine-tuning: BatchNorm layers running in
training mode on a small data set wreck the pretrained statistics. Here BatchNorm stays in
inference mode and frozen, each phase keeps its best weights by validation accuracy, and if
fine-tuning ends below where feature extraction left off, tledge keeps the better weights and
says so loudly.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np

from tledge.errors import TrainError
from tledge.model import build_backbone, build_classifier, find_backbone, is_pretrained


@dataclasses.dataclass
class PhaseResult:
    name: str
    epochs: list  # one dict per epoch: loss, accuracy, val_loss, val_accuracy
    best_epoch: int | None
    best_val_accuracy: float | None
    wall_seconds: float
    images_per_second: float
    trainable_params: int
    total_params: int
    skipped: str | None = None


def train_model(recipe, splits, *, weights_file=None, verbose="auto"):
    """Build and train the recipe's classifier on `splits`.

    Returns:
        (model, history) where history is a JSON-able dict of both phases and the verdict.

    Raises:
        TrainError: the data cannot train this model (no training images, one class).
        WeightsError: the backbone weights cannot be obtained.
    """
    import keras
    if len(splits.y_train) == 0:
        raise TrainError("the training split is empty; lower data.val_fraction and "
                         "data.test_fraction or add images")
    keras.utils.set_random_seed(recipe.seed)
    backbone = build_backbone(recipe, weights_file=weights_file)
    model = build_classifier(recipe, splits.num_classes, backbone)
    train_data = _dataset(recipe, splits.x_train, splits.y_train, training=True)
    has_val = len(splits.y_val) > 0
    if not has_val:
        warnings.warn("the validation split is empty: best weights are chosen by training "
                      "accuracy, which flatters the model; set data.val_fraction > 0")
    val_data = _dataset(recipe, splits.x_val, splits.y_val, training=False) if has_val else None
    pretrained = is_pretrained(recipe)
    if not pretrained:
        _fast_batchnorm(backbone)
    phases = []

    extraction = recipe.train.feature_extraction
    backbone.trainable = not pretrained  # from scratch, the whole network learns in phase 1
    phases.append(_fit(model, "feature_extraction" if pretrained else "from_scratch",
                       extraction.epochs, extraction.learning_rate, train_data, val_data,
                       len(splits.y_train), verbose, initial_epoch=0))
    after_extraction = model.get_weights()

    tune = recipe.train.fine_tune
    if not pretrained:
        phases.append(_skipped("fine_tune", "weights = \"none\": the whole network already "
                                            "trained from scratch"))
    elif tune.epochs == 0:
        phases.append(_skipped("fine_tune", "train.fine_tune.epochs = 0"))
    else:
        unfrozen = unfreeze_top(backbone, tune.unfreeze, recipe.model.backbone)
        result = _fit(model, "fine_tune", tune.epochs, tune.learning_rate, train_data,
                      val_data, len(splits.y_train), verbose, initial_epoch=extraction.epochs)
        result.unfrozen_layers = unfrozen
        phases.append(result)

    verdict = _verdict(phases)
    if verdict["kept"] == "feature_extraction" and phases[1].skipped is None:
        model.set_weights(after_extraction)
        warnings.warn(verdict["message"])
    history = {"phases": [dataclasses.asdict(phase) | _extra(phase) for phase in phases],
               "verdict": verdict, "backbone": recipe.model.backbone,
               "backbone_layer": find_backbone(model).name,
               "pretrained": pretrained}
    return model, history


def _fast_batchnorm(backbone) -> None:
    """Let BatchNorm's moving statistics keep up on a short from-scratch run.

    keras.applications builds MobileNetV2 with momentum 0.999: after a few hundred steps the
    moving averages still hold mostly their initial values, so the model that scores well in
    training predicts one class at inference. 0.9 follows the data within tens of steps.
    """
    import keras
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = min(layer.momentum, 0.9)


def _extra(phase) -> dict:
    return {"unfrozen_layers": getattr(phase, "unfrozen_layers", None)}


def _skipped(name, reason) -> PhaseResult:
    return PhaseResult(name, [], None, None, 0.0, 0.0, 0, 0, skipped=reason)


def _verdict(phases) -> dict:
    """Which phase's weights the model keeps, and a message when fine-tuning made it worse."""
    first, second = phases[0], phases[1]
    if second.skipped or second.best_val_accuracy is None:
        return {"kept": first.name, "regressed": False, "message": ""}
    if second.best_val_accuracy + 1e-9 < (first.best_val_accuracy or 0.0):
        return {"kept": "feature_extraction", "regressed": True,
                "message": (f"FINE-TUNING MADE THE MODEL WORSE: best validation accuracy "
                            f"{second.best_val_accuracy:.3f} after fine-tuning against "
                            f"{first.best_val_accuracy:.3f} after feature extraction. Keeping "
                            "the feature-extraction weights. Try a lower "
                            "train.fine_tune.learning_rate or fewer unfrozen layers.")}
    return {"kept": "fine_tune", "regressed": False, "message": ""}


def unfreeze_top(backbone, unfreeze, backbone_name) -> int:
    """Make the top layers of `backbone` trainable, BatchNorm excepted; return how many.

    `unfreeze` is a count of top layers, a layer name (that layer and everything above it)
    or "all".
    """
    import keras
    layers = backbone.layers
    if unfreeze == "all":
        start = 0
    elif isinstance(unfreeze, int):
        if unfreeze > len(layers):
            raise TrainError(f"train.fine_tune.unfreeze = {unfreeze}, but '{backbone_name}' "
                             f"has {len(layers)} layers")
        start = len(layers) - unfreeze
    else:
        names = [layer.name for layer in layers]
        if unfreeze not in names:
            import difflib
            close = difflib.get_close_matches(unfreeze, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise TrainError(f"train.fine_tune.unfreeze: '{backbone_name}' has no layer "
                             f"{unfreeze!r}{hint}")
        start = names.index(unfreeze)
    backbone.trainable = True
    count = 0
    for index, layer in enumerate(layers):
        trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = trainable
        count += trainable and bool(layer.weights)
    return count


class _KeepBest:
    """Keeps the weights of the epoch with the best monitored accuracy (in memory)."""

    def __new__(cls, monitor):
        import keras

        class KeepBest(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.best, self.best_epoch, self.weights = -1.0, None, None

            def on_epoch_end(self, epoch, logs=None):
                value = (logs or {}).get(monitor)
                if value is not None and value > self.best:
                    self.best, self.best_epoch = float(value), epoch
                    self.weights = self.model.get_weights()

            def on_train_end(self, logs=None):
                if self.weights is not None:
                    self.model.set_weights(self.weights)

        return KeepBest()


def _fit(model, name, epochs, learning_rate, train_data, val_data, train_count, verbose,
         *, initial_epoch) -> PhaseResult:
    import keras
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(model.count_params())
    if epochs == 0:
        return _skipped(name, "0 epochs")
    monitor = "val_accuracy" if val_data is not None else "accuracy"
    keep_best = _KeepBest(monitor)
    start = time.perf_counter()
    fit = model.fit(train_data, validation_data=val_data, epochs=initial_epoch + epochs,
                    initial_epoch=initial_epoch, callbacks=[keep_best], verbose=verbose)
    wall = time.perf_counter() - start
    keys = list(fit.history)
    rows = [{"epoch": initial_epoch + index + 1,
             **{key: float(fit.history[key][index]) for key in keys}}
            for index in range(len(fit.history[keys[0]]))]
    best_epoch = None if keep_best.best_epoch is None else keep_best.best_epoch + 1
    return PhaseResult(name, rows, best_epoch, keep_best.best if keep_best.weights else None,
                       round(wall, 3), round(train_count * epochs / wall, 1), trainable, total)


def augmentation(recipe):
    """The training-only augmentation layers, or None."""
    import keras
    augment = recipe.data.augment
    layers = []
    if augment.flip != "none":
        layers.append(keras.layers.RandomFlip(augment.flip, seed=recipe.seed))
    if augment.rotation:
        layers.append(keras.layers.RandomRotation(augment.rotation, seed=recipe.seed))
    if augment.zoom:
        layers.append(keras.layers.RandomZoom((-augment.zoom, augment.zoom), seed=recipe.seed))
    return keras.Sequential(layers, name="augment") if layers else None


def _dataset(recipe, images, labels, *, training):
    import tensorflow as tf
    data = tf.data.Dataset.from_tensor_slices((images, labels.astype("int32")))
    if training:
        data = data.shuffle(len(labels), seed=recipe.seed, reshuffle_each_iteration=True)
    data = data.batch(recipe.data.batch_size)
    data = data.map(lambda x, y: (tf.cast(x, tf.float32), y))
    augment = augmentation(recipe) if training else None
    if augment is not None:
        # augmentation sits in the input pipeline, not in the model: exported graphs stay clean
        data = data.map(lambda x, y: (tf.clip_by_value(augment(x, training=True), 0, 255), y),
                        num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)
