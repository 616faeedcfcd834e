"""ONNX Runtime runner: CPU, or CUDA when that execution provider is installed."""

from __future__ import annotations

from tledge.errors import RuntimeUnavailable
from tledge.runners import Runner

_PROVIDERS = {"cpu": "CPUExecutionProvider", "gpu": "CUDAExecutionProvider",
              "tensorrt": "TensorrtExecutionProvider"}


def unavailable(device, loader=None) -> str | None:
    """Why ONNX Runtime cannot run on `device` here (None when it can)."""
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime)"
    provider = _PROVIDERS.get(device)
    if provider not in onnxruntime.get_available_providers():
        return (f"no {provider or device} in this onnxruntime (has "
                f"{', '.join(onnxruntime.get_available_providers())})")
    return None


class OnnxRuntimeRunner(Runner):
    runtime = "onnxruntime"

    def __init__(self, path, spec, threads, device):
        super().__init__(spec, threads, device)
        try:
            import onnxruntime
        except ImportError:
            raise RuntimeUnavailable("onnxruntime is not installed "
                                     "(pip install onnxruntime)") from None
        reason = unavailable(device)
        if reason:
            raise RuntimeUnavailable(reason)
        provider = _PROVIDERS[device]
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        settings = {}
        if provider == "CUDAExecutionProvider" and spec.get("precision") != "int8":
            # CUDA runs float convolutions and matmuls in TF32 by default on Ampere and later
            # (a 10-bit mantissa): it moved the quickstart's fp32 probabilities by 4e-3 on an
            # H200, forty times the fp32 tolerance. Run the fp32 artifact as fp32, as the
            # OpenVINO runner does.
            settings["use_tf32"] = "0"
        self.session = onnxruntime.InferenceSession(str(path), options,
                                                    providers=[(provider, settings)])
        if provider not in self.session.get_providers():
            # An execution provider that is listed but cannot load (CUDA or cuDNN libraries
            # missing, TensorRT absent) makes ONNX Runtime fall back to the CPU with a warning:
            # a "GPU" figure would then be the CPU's.
            raise RuntimeUnavailable(
                f"{provider} is in this onnxruntime but did not load (its libraries are "
                f"missing or do not match); ONNX Runtime fell back to "
                f"{', '.join(self.session.get_providers())}")
        if settings:
            self.executed = ", ".join(f"{key} {value}" for key, value in settings.items())
        self._input = self.session.get_inputs()[0].name

    def _run(self, prepared):
        return self.session.run(None, {self._input: prepared})[0]


def load_onnxruntime(path, spec, *, threads=None, device="cpu") -> OnnxRuntimeRunner:
    return OnnxRuntimeRunner(path, spec, threads, device)
