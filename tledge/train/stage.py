"""Transfer training in two phases: feature extraction, then fine-tuning; and the baseline.

The phase where hand-written pipelines break is fine-tuning: BatchNorm layers running in
training mode on a small data set wreck the pretrained statistics. Here BatchNorm stays in
inference mode and frozen (unless the recipe says otherwise), each phase keeps its best
weights by validation accuracy, and if fine-tuning ends below where feature extraction left
off, tledge keeps the better weights and says so loudly.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
import warnings

import numpy as np

from tledge.core.metrics import accuracy
from tledge.data.feed import (augmentation, class_weights, training_batches,
                              validation_batches)
from tledge.errors import TrainError
from tledge.model import (build_backbone, build_classifier, find_backbone, is_pretrained,
                          keep_head, predict_in_batches)
from tledge.recipe.spec import PhaseRecipe
from tledge.tasks import model_tasks, score, targets
from tledge.train.bottlenecks import (bottleneck_key, cached_features, compute_features,
                                      feature_extractor, head_model)
from tledge.train.distribute import per_worker_input, precision, strategy_for
from tledge.train.loop import fit_phase, PhaseResult, skipped, steps_per_epoch

# Keras is imported inside the functions that use it: the CLI imports this
# module at start-up, and it takes seconds to load.


def train_model(recipe, splits, *, weights_file=None, verbose="auto", checkpoint_dir=None,
                cache_dir=None, log=print):
    """Build and train the recipe's classifier on `splits`.

    Args:
        checkpoint_dir: where each epoch is saved so a killed run resumes; None for none.
        cache_dir: where bottleneck features are cached; None computes them in memory.

    Returns:
        (model, history): the float32 Keras model and a JSON-able dict of both phases.

    Raises:
        TrainError: the data cannot train this model, or the machine lacks what the recipe's
            distribution strategy needs.
        WeightsError: the backbone weights cannot be obtained.
    """
    import keras
    if len(splits.y_train) == 0:
        raise TrainError("the training split is empty; lower data.val_fraction and "
                         "data.test_fraction or add images")
    keras.utils.set_random_seed(recipe.seed)
    strategy = strategy_for(recipe.train)
    tasks = model_tasks(recipe, splits.class_names)
    with precision(recipe.train), strategy.scope():
        backbone = build_backbone(recipe, weights_file=weights_file)
        model = build_classifier(recipe, splits.num_classes, backbone, tasks)
        if recipe.model.head == "keep":
            keep_head(model, weights_file or recipe.model.weights, splits.class_names)
        phases = _train_phases(recipe, splits, model, backbone, weights_file=weights_file,
                               verbose=verbose, checkpoint_dir=checkpoint_dir,
                               cache_dir=cache_dir, log=log, strategy=strategy, tasks=tasks)
    if recipe.train.mixed_precision:
        model = _float32_copy(recipe, splits.num_classes, model, weights_file, tasks)
    verdict = _verdict(phases)
    if verdict["regressed"]:
        warnings.warn(verdict["message"])
    history = {"phases": [dataclasses.asdict(phase) for phase in phases], "verdict": verdict,
               "backbone": recipe.model.backbone, "backbone_layer": find_backbone(model).name,
               "pretrained": is_pretrained(recipe), "head": recipe.model.head,
               "test_accuracy": None if tasks else evaluate(model, splits.x_test, splits.y_test),
               "distribute": recipe.train.distribute, "devices": strategy.num_replicas_in_sync}
    if tasks:  # test_accuracy is then the best_by score of the tasks' accuracies
        history["task_accuracy"] = evaluate_tasks(model, splits.x_test, splits.y_test, tasks,
                                                  splits.class_names)
        history["test_accuracy"] = score(history["task_accuracy"], recipe.train.best_by) \
            if len(splits.y_test) else None
        history["best_by"] = recipe.train.best_by
    return model, history


def _train_phases(recipe, splits, model, backbone, *, weights_file, verbose, checkpoint_dir,
                  cache_dir, log, strategy, tasks):
    pretrained = is_pretrained(recipe)
    if not pretrained:
        _fast_batchnorm(backbone)
    weights = class_weights(splits.y_train, splits.num_classes) \
        if recipe.train.class_weight == "balanced" else None
    batch = recipe.data.batch_size
    steps = steps_per_epoch(len(splits.y_train), batch)
    augment = augmentation(recipe.data.augment, recipe.seed)

    def datasets(train_x, val_x, with_augmentation):
        def train_input(batch_size, shard):
            return training_batches(splits, train_x, batch_size=batch_size, seed=recipe.seed,
                                    weights=weights, shard=shard, tasks=tasks,
                                    augment=augment if with_augmentation else None)

        train = per_worker_input(strategy, train_input, batch)
        # Every worker scores all of val (the same weights give the same number)
        return train, validation_batches(splits, val_x, batch_size=batch, seed=recipe.seed,
                                         tasks=tasks)

    if not len(splits.y_val):
        warnings.warn("the validation split is empty: best weights are chosen by training "
                      "accuracy, which flatters the model; set data.val_fraction > 0")
    common = dict(train_count=len(splits.y_train), steps_per_epoch=steps,
                  checkpoint_dir=checkpoint_dir, verbose=verbose,
                  jit_compile=recipe.train.jit_compile, tasks=tasks,
                  best_by=recipe.train.best_by)
    extraction = recipe.train.feature_extraction
    backbone.trainable = not pretrained  # from scratch, the whole network learns in phase 1
    if pretrained and _use_bottlenecks(recipe) and extraction.epochs:
        first = _fit_on_bottlenecks(recipe, splits, model, datasets, weights_file, common,
                                    cache_dir, log)
    else:
        first = fit_phase(model, "feature_extraction" if pretrained else "from_scratch",
                          extraction, *datasets(splits.x_train, splits.x_val, True), **common)
    after_extraction = model.get_weights()

    tune = recipe.train.fine_tune
    if not pretrained:
        second = skipped("fine_tune", "weights = \"none\": the whole network already trained "
                                      "from scratch")
    elif tune.epochs == 0:
        second = skipped("fine_tune", "train.fine_tune.epochs = 0")
    else:
        unfrozen = unfreeze_top(backbone, tune.unfreeze, recipe.model.backbone,
                                batchnorm=tune.batchnorm)
        second = fit_phase(model, "fine_tune", tune,
                           *datasets(splits.x_train, splits.x_val, True),
                           initial_epoch=extraction.epochs, **common)
        second.unfrozen_layers = unfrozen
        if _verdict([first, second])["regressed"]:
            model.set_weights(after_extraction)
    return [first, second]


def _use_bottlenecks(recipe) -> bool:
    mode = recipe.train.cache_bottlenecks
    if mode == "never" or recipe.train.distribute != "none":
        return False
    return mode == "always" or not recipe.data.augment.active


def _fit_on_bottlenecks(recipe, splits, model, datasets, weights_file, common, cache_dir, log):
    """Feature extraction on cached backbone features: the same head, many times faster."""
    start = time.perf_counter()
    extractor = feature_extractor(model)
    if cache_dir is None:
        train_features = compute_features(extractor, splits.x_train)
        val_features = compute_features(extractor, splits.x_val)
        status = "computed"
    else:
        key = bottleneck_key(recipe, splits, weights_file)
        train_features, val_features, status = cached_features(cache_dir, key, extractor, splits)
    feature_seconds = time.perf_counter() - start
    if recipe.data.augment.active:
        log("feature extraction: training on cached bottlenecks, so without augmentation "
            "(train.cache_bottlenecks = \"always\")")
    log(f"feature extraction: bottleneck features {status} "
        f"({train_features.shape[1]} per image, {feature_seconds:.1f} s)")
    head = head_model(model)
    result = fit_phase(head, "feature_extraction", recipe.train.feature_extraction,
                       *datasets(train_features, val_features, False), **common)
    result.bottlenecks = status
    result.feature_seconds = round(feature_seconds, 3)
    result.wall_seconds = round(result.wall_seconds + feature_seconds, 3)
    result.total_params = int(model.count_params())
    return result


def _float32_copy(recipe, num_classes, model, weights_file, tasks):
    """The trained model rebuilt in float32, so every export starts from float32."""
    backbone = build_backbone(dataclasses.replace(
        recipe, model=dataclasses.replace(recipe.model, weights="none")))
    copy = build_classifier(recipe, num_classes, backbone, tasks)
    copy.set_weights([np.asarray(w, dtype=np.float32) for w in model.get_weights()])
    return copy


def evaluate(model, images, labels, batch=64) -> float | None:
    """Top-1 accuracy of a Keras model on uint8 images (None when there are none)."""
    if not len(labels):
        return None
    predicted = predict_in_batches(model, images, batch).argmax(axis=1)
    return accuracy(predicted, labels)


def evaluate_tasks(model, images, labels, tasks, class_names, batch=64) -> dict:
    """Each task's top-1 accuracy of a multi-task Keras model ({} when there are no images)."""
    if not len(labels):
        return {}
    outputs = predict_in_batches(model, images, batch)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    expected = targets(labels, tasks, class_names)
    return {task["name"]: accuracy(output.argmax(axis=1), expected[:, index])
            for index, (task, output) in enumerate(zip(tasks, outputs))}


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


