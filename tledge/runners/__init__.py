"""One runner interface for every runtime.

    runner = load(artifact, run_dir, runtime="litert", threads=2)
    probabilities = runner.predict(uint8_images)   # [batch, H, W, 3] -> [batch, classes]

A multi-task artifact (one output per task, `tledge.tasks`) gives its outputs side by side:
[batch, sum of the tasks' classes], in the manifest's task order, each block a softmax; its
`output` spec is then a list of per-output specs, and `runner.outputs` their tensor names.

Validation and benchmarking both go through here, so an accuracy figure and a latency figure
always describe the same code path. A runtime that cannot run on this machine raises
`RuntimeUnavailable` with the reason; callers turn it into a "skipped" row.
A new runtime is one module with a `load_<name>` function and one row in `RUNTIMES`.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from pathlib import Path
from typing import Callable

from tledge.core.engines import dequantize, output_names, prepare_pixels
from tledge.errors import RuntimeUnavailable
from tledge.formats import RuntimeRow, RUNTIME_ROWS
from tledge.rundir import verified_artifact


@dataclasses.dataclass(frozen=True)
class Runtime(RuntimeRow):
    """A row of the runtime table (`tledge.formats.RUNTIME_ROWS`) with what it does."""

    def load(self, path, spec, threads, device) -> "Runner":
        loader: Callable = getattr(importlib.import_module(self.module), self.loader)
        return loader(path, spec, threads=threads, device=self.device or device)

    def unavailable(self) -> str | None:
        """Why this runtime cannot run on this machine, found cheaply; None when it may."""
        check = getattr(importlib.import_module(self.module), "unavailable", None)
        return check(self.device or "cpu", self.loader) if check else None


RUNTIMES: dict[str, Runtime] = {row.name: Runtime(**dataclasses.asdict(row))
                                for row in RUNTIME_ROWS}


class Runner(abc.ABC):
    """A loaded artifact in one runtime. Subclasses implement `_run` on prepared input."""

    runtime = ""
    executed: str | None = None  # how the runtime says it ran the graph, where it may differ
    # from the artifact (OpenVINO's inference precision); recorded in parity and bench rows

    def __init__(self, spec: dict, threads: int, device: str):
        self.spec, self.threads, self.device = spec, threads, device
        self.outputs = output_names(spec["output"])  # several outputs: names in task order

    def prepare(self, images):
        """Raw uint8 pixels to what this artifact's input tensor takes (outside timing)."""
        return prepare_pixels(images, self.spec["input"])

    def run(self, prepared):
        """Run prepared input; returns the raw output (what benchmarks time): the outputs
        side by side, for a multi-output artifact."""
        return self._run(prepared)

    def finish(self, raw):
        """Raw output to float probabilities."""
        return dequantize(raw, self.spec["output"])

    def predict(self, images):
        """uint8 images [batch, H, W, 3] -> probabilities [batch, classes] (float32)."""
        return self.finish(self.run(self.prepare(images)))

    @abc.abstractmethod
    def _run(self, prepared):
        """Execute the artifact on prepared input; each runtime module implements it."""

    def close(self) -> None:
        pass


def runtimes_for(family: str) -> tuple[str, ...]:
    return tuple(name for name, row in RUNTIMES.items() if family in row.families)


def load(artifact: dict, run_dir, runtime: str | None = None, *, threads: int | None = None,
         device: str = "cpu") -> Runner:
    """Load a manifest artifact in a runtime (its first runtime when none is named).

    `threads` None leaves the runtime's own default (validation); benchmarks name a count.

    Raises:
        RuntimeUnavailable: the runtime is not installed, cannot run this artifact, or
            the device is not present.
    """
    runtime = runtime or runtimes_for(artifact["family"])[0]
    row = RUNTIMES.get(runtime)
    if row is None:
        raise RuntimeUnavailable(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    if artifact["family"] not in row.families:
        raise RuntimeUnavailable(f"{runtime} does not run {artifact['family']} artifacts")
    path = verified_artifact(run_dir, artifact) if artifact.get("sha256") \
        else Path(run_dir) / artifact["path"]
    spec = {"input": artifact["input"], "output": artifact["output"],
            "precision": artifact.get("precision")}
    return row.load(path, spec, threads, device)

