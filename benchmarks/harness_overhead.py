"""tledge's benchmark harness against a bare runtime loop, on the same file, in one run.

For a .tflite (LiteRT, XNNPACK) and an .onnx (ONNX Runtime), both at batch 1 on the same
thread count: the p50 that `tledge bench` reports (runner, timing loop and all) and the p50
of the thinnest possible loop (set input, invoke, get output; perf_counter_ns around each
call). The ratio says how much tledge's harness adds. Runs alternate, so drift in the
machine's speed hits both alike.

    python benchmarks/harness_overhead.py [--run models/quickstart] [--threads 2] [--runs 2000]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def bare_litert(path, image, threads, runs):
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    interpreter.resize_tensor_input(inp, list(image.shape))
    interpreter.allocate_tensors()
    samples = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        interpreter.set_tensor(inp, image)
        interpreter.invoke()
        interpreter.get_tensor(out)
        samples.append(time.perf_counter_ns() - start)
    return samples


def bare_onnxruntime(path, image, threads, runs):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    samples = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        session.run(None, {name: image})
        samples.append(time.perf_counter_ns() - start)
    return samples


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="models/quickstart", help="a built run directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import numpy as np
    from tledge.core.timing import summarize
    from tledge.bench.stage import bench_artifact
    from tledge.rundir import find_artifact, read_manifest

    run_dir = Path(args.run)
    manifest = read_manifest(run_dir)
    rng = np.random.default_rng(0)
    cases = (("tflite_fp32", "litert", bare_litert), ("tflite_int8", "litert", bare_litert),
             ("onnx_fp32", "onnxruntime", bare_onnxruntime))
    print(f"{run_dir}, batch 1, {args.threads} threads, {args.rounds} alternating rounds of "
          f"{args.runs} runs, {time.strftime('%Y-%m-%d')}")
    print(f"{'artifact':<14} {'runtime':<12} {'tledge p50 ms':>14} {'bare p50 ms':>12} "
          f"{'ratio':>7}")
    for name, runtime, bare in cases:
        entry = find_artifact(manifest, name)
        image = rng.integers(0, 256, (1, *manifest["image_size"], 3), dtype=np.uint8)
        fed = image if entry["input"]["dtype"] == "uint8" else image.astype(np.float32)
        ours, theirs = [], []
        for _ in range(args.rounds):
            row = bench_artifact(entry, run_dir, runtime, threads=args.threads, batch=1,
                                 images=image, warmup=20, min_runs=args.runs, min_seconds=0)
            ours.append(row.p50_ms)
            bare(run_dir / entry["path"], fed, args.threads, 20)  # warm-up, as tledge does
            theirs.append(summarize(bare(run_dir / entry["path"], fed, args.threads,
                                         args.runs), 1)["p50_ms"])
        tledge_p50, bare_p50 = float(np.median(ours)), float(np.median(theirs))
        print(f"{name:<14} {runtime:<12} {tledge_p50:14.4f} {bare_p50:12.4f} "
              f"{tledge_p50 / bare_p50:6.3f}x")


if __name__ == "__main__":
    main()
