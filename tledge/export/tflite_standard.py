"""TFLite Model Metadata: the standard self-description that deployment clients read.

MediaPipe Tasks' `ImageClassifier` (and the TFLite Task Library and Android Studio's model
binding before it) read a flatbuffer stored in the model's `metadata` list under the name
"TFLITE_METADATA" (file identifier "M001"), plus "associated files" packed as an uncompressed
zip archive appended to the model. A float input needs `NormalizationOptions` to be accepted at
all; class names come from a `TENSOR_AXIS_LABELS` file attached to the output.

The tables are written here field by field from the published schema (metadata_schema.fbs,
schema version 1.5.0), with the `flatbuffers` package TensorFlow already depends on: the
`tflite-support` package that ships a writer pins a protobuf TensorFlow 2.21 refuses. Field
numbers are the schema's vtable slots. What tledge writes uses only 1.0.0 features, so
`min_parser_version` is "1.0.0" and every client since the first reads it.

The input contract (docs/architecture.md: raw 0-255 RGB pixels, preprocessing inside the graph) is said as
mean 0, std 1: a client feeds pixels as they are.
"""

from __future__ import annotations

import io
import zipfile

ENTRY = "TFLITE_METADATA"
IDENTIFIER = b"M001"
LABELS_FILE = "labels.txt"
MIN_PARSER_VERSION = "1.0.0"

# Enum and union values of metadata_schema.fbs
_RGB = 1  # ColorSpaceType
_TENSOR_AXIS_LABELS = 2  # AssociatedFileType
_FEATURE_PROPERTIES, _IMAGE_PROPERTIES = 1, 2  # ContentProperties union
_NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions union


class _Writer:
    """Builds tables bottom-up: children (strings, vectors, sub-tables) before their parent."""

    def __init__(self):
        import flatbuffers
        self.builder = flatbuffers.Builder(1024)

    def string(self, text):
        return self.builder.CreateString(text) if text else None

    def tables(self, offsets):
        builder = self.builder
        builder.StartVector(4, len(offsets), 4)
        for offset in reversed(offsets):
            builder.PrependUOffsetTRelative(offset)
        return builder.EndVector()

    def floats(self, values):
        builder = self.builder
        builder.StartVector(4, len(values), 4)
        for value in reversed(values):
            builder.PrependFloat32(float(value))
        return builder.EndVector()

    def table(self, **fields):
        """A table from `name=(slot, kind, value)`; kind: offset, ubyte, byte or uint. None
        values are left out (the reader sees the schema's default)."""
        builder = self.builder
        present = [field for field in fields.values() if field[2] is not None]
        builder.StartObject(max((slot for slot, _, _ in present), default=-1) + 1)
        prepend = {"offset": builder.PrependUOffsetTRelativeSlot,
                   "ubyte": builder.PrependUint8Slot, "byte": builder.PrependInt8Slot,
                   "uint": builder.PrependUint32Slot}
        for slot, kind, value in present:
            prepend[kind](slot, value, 0)
        return builder.EndObject()

    def finish(self, root) -> bytes:
        self.builder.Finish(root, file_identifier=IDENTIFIER)
        return bytes(self.builder.Output())


def labels_file(task: str | None) -> str:
    """The labels file of one output: `labels.txt`, or `labels_<task>.txt` for a task's."""
    return LABELS_FILE if task is None else f"labels_{task}.txt"


def model_metadata(*, name: str, description: str, version: str | None, author: str | None,
                   license_text: str | None, height: int, width: int,
                   outputs=(None,)) -> bytes:
    """The "TFLITE_METADATA" flatbuffer of an image classifier that takes raw RGB pixels
    [1, height, width, 3] and returns probabilities, labels in `LABELS_FILE`. A multi-task
    model lists `outputs` (task names, in the order of the subgraph's outputs): each output
    is described with its own labels file (`labels_file`)."""
    w = _Writer()
    # input: an RGB image, normalised by mean 0 / std 1 (raw pixels), values 0..255
    size = w.table(width=(0, "uint", width), height=(1, "uint", height))
    image = w.table(color_space=(0, "byte", _RGB), default_size=(1, "offset", size))
    image_content = w.table(kind=(0, "ubyte", _IMAGE_PROPERTIES), properties=(1, "offset", image))
    normalization = w.table(mean=(0, "offset", w.floats([0.0])),
                            std=(1, "offset", w.floats([1.0])))
    unit = w.table(kind=(0, "ubyte", _NORMALIZATION_OPTIONS),
                   options=(1, "offset", normalization))
    input_stats = w.table(max=(0, "offset", w.floats([255.0])), min=(1, "offset", w.floats([0.0])))
    input_tensor = w.table(
        name=(0, "offset", w.string("image")),
        description=(1, "offset", w.string("RGB pixels, 0 to 255 as they are: the model "
                                             "normalises them itself")),
        content=(3, "offset", image_content), process_units=(4, "offset", w.tables([unit])),
        stats=(5, "offset", input_stats))
    # outputs: one probability per class, the class names in the attached labels file
    output_tensors = []
    for task in outputs:
        labels = w.table(name=(0, "offset", w.string(labels_file(task))),
                         description=(1, "offset", w.string("Class names, one per line, in "
                                                            "the order of the output")),
                         type=(2, "byte", _TENSOR_AXIS_LABELS))
        feature = w.table()
        output_content = w.table(kind=(0, "ubyte", _FEATURE_PROPERTIES),
                                 properties=(1, "offset", feature))
        output_stats = w.table(max=(0, "offset", w.floats([1.0])),
                               min=(1, "offset", w.floats([0.0])))
        output_tensors.append(w.table(
            name=(0, "offset", w.string(task or "probabilities")),
            description=(1, "offset", w.string("Probability of each class" + (
                f" of task '{task}'" if task else ""))),
            content=(3, "offset", output_content), stats=(5, "offset", output_stats),
            associated_files=(6, "offset", w.tables([labels]))))
    subgraph = w.table(name=(0, "offset", w.string("image_classifier")),
                       inputs=(2, "offset", w.tables([input_tensor])),
                       outputs=(3, "offset", w.tables(output_tensors)))
    root = w.table(name=(0, "offset", w.string(name)),
                   description=(1, "offset", w.string(description)),
                   version=(2, "offset", w.string(version)),
                   subgraphs=(3, "offset", w.tables([subgraph])),
                   author=(4, "offset", w.string(author)),
                   license=(5, "offset", w.string(license_text)),
                   min_parser_version=(7, "offset", w.string(MIN_PARSER_VERSION)))
    return w.finish(root)


