"""The classifier graph and where its backbone weights come from.

Every tledge model has one input, `image`: raw pixels [batch, H, W, 3] valued 0-255, and
one output, `probabilities` (a multi-task model: one output per task, named after it, in
task order; see `tledge.tasks`). The backbone's preprocessing is a layer inside the graph (the
input contract of docs/architecture.md), so no artifact needs to be fed differently.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from tledge.backbones import BACKBONES, Backbone
from tledge.errors import RunDirError, WeightsError, first_line
from tledge.rundir import read_manifest

# TensorFlow and Keras are imported inside the functions that use them: the CLI imports this
# module at start-up, and they take seconds to load.

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


def keras_cache_dir() -> Path:
    """Where keras.applications and keras.datasets look for downloaded files."""
    try:
        from keras.src.backend.config import keras_home
        return Path(keras_home())
    except ImportError:  # keras moved its private accessor; use its documented rule
        return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


def build_backbone(recipe, weights_file=None):
    """The recipe's backbone, with its weights loaded.

    Args:
        recipe: the resolved recipe.
        weights_file: a .keras file whose backbone supplies the weights, when the recipe's
            weights name another recipe (the caller has built that recipe first).

    Raises:
        WeightsError: weights cannot be downloaded, read, or do not fit this backbone.
    """
    backbone = BACKBONES[recipe.model.backbone]
    weights = recipe.model.weights
    size, alpha = recipe.data.image_size, recipe.model.alpha
    if weights == "imagenet":
        return _imagenet(backbone, size, alpha)
    if weights == "none":
        return backbone.create(size, weights=None, alpha=alpha)
    path = Path(weights_file or weights)
    if path.suffix == ".keras":
        return _from_keras_file(backbone, path, size, alpha)
    try:
        # keras.applications reads both its own legacy .h5 downloads and .weights.h5 files
        return backbone.create(size, weights=str(path), alpha=alpha)
    except (ValueError, OSError, KeyError) as error:
        raise WeightsError(f"{path} does not fit backbone '{backbone.name}': "
                           f"{first_line(error)}") from None


def _imagenet(backbone: Backbone, size, alpha):
    if backbone.imagenet_file is None:
        raise WeightsError(f"'{backbone.name}' has no ImageNet weights; use weights = \"none\", "
                           "a weights file or a recipe")
    try:
        return backbone.create(size, weights="imagenet", alpha=alpha)
    except Exception as error:  # keras raises a bare Exception on a failed download
        if "URL fetch failure" not in str(error) and "urlopen" not in str(error).lower():
            raise
        name, url = backbone.imagenet_file(size, alpha)
        target = keras_cache_dir() / "models" / name
        raise WeightsError(
            f"cannot download ImageNet weights for '{backbone.name}' (no network?). Download "
            f"{url} on a machine with network and put it at {target} (or set model.weights "
            "to its path)") from None


def _from_keras_file(backbone: Backbone, path: Path, size, alpha):
    import keras
    source = load_model(path)
    nested = [layer for layer in source.layers if isinstance(layer, keras.Model)]
    source_backbone = nested[0] if len(nested) == 1 else source
    fresh = backbone.create(size, weights=None, alpha=alpha)
    source_weights = source_backbone.get_weights()
    fresh_weights = fresh.get_weights()
    first = next((index for index, (a, b) in enumerate(zip(source_weights, fresh_weights))
                  if a.shape != b.shape), None)
    if first is not None or len(source_weights) != len(fresh_weights):
        where = (f"first difference at {fresh.weights[first].path}: {fresh_weights[first].shape} "
                 f"expected, {source_weights[first].shape} in the file" if first is not None
                 else f"{len(source_weights)} weight tensors in the file, "
                      f"{len(fresh_weights)} expected")
        raise WeightsError(
            f"{path}: its backbone '{source_backbone.name}' does not match '{backbone.name}' "
            f"with alpha={alpha} ({where}); use a file made for this backbone")
    fresh.set_weights(source_weights)
    return fresh


def build_classifier(recipe, num_classes: int, backbone, tasks=()):
    """Raw pixels in, class probabilities out, with the backbone's preprocessing inside.

    A pretrained backbone is called in inference mode, so its BatchNorm statistics stay
    as they are in both training phases; a backbone trained from scratch is not. With
    `tasks` (`tledge.tasks.model_tasks`) the pooled features feed one softmax head per task.
    """
    import keras
    from keras import layers
    spec = BACKBONES[recipe.model.backbone]
    inputs = keras.Input((*recipe.data.image_size, 3), name=INPUT_NAME, dtype="float32")
    x = inputs
    preprocess = spec.preprocessing.layer(name="preprocess")
    if preprocess is not None:
        x = preprocess(x)
    x = backbone(x, training=False) if is_pretrained(recipe) else backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if recipe.model.dropout:
        x = layers.Dropout(recipe.model.dropout, name="dropout")(x)
    # float32 even under mixed precision: a float16 softmax loses small probabilities
    taken = [task["name"] for task in tasks if task["name"] == backbone.name]
    if taken:
        raise WeightsError(f"task '{taken[0]}' has the name of the backbone's model; every "
                           "output is named after its task, so rename the task")
    if tasks:
        outputs = [layers.Dense(len(task["labels"]), activation="softmax", name=task["name"],
                                dtype="float32")(x) for task in tasks]
    else:
        outputs = layers.Dense(num_classes, activation="softmax", name=OUTPUT_NAME,
                               dtype="float32")(x)
    return keras.Model(inputs, outputs, name=recipe.name.replace(".", "_"))


def task_outputs(model, tasks=None) -> list[str] | None:
    """The output names of a multi-task model, in order: the run's `tasks` (names) when it
    has them (a model of one task too: `train.compare_single_task`), else the model's own
    output names when it has several; None for a model with one output."""
    if tasks:
        return list(tasks)
    names = list(model.output_names)
    return names if len(names) > 1 else None


# Layer names of the classifier around the backbone: no task may take one as its name
RESERVED_NAMES = (INPUT_NAME, OUTPUT_NAME, "preprocess", "pool", "dropout")


def keep_head(model, source_path, class_names) -> None:
    """Give `model` the classification head of the trained model at `source_path`
    (`model.head = "keep"`): a few labelled images of a new domain then adapt a head that
    already knows the classes, instead of training one from nothing. Classes the source run
    lists in another order are put in this data's order.

    Raises:
        WeightsError: the source has other classes, or a head of another shape.
    """
    source_path = Path(source_path)
    source = load_model(source_path)
    labels = None
    try:
        labels = read_manifest(source_path.parent)["labels"]
    except RunDirError:  # a .keras file outside a run directory: its classes are not known
        pass
    head, theirs = model.get_layer(OUTPUT_NAME), source.get_layer(OUTPUT_NAME)
    kernel, bias = theirs.get_weights()
    if kernel.shape != tuple(head.kernel.shape):
        raise WeightsError(f"model.head = \"keep\": the head of {source_path} maps "
                           f"{kernel.shape[0]} features to {kernel.shape[1]} classes; this "
                           f"model needs {tuple(head.kernel.shape)} (another backbone, width "
                           f"or number of classes)")
    if labels is not None:
        if sorted(labels) != sorted(class_names):
            raise WeightsError(
                f"model.head = \"keep\": {source_path.parent.name} was trained on "
                f"{', '.join(labels)}; this data has {', '.join(class_names)}: the head can "
                "only be kept for the same classes (use model.head = \"new\")")
        order = [list(labels).index(name) for name in class_names]
        kernel, bias = kernel[:, order], bias[order]
    head.set_weights([kernel, bias])


def is_pretrained(recipe) -> bool:
    return recipe.model.weights != "none"


def predict_in_batches(model, images, batch=64):
    """A Keras model's outputs on uint8 images, in batches through one traced function.

    Returns one array, or a list of arrays for a model with several outputs. Never
    `model.predict`, whose per-call overhead dwarfs a small model's work.
    """
    import numpy as np
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def run(x):
        return model(x, training=False)
    parts = [run(tf.constant(images[start:start + batch], tf.float32))
             for start in range(0, len(images), batch)]
    outputs = model.outputs if isinstance(model.outputs, list) else [model.outputs]
    if not parts:
        empty = [np.zeros((0, *out.shape[1:]), np.float32) for out in outputs]
        return empty if len(outputs) > 1 else empty[0]
    if isinstance(parts[0], (list, tuple)):
        return [np.concatenate([np.asarray(part[index]) for part in parts])
                for index in range(len(parts[0]))]
    return np.concatenate([np.asarray(part) for part in parts])


def written_size(model) -> int:
    """About the bytes Keras writes for `model` (`save_weights` or `save`): its weights and its
    optimizer's state where it has one, plus HDF5's overhead per array and a margin."""
    import numpy as np
    variables = list(model.weights)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    arrays = sum(int(np.prod(variable.shape)) * np.dtype(variable.dtype).itemsize
                 for variable in variables)
    return int(arrays * 1.1) + 4096 * len(variables) + (256 << 10)


def find_backbone(model):
    """The backbone inside a tledge classifier: its one nested model."""
    import keras
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise WeightsError(f"model '{model.name}' has {len(nested)} nested models; "
                           "expected one backbone")
    return nested[0]


def load_model(path):
    """Load a .keras model without ever enabling unsafe deserialization.

    Raises:
        WeightsError: one line for every way the file can be unreadable: missing, truncated
            or not a zip (Keras itself says "File not found"), damaged inside, or a model
            that would run Python code stored in it.
    """
    import keras
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such .keras file")
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{path}: not a readable .keras model (not a zip archive: "
                           "truncated, damaged, or not saved by Keras 3)")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as error:
        if "arbitrary code" in str(error):  # keras' hint to pass safe_mode=False: never here
            raise WeightsError(f"{path}: refused: loading it would run Python code stored in "
                               "the file (a Lambda layer or custom object); tledge never "
                               "enables unsafe deserialization") from None
        raise WeightsError(f"{path}: not a readable .keras model ({first_line(error)})") \
            from None
    except Exception as error:  # a bad CRC, a missing config or weights entry, h5py's errors
        raise WeightsError(f"{path}: not a readable .keras model ({first_line(error)})") \
            from None

