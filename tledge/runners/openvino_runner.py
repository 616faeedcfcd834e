"""OpenVINO runner: the .onnx artifacts (fp32, int8 QDQ) on the CPU, through OpenVINO.

OpenVINO chooses its own inference precision: on a CPU with bf16 (AVX-512 BF16, AMX) it runs a
float graph in bf16 unless told otherwise, which moves probabilities by ~1e-3. An fp32
artifact is therefore compiled with inference precision f32, what parity judges it at; an int8
artifact keeps OpenVINO's default. Either way the precision OpenVINO reports for the compiled
model is recorded (`executed`) in the parity and bench rows, so the row says what ran.
"""

from __future__ import annotations

from tledge.errors import RuntimeUnavailable
from tledge.quiet import quiet
from tledge.runners import Runner


def unavailable(device, loader=None) -> str | None:
    """Why OpenVINO cannot run here (None when it can)."""
    if device != "cpu":
        return f"the OpenVINO runner runs on the CPU, not {device}"
    import importlib.util
    if importlib.util.find_spec("openvino") is None:
        return "openvino is not installed (pip install 'tledge[openvino]' or openvino)"
    return None


class OpenVINORunner(Runner):
    runtime = "openvino"

    def __init__(self, path, spec, threads, device):
        super().__init__(spec, threads, device)
        reason = unavailable(device)
        if reason:
            raise RuntimeUnavailable(reason)
        import openvino
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if spec.get("precision") != "int8":
            config["INFERENCE_PRECISION_HINT"] = "f32"  # run the fp32 artifact as fp32
        core = openvino.Core()
        with quiet():
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        precision = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.executed = f"inference precision {getattr(precision, 'get_type_name', str)()}"

    def _run(self, prepared):
        self.request.infer({0: prepared})
        return self.request.get_output_tensor(0).data.copy()


def load_openvino(path, spec, *, threads=None, device="cpu") -> OpenVINORunner:
    return OpenVINORunner(path, spec, threads, device)
