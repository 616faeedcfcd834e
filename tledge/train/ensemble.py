"""Fused ensembles: several trained members, one deployable graph.

The fused model has the one raw-pixel input of every tledge model. Each member branch
resizes that input to the member's own size (when it differs) and runs the member, whose
preprocessing is inside it; the branches meet in the fusion:

- `mean`: soft voting, the average of the members' probabilities. No fitting, no risk of
  overfitting the validation split; the right default when members are about as good.
- `weighted`: a weighted average whose weights are fitted on the validation split (never on
  test) by maximum likelihood. Worth it when members differ in quality.
- `concat`: feature-level fusion: the members' pooled features concatenated and a new head
  trained on them with the members frozen (optionally fine-tuned after). It can learn which
  member to trust for which class, and needs more data than the other two.

Since the result is one Keras model, export, validate, bench and report treat it like any
other.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tledge.data.feed import training_batches, validation_batches
from tledge.errors import TrainError
from tledge.model import load_model, predict_in_batches
from tledge.recipe.spec import PhaseRecipe
from tledge.train.bottlenecks import compute_features, feature_extractor
from tledge.train.loop import fit_phase, steps_per_epoch
from tledge.train.stage import evaluate

# Keras is imported inside the functions that use it: the CLI imports this
# module at start-up, and it takes seconds to load.


def train_ensemble(recipe, splits, members, *, verbose="auto", log=print):
    """Fuse trained members into one model; returns (model, history).

    Raises:
        TrainError: the members were trained on other classes, or in another order.
    """
    import keras
    for member in members:
        if tuple(member["labels"]) != tuple(splits.class_names):
            raise TrainError(f"member {member['name']} ({member['recipe']}) knows the classes "
                             f"{', '.join(member['labels'])}; the ensemble {recipe.name} "
                             f"({recipe.path}) has {', '.join(splits.class_names)}: members "
                             "must share the classes and their order")
    keras.utils.set_random_seed(recipe.seed)
    models = [load_model(member["model"]) for member in members]
    inputs = keras.Input((*recipe.data.image_size, 3), name="image", dtype="float32")
    branches = [_resize(inputs, model, index) for index, model in enumerate(models)]
    fusion = recipe.ensemble.fusion
    phases, weights = [], None
    if fusion == "mean":
        outputs = keras.layers.Average(name="probabilities")(
            [model(x) for model, x in zip(models, branches)])
    elif fusion == "weighted":
        if not len(splits.y_val):
            raise TrainError("fusion = \"weighted\" fits its weights on the validation split, "
                             "which is empty; set data.val_fraction > 0")
        probabilities = keras.Model(inputs, [m(x) for m, x in zip(models, branches)])
        val = predict_in_batches(probabilities, splits.x_val)
        weights = fit_weights(val, splits.y_val)
        log("fusion weights (fitted on the validation split): "
            + ", ".join(f"{m['name']} {w:.3f}" for m, w in zip(members, weights)))
        scaled = [keras.layers.Rescaling(float(w), name=f"weight_{index}")(model(x))
                  for index, (w, model, x) in enumerate(zip(weights, models, branches))]
        outputs = keras.layers.Add(name="probabilities")(scaled)
    else:
        outputs, phases = _concat(recipe, splits, models, inputs, branches, verbose, log)
    fused = keras.Model(inputs, outputs, name=recipe.name.replace(".", "_"))
    accuracy = evaluate(fused, splits.x_test, splits.y_test)
    names = ", ".join(member["name"] for member in members)
    history = {"phases": [dataclasses.asdict(phase) for phase in phases],
               "verdict": {"kept": fusion, "regressed": False, "message": ""},
               "backbone": f"ensemble ({names})", "pretrained": True,
               "test_accuracy": accuracy, "distribute": "none", "devices": 1,
               "ensemble": {"fusion": fusion, "members": members,
                            "weights": None if weights is None else [float(w) for w in weights],
                            "member_test_accuracy_in_graph": [
                                evaluate(keras.Model(inputs, model(x)), splits.x_test,
                                         splits.y_test) for model, x in zip(models, branches)]}}
    return fused, history


def _resize(inputs, model, index):
    import keras
    size = tuple(model.input_shape[1:3])
    if size == tuple(inputs.shape[1:3]):
        return inputs
    # the ensemble's images are loaded at its own size; each member sees its training size
    return keras.layers.Resizing(*size, interpolation="bilinear", name=f"resize_{index}")(inputs)


def fit_weights(probabilities, labels, *, steps=2000, rate=0.5) -> np.ndarray:
    """Mixture weights (on the simplex) that maximize the likelihood of `labels`.

    Exponentiated gradient on the mean negative log-likelihood of `sum_k w_k p_k`, a convex
    problem; deterministic. `probabilities` is one [N, classes] array per member.
    """
    stacked = np.stack(probabilities).astype(np.float64)  # [members, N, classes]
    chosen = stacked[:, np.arange(len(labels)), labels]  # [members, N]
    weights = np.full(len(probabilities), 1.0 / len(probabilities))
    for _ in range(steps):
        mixture = np.clip(weights @ chosen, 1e-12, None)
        gradient = -(chosen / mixture).mean(axis=1)
        weights = weights * np.exp(-rate * (gradient - gradient.min()))
        weights /= weights.sum()
    return weights


def _concat(recipe, splits, models, inputs, branches, verbose, log):
    """A new head on the members' concatenated pooled features, members frozen."""
    import keras
    settings = recipe.ensemble.concat
    for model in models:
        model.trainable = False
    features = keras.layers.Concatenate(name="features")(
        [feature_extractor(model, name=f"features_{index}")(x, training=False)
         for index, (model, x) in enumerate(zip(models, branches))])
    dropout = keras.layers.Dropout(settings.dropout, name="dropout")
    dense = keras.layers.Dense(splits.num_classes, activation="softmax", name="probabilities",
                               dtype="float32")
    outputs = dense(dropout(features))
    # the members are frozen: their features are computed once, the head trains on them
    extractor = keras.Model(inputs, features)
    train_features = compute_features(extractor, splits.x_train)
    val_features = compute_features(extractor, splits.x_val)
    head_inputs = keras.Input((train_features.shape[1],))
    head = keras.Model(head_inputs, dense(dropout(head_inputs)))
    batch = recipe.data.batch_size
    steps = steps_per_epoch(len(splits.y_train), batch)

    def data(x_train, x_val):
        return (training_batches(splits, x_train, batch_size=batch, seed=recipe.seed),
                validation_batches(splits, x_val, batch_size=batch, seed=recipe.seed))
    head_phase = PhaseRecipe(epochs=settings.epochs, learning_rate=settings.learning_rate)
    phases = [fit_phase(head, "concat_head", head_phase, *data(train_features, val_features),
                        train_count=len(splits.y_train), steps_per_epoch=steps,
                        verbose=verbose)]
    phases[0].bottlenecks = "computed"
    if settings.fine_tune_epochs:
        fused = keras.Model(inputs, outputs)
        for model in models:
            model.trainable = True
            for layer in _all_layers(model):  # backbones are nested models
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False
        tune = PhaseRecipe(epochs=settings.fine_tune_epochs,
                           learning_rate=settings.fine_tune_learning_rate)
        phases.append(fit_phase(fused, "concat_fine_tune", tune,
                                *data(splits.x_train, splits.x_val),
                                train_count=len(splits.y_train), steps_per_epoch=steps,
                                initial_epoch=settings.epochs, verbose=verbose))
    log(f"concat head: best validation accuracy {phases[-1].best_val_accuracy:.3f}")
    return outputs, phases


def _all_layers(model):
    """Every layer of a model, nested models' layers included."""
    import keras
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
