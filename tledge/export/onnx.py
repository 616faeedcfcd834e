"""ONNX export through tf2onnx, with real tensor names and a dynamic batch dimension."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from tledge.errors import ExportError, first_line
from tledge.export.tflite import pinned_calibration
from tledge.model import INPUT_NAME, OUTPUT_NAME, task_outputs

# TensorFlow, tf2onnx, onnx and ONNX Runtime are imported inside the functions that use them: the CLI imports this
# module at start-up, and they take seconds to load.

OPSET = 17


def export_onnx(model, path, *, precision: str, calibration=None, settings=None,
                tasks=None) -> dict:
    """Convert a Keras model to ONNX at `path`.

    The input is named `image` with shape [batch, H, W, 3] (batch dynamic) and the output
    `probabilities`; tf2onnx's own names (`unk__NNN`, `output_0`) are replaced. Input and
    output stay float32 at every precision:
    - fp32: as converted;
    - fp16: float16 weights and compute (onnxruntime's converter, float32 I/O kept);
    - int8: static QDQ quantization calibrated on `calibration` (the same training images as
      TFLite int8), as `settings` says (`INT8_DEFAULTS`: per-channel int8 weights, uint8
      activations, min-max ranges; `tledge.export.int8` searches other settings).

    Returns:
        The input and output tensor specs, read back from the written file.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"unknown ONNX precision {precision!r}")
    if precision == "int8" and (calibration is None or len(calibration) == 0):
        raise ExportError("int8 export needs calibration images from the training split")
    import onnx
    proto = float_proto(model, tasks)
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        proto = convert_float_to_float16(proto, keep_io_types=True)
        _sort_topologically(proto.graph)  # the converter appends the input's cast at the end
    if precision == "int8":
        with tempfile.TemporaryDirectory(prefix="tledge-onnx-") as folder:
            prepared = prepare_for_quantization(proto, folder)
            quantize(prepared, path, calibration, settings)
        proto = onnx.load(str(path))
    onnx.save(_only_used_opsets(proto), str(path))
    return onnx_spec(path, task_outputs(model, tasks))


