"""One benchmark combination in a process of its own: `python -m tledge.bench.worker`.

Reads a JSON job on stdin (artifact entry, run directory, runtime, threads, batch, timing
settings, and an .npy file of images), runs `tledge.bench.stage.bench_artifact` and emits the
row (`tledge.core.timing.emit_row`), memory figures included. `tledge.core.timing.run_child`
starts it and reads the row back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

from tledge.core.timing import emit_row
from tledge.bench.stage import bench_artifact


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # this process's own output is JSON
    job = json.loads(sys.stdin.read())
    row = bench_artifact(job["entry"], job["run_dir"], job["runtime"], threads=job["threads"],
                         batch=job["batch"], images=np.load(job["images"]),
                         warmup=job["warmup"], min_runs=job["min_runs"],
                         min_seconds=job["min_seconds"])
    emit_row(dataclasses.asdict(row))


if __name__ == "__main__":
    main()
