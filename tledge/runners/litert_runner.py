"""LiteRT runner: the `ai_edge_litert` interpreter with the XNNPACK delegate, or without it.

The interpreter itself is `tledge.core.engines.TFLiteModel`, the same class bench_device.py
runs on a device; this runner adds the runner contract (input and output specs, errors as
`RuntimeUnavailable`) and keeps LiteRT's delegate announcements off the terminal.
"""

from __future__ import annotations

from tledge.core.engines import TFLiteModel
from tledge.errors import RuntimeUnavailable
from tledge.quiet import quiet
from tledge.runners import Runner


class LiteRTRunner(Runner):
    runtime = "litert"

    def __init__(self, path, spec, threads, device, *, xnnpack=True):
        super().__init__(spec, threads, device)
        if device != "cpu":
            raise RuntimeUnavailable(f"the LiteRT runner runs on the CPU, not {device}")
        try:
            with quiet():
                # without the default delegates every operator runs on the builtin kernels
                self.model = TFLiteModel(path, threads, "ai_edge_litert",
                                         builtin_only=not xnnpack, outputs=self.outputs)
        except ImportError:
            raise RuntimeUnavailable("ai-edge-litert is not installed "
                                     "(pip install ai-edge-litert)") from None

    def _run(self, prepared):
        if prepared.shape[0] != self.model.batch:
            with quiet():  # LiteRT announces its XNNPACK delegate on stderr when re-planning
                self.model.resize(prepared.shape[0])
        return self.model.run(prepared)


def load_litert(path, spec, *, threads=None, device="cpu") -> LiteRTRunner:
    return LiteRTRunner(path, spec, threads, device)


def load_litert_builtin(path, spec, *, threads=None, device="cpu") -> LiteRTRunner:
    """LiteRT with XNNPACK off: what a device without the delegate would run."""
    runner = LiteRTRunner(path, spec, threads, device, xnnpack=False)
    runner.runtime = "litert_no_xnnpack"
    return runner
