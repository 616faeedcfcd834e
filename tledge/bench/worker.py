"""One benchmark combination in a process of its own: `python -m tledge.bench.worker`.

Reads a JSON job on stdin (artifact entry, run directory, runtime, threads, batch, timing
settings, and an .npy file of images), runs `tledge.bench.stage.bench_artifact` and prints the row
as JSON, with the process's resident memory before loading the runtime and at its peak.
A process per combination keeps one runtime's memory out of another's figure, and lets
TensorFlow size its thread pool for this row alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from tledge.bench.core import peak_rss_bytes


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # this process's own output is JSON
    job = json.loads(sys.stdin.read())
    import numpy as np
    from tledge.bench.stage import bench_artifact
    images = np.load(job["images"])
    baseline = peak_rss_bytes()
    row = bench_artifact(job["entry"], job["run_dir"], job["runtime"], threads=job["threads"],
                         batch=job["batch"], images=images, warmup=job["warmup"],
                         min_runs=job["min_runs"], min_seconds=job["min_seconds"])
    row.peak_rss_mb = round(peak_rss_bytes() / 2**20, 1)
    row.runtime_rss_mb = round((peak_rss_bytes() - baseline) / 2**20, 1)
    sys.stdout.write("\nTLEDGE-ROW " + json.dumps(dataclasses.asdict(row)) + "\n")


if __name__ == "__main__":
    main()
