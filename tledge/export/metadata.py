"""Artifacts that describe themselves: labels and the input contract inside the file.

The manifest says what every artifact is, but a file copied to a device leaves the manifest
behind. So the same facts (labels, input contract, recipe hash, tledge version, format and
precision) are written into the artifact itself, as one JSON document:

- TFLite: a flatbuffer `Metadata` entry named "tledge" whose buffer holds the JSON, written
  with TensorFlow's own generated schema (`tensorflow.lite.python.schema_py_generated`); the
  interpreter ignores metadata it does not know, so the model runs exactly as before. Beside
  it, the standard "TFLITE_METADATA" entry and `labels.txt` that MediaPipe and the other
  deployment clients read (`tflite_standard`).
- ONNX: `metadata_props` key "tledge" (the JSON) and "labels" (comma-joined, for tools that
  only show strings), and ONNX's standard image keys (`IMAGE_PROPS`: 8-bit RGB, sRGB, values
  0-255, what the input contract feeds) with the input tensor denoted `IMAGE`.

`embed_tflite` / `embed_onnx` take the final file path and rewrite it in place, atomically.
`read_metadata` reads the JSON back from the file alone.
"""

from __future__ import annotations

import json
from importlib import metadata as _package
from pathlib import Path

import numpy as np

from tledge.errors import ArtifactError, ExportError, first_line
from tledge.export import tflite_standard as standard
from tledge.export.openvino import read_openvino_metadata
from tledge.model import INPUT_NAME, OUTPUT_NAME
from tledge.rundir import atomic_path

# TensorFlow and onnx are imported inside the functions that use them: the CLI imports this
# module at start-up, and they take seconds to load.

KEY = "tledge"
_TFLITE_IDENTIFIER = b"TFL3"
# TFLite's converter aligns buffer data to 16 bytes; keep that when repacking so kernels
# that read weights in place (mmap) see the alignment they were written for.
_BUFFER_ALIGNMENT = 16


def artifact_metadata(*, labels, input_spec: dict, recipe_hash, precision: str,
                      fmt_name: str, tasks=None, model_sha256=None) -> dict:
    """The self-description embedded in an artifact.

    Args:
        labels: class names, index i for output i.
        input_spec: the artifact's input tensor spec (`tflite_spec` / `onnx_spec` "input").
        recipe_hash: the recipe hash recorded in the manifest (None for foreign models).
        precision: "fp32", "int8", ...
        fmt_name: the format table's name, e.g. "tflite_int8".
        tasks: a multi-task model's tasks (`tledge.tasks`): then "tasks" lists each output's
            name and class names in output order, and "labels" is left empty.
        model_sha256: a foreign model's .keras file's sha256 (it has no recipe).
    """
    try:
        version = _package.version("tledge")
    except _package.PackageNotFoundError:
        version = None
    contract = {"shape": list(input_spec["shape"]), "dtype": input_spec["dtype"],
                "value_range": [0, 255],
                "meaning": "raw RGB pixels, resized by the loader"}
    if input_spec.get("quantization"):
        contract["quantization"] = dict(input_spec["quantization"])
    facts = {"labels": [] if tasks else [str(label) for label in labels], "input": contract,
             "recipe_hash": recipe_hash, "tledge_version": version, "format": fmt_name,
             "precision": precision}
    if tasks:
        facts["tasks"] = [{"name": task["name"], "labels": list(task["labels"])}
                          for task in tasks]
    if model_sha256:
        facts["model_sha256"] = model_sha256
    return facts


