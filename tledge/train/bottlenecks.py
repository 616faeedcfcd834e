"""Cached bottlenecks: the frozen backbone's pooled features, computed once.

While the backbone is frozen (feature extraction), every epoch would push the same images
through the same backbone. Instead the pooled features of the training and validation
images are computed once, stored under the run directory keyed by backbone, weights, input
size and data, and the head (dropout + softmax) trains on them. The head's weights then go
back into the full model, which is the same function: the backbone runs in inference mode
either way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tledge.model import predict_in_batches
from tledge.rundir import atomic_path, sha256

# Keras is imported inside the functions that use it: the CLI imports this
# module at start-up, and it takes seconds to load.

BATCH = 64


def weights_identity(recipe, weights_file=None) -> str:
    """What the backbone's weights are, as text that changes when they do."""
    source = weights_file or recipe.model.weights
    if source in ("imagenet", "none"):
        return source
    return f"{Path(source).name}:{sha256(source)}"


def bottleneck_key(recipe, splits, weights_file=None) -> str:
    parts = {"backbone": recipe.model.backbone, "alpha": recipe.model.alpha,
             "weights": weights_identity(recipe, weights_file),
             "image_size": list(recipe.data.image_size),
             "data": splits.record["fingerprint"]}
    text = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def feature_extractor(model, name="features"):
    """The classifier up to its pooled features (preprocessing and backbone included)."""
    import keras
    return keras.Model(model.inputs, model.get_layer("pool").output, name=name)


def compute_features(extractor, images, batch=BATCH) -> np.ndarray:
    return predict_in_batches(extractor, images, batch)


def cached_features(cache_dir, key, extractor, splits):
    """(train features, val features, "cached" | "computed"), reading or writing the cache."""
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return stored["train"], stored["val"], "cached"
    train = compute_features(extractor, splits.x_train)
    val = compute_features(extractor, splits.x_val)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, train=train, val=val)
    return train, val, "computed"


def head_model(model):
    """A model of the classifier's head alone (dropout + softmax, or a softmax per task),
    sharing its layers."""
    import keras
    width = model.get_layer("pool").output.shape[-1]
    inputs = keras.Input((width,), name="features")
    x = inputs
    if "dropout" in [layer.name for layer in model.layers]:
        x = model.get_layer("dropout")(x)
    outputs = [model.get_layer(name)(x) for name in model.output_names]  # a head per task
    return keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name="head")
