"""An artifact in its runtime, as every process opens it: the input contract (uint8 pixels
to what an input tensor takes), the outputs back to probabilities (a multi-task artifact's
side by side), and one class per runtime (LiteRT or tflite-runtime, ONNX Runtime, OpenVINO)
with `run(prepared) -> raw output`. tledge's runners wrap these classes; bench_device.py uses
them as they are, so a device runs the code the build machine validated.

A runtime is imported when a model is opened, never at module top: a device has one runtime
at most, and in a foreign userland importing one has crashed the process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

def prepare_pixels(images, input_spec: dict):
    """uint8 pixels [batch, H, W, 3] to what an artifact's input tensor takes.

    The input contract: every artifact takes raw 0-255 RGB pixels. A float input gets them as
    float32; a uint8/int8 input gets them as they are when its quantization is exactly
    (scale 1, zero point 0), else quantized with the input's own parameters.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [batch, H, W, 3], got {images.dtype} "
                         f"{list(images.shape)}")
    dtype = input_spec["dtype"]
    if dtype in ("uint8", "int8"):
        quantization = input_spec.get("quantization")
        if quantization and quantization != {"scale": 1.0, "zero_point": 0}:
            low, high = (0, 255) if dtype == "uint8" else (-128, 127)
            scaled = images / quantization["scale"] + quantization["zero_point"]
            return np.clip(np.round(scaled), low, high).astype(dtype)
        return images
    return images.astype(np.float32)


def dequantize(raw, output_spec):
    """An artifact's raw output to float32 probabilities.

    A multi-task artifact's `output_spec` is a list, one spec per output in task order, and
    its raw output the outputs side by side (`concatenated`): each is dequantized with its
    own parameters."""
    if isinstance(output_spec, list):
        edges = np.cumsum([0, *(int(spec["shape"][-1]) for spec in output_spec)])
        return np.concatenate([dequantize(raw[:, start:end], spec) for spec, start, end
                               in zip(output_spec, edges[:-1], edges[1:])], axis=1)
    quantization = output_spec.get("quantization")
    if quantization:
        return (raw.astype(np.float32) - quantization["zero_point"]) * quantization["scale"]
    return np.asarray(raw, dtype=np.float32)


def output_names(output_spec):
    """A multi-output artifact's output tensor names in task order; None for one output."""
    return [spec["name"] for spec in output_spec] if isinstance(output_spec, list) else None


def predicted_classes(probabilities, output_spec):
    """Top-1 classes: [N] for one output, [N, tasks] for a multi-task artifact."""
    if not isinstance(output_spec, list):
        return probabilities.argmax(axis=1)
    edges = np.cumsum([0, *(int(spec["shape"][-1]) for spec in output_spec)])
    return np.stack([probabilities[:, start:end].argmax(axis=1)
                     for start, end in zip(edges[:-1], edges[1:])], axis=1)


def concatenated(outputs):
    """Several outputs side by side along the class axis (one output: itself)."""
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=-1)


# -- the device's runtimes -------------------------------------------------------------------

TFLITE_MODULES = ("ai_edge_litert", "tflite_runtime")


class Unavailable(Exception):
    """No runtime on this device runs the artifact."""


