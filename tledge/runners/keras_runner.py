"""Keras / TensorFlow runner: the model as one compiled tf.function.

`model.predict` costs ~100 ms of Python overhead per call on a small CPU, which would make
every latency figure a lie; a traced function runs the same graph without it.
"""

from __future__ import annotations

import os


from tledge.core.engines import concatenated
from tledge.errors import RuntimeUnavailable
from tledge.model import load_model
from tledge.runners import Runner

# TensorFlow is imported where it is used: a skipped row says when it is missing, and it
# takes seconds to import at CLI start-up.


def unavailable(device, loader=None) -> str | None:
    """Why TensorFlow cannot run on `device` here (None when it can)."""
    try:
        import tensorflow as tf
    except ImportError:
        return "tensorflow is not installed (pip install tensorflow)"
    if device != "gpu":
        return None
    return None if tf.config.list_physical_devices("GPU") else "TensorFlow sees no GPU"


class KerasRunner(Runner):
    runtime = "keras"

    def __init__(self, path, spec, threads, device):
        super().__init__(spec, threads, device)
        reason = unavailable(device)
        if reason:
            raise RuntimeUnavailable(reason)
        import tensorflow as tf
        if threads is not None:
            _set_threads(tf, threads)
        self._device = "/GPU:0" if device == "gpu" else "/CPU:0"
        with tf.device(self._device):
            self.model = load_model(path)
        model = self.model

        @tf.function(reduce_retracing=True)
        def call(images):
            return model(images, training=False)
        self._call = call
        self._tf = tf

    def _run(self, prepared):
        with self._tf.device(self._device):
            result = self._call(self._tf.constant(prepared))
        return concatenated([output.numpy() for output in result]) \
            if isinstance(result, (list, tuple)) else result.numpy()


def _set_threads(tf, threads):
    """Ask TensorFlow for `threads`; it fixes its thread pool once per process.

    Raises:
        RuntimeUnavailable: the pool is already fixed at another size in this process, so a
            row labelled with `threads` would describe something else.
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass
    effective = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
    if effective != threads:
        raise RuntimeUnavailable(f"TensorFlow's thread pool is already fixed at {effective} "
                                 f"threads in this process, not {threads}")


def load_keras(path, spec, *, threads=None, device="cpu") -> KerasRunner:
    return KerasRunner(path, spec, threads, device)


class SavedModelRunner(Runner):
    """A SavedModel's `serve` endpoint, called as a tf.function (no Keras involved)."""

    runtime = "tensorflow"

    def __init__(self, path, spec, threads, device):
        super().__init__(spec, threads, device)
        import tensorflow as tf
        if threads is not None:
            _set_threads(tf, threads)
        self._tf = tf
        self._loaded = tf.saved_model.load(str(path))  # keeps the variables alive
        self._serve = self._loaded.serve

    def _run(self, prepared):
        result = self._serve(self._tf.constant(prepared))
        if isinstance(result, dict):  # several outputs, by name: put in task order
            return concatenated([result[name].numpy() for name in self.outputs])
        if isinstance(result, (list, tuple)):  # several outputs, in the model's order
            return concatenated([output.numpy() for output in result])
        return result.numpy()


def load_savedmodel(path, spec, *, threads=None, device="cpu") -> SavedModelRunner:
    return SavedModelRunner(path, spec, threads, device)
