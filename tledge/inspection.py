"""What an artifact file is, read from the file alone: `tledge inspect`.

Works on any .tflite, .onnx or .keras file, tledge's or not. The description doubles as a
manifest-like entry ("family", "path", "input", "output"), so
`tledge.runners.load(describe_file(path), path.parent)` runs the file in its real runtime.
"""

from __future__ import annotations

import collections
from pathlib import Path

from tledge.errors import ArtifactError, ExportError, first_line, TledgeError
from tledge.export import tflite_standard as standard
from tledge.export.metadata import read_metadata, tflite_metadata_entries
from tledge.export.onnx import onnx_spec
from tledge.export.openvino import ir_spec, read_ir
from tledge.export.tflite import tflite_spec
from tledge.model import load_model, task_outputs
from tledge.rundir import size_bytes

# TensorFlow and onnx are imported inside the functions that use them: the CLI imports this
# module at start-up, and they take seconds to load.

SUFFIXES = {".tflite": "tflite", ".onnx": "onnx", ".keras": "keras", ".xml": "openvino"}


def family_of(path: Path) -> str | None:
    """The artifact family of a path: by its suffix, or "openvino" for an IR folder."""
    if path.is_dir():
        return "openvino" if (path / "model.xml").is_file() else None
    return SUFFIXES.get(path.suffix.lower())

# Operators the TFLite XNNPACK delegate documents as supported (float and quantized lists
# together), from tensorflow/lite/delegates/xnnpack/README.md, "Limitations and supported
# operators", tensorflow/tensorflow at commit 66d227cd, read 2026-11-25, plus the operators
# the delegate's source handles beyond that README (listed last). Per-op conditions (fused
# activations, static weights, 4D shapes) are not checked, so an operator in the set can
# still stay on the CPU kernels for a particular model.
XNNPACK_OPS = frozenset({
    "ABS", "ADD", "AVERAGE_POOL_2D", "CEIL", "CONV_2D", "DEPTH_TO_SPACE",
    "DEPTHWISE_CONV_2D", "DIV", "ELU", "FULLY_CONNECTED", "FLOOR", "HARD_SWISH",
    "LEAKY_RELU", "LOGISTIC", "MAX_POOL_2D", "MAXIMUM", "MEAN", "MINIMUM", "MUL", "NEG",
    "PAD", "PRELU", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR", "ROUND",
    "SOFTMAX", "SQRT", "SQUARE", "SQUARED_DIFFERENCE", "SUB",
    # handled by the delegate's own source (xnnpack_delegate.cc, VisitNode) in the TF 2.15+
    # line but missing from that README's list
    "BATCH_MATMUL", "CONCATENATION", "DEQUANTIZE", "GELU", "QUANTIZE", "RSQRT", "SLICE",
    "SPACE_TO_DEPTH", "SPLIT", "STRIDED_SLICE", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
})

_QUANTIZED_ONNX_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                       "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}


def describe_file(path) -> dict:
    """Describe one artifact file: format, precision, tensors, operators, size, metadata.

    Returns:
        A dict with "family" (tflite, onnx or keras), "path" (file name, relative to its
        folder), "file", "size_bytes",
        "precision", "input", "output" (specs as in the manifest), "operators" (name -> count),
        "metadata" (embedded tledge metadata or None), "labels" (or None) and, for TFLite,
        "not_on_xnnpack" (operator names outside XNNPACK_OPS).

    Raises:
        ArtifactError: the file is missing, of an unknown kind, or cannot be read; a .keras
            file that needs unsafe deserialization is refused.
    """
    path = Path(path)
    family = family_of(path)
    if family is None:
        raise ArtifactError(f"{path}: unknown artifact kind {path.suffix or '(no suffix)'!r}; "
                            f"tledge reads {', '.join(SUFFIXES)} files and OpenVINO IR folders")
    if not path.exists():
        raise ArtifactError(f"{path}: no such artifact file")
    try:
        metadata, unreadable = read_metadata(path), None
    except ArtifactError as error:  # the file's own reader says what is wrong first
        metadata, unreadable = None, error
    tasks = (metadata or {}).get("tasks") or None  # a multi-task model's outputs, in order
    if tasks is not None and not _tasks_readable(tasks):
        raise ArtifactError(f"{path}: its embedded metadata lists tasks tledge does not write "
                            "(each needs a name and a list of labels); export it again")
    described = {"tflite": _describe_tflite, "onnx": _describe_onnx, "keras": _describe_keras,
                 "openvino": _describe_openvino}[family](path, tasks)
    if unreadable is not None:
        raise unreadable
    if metadata and metadata.get("precision"):
        described["precision"] = metadata["precision"]
    return {"family": family, "path": path.name, "file": str(path),
            "size_bytes": size_bytes(path), **described, "metadata": metadata,
            "labels": list(metadata["labels"]) if metadata and metadata.get("labels")
            else (described.get("standard_metadata") or {}).get("labels"),
            **({"tasks": tasks} if tasks else {})}


