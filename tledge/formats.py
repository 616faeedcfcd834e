"""The table of artifact formats: one row per format x precision.

This one table feeds the recipe's choices, the export dispatch, the default parity
tolerances, `tledge export --help` and the parametrized tests. A new precision is a new row
here plus its branch in the exporter module of its family.

Below it, the table of runtimes: which runtime runs which family, in which runner module.
It is plain data, so that a recipe can name runtimes without importing any runner;
`tledge.runners.RUNTIMES` is the same table with the behaviour (load, unavailable).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType


@dataclasses.dataclass(frozen=True)
class Format:
    name: str            # "tflite_int8": the key in the manifest, the recipe and the CLI
    family: str          # "keras" | "tflite" | "onnx" | "openvino" | "savedmodel": which
    # exporter module and file kind
    precision: str       # "fp32" | "int8" | ...
    suffix: str          # file name ending
    input_dtype: str     # what the artifact's input tensor takes (the input contract)
    tolerance: MappingProxyType  # default parity thresholds (see ValidateRecipe)
    description: str = ""  # one line for `tledge export --help`

    @property
    def file_name(self) -> str:
        if self.family == "savedmodel":
            return "saved_model"
        if self.family == "openvino":  # a folder: model.xml and model.bin
            return f"openvino_{self.precision}"
        return f"model{'' if self.family == 'keras' else '_' + self.precision}{self.suffix}"


def _tolerance(max_accuracy_drop, min_agreement, max_abs_diff):
    return MappingProxyType({"max_accuracy_drop": max_accuracy_drop,
                             "min_agreement": min_agreement, "max_abs_diff": max_abs_diff})


# Float conversions must reproduce Keras almost exactly. Integer ones are judged on what they
# do to accuracy (at most 1 point) and on how often they pick the same class (97 %): what a
# deployer signs. Their largest probability difference is reported, not judged (None): one
# near-tie image can differ by 0.3 in a model that classifies like the original, and a
# threshold loose enough to allow that (as 1.0 once was) can never fail.
_FLOAT = _tolerance(max_accuracy_drop=0.005, min_agreement=0.99, max_abs_diff=1e-4)
_HALF = _tolerance(max_accuracy_drop=0.01, min_agreement=0.98, max_abs_diff=0.05)
_INT8 = _tolerance(max_accuracy_drop=0.01, min_agreement=0.97, max_abs_diff=None)

FORMATS: dict[str, Format] = {row.name: row for row in (
    Format("keras", "keras", "fp32", ".keras", "float32",
           _tolerance(0.0, 1.0, 0.0), "the trained Keras model: the reference"),
    Format("tflite_fp32", "tflite", "fp32", ".tflite", "float32", _FLOAT,
           "TFLite, float32"),
    Format("tflite_fp16", "tflite", "fp16", ".tflite", "float32", _HALF,
           "TFLite, float16 weights"),
    Format("tflite_dynamic", "tflite", "dynamic", ".tflite", "float32", _INT8,
           "TFLite, dynamic range: int8 weights, float activations"),
    Format("tflite_int8", "tflite", "int8", ".tflite", "uint8", _INT8,
           "TFLite, full integer, uint8 input and output (export.int8_io)"),
    Format("onnx_fp32", "onnx", "fp32", ".onnx", "float32", _FLOAT,
           "ONNX, float32, dynamic batch"),
    Format("onnx_fp16", "onnx", "fp16", ".onnx", "float32", _HALF,
           "ONNX, float16 weights and compute, float32 input and output"),
    Format("onnx_int8", "onnx", "int8", ".onnx", "float32", _INT8,
           "ONNX, static QDQ int8, per-channel weights, float32 input and output"),
    Format("openvino_fp32", "openvino", "fp32", "", "float32", _FLOAT,
           "OpenVINO IR folder (model.xml + model.bin), float32"),
    Format("openvino_fp16", "openvino", "fp16", "", "float32", _HALF,
           "OpenVINO IR, float16 weights (the CPU computes in float32)"),
    Format("openvino_int8", "openvino", "int8", "", "float32", _INT8,
           "OpenVINO IR, int8 through NNCF with accuracy control (max_accuracy_drop)"),
    Format("savedmodel_fp32", "savedmodel", "fp32", "", "float32", _FLOAT,
           "TensorFlow SavedModel folder"),
)}

# the exported families, in table order (the Keras model is trained, not exported)
FAMILIES = tuple(dict.fromkeys(row.family for row in FORMATS.values() if row.family != "keras"))


def precisions(family: str) -> tuple[str, ...]:
    """The precisions a family can be exported at, in table order."""
    return tuple(row.precision for row in FORMATS.values() if row.family == family)


def format_for(family: str, precision: str) -> Format:
    return FORMATS[f"{family}_{precision}" if family != "keras" else "keras"]


@dataclasses.dataclass(frozen=True)
class RuntimeRow:
    name: str
    families: tuple[str, ...]  # artifact families it executes
    module: str  # the runner module (tledge.runners.*) that loads it
    loader: str  # the function of that module that loads an artifact
    description: str
    device: str | None = None  # a runtime bound to one device ("gpu"): overrides the caller's


RUNTIME_ROWS: tuple[RuntimeRow, ...] = (
    RuntimeRow("keras", ("keras",), "tledge.runners.keras_runner", "load_keras",
               "Keras model as a compiled tf.function (never model.predict)"),
    RuntimeRow("litert", ("tflite",), "tledge.runners.litert_runner", "load_litert",
               "LiteRT interpreter (ai_edge_litert), XNNPACK delegate"),
    RuntimeRow("litert_no_xnnpack", ("tflite",), "tledge.runners.litert_runner",
               "load_litert_builtin", "LiteRT interpreter, builtin kernels only (XNNPACK off)"),
    RuntimeRow("onnxruntime", ("onnx",), "tledge.runners.ort_runner", "load_onnxruntime",
               "ONNX Runtime, CPU execution provider"),
    RuntimeRow("openvino", ("openvino", "onnx"), "tledge.runners.openvino_runner",
               "load_openvino", "OpenVINO on the CPU: its IR, and the .onnx artifacts "
               "(pip install openvino)"),
    RuntimeRow("tensorflow", ("savedmodel",), "tledge.runners.keras_runner", "load_savedmodel",
               "a SavedModel's serving signature, in TensorFlow"),
    RuntimeRow("keras_gpu", ("keras",), "tledge.runners.keras_runner", "load_keras",
               "Keras model on TensorFlow's first GPU", device="gpu"),
    RuntimeRow("onnxruntime_cuda", ("onnx",), "tledge.runners.ort_runner", "load_onnxruntime",
               "ONNX Runtime, CUDA execution provider", device="gpu"),
    RuntimeRow("onnxruntime_tensorrt", ("onnx",), "tledge.runners.ort_runner",
               "load_onnxruntime", "ONNX Runtime, TensorRT execution provider",
               device="tensorrt"),
    RuntimeRow("onnxruntime_web", ("onnx",), "tledge.runners.web_runner",
               "load_onnxruntime_web", "ONNX Runtime Web (WebAssembly, SIMD, threads) in "
               "headless Chromium"),
    RuntimeRow("litert_web", ("tflite",), "tledge.runners.web_runner", "load_litert_web",
               "LiteRT.js (WebAssembly, XNNPACK) in headless Chromium, batch 1"),
)
RUNTIME_NAMES = tuple(row.name for row in RUNTIME_ROWS)
