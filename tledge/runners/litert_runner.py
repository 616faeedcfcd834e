"""LiteRT runner: the `ai_edge_litert` interpreter with the XNNPACK delegate."""

from __future__ import annotations

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
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        except ImportError:
            raise RuntimeUnavailable("ai-edge-litert is not installed "
                                     "(pip install ai-edge-litert)") from None
        # without the default delegates, every operator runs on LiteRT's builtin kernels
        resolver = OpResolverType.AUTO if xnnpack else \
            OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        with quiet():
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads,
                                           experimental_op_resolver_type=resolver)
        self._input = self.interpreter.get_input_details()[0]["index"]
        self._output = self.interpreter.get_output_details()[0]["index"]
        self._batch = None

    def _run(self, prepared):
        interpreter = self.interpreter
        if prepared.shape[0] != self._batch:
            # resizing re-plans the graph: done once per batch size, never per call
            with quiet():  # LiteRT announces its XNNPACK delegate on stderr
                interpreter.resize_tensor_input(self._input, list(prepared.shape), strict=False)
                interpreter.allocate_tensors()
            self._batch = prepared.shape[0]
        interpreter.set_tensor(self._input, prepared)
        interpreter.invoke()
        return interpreter.get_tensor(self._output)


def load_litert(path, spec, *, threads=None, device="cpu") -> LiteRTRunner:
    return LiteRTRunner(path, spec, threads, device)


def load_litert_builtin(path, spec, *, threads=None, device="cpu") -> LiteRTRunner:
    """LiteRT with XNNPACK off: what a device without the delegate would run."""
    runner = LiteRTRunner(path, spec, threads, device, xnnpack=False)
    runner.runtime = "litert_no_xnnpack"
    return runner