class TFLiteModel:
    """A .tflite file in ai-edge-litert's or tflite-runtime's interpreter: with its default
    delegate (XNNPACK), or LiteRT's builtin kernels alone (`builtin_only`)."""

    def __init__(self, path, threads, module="ai_edge_litert", builtin_only=False,
                 outputs=None):
        if module == "ai_edge_litert":
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        else:
            from tflite_runtime.interpreter import Interpreter, OpResolverType
        resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if builtin_only \
            else OpResolverType.AUTO
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads,
                                       experimental_op_resolver_type=resolver)
        self._input = self.interpreter.get_input_details()[0]["index"]
        details = {detail["name"]: detail["index"]
                   for detail in self.interpreter.get_output_details()}
        missing = [name for name in outputs or () if name not in details]
        if missing:
            raise ValueError(f"{path} has no output {', '.join(missing)}")
        self._outputs = [details[name] for name in outputs] if outputs \
            else [self.interpreter.get_output_details()[0]["index"]]
        self.batch = None

    def resize(self, batch: int) -> None:
        """Re-plan the graph for a batch size: once per size, never per call."""
        shape = list(self.interpreter.get_input_details()[0]["shape"])
        self.interpreter.resize_tensor_input(self._input, [batch, *shape[1:]], strict=False)
        self.interpreter.allocate_tensors()
        self.batch = batch

    def run(self, prepared):
        if prepared.shape[0] != self.batch:
            self.resize(prepared.shape[0])
        self.interpreter.set_tensor(self._input, prepared)
        self.interpreter.invoke()
        return concatenated([self.interpreter.get_tensor(index) for index in self._outputs])


class OnnxModel:
    """An .onnx file in ONNX Runtime, on one execution provider (the CPU's by default).
    `threads` None leaves ONNX Runtime's own default."""

    def __init__(self, path, threads, module="onnxruntime", provider="CPUExecutionProvider",
                 settings=None, outputs=None):
        import onnxruntime
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(path), options,
                                                    providers=[(provider, settings or {})])
        self._input = self.session.get_inputs()[0].name
        self._outputs = list(outputs) if outputs else [self.session.get_outputs()[0].name]

    def run(self, prepared):
        return concatenated(self.session.run(self._outputs, {self._input: prepared}))


class OpenVinoModel:
    """An .onnx file or an IR (its folder, or its .xml) in OpenVINO on the CPU (Intel edge
    boxes). OpenVINO may run a float graph in bf16: an fp32 or fp16 artifact is compiled at
    f32, what parity judges; `executed` says what OpenVINO chose."""

    def __init__(self, path, threads, module="openvino", precision=None, outputs=None):
        import openvino
        path = Path(path) / IR_XML if Path(path).is_dir() else path
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if precision != "int8":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        core = openvino.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        chosen = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.executed = f"inference precision {getattr(chosen, 'get_type_name', str)()}"
        self._outputs = [self.compiled.output(name) for name in outputs] if outputs \
            else [self.compiled.output(0)]

    def run(self, prepared):
        self.request.infer({0: prepared})
        return concatenated([self.request.get_tensor(output).data.copy()
                             for output in self._outputs])


ONNX_MODULES = ("onnxruntime", "openvino")
IR_MODULES = ("openvino",)
IR_XML = "model.xml"  # an OpenVINO IR artifact is a folder: model.xml and model.bin


def modules_for(file_name) -> tuple[str, ...]:
    """The runtime modules that can open an artifact, by its name: a .tflite, an .onnx, or an
    OpenVINO IR (a folder holding model.xml, or the .xml)."""
    path = Path(file_name)
    if path.suffix == ".tflite":
        return TFLITE_MODULES
    if path.suffix == ".xml" or path.is_dir():
        return IR_MODULES
    return ONNX_MODULES


def installed(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def runtime_for(file_name: str, wanted: str = "auto") -> str:
    """The runtime module this device runs `file_name` with, or raise Unavailable."""
    candidates = modules_for(file_name)
    if wanted != "auto":
        if wanted not in candidates:
            raise Unavailable(f"{wanted} does not run {_kind(file_name)} files")
        candidates = (wanted,)
    for module in candidates:
        if installed(module):
            return module
    hint = " or ".join(name.replace("_", "-") for name in candidates)
    raise Unavailable(f"no runtime for {_kind(file_name)} here (pip install {hint})")


def _kind(file_name) -> str:
    return "OpenVINO IR" if modules_for(file_name) == IR_MODULES else Path(file_name).suffix


def open_model(path, threads: int, module: str, precision=None, outputs=None):
    if module == "openvino":
        return OpenVinoModel(path, threads, module, precision, outputs=outputs)
    return (OnnxModel if module == "onnxruntime" else TFLiteModel)(path, threads, module,
                                                                   outputs=outputs)