# -- reading it back (for `tledge inspect` and the tests) ------------------------------------

def read_model_metadata(data: bytes) -> dict:
    """The facts of a "TFLITE_METADATA" flatbuffer, as plain data (what `inspect` shows)."""
    from flatbuffers.table import Table
    if len(data) < 8 or data[4:8] != IDENTIFIER:
        raise ValueError(f"not a TFLite metadata flatbuffer (no {IDENTIFIER.decode()} "
                         "identifier)")
    root = _Table(Table(data, int.from_bytes(data[0:4], "little")))
    subgraphs = root.tables(3)
    subgraph = subgraphs[0] if subgraphs else None

    def tensor(table):
        content = table.table(3)
        units = [unit for unit in table.tables(4) if unit.ubyte(0) == _NORMALIZATION_OPTIONS]
        normalization = units[0].table(1) if units else None
        stats = table.table(5)
        image = content.table(1) if content and content.ubyte(0) == _IMAGE_PROPERTIES else None
        return {"name": table.string(0), "description": table.string(1),
                "content": {_IMAGE_PROPERTIES: "image", _FEATURE_PROPERTIES: "feature"}.get(
                    content.ubyte(0) if content else 0),
                "color_space": {_RGB: "RGB", 2: "GRAYSCALE"}.get(image.byte(0))
                if image else None,
                "normalization": {"mean": normalization.floats(0), "std": normalization.floats(1)}
                if normalization else None,
                "range": _range(stats),
                "associated_files": [{"name": item.string(0), "type": item.byte(2)}
                                     for item in table.tables(6)]}
    return {"name": root.string(0), "description": root.string(1), "version": root.string(2),
            "author": root.string(4), "license": root.string(5),
            "min_parser_version": root.string(7),
            "inputs": [tensor(item) for item in subgraph.tables(2)] if subgraph else [],
            "outputs": [tensor(item) for item in subgraph.tables(3)] if subgraph else []}


def _range(stats) -> list | None:
    """[min, max] from a Stats table (per channel lists when it has several values)."""
    if stats is None:
        return None
    low, high = stats.floats(1), stats.floats(0)
    return [low[0], high[0]] if len(low) == 1 and len(high) == 1 else [low, high]


class _Table:
    """Field access by slot number over a flatbuffers Table."""

    def __init__(self, table):
        self.t = table

    def _at(self, slot):
        return self.t.Offset(4 + 2 * slot)

    def string(self, slot):
        offset = self._at(slot)
        return self.t.String(offset + self.t.Pos).decode("utf-8") if offset else None

    def ubyte(self, slot):
        import flatbuffers
        offset = self._at(slot)
        return self.t.Get(flatbuffers.number_types.Uint8Flags, offset + self.t.Pos) if offset else 0

    def byte(self, slot):
        import flatbuffers
        offset = self._at(slot)
        return self.t.Get(flatbuffers.number_types.Int8Flags, offset + self.t.Pos) if offset else 0

    def table(self, slot):
        from flatbuffers.table import Table
        offset = self._at(slot)
        return _Table(Table(self.t.Bytes, self.t.Indirect(offset + self.t.Pos))) if offset \
            else None

    def tables(self, slot):
        from flatbuffers.table import Table
        offset = self._at(slot)
        if not offset:
            return []
        start = self.t.Vector(offset)
        return [_Table(Table(self.t.Bytes, self.t.Indirect(start + 4 * index)))
                for index in range(self.t.VectorLen(offset))]

    def floats(self, slot):
        import flatbuffers
        offset = self._at(slot)
        if not offset:
            return []
        start = self.t.Vector(offset)
        return [float(self.t.Get(flatbuffers.number_types.Float32Flags, start + 4 * index))
                for index in range(self.t.VectorLen(offset))]


# -- the associated files, appended as an uncompressed zip -----------------------------------

def associated_files(data: bytes) -> dict[str, bytes]:
    """The files of the zip appended to a model (none when there is no zip)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return {name: archive.read(name) for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError, ValueError):
        return {}


def with_associated_files(flatbuffer: bytes, files: dict[str, bytes]) -> bytes:
    """The model bytes followed by a zip of `files`, stored uncompressed (clients read the
    members in place and refuse compressed ones)."""
    if not files:
        return flatbuffer
    buffer = io.BytesIO(flatbuffer)
    with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_STORED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()