def embed_tflite(path, metadata: dict, about: dict | None = None) -> Path:
    """Write tledge's `metadata` and the standard TFLite Model Metadata into the .tflite
    flatbuffer at `path`, and name its input `image` and its output `probabilities` (tensors
    and signature), in one rewrite.

    Both metadata entries are replaced together, other entries are kept, and the associated
    files appended to the model (a zip) are carried over, with `labels.txt` written from the
    labels: neither entry can clobber the other, whichever was written first.

    Args:
        about: name, description, version, author, license for the standard metadata (from
            the recipe); None or missing keys leave those fields out.

    Raises:
        ExportError: the file is not a TFLite flatbuffer, or keeps its weights outside the
            flatbuffer (buffer offsets, external buffers: models past 2 GB), which repacking
            would break.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    path = Path(path)
    data = path.read_bytes()
    model = _tflite_object(path, schema, data)
    files = standard.associated_files(data)
    tasks = metadata.get("tasks") or []
    order = _name_inputs_and_outputs(model, [task["name"] for task in tasks])
    _batch_of_one(model)
    payloads = {KEY: json.dumps(metadata, sort_keys=True).encode("utf-8")}
    labels = metadata.get("labels") or []
    shape = metadata.get("input", {}).get("shape") or []
    if (labels or tasks) and len(shape) == 4:
        about = about or {}
        what = f"{len(labels)} classes" if labels else \
            "tasks " + ", ".join(f"{task['name']} ({len(task['labels'])} classes)"
                                 for task in tasks)
        payloads[standard.ENTRY] = standard.model_metadata(
            name=about.get("name") or metadata.get("format") or path.stem,
            description=about.get("description") or
            f"Image classifier, {what} ({metadata.get('format')}, made by tledge)",
            version=about.get("version") or metadata.get("recipe_hash"),
            author=about.get("author"), license_text=about.get("license"),
            height=int(shape[1]), width=int(shape[2]), outputs=order or (None,))
        for task in tasks or [{"name": None, "labels": labels}]:
            files[standard.labels_file(task["name"])] = \
                "".join(f"{label}\n" for label in task["labels"]).encode("utf-8")
    entries = [entry for entry in (model.metadata or []) if _name(entry.name) not in payloads]
    for name, payload in payloads.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(payload, dtype=np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = name, len(model.buffers) - 1
        entries.append(entry)
    model.metadata = entries
    # Earlier metadata buffers stay as unreferenced buffers: removing them would renumber the
    # buffers every tensor points at.
    model.buffers = [_AlignedBuffer.of(item, schema) for item in model.buffers]
    size = len(data) + sum(map(len, payloads.values()))
    builder = __import__("flatbuffers").Builder(max(1024, size))
    builder.Finish(model.Pack(builder), file_identifier=_TFLITE_IDENTIFIER)
    _replace(path, standard.with_associated_files(bytes(builder.Output()), files))
    return path


def _batch_of_one(model) -> None:
    """Declare the batch the file is converted at (1) in every tensor's shape signature,
    where the converter wrote -1 (any batch). Runtimes that cannot resize an input refuse a
    -1 they cannot feed (LiteRT.js: "ranked tensor type Float32[1, 48, 48, 3] does not match
    expected ... [-1, 48, 48, 3]"); the LiteRT interpreter still runs other batches by
    resizing the input (`resize_tensor_input(..., strict=False)`), as tledge's runners do.
    The shapes the kernels were planned with are unchanged."""
    for subgraph in model.subgraphs or []:
        for tensor in subgraph.tensors or []:
            signature = tensor.shapeSignature
            if signature is not None and len(signature) and signature[0] == -1 and \
                    tensor.shape is not None and len(tensor.shape) and tensor.shape[0] == 1:
                signature = np.array(signature, copy=True)
                signature[0] = 1
                tensor.shapeSignature = signature


def _name_inputs_and_outputs(model, tasks=()) -> list:
    """`image` in, `probabilities` out, as in the ONNX file and the manifest: the tensors and
    the signature (the converter calls them serving_default_image:0 and StatefulPartitionedCall
    / output_0). A multi-task model's outputs are named after its `tasks` (signature output
    `output_i` is task i). Names only: the graph is untouched. Returns the task names in the
    order of the subgraph's outputs (what the standard metadata describes), [] for one output.
    """
    for subgraph in model.subgraphs or []:
        if len(subgraph.inputs) == 1 and len(subgraph.outputs) == 1 and not tasks:
            subgraph.tensors[subgraph.inputs[0]].name = INPUT_NAME
            subgraph.tensors[subgraph.outputs[0]].name = OUTPUT_NAME
    order = []
    for signature in model.signatureDefs or []:
        if len(signature.inputs) == 1 and len(signature.outputs) == 1 and not tasks:
            signature.inputs[0].name = INPUT_NAME
            signature.outputs[0].name = OUTPUT_NAME
        elif tasks and len(signature.inputs) == 1 and len(signature.outputs) == len(tasks):
            signature.inputs[0].name = INPUT_NAME
            subgraph = model.subgraphs[signature.subgraphIndex]
            subgraph.tensors[subgraph.inputs[0]].name = INPUT_NAME
            named = {}
            for output in signature.outputs:
                key = _name(output.name)
                task = tasks[int(key.removeprefix("output_"))] if key.startswith("output_") \
                    else key  # named before: an embed run again on its own output
                if task not in tasks:
                    raise ExportError(f"output {key!r} is none of the tasks {', '.join(tasks)}")
                output.name = task
                subgraph.tensors[output.tensorIndex].name = task
                named[output.tensorIndex] = task
            order = [named[index] for index in subgraph.outputs]
    if tasks and sorted(order) != sorted(tasks):
        raise ExportError(f"cannot find the outputs of tasks {', '.join(tasks)} in the model")
    return order


# ONNX's metadata for image inputs (onnx/docs/MetadataProps.md): the input contract in the
# words that image tools read
IMAGE_PROPS = {"Image.BitmapPixelFormat": "Rgb8", "Image.ColorSpaceGamma": "SRGB",
               "Image.NominalPixelRange": "NominalRange_0_255"}


def embed_onnx(path, metadata: dict) -> Path:
    """Write `metadata` into the ONNX model's `metadata_props` at `path`, with the standard
    image keys and the input tensor's `IMAGE` denotation."""
    import onnx
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends
        raise ExportError(f"{path}: not an ONNX model ({first_line(error)})") from None
    props = {prop.key: prop.value for prop in model.metadata_props}
    props[KEY] = json.dumps(metadata, sort_keys=True)
    props["labels"] = ",".join(metadata.get("labels", []))
    for task in metadata.get("tasks") or []:  # a multi-task model: each output's classes
        props[f"labels_{task['name']}"] = ",".join(task["labels"])
    props.update(IMAGE_PROPS)
    onnx.helper.set_model_props(model, props)
    model.graph.input[0].type.denotation = "IMAGE"
    _replace(path, model.SerializeToString())
    return path


