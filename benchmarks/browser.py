"""The same files in a browser and natively, side by side in one run.

For each .tflite and .onnx artifact of a run (models/quickstart by default): its native
runtime (LiteRT, ONNX Runtime) and its browser runtime (LiteRT.js, ONNX Runtime Web in
headless Chromium), loaded together, then timed in alternating rounds (`--rounds`, each
`tledge.core.timing.time_runner`: the browser times itself inside the page) so that a slow
spell of the machine hits both alike; the table gives the median of the rounds' p50s and
p90s, the browser's p50 as a multiple of the native one, and how often the two answer alike
on the run's evaluation images. The CPU, its ISA, the browser, its backend and threads are
printed.

    python benchmarks/browser.py [models/quickstart] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PAIRS = {"tflite": ("litert", "litert_web"), "onnx": ("onnxruntime", "onnxruntime_web")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="models/quickstart")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=100, help="timed runs per round")
    args = parser.parse_args()

    import datetime
    import numpy as np
    from tledge.core.machine import machine_facts
    from tledge.core.timing import summarize, time_runner
    from tledge.quiet import quiet_tensorflow
    from tledge.run_inputs import evaluation_split, run_recipe, run_splits
    from tledge.rundir import artifacts, read_manifest
    from tledge.runners import load
    quiet_tensorflow()

    manifest = read_manifest(args.run)
    images = np.asarray(evaluation_split(run_splits(args.run, run_recipe(args.run)))[0])
    facts = machine_facts()
    print(f"{args.run} on {facts['cpu']} ({facts['isa']}), {os.cpu_count()} cores, "
          f"{args.threads} threads, batch 1, {datetime.date.today()}")
    print(f"{'artifact':<14} {'runtime':<16} {'p50 ms':>8} {'p90 ms':>8} {'x native':>9} "
          f"{'agrees':>7}  what ran")
    for entry in artifacts(manifest):
        if entry["family"] not in PAIRS:
            continue
        runners = [load(entry, args.run, runtime, threads=args.threads)
                   for runtime in PAIRS[entry["family"]]]
        try:
            answers = [runner.predict(images).argmax(1) for runner in runners]
            one = runners[0].prepare(images[:1])
            rounds = {runtime: [] for runtime in PAIRS[entry["family"]]}
            for _ in range(args.rounds):
                for runtime, runner in zip(PAIRS[entry["family"]], runners):
                    _, samples = time_runner(runner, one, warmup=10, min_runs=args.runs,
                                             min_seconds=0.0, max_runs=args.runs)
                    stats = summarize(samples, 1)
                    rounds[runtime].append((stats["p50_ms"], stats["p90_ms"]))
            native = float(np.median([p50 for p50, _ in rounds[PAIRS[entry["family"]][0]]]))
            for runtime, runner, answer in zip(PAIRS[entry["family"]], runners, answers):
                p50 = float(np.median([p50 for p50, _ in rounds[runtime]]))
                p90 = float(np.median([p90 for _, p90 in rounds[runtime]]))
                agrees = float(np.mean(answer == answers[0]))
                print(f"{entry['name']:<14} {runtime:<16} {p50:>8.3f} {p90:>8.3f} "
                      f"{p50 / native:>8.2f}x {agrees:>7.4f}  {runner.executed or ''}")
        finally:
            for runner in runners:
                runner.close()


if __name__ == "__main__":
    main()
