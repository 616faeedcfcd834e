"""OpenVINO runner: the .onnx artifacts (fp32, int8 QDQ) on the CPU, through OpenVINO.

OpenVINO chooses its own inference precision: on a CPU with bf16 (AVX-512 BF16, AMX) it runs a
float graph in bf16 unless told otherwise, which moves probabilities by ~1e-3. An fp32
artifact is therefore compiled with inference precision f32, what parity judges it at; an int8
artifact keeps OpenVINO's default. Either way the precision OpenVINO reports for the compiled
model is recorded (`executed`) in the parity and bench rows, so the row says what ran.
"""

from __future__ import annotations

import importlib.util


from tledge.core.engines import OpenVinoModel
from tledge.errors import RuntimeUnavailable
from tledge.quiet import quiet
from tledge.runners import Runner


def unavailable(device, loader=None) -> str | None:
    """Why OpenVINO cannot run here (None when it can)."""
    if device != "cpu":
        return f"the OpenVINO runner runs on the CPU, not {device}"
    if importlib.util.find_spec("openvino") is None:
        return "openvino is not installed (pip install 'tledge[openvino]' or openvino)"
    return None


class OpenVINORunner(Runner):
    """The compiled model is `tledge.core.engines.OpenVinoModel`, as on a device."""

    runtime = "openvino"

    def __init__(self, path, spec, threads, device):
        super().__init__(spec, threads, device)
        reason = unavailable(device)
        if reason:
            raise RuntimeUnavailable(reason)
        with quiet():
            self.model = OpenVinoModel(path, threads, precision=spec.get("precision"),
                                       outputs=self.outputs)
        self.executed = self.model.executed

    def _run(self, prepared):
        return self.model.run(prepared)


def load_openvino(path, spec, *, threads=None, device="cpu") -> OpenVINORunner:
    return OpenVINORunner(path, spec, threads, device)
