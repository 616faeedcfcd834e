"""ONNX export through tf2onnx, with real tensor names and a dynamic batch dimension."""

from __future__ import annotations

from tledge.errors import ExportError, first_line
from tledge.model import INPUT_NAME, OUTPUT_NAME

OPSET = 17


def export_onnx(model, path, *, precision: str, calibration=None) -> dict:
    """Convert a Keras model to ONNX at `path`.

    The input is named `image` with shape [batch, H, W, 3] (batch dynamic) and the output
    `probabilities`; tf2onnx's own names (`unk__NNN`, `output_0`) are replaced. Input and
    output stay float32 at every precision:
    - fp32: as converted;
    - fp16: float16 weights and compute (onnxruntime's converter, float32 I/O kept);
    - int8: static QDQ quantization, per channel, calibrated on `calibration` (the same
      training images as TFLite int8).

    Returns:
        The input and output tensor specs, read back from the written file.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"unknown ONNX precision {precision!r}")
    if precision == "int8" and (calibration is None or len(calibration) == 0):
        raise ExportError("int8 export needs calibration images from the training split")
    import onnx
    import tensorflow as tf
    import tf2onnx

    height, width = model.input_shape[1:3]
    signature = [tf.TensorSpec([None, height, width, 3], tf.float32, name=INPUT_NAME)]

    @tf.function(input_signature=signature)
    def serve(image):
        return {OUTPUT_NAME: model(image, training=False)}

    try:
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature,
                                                 opset=OPSET)
    except Exception as error:  # tf2onnx raises assorted errors on unsupported graphs
        raise ExportError(f"ONNX conversion failed: {first_line(error)}") from None
    _rename(proto)
    onnx.checker.check_model(proto)
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        proto = convert_float_to_float16(proto, keep_io_types=True)
    if precision == "int8":
        _quantize_static(proto, path, calibration)
        proto = onnx.load(str(path))
    onnx.save(_only_used_opsets(proto), str(path))
    return onnx_spec(path)


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


def _quantize_static(proto, path, calibration) -> None:
    """QDQ int8 with per-channel weights, calibrated on training images (min-max)."""
    import tempfile
    from pathlib import Path
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            from tledge.export.tflite import pinned_calibration
            self._images = iter(pinned_calibration(calibration))

        def get_next(self):
            image = next(self._images, None)
            return None if image is None else {INPUT_NAME: image[None]}

    with tempfile.TemporaryDirectory(prefix="tledge-onnx-") as folder:
        float_path, prepared = Path(folder) / "float.onnx", Path(folder) / "prepared.onnx"
        onnx.save(proto, str(float_path))
        try:
            quant_pre_process(str(float_path), str(prepared))
        except Exception:  # symbolic shape inference is optional; quantization still works
            prepared = float_path
        try:
            quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        except Exception as error:
            raise ExportError(f"ONNX int8 quantization failed: {first_line(error)}") from None


def _rename(proto) -> None:
    """Give the graph's single input and output their contract names and a `batch` dim."""
    graph = proto.graph
    renames = {graph.input[0].name: INPUT_NAME, graph.output[0].name: OUTPUT_NAME}
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    for value in (graph.input[0], graph.output[0]):
        value.name = renames[value.name]
        value.type.tensor_type.shape.dim[0].dim_param = "batch"


def onnx_spec(path) -> dict:
    import onnx
    model = onnx.load(str(path), load_external_data=False)

    def spec(value):
        tensor = value.type.tensor_type
        shape = [dim.dim_param or dim.dim_value for dim in tensor.shape.dim]
        return {"name": value.name, "shape": [-1 if isinstance(d, str) else d for d in shape],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name}
    return {"input": spec(model.graph.input[0]), "output": spec(model.graph.output[0])}