def _tasks_readable(tasks) -> bool:
    return isinstance(tasks, list) and all(
        isinstance(task, dict) and isinstance(task.get("name"), str)
        and isinstance(task.get("labels"), list) and task["labels"]
        and all(isinstance(label, str) for label in task["labels"]) for task in tasks)


def _describe_tflite(path: Path, tasks=None) -> dict:
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.python.schema_util import get_builtin_code_from_operator_code

    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ArtifactError(f"{path}: not a TFLite flatbuffer (no TFL3 identifier)")
    try:
        spec = tflite_spec(path, tasks=[task["name"] for task in tasks] if tasks else None)
    except (ValueError, RuntimeError, ExportError) as error:
        raise ArtifactError(f"{path}: LiteRT cannot load it ({first_line(error)})") from None
    model = schema.Model.GetRootAs(data, 0)
    builtin_names = {value: name for name, value in vars(schema.BuiltinOperator).items()
                     if not name.startswith("_")}
    operators = collections.Counter()
    weight_types = set()
    for index in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(index)
        for position in range(subgraph.OperatorsLength()):
            code = model.OperatorCodes(subgraph.Operators(position).OpcodeIndex())
            builtin = get_builtin_code_from_operator_code(code)
            if builtin == schema.BuiltinOperator.CUSTOM:
                name = f"CUSTOM:{(code.CustomCode() or b'?').decode('utf-8', 'replace')}"
            else:
                name = builtin_names.get(builtin, f"BUILTIN_{builtin}")
            operators[name] += 1
        for position in range(subgraph.TensorsLength()):
            tensor = subgraph.Tensors(position)
            buffer = model.Buffers(tensor.Buffer())
            if buffer is not None and (buffer.DataLength() or buffer.Offset() > 1):
                weight_types.add(tensor.Type())  # a constant: weights, biases, shapes
    types = schema.TensorType
    if spec["input"]["dtype"] in ("int8", "uint8") or "QUANTIZE" in operators:
        precision = "int8"  # full integer, with integer or float (quantized inside) I/O
    elif types.FLOAT16 in weight_types:
        precision = "fp16"
    elif types.INT8 in weight_types:
        precision = "dynamic"  # int8 weights, float activations: dynamic-range quantization
    else:
        precision = "fp32"
    return {"precision": precision, **spec, "operators": dict(operators.most_common()),
            "not_on_xnnpack": sorted(name for name in operators if name not in XNNPACK_OPS),
            "standard_metadata": _standard_metadata(path, data)}


def _standard_metadata(path: Path, data: bytes) -> dict | None:
    """The TFLite Model Metadata (what MediaPipe reads) and its labels file, if the model
    has them; None when it has none."""
    raw = tflite_metadata_entries(path).get(standard.ENTRY)
    if raw is None:
        return None
    try:
        facts = standard.read_model_metadata(raw)
    except (ValueError, IndexError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path}: its TFLITE_METADATA entry is not readable "
                            f"({first_line(error)})") from None
    files = standard.associated_files(data)

    def labels(output):
        named = [item["name"] for item in output.get("associated_files", [])
                 if item["type"] == 2]  # TENSOR_AXIS_LABELS
        text = files.get(named[0], b"").decode("utf-8", "replace") if named else ""
        return ([line for line in text.splitlines() if line] if named else None,
                named[0] if named else None)
    found = [labels(output) for output in facts["outputs"]] or [(None, None)]
    facts["labels"], facts["labels_file"] = found[0]
    if len(facts["outputs"]) > 1:  # a multi-task model: a labels file per output
        facts["output_labels"] = {output["name"]: {"labels": names, "labels_file": file}
                                  for output, (names, file) in zip(facts["outputs"], found)}
    return facts


def _describe_onnx(path: Path, tasks=None) -> dict:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        spec = onnx_spec(path)
    except Exception as error:  # protobuf's DecodeError, an empty graph's IndexError
        raise ArtifactError(f"{path}: not a readable ONNX model ({first_line(error)})") \
            from None
    operators = collections.Counter(node.op_type for node in model.graph.node)
    initializer_types = {tensor.data_type for tensor in model.graph.initializer}
    kinds = onnx.TensorProto
    if spec["input"]["dtype"] in ("int8", "uint8") or _QUANTIZED_ONNX_OPS & set(operators) \
            or {kinds.INT8, kinds.UINT8} & initializer_types:
        precision = "int8"
    elif kinds.FLOAT16 in initializer_types:
        precision = "fp16"
    else:
        precision = "fp32"
    return {"precision": precision, **spec, "operators": dict(operators.most_common()),
            "opset": {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}}


