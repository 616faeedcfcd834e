"""TFLite export: float32, and full integer with uint8 input and output."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np

from tledge.errors import ExportError, first_line
from tledge.model import task_outputs, written_size

# TensorFlow and LiteRT are imported inside the functions that use them: the CLI imports this
# module at start-up, and they take seconds to load.


INT8_IO = ("uint8", "int8", "float32")


def export_tflite(model, path, *, precision: str, calibration=None, int8_io="uint8",
                  settings=None, tasks=None) -> dict:
    """Convert a Keras model to a .tflite file at `path`.

    Args:
        model: the trained Keras classifier (raw 0-255 pixels in, probabilities out).
        path: where to write the flatbuffer.
        precision: "fp32"; "fp16" (float16 weights); "dynamic" (int8 weights, float
            activations, no calibration); "int8" (full integer).
        calibration: uint8 images [N, H, W, 3] from the training split; required for int8.
        int8_io: the int8 model's input and output type: "uint8" (raw pixel bytes in),
            "int8", or "float32" (quantize and dequantize inside the model).
        settings: int8 only: `{"float_layers": [tensor names]}` keeps those layers in float
            (selective quantization, as `tledge.export.int8` chooses them); input and
            output keep the `int8_io` type.
        tasks: a multi-task model's task names, in output order (the run's manifest).

    Returns:
        The input and output tensor specs, read back from the written file.
    """
    float_layers = list((settings or {}).get("float_layers") or [])
    converter = int8_converter(model, calibration, int8_io) if precision == "int8" \
        else _converter(model, precision)
    try:
        if float_layers:
            flatbuffer = _selective(converter, calibration, float_layers, int8_io)
        else:
            flatbuffer = converter.convert()
    except Exception as error:  # the converter raises ConverterError and plain Exceptions
        raise ExportError(f"TFLite {precision} conversion failed: {first_line(error)}"
                          + temporary_space_note(model)) from None
    with open(path, "wb") as handle:
        handle.write(flatbuffer)
    spec = tflite_spec(path, tasks=task_outputs(model, tasks))
    outputs = spec["output"] if isinstance(spec["output"], list) else [spec["output"]]
    dtypes = [spec["input"]["dtype"], *(output["dtype"] for output in outputs)]
    if precision == "int8" and set(dtypes) != {int8_io}:
        kept = f"{len(float_layers)} layer(s)" if float_layers else "no layer"
        raise ExportError(f"keeping {kept} in float left the model's input or output "
                          f"{'/'.join(dtypes)}, not {int8_io} as export.int8_io says")
    return spec


def temporary_space_note(model) -> str:
    """Why a conversion may have failed where the temporary folder is short of space: the
    converter saves the model there first, and its error does not say so (with Keras 3 a full
    disk surfaces as "'NoneType' object is not callable")."""
    folder = tempfile.gettempdir()
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    needed = 2 * written_size(model)
    if free >= needed:
        return ""
    return (f"; the temporary folder {folder} has {free / 2**20:,.1f} MiB free, and the "
            f"converter writes the model there first (about {needed / 2**20:,.1f} MiB): free "
            "space there, or point TMPDIR at another folder")


def _converter(model, precision):
    import tensorflow as tf
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no data: dynamic range
    elif precision != "fp32":
        raise ExportError(f"unknown TFLite precision {precision!r}")
    return converter


def int8_converter(model, calibration, int8_io="uint8"):
    """A full-integer converter calibrated on `calibration` (training images)."""
    import tensorflow as tf
    if calibration is None or len(calibration) == 0:
        raise ExportError("int8 export needs calibration images from the training split")
    if int8_io not in INT8_IO:
        raise ExportError(f"int8 I/O must be one of {', '.join(INT8_IO)}, not {int8_io!r}")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative(calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_io != "float32":
        converter.inference_input_type = getattr(tf, int8_io)
        converter.inference_output_type = getattr(tf, int8_io)
    return converter


def _selective(converter, calibration, float_layers, int8_io) -> bytes:
    """Full integer except `float_layers`, through TFLite's quantization debugger (its
    denylist is the supported way to keep chosen layers in float)."""
    import tensorflow as tf
    # the kept layers run on float kernels; the model's input and output stay integer
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                           tf.lite.OpsSet.TFLITE_BUILTINS]
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=float_layers)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=_representative(calibration[:1]),
        debug_options=options)
    flatbuffer = debugger.get_nondebug_quantized_model()  # float I/O around the int8 graph
    if int8_io == "float32":
        return flatbuffer
    # the debugger has no I/O type option; the converter's own step sets it (uint8 input at
    # scale 1, zero point 0, as the plain int8 export has)
    from tensorflow.lite.python.util import modify_model_io_type
    return modify_model_io_type(flatbuffer, getattr(tf, int8_io), getattr(tf, int8_io))


def _representative(calibration):
    """Calibration batches of one image, as float pixels pinned to the full 0-255 range."""
    images = pinned_calibration(calibration)

    def generate():
        for image in images:
            yield [image[None]]
    return generate


def pinned_calibration(calibration):
    """Calibration images as float32, the first carrying one pixel at 0 and one at 255.

    The calibrated input range is then exactly [0, 255]: a uint8 input gets scale 1 and zero
    point 0 (it takes raw pixel bytes, as the input contract says), and no format clips a
    real pixel the calibration set happened not to contain. TFLite and ONNX int8 both use it.
    """
    images = np.array(calibration, dtype=np.float32)
    images[0, 0, 0, :] = 0.0
    images[0, 0, 1, :] = 255.0
    return images


def tflite_spec(path, tasks=None) -> dict:
    """Input and output tensor specs of a .tflite file, quantization included.

    `tasks` (a multi-task model's output names, in order) makes "output" a list of specs in
    that order: found by the serving signature's output names, which are the task names once
    tledge's metadata named them and `output_0`, `output_1`... (the Keras output order) in
    the converter's file. Each spec's "name" is its tensor's, which the runners look up.
    """
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path))
    spec = {"input": _tensor_spec(interpreter.get_input_details()[0])}
    if not tasks:
        return {**spec, "output": _tensor_spec(interpreter.get_output_details()[0])}
    signature = interpreter.get_signature_runner().get_output_details()
    keys = list(tasks) if set(tasks) <= set(signature) else \
        [f"output_{index}" for index in range(len(tasks))]
    if not set(keys) <= set(signature):
        raise ExportError(f"{path}: its outputs {', '.join(sorted(signature))} are not the "
                          f"tasks {', '.join(tasks)}")
    details = {detail["index"]: detail for detail in interpreter.get_output_details()}
    return {**spec, "output": [_tensor_spec(details[signature[key]["index"]])
                               for key in keys]}


def _tensor_spec(detail) -> dict:
    spec = {"name": detail["name"], "shape": [int(d) for d in detail["shape_signature"]],
            "dtype": np.dtype(detail["dtype"]).name}
    scale, zero_point = detail["quantization"]
    if scale:
        spec["quantization"] = {"scale": float(scale), "zero_point": int(zero_point)}
    return spec

