"""ONNX Runtime runner: CPU, or CUDA when that execution provider is installed."""

from __future__ import annotations

from tledge.core.engines import OnnxModel
from tledge.errors import RuntimeUnavailable
from tledge.runners import Runner

# onnxruntime is imported where it is used: it is optional (a missing or GPU-less build
# is a skipped row, see `unavailable`), and slow to import at CLI start-up.

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
    """The session is `tledge.core.engines.OnnxModel`, the class bench_device.py runs too."""

    runtime = "onnxruntime"

    def __init__(self, path, spec, threads, device):
        super().__init__(spec, threads, device)
        reason = unavailable(device)
        if reason:
            raise RuntimeUnavailable(reason)
        provider = _PROVIDERS[device]
        settings = {}
        if provider == "CUDAExecutionProvider" and spec.get("precision") != "int8":
            # CUDA runs float convolutions and matmuls in TF32 by default on Ampere and later
            # (a 10-bit mantissa): it moved the quickstart's fp32 probabilities by 4e-3 on an
            # H200, forty times the fp32 tolerance. Run the fp32 artifact as fp32, as the
            # OpenVINO runner does.
            settings["use_tf32"] = "0"
        self.model = OnnxModel(path, threads, provider=provider, settings=settings,
                               outputs=self.outputs)
        self.session = self.model.session
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

    def _run(self, prepared):
        return self.model.run(prepared)


def load_onnxruntime(path, spec, *, threads=None, device="cpu") -> OnnxRuntimeRunner:
    return OnnxRuntimeRunner(path, spec, threads, device)