def _sort_topologically(graph) -> None:
    """Order `graph`'s nodes so that each comes after the nodes whose outputs it reads, as
    the ONNX standard requires (`onnx.checker.check_model(full_check=True)` and stricter
    consumers refuse a graph that is not; ONNX Runtime and OpenVINO sort it themselves).
    Nodes already in order keep it."""
    known = {tensor.name for tensor in graph.input} | \
        {tensor.name for tensor in graph.initializer} | {""}
    waiting, ordered = list(graph.node), []
    while waiting:
        ready = [node for node in waiting if all(name in known for name in node.input)]
        if not ready:  # a cycle, or a name nothing produces: leave the rest as it was
            ordered += waiting
            break
        for node in ready:
            known.update(node.output)
        ordered += ready
        taken = {id(node) for node in ready}
        waiting = [node for node in waiting if id(node) not in taken]
    copies = [type(node)() for node in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def float_proto(model, tasks=None):
    """The Keras model as a checked float32 ONNX graph with the contract's tensor names (a
    multi-task model's outputs named after its `tasks`, in task order)."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    height, width = model.input_shape[1:3]
    signature = [tf.TensorSpec([None, height, width, 3], tf.float32, name=INPUT_NAME)]

    names = task_outputs(model, tasks) or [OUTPUT_NAME]

    @tf.function(input_signature=signature)
    def serve(image):
        outputs = model(image, training=False)
        return dict(zip(names, outputs if isinstance(outputs, (list, tuple)) else [outputs]))

    try:
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature,
                                                 opset=OPSET)
    except Exception as error:  # tf2onnx raises assorted errors on unsupported graphs
        raise ExportError(f"ONNX conversion failed: {first_line(error)}") from None
    _rename(proto, names)
    onnx.checker.check_model(proto)
    return proto


def _only_used_opsets(proto):
    """Drop opset imports no node uses (tf2onnx declares ai.onnx.ml, the quantizer a row of
    Microsoft and training domains): a runtime that does not know a declared domain may
    refuse the whole file."""
    import onnx

    def domains(graph):
        for node in graph.node:
            yield node.domain
            for attribute in node.attribute:  # the bodies of If and Loop nodes
                if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    for body in [attribute.g, *attribute.graphs]:
                        yield from domains(body)
    used = set(domains(proto.graph)) | {""}
    kept = [entry for entry in proto.opset_import if entry.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto


# The settings of a plain int8 export; `tledge.export.int8` tries others when parity fails
INT8_DEFAULTS = {"method": "minmax", "per_channel": True, "activations": "uint8",
                 "reduce_range": False, "float_nodes": []}
_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def prepare_for_quantization(proto, folder) -> Path:
    """The float graph as quantization starts from it (shapes inferred, batch norms folded),
    saved in `folder`; node names in `float_nodes` settings are this graph's."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process
    float_path, prepared = Path(folder) / "float.onnx", Path(folder) / "prepared.onnx"
    onnx.save(proto, str(float_path))
    try:
        quant_pre_process(str(float_path), str(prepared))
    except Exception:  # symbolic shape inference is optional; quantization still works
        return float_path
    return prepared


class _Images:
    """Calibration images fed one at a time, pinned to the full 0-255 input range."""

    def __init__(self, images, pin=True):
        images = pinned_calibration(images) if pin else np.asarray(images, np.float32)
        self._images = iter(images)

    def get_next(self):
        image = next(self._images, None)
        return None if image is None else {INPUT_NAME: image[None]}

    def __iter__(self):  # ONNX Runtime's debugging helpers iterate the reader
        return self

    def __next__(self):
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch


def quantize(prepared, path, calibration, settings=None) -> None:
    """QDQ int8 of the prepared float graph at `path`, calibrated on training images."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)
    chosen = {**INT8_DEFAULTS, **(settings or {})}
    chosen.pop("calibration_samples", None)  # the caller chose the images already
    unknown = set(chosen) - set(INT8_DEFAULTS)
    if unknown or chosen["method"] not in _METHODS or \
            chosen["activations"] not in ("uint8", "int8"):
        raise ExportError(f"unknown ONNX int8 settings {settings!r}")

    class Reader(_Images, CalibrationDataReader):
        pass

    try:
        quantize_static(str(prepared), str(path), Reader(calibration),
                        quant_format=QuantFormat.QDQ, per_channel=chosen["per_channel"],
                        reduce_range=chosen["reduce_range"],
                        activation_type=QuantType.QUInt8 if chosen["activations"] == "uint8"
                        else QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod,
                                                 _METHODS[chosen["method"]]),
                        nodes_to_exclude=list(chosen["float_nodes"]))
    except Exception as error:
        raise ExportError(f"ONNX int8 quantization failed: {first_line(error)}") from None


def _rename(proto, names) -> None:
    """Give the graph's input and outputs their contract names and a `batch` dim; several
    outputs (one per task, already named after it by tf2onnx) are put in task order."""
    graph = proto.graph
    renames = {graph.input[0].name: INPUT_NAME}
    if names == [OUTPUT_NAME]:
        renames[graph.output[0].name] = OUTPUT_NAME
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    outputs = sorted(graph.output, key=lambda value: names.index(renames.get(value.name,
                                                                             value.name)))
    ordered = [type(value)() for value in outputs]
    for copy, value in zip(ordered, outputs):
        copy.CopyFrom(value)
    del graph.output[:]
    graph.output.extend(ordered)
    for value in (graph.input[0], *graph.output):
        value.name = renames.get(value.name, value.name)
        value.type.tensor_type.shape.dim[0].dim_param = "batch"


def onnx_spec(path, tasks=None) -> dict:
    """Input and output specs of an .onnx file; with `tasks` (output names in task order) the
    output is a list of specs in that order, else the first output's."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)

    def spec(value):
        tensor = value.type.tensor_type
        shape = [dim.dim_param or dim.dim_value for dim in tensor.shape.dim]
        return {"name": value.name, "shape": [-1 if isinstance(d, str) else d for d in shape],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name}
    outputs = {value.name: spec(value) for value in model.graph.output}
    if not tasks:
        return {"input": spec(model.graph.input[0]), "output": spec(model.graph.output[0])}
    missing = [name for name in tasks if name not in outputs]
    if missing:
        raise ExportError(f"{path}: has no output {', '.join(missing)}")
    return {"input": spec(model.graph.input[0]), "output": [outputs[name] for name in tasks]}

