"""Where training runs: one device, `tf.distribute` strategies, mixed precision.

Past one machine tledge uses TensorFlow's own strategies, never a home-made scheduler:
`mirrored` (every GPU, or every logical CPU, of this machine) and `multi_worker`
(MultiWorkerMirroredStrategy, configured by the TF_CONFIG environment variable).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings

from tledge.errors import TrainError


def strategy_for(train):
    """The tf.distribute strategy a `TrainRecipe` asks for (the default one for "none").

    Raises:
        TrainError: the machine does not have what the strategy needs.
    """
    import tensorflow as tf
    if train.distribute == "none":
        return tf.distribute.get_strategy()
    if train.distribute == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        if len(devices) < 2:
            raise TrainError("train.distribute = \"mirrored\" needs at least 2 devices (GPUs, or "
                             f"logical CPUs); this machine has {len(devices)}. Remove the key "
                             "to train on one device")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    config = os.environ.get("TF_CONFIG")
    if not config:
        raise TrainError("train.distribute = \"multi_worker\" needs the TF_CONFIG environment "
                         "variable (cluster and task of this worker); see "
                         "tf.distribute.MultiWorkerMirroredStrategy")
    try:
        json.loads(config)
    except json.JSONDecodeError as error:
        raise TrainError(f"TF_CONFIG is not valid JSON: {error}") from None
    return tf.distribute.MultiWorkerMirroredStrategy()


@contextlib.contextmanager
def precision(train):
    """Mixed float16 for the duration of training when the recipe asks; float32 after."""
    import keras
    if not train.mixed_precision:
        yield
        return
    import tensorflow as tf
    if not tf.config.list_physical_devices("GPU"):
        warnings.warn("train.mixed_precision = true on a machine without a GPU: float16 "
                      "compute runs, but slower than float32 on a CPU")
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
