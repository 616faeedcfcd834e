"""OpenVINO IR: what Intel's tools, Geti and DL Streamer ship, as a folder of `model.xml` and
`model.bin`.

The graph is the ONNX fp32 export (`tledge.export.onnx`) converted by OpenVINO itself
(`openvino.convert_model`), so the IR takes the same input (float32 raw 0-255 RGB, NHWC,
dynamic batch) and names its output `probabilities` as every artifact does. The IR's runtime
info carries the labels and the input contract where OpenVINO's Model API and DL Streamer look
for them (`model_info`), and the same tledge JSON as the other artifacts (`tledge`).

- fp32: as converted.
- fp16: weights stored as float16 (`compress_to_fp16`); the CPU decompresses them at load
  and computes in float32, a GPU or NPU in float16.
- int8: NNCF's post-training quantization, calibrated on the same training images as the
  other int8 files, activation ranges from their min and max as those files take them. With
  `accuracy` (the run's repair split and its threshold) it is
  `nncf.quantize_with_accuracy_control`: NNCF ranks the quantized operations by what they cost
  on those images and returns operations to float until accuracy is at most `max_drop` below
  the float IR's; the count returned is recorded. This is NNCF's route beside tledge's own
  repair of the QDQ ONNX file (`tledge.export.int8`); the report compares the two.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from tledge.errors import ArtifactError, ExportError, first_line
from tledge.export.onnx import export_onnx

XML = "model.xml"
KEY = "tledge"


@dataclasses.dataclass
class AccuracyControl:
    """What `nncf.quantize_with_accuracy_control` validates on: images held apart from
    calibration with their labels, and the largest accuracy drop allowed (absolute)."""
    images: np.ndarray
    labels: np.ndarray
    max_drop: float
    split: str = "repair"


def model_xml(path) -> Path:
    """The .xml of an IR artifact folder (or the .xml itself)."""
    path = Path(path)
    return path / XML if path.is_dir() else path


def export_openvino(model, path, *, precision: str, calibration=None, tasks=None,
                    accuracy: AccuracyControl | None = None) -> dict:
    """Convert a Keras model to an OpenVINO IR folder at `path`; returns the input and output
    specs (those of the ONNX graph it was converted from) and, for int8, `"nncf"`: what NNCF
    did."""
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"unknown OpenVINO precision {precision!r}")
    if precision == "int8" and (calibration is None or len(calibration) == 0):
        raise ExportError("int8 export needs calibration images from the training split")
    try:
        import openvino
    except ImportError:
        raise ExportError("openvino is not installed (pip install 'tledge[openvino]')") \
            from None
    with tempfile.TemporaryDirectory(prefix="tledge-openvino-") as folder:
        onnx_path = Path(folder) / "model.onnx"
        spec = export_onnx(model, onnx_path, precision="fp32", tasks=tasks)
        ir = openvino.convert_model(str(onnx_path))
    record = None
    if precision == "int8":
        ir, record = quantize_ir(ir, calibration, accuracy)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    openvino.save_model(ir, str(path / XML), compress_to_fp16=precision == "fp16")
    if record is not None:
        spec["nncf"] = record
    return spec


def _probabilities(compiled, images, batch=64) -> np.ndarray:
    request = compiled.create_infer_request()
    outputs = []
    for start in range(0, len(images), batch):
        request.infer({0: np.asarray(images[start:start + batch], np.float32)})
        outputs.append(request.get_output_tensor(0).data.copy())
    return np.concatenate(outputs)


def quantize_ir(ir, calibration, accuracy):
    """NNCF int8 of a float IR; returns (the quantized IR, the record of what was done)."""
    try:
        import nncf
    except ImportError:
        raise ExportError("openvino int8 needs NNCF (pip install nncf, or 'tledge[openvino]')") \
            from None
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    nncf.set_log_level(40)  # its progress bars and INFO lines are not tledge's output
    calibration = np.asarray(calibration, np.float32)
    dataset = nncf.Dataset([image[None] for image in calibration])
    # activation ranges from the calibration images' min and max, as tledge's other int8
    # files take them: NNCF's default (the mean of each batch's min and max) clipped the
    # quickstart's activations to 96.4 % agreement with Keras; min-max gave 99.6 %
    ranges = AdvancedQuantizationParameters(
        activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    common = dict(subset_size=len(calibration), preset=nncf.QuantizationPreset.MIXED)
    if accuracy is None:
        try:
            quantized = nncf.quantize(ir, dataset, advanced_parameters=ranges, **common)
        except Exception as error:
            raise ExportError(f"NNCF could not quantize the IR: {first_line(error)}") from None
        return quantized, {"route": "nncf", "calibration_samples": len(calibration),
                           "quantizers": _count_quantizers(quantized)}
    labels = np.asarray(accuracy.labels)
    items = list(zip(np.asarray(accuracy.images, np.float32), labels))

    def validate(compiled, data):
        images = np.stack([image for image, _ in data])
        truth = np.asarray([label for _, label in data])
        hits = (_probabilities(compiled, images).argmax(-1) == truth).astype(float)
        return float(hits.mean()), list(hits)
    validation = nncf.Dataset(items, lambda item: item[0][None])
    try:  # the plain quantization too: what accuracy control returned to float is the
        # difference in quantizers between the two
        plain = nncf.quantize(ir, dataset, advanced_parameters=ranges, **common)
        quantized = nncf.quantize_with_accuracy_control(
            ir, dataset, validation, validate, max_drop=accuracy.max_drop,
            drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=ranges,
            **common)
    except Exception as error:
        raise ExportError(f"NNCF could not quantize the IR: {first_line(error)}") from None
    float_quantizers = _count_quantizers(plain) - _count_quantizers(quantized)
    return quantized, {"route": "nncf_accuracy_control", "max_drop": accuracy.max_drop,
                       "split": accuracy.split, "images": len(labels),
                       "calibration_samples": len(calibration),
                       "quantizers": _count_quantizers(quantized),
                       "reverted": max(float_quantizers, 0)}


def _count_quantizers(ir) -> int:
    return sum(op.get_type_name() == "FakeQuantize" for op in ir.get_ops())


def embed_openvino(path, metadata: dict) -> Path:
    """Write `metadata` into the IR's runtime info: `tledge` (the JSON every artifact
    carries) and `model_info` (what OpenVINO's Model API and DL Streamer read: the model type,
    the labels space-separated, the resize and pixel conventions of the input contract)."""
    import openvino
    xml = model_xml(path)
    core = openvino.Core()
    try:
        ir = core.read_model(str(xml))
    except Exception as error:
        raise ExportError(f"{xml}: not an OpenVINO IR ({first_line(error)})") from None
    ir.set_rt_info(json.dumps(metadata, sort_keys=True), [KEY])
    labels = metadata.get("labels") or []
    info = {"model_type": "Classification", "labels": " ".join(
                label.replace(" ", "_") for label in labels),
            "resize_type": "standard",  # stretched to the input size, never cropped
            "reverse_input_channels": "True",  # the model takes RGB; apps read BGR frames
            "mean_values": "0 0 0", "scale_values": "1 1 1",  # raw 0-255 pixels
            "output_raw_scores": "True", "multilabel": "False"}
    for key, value in info.items():
        ir.set_rt_info(value, ["model_info", key])
    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=".embed-") as folder:
        staged = Path(folder) / XML
        openvino.save_model(ir, str(staged), compress_to_fp16=False)
        for name in (XML, "model.bin"):
            (Path(folder) / name).replace(xml.parent / name)
    return xml.parent


def read_ir(path):
    """An IR (its folder or its .xml) read by OpenVINO, or ArtifactError saying why not."""
    xml = model_xml(path)
    if not xml.is_file() or not xml.with_suffix(".bin").is_file():
        raise ArtifactError(f"{path}: not an OpenVINO IR (needs {xml.name} and "
                            f"{xml.with_suffix('.bin').name})")
    try:
        import openvino
    except ImportError:
        raise ArtifactError(f"{path}: an OpenVINO IR needs openvino to read "
                            "(pip install openvino)") from None
    try:
        return openvino.Core().read_model(str(xml))
    except Exception as error:
        raise ArtifactError(f"{path}: OpenVINO cannot read it ({first_line(error)})") from None


def read_openvino_metadata(path) -> dict | None:
    """The tledge JSON in an IR's runtime info; None when it has none."""
    ir = read_ir(path)
    if not ir.has_rt_info([KEY]):
        return None
    return json.loads(ir.get_rt_info([KEY]).astype(str))


def ir_spec(ir) -> dict:
    """Input and output specs of a read IR (a dynamic dimension is -1), each output by its
    first name, as the manifest writes them."""
    def spec(port):
        shape = port.get_partial_shape()
        return {"name": port.get_any_name(),
                "shape": [dim.get_length() if dim.is_static else -1 for dim in shape],
                "dtype": port.get_element_type().to_dtype().name}
    outputs = [spec(port) for port in ir.outputs]
    return {"input": spec(ir.inputs[0]),
            "output": outputs[0] if len(outputs) == 1 else outputs}
