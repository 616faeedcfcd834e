"""Where training runs: one device, `tf.distribute` strategies, mixed precision.

Past one machine tledge uses TensorFlow's own strategies, never a home-made scheduler:
`mirrored` (every GPU, or every logical CPU, of this machine) and `multi_worker`
(MultiWorkerMirroredStrategy, configured by the TF_CONFIG environment variable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings

from tledge.errors import TrainError

# TensorFlow and Keras are imported inside the functions that use them: the CLI imports this
# module at start-up, and they take seconds to load.


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


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    count: int   # workers training together (1 without multi_worker)
    index: int   # this worker's place among them; the chief is 0
    chief: bool  # only the chief writes the run directory


def worker_role(train) -> WorkerRole:
    """Which worker of a multi_worker cluster this process is, from TF_CONFIG.

    MultiWorkerMirroredStrategy's convention: a "chief" task when the cluster has one, else
    worker 0, is the chief; the chief counts first.
    """
    if train.distribute != "multi_worker":
        return WorkerRole(1, 0, True)
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        cluster, task = config.get("cluster", {}), config.get("task", {})
        chiefs, workers = len(cluster.get("chief", [])), len(cluster.get("worker", []))
        kind, number = task.get("type", "worker"), int(task.get("index", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return WorkerRole(1, 0, True)  # strategy_for reports a broken TF_CONFIG
    if kind == "chief":
        return WorkerRole(chiefs + workers, 0, True)
    index = chiefs + number
    return WorkerRole(chiefs + workers, index, index == 0)


def per_worker_input(strategy, make, batch_size):
    """The training input under `strategy`.

    Under multi_worker every worker builds its own input, `make(per-replica batch size,
    (shards, this shard))`, reading only its shard of the training rows rather than every
    worker reading everything and dropping what is not its own (the loop in
    `tledge.train.multi_worker` consumes it). Elsewhere `make(batch_size, None)`, for `model.fit`.
    """
    import tensorflow as tf
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return make(batch_size, None)

    def build(context):
        return make(context.get_per_replica_batch_size(batch_size),
                    (context.num_input_pipelines, context.input_pipeline_id))
    return strategy.distribute_datasets_from_function(build)


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
