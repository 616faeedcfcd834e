"""One multi-task graph against one single-task graph per task, measured side by side.

For a multi-task run built with `train.compare_single_task = true` (its single-task models in
`single_task/<task>/`): per task, the test accuracy of the multi-task model and of its
single-task model (from each run's parity.json); then, per artifact, p50 latency at batch 1
of the one multi-task graph against the single-task graphs run one after the other, timed in
turns in this process (same runtime, same threads), and the sizes. Every file is checked
against its manifest before it runs.

    tledge build recipes/multitask_quickstart.toml
    python benchmarks/multitask.py models/multitask_quickstart --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROUNDS = 15  # turns: multi-task graph, then the single-task graphs, each turn
CALLS = 40  # calls per graph per turn


def main():
    from tledge.bench.core import machine_facts
    from tledge.rundir import artifacts, PARITY, read_manifest, read_record, SINGLE_TASK
    from tledge.run_inputs import evaluation_split, run_splits
    from tledge.runners import load, runtimes_for
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="models/multitask_quickstart")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--artifacts", default="tflite_fp32,tflite_int8,onnx_fp32,onnx_int8")
    args = parser.parse_args()
    run = Path(args.run)
    manifest = read_manifest(run)
    tasks = [task["name"] for task in manifest.get("tasks") or []]
    singles = {task: run / SINGLE_TASK / task for task in tasks}
    missing = [task for task, folder in singles.items() if not (folder / "manifest.json").is_file()]
    if not tasks or missing:
        raise SystemExit(f"{run}: needs a multi-task run built with train.compare_single_task "
                         f"= true (missing single-task models: {', '.join(missing) or 'all'})")
    facts = machine_facts()
    print(f"machine: {facts['cpu']} ({facts['isa']}), {facts['cores']} cores; "
          f"{time.strftime('%Y-%m-%d')}; threads {args.threads}, batch 1")

    def reference(folder):
        row = next(row for row in read_record(folder / PARITY)["rows"]
                   if row["status"] == "reference")
        return {name: part["accuracy"] for name, part in row["tasks"].items()}
    mine = reference(run)
    print("\n| task | multi-task model | single-task model | difference |")
    print("|---|---:|---:|---:|")
    for task in tasks:
        theirs = reference(singles[task])[task]
        print(f"| {task} | {mine[task]:.1%} | {theirs:.1%} | "
              f"{(mine[task] - theirs) * 100:+.1f} points |")

    images, _, _ = evaluation_split(run_splits(run))
    image = np.asarray(images[:1])
    print("\n| artifact | runtime | multi-task p50 ms | single-task p50 ms (one after the "
          "other) | ratio | multi-task KiB | single-task KiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.artifacts.split(","):
        entries = {}
        for label, folder in [("multi", run), *singles.items()]:
            found = [entry for entry in artifacts(read_manifest(folder)) if entry["name"] == name]
            if found:
                entries[label] = (folder, found[0])
        if len(entries) < len(tasks) + 1:
            continue
        runtime = runtimes_for(entries["multi"][1]["family"])[0]
        runners = {label: load(entry, folder, runtime, threads=args.threads)
                   for label, (folder, entry) in entries.items()}
        prepared = {label: runner.prepare(image) for label, runner in runners.items()}
        samples = {"multi": [], "single": []}
        for _ in range(ROUNDS):  # in turns, so a busy moment of the machine hits both
            for label in ("multi", "single"):
                chosen = ["multi"] if label == "multi" else tasks
                for _ in range(3):  # warm
                    for key in chosen:
                        runners[key].run(prepared[key])
                for _ in range(CALLS):
                    start = time.perf_counter_ns()
                    for key in chosen:
                        runners[key].run(prepared[key])
                    samples[label].append(time.perf_counter_ns() - start)
        for runner in runners.values():
            runner.close()
        multi, single = (np.median(samples[key]) / 1e6 for key in ("multi", "single"))
        sizes = {label: entry["size_bytes"] / 1024 for label, (_, entry) in entries.items()}
        print(f"| {name} | {runtime} | {multi:.3f} | {single:.3f} | {multi / single:.2f}x | "
              f"{sizes['multi']:,.0f} | {sum(sizes[task] for task in tasks):,.0f} |")


if __name__ == "__main__":
    main()
