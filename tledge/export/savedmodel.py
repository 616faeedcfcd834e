"""TensorFlow SavedModel export: a folder with a `serve` signature (TF Serving, TF.js, TF-TRT)."""

from __future__ import annotations

from tledge.errors import ExportError, first_line
from tledge.model import INPUT_NAME, OUTPUT_NAME, task_outputs

# TensorFlow is imported inside the functions that use it: the CLI imports this
# module at start-up, and it takes seconds to load.


def export_savedmodel(model, path, *, precision: str, calibration=None, tasks=None) -> dict:
    """Write the model as a SavedModel folder at `path` (float32: [batch, H, W, 3] in)."""
    if precision != "fp32":
        raise ExportError(f"unknown SavedModel precision {precision!r}")
    import tensorflow as tf
    height, width = model.input_shape[1:3]
    signature = tf.TensorSpec([None, height, width, 3], tf.float32, name=INPUT_NAME)
    names = task_outputs(model, tasks)
    try:
        if names:  # a multi-task model: `serve` returns {task: probabilities}, by name
            import keras

            def serve(image):
                outputs = model(image, training=False)
                return dict(zip(names, outputs if isinstance(outputs, (list, tuple))
                                else [outputs]))
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint(name="serve", fn=serve, input_signature=[signature])
            archive.write_out(str(path), verbose=False)
        else:
            model.export(str(path), format="tf_saved_model", input_signature=[signature],
                         verbose=False)
    except Exception as error:
        raise ExportError(f"SavedModel export failed: {first_line(error)}") from None
    spec = {"shape": [-1, height, width, 3], "dtype": "float32", "name": INPUT_NAME}
    if names:  # a multi-task model: its `serve` returns its outputs
        return {"input": spec, "output": [
            {"name": name, "shape": [-1, int(output.shape[-1])], "dtype": "float32"}
            for name, output in zip(names, model.outputs)]}
    classes = model.output_shape[-1]
    return {"input": spec, "output": {"name": OUTPUT_NAME, "shape": [-1, classes],
                                      "dtype": "float32"}}