def read_metadata(path) -> dict | None:
    """The tledge metadata embedded in a .tflite or .onnx file or an OpenVINO IR (its folder
    or .xml); None when it has none.

    A .keras file carries none (tledge keeps its facts in the manifest next to it).

    Raises:
        ArtifactError: the file is missing, unreadable, or of an unknown kind.
    """
    path = Path(path)
    if path.is_dir() or path.suffix.lower() == ".xml":  # an OpenVINO IR
        try:
            return read_openvino_metadata(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ArtifactError(f"{path}: its embedded tledge metadata is not JSON "
                                f"({error})") from None
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    suffix = path.suffix.lower()
    if suffix == ".tflite":
        text = tflite_metadata_entries(path).get(KEY)
    elif suffix == ".onnx":
        import onnx
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as error:
            raise ArtifactError(f"{path}: not an ONNX model ({first_line(error)})") from None
        text = {prop.key: prop.value for prop in model.metadata_props}.get(KEY)
    elif suffix == ".keras":
        return None
    else:
        raise ArtifactError(f"{path}: unknown artifact kind {path.suffix!r}; expected .tflite, "
                          ".onnx or .keras")
    if text is None:
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path}: its embedded tledge metadata is not JSON ({error})") \
            from None


def tflite_metadata_entries(path) -> dict[str, bytes]:
    """Every metadata entry of a .tflite file, by name, as raw bytes (read without unpacking
    the whole model)."""
    from tensorflow.lite.python import schema_py_generated as schema
    data = Path(path).read_bytes()
    model = _tflite_root(data, path, schema)
    entries = {}
    for index in range(model.MetadataLength()):
        entry = model.Metadata(index)
        buffer = model.Buffers(entry.Buffer())
        if buffer.Offset() > 1:  # data stored after the flatbuffer (models past 2 GB)
            raw = data[buffer.Offset():buffer.Offset() + buffer.Size()]
        else:
            raw = buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b""
        entries[_name(entry.Name())] = raw
    return entries


def _tflite_root(data: bytes, path, schema, error=ArtifactError):
    if len(data) < 8 or data[4:8] != _TFLITE_IDENTIFIER:
        raise error(f"{path}: not a TFLite flatbuffer (no {_TFLITE_IDENTIFIER.decode()} "
                          "identifier)")
    return schema.Model.GetRootAs(data, 0)


def _tflite_object(path, schema, data=None):
    data = Path(path).read_bytes() if data is None else data
    root = _tflite_root(data, path, schema, ExportError)
    model = schema.ModelT.InitFromObj(root)
    if any(buffer.offset > 1 for buffer in model.buffers or []) or model.externalBuffers \
            or model.externalBufferGroups:
        raise ExportError(f"{path}: its weights are stored outside the flatbuffer (buffer "
                          "offsets or external buffers); tledge cannot embed metadata in it")
    return model


class _AlignedBuffer:
    """A BufferT that packs its bytes aligned to _BUFFER_ALIGNMENT (BufferT.Pack aligns
    uint8 data to 1 byte)."""

    def __init__(self, data):
        self.data = data

    @classmethod
    def of(cls, buffer, schema):
        data = None if buffer.data is None or len(buffer.data) == 0 else \
            np.asarray(buffer.data, dtype=np.uint8).tobytes()
        packed = cls(data)
        packed.schema = schema
        return packed

    def Pack(self, builder):  # noqa: N802 (the flatbuffers object API's name)
        schema = self.schema
        vector = None
        if self.data:
            builder.StartVector(1, len(self.data), _BUFFER_ALIGNMENT)
            builder.head -= len(self.data)
            builder.Bytes[builder.head:builder.head + len(self.data)] = self.data
            builder.vectorNumElems = len(self.data)
            vector = builder.EndVector()
        schema.BufferStart(builder)
        if vector is not None:
            schema.BufferAddData(builder, vector)
        return schema.BufferEnd(builder)


def _name(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _replace(path: Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
