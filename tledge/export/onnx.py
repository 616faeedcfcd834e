"""ONNX export through tf2onnx, with real tensor names and a dynamic batch dimension."""

from __future__ import annotations

from tledge.errors import ExportError, first_line
from tledge.model import INPUT_NAME, OUTPUT_NAME

OPSET = 17


def export_onnx(model, path, *, precision: str) -> dict:
    """Convert a Keras model to ONNX at `path`.

    The input is named `image` with shape [batch, H, W, 3] (batch dynamic) and the output
    `probabilities`; tf2onnx's own names (`unk__NNN`, `output_0`) are replaced.

    Returns:
        The input and output tensor specs, read back from the written file.
    """
    if precision != "fp32":
        raise ExportError(f"unknown ONNX precision {precision!r}")
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
    onnx.save(proto, str(path))
    return onnx_spec(path)


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