def _describe_openvino(path: Path, tasks=None) -> dict:
    ir = read_ir(path)
    operators = collections.Counter(op.get_type_name() for op in ir.get_ops()
                                    if op.get_type_name() not in ("Parameter", "Result",
                                                                  "Constant"))
    weights = {op.get_element_type().get_type_name() for op in ir.get_ops()
               if op.get_type_name() == "Constant"}
    precision = "int8" if "FakeQuantize" in operators or {"i8", "u8"} & weights \
        else "fp16" if "f16" in weights else "fp32"
    spec = ir_spec(ir)
    if tasks:  # a multi-task IR: its outputs in task order
        named = {output["name"]: output for output in spec["output"]}
        spec["output"] = [named[task["name"]] for task in tasks if task["name"] in named]
    return {"precision": precision, **spec, "operators": dict(operators.most_common())}


def _describe_keras(path: Path, tasks=None) -> dict:
    try:
        model = load_model(path)  # safe_mode=True, always
    except TledgeError as error:
        raise ArtifactError(str(error)) from None
    operators = collections.Counter(type(layer).__name__ for layer in _layers(model))
    precision = "fp16" if any("float16" in str(weight.dtype) for weight in model.weights) \
        else "fp32"

    def spec(tensor, name=None):
        return {"name": name or tensor.name,
                "shape": [-1 if side is None else int(side) for side in tensor.shape],
                "dtype": str(getattr(tensor.dtype, "name", tensor.dtype))}
    names = task_outputs(model)
    output = [spec(tensor, name) for tensor, name in zip(model.outputs, names)] if names \
        else spec(model.outputs[0], model.output_names[0])  # the layer's name, not Keras'
    # tensor name (keras_tensor_325): what a client asks the model for
    return {"precision": precision, "input": spec(model.inputs[0]),
            "output": output, "operators": dict(operators.most_common()),
            "parameters": int(model.count_params())}


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):  # a nested model, e.g. a backbone
            yield from _layers(layer)


def format_description(info: dict) -> str:
    """`describe_file`'s result as the text `tledge inspect` prints."""
    lines = [f"{info['file']}",
             f"  family     {info['family']}  precision {info['precision']}  "
             f"size {info['size_bytes']:,} bytes"]
    tensors = [("input", info["input"])] + [
        ("output", tensor) for tensor in (info["output"] if isinstance(info["output"], list)
                                          else [info["output"]])]
    for role, tensor in tensors:
        text = f"  {role:<10} {tensor['name']}  {tensor['shape']}  {tensor['dtype']}"
        if tensor.get("quantization"):
            text += (f"  scale {tensor['quantization']['scale']:g}  "
                     f"zero point {tensor['quantization']['zero_point']}")
        lines.append(text)
    operators = ", ".join(f"{name} x{count}" for name, count in info["operators"].items())
    lines.append(f"  operators  {sum(info['operators'].values())}: {operators or 'none'}")
    if "not_on_xnnpack" in info:
        lines.append(f"  not on XNNPACK  {', '.join(info['not_on_xnnpack']) or 'none'} "
                     "(per the delegate's documented operator list)")
    metadata = info.get("metadata")
    if metadata:
        labels = metadata.get("labels") or []
        contract = metadata.get("input", {})
        lines.append(f"  metadata   {metadata.get('format')} {metadata.get('precision')}, "
                     f"tledge {metadata.get('tledge_version')}, " + (
                         f"recipe hash {metadata['recipe_hash']}" if metadata.get("recipe_hash")
                         else f"from a model tledge did not train (sha256 "
                              f"{str(metadata.get('model_sha256') or '?')[:16]})"))
        lines.append(f"  contract   {contract.get('shape')} {contract.get('dtype')} "
                     f"values {contract.get('value_range')}: {contract.get('meaning')}")
        if labels or not metadata.get("tasks"):
            lines.append(f"  labels     {len(labels)}: {', '.join(labels)}")
        for task in metadata.get("tasks") or []:
            lines.append(f"  task       {task['name']}: {len(task['labels'])} labels: "
                         f"{', '.join(task['labels'])}")
    else:
        lines.append("  metadata   none embedded")
    standard = info.get("standard_metadata")
    if standard is not None:
        image = (standard["inputs"] or [{}])[0]
        normalization = image.get("normalization") or {}
        labels = standard.get("labels")
        lines.append(f"  standard   TFLite Model Metadata (read by MediaPipe): "
                     f"{standard['name']!r}, {image.get('color_space') or '?'} "
                     f"{image.get('content') or 'tensor'}, "
                     f"mean {normalization.get('mean')} std {normalization.get('std')}, "
                     f"values {image.get('range')}, "
                     + (", ".join(f"{len(item['labels'] or [])} labels in "
                                  f"{item['labels_file']}" for item in
                                  standard["output_labels"].values())
                        if standard.get("output_labels") else
                        f"{len(labels)} labels in {standard['labels_file']}" if labels
                        else "no labels file")
                     + f", min parser {standard.get('min_parser_version')}")
    elif info["family"] == "tflite":
        lines.append("  standard   no TFLite Model Metadata (MediaPipe refuses a float input "
                     "without it)")
    return "\n".join(lines)