def unfreeze_top(backbone, unfreeze, backbone_name, *, batchnorm="frozen") -> int:
    """Make the top layers of `backbone` trainable; return how many layers with weights.

    `unfreeze` is a count of top layers, a layer name (that layer and everything above it)
    or "all". BatchNorm layers stay frozen (inference mode) unless `batchnorm` is "train".
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
            close = difflib.get_close_matches(unfreeze, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise TrainError(f"train.fine_tune.unfreeze: '{backbone_name}' has no layer "
                             f"{unfreeze!r}{hint}")
        start = names.index(unfreeze)
    backbone.trainable = True
    count = 0
    for index, layer in enumerate(layers):
        is_batchnorm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = index >= start and (batchnorm == "train" or not is_batchnorm)
        count += layer.trainable and bool(layer.weights)
    return count


def train_baseline(recipe, splits, *, verbose="auto", log=print):
    """Train the recipe's `[baseline]` from scratch on the same split.

    Returns:
        (summary, model): a JSON-able summary (phase, test accuracy, parameters) and the model.
    """
    import keras
    settings = recipe.baseline
    baseline_recipe = dataclasses.replace(
        recipe, model=dataclasses.replace(recipe.model, backbone=settings.backbone,
                                          weights="none", alpha=None))
    keras.utils.set_random_seed(recipe.seed)
    backbone = build_backbone(baseline_recipe)
    _fast_batchnorm(backbone)
    model = build_classifier(baseline_recipe, splits.num_classes, backbone)
    phase = PhaseRecipe(epochs=settings.epochs, learning_rate=settings.learning_rate,
                        optimizer=settings.optimizer, early_stopping=settings.early_stopping)
    batch = recipe.data.batch_size
    train = training_batches(splits, splits.x_train, batch_size=batch, seed=recipe.seed,
                             augment=augmentation(recipe.data.augment, recipe.seed))
    val = validation_batches(splits, splits.x_val, batch_size=batch, seed=recipe.seed)
    start = time.perf_counter()
    result = fit_phase(model, "baseline", phase, train, val, train_count=len(splits.y_train),
                       steps_per_epoch=steps_per_epoch(len(splits.y_train), batch),
                       verbose=verbose)
    accuracy = evaluate(model, splits.x_test, splits.y_test)
    log(f"baseline: {settings.backbone} from scratch, test accuracy "
        f"{_percent(accuracy)} in {time.perf_counter() - start:.0f} s")
    return {"backbone": settings.backbone, "phase": dataclasses.asdict(result),
            "test_accuracy": accuracy, "params": int(model.count_params())}, model


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


__all__ = ["PhaseResult", "train_model", "train_baseline", "unfreeze_top", "evaluate"]
