"""One multi-task graph against one single-task graph per task, measured side by side.

For a multi-task run built with `train.compare_single_task = true` (its single-task models in
`single_task/<task>/`): per task, the test accuracy of the multi-task model and of its
single-task model (from each run's parity.json); then, per artifact, p50 latency at batch 1
of the one multi-task graph against the single-task graphs run one after the other, timed in
turns in this process (same runtime, same threads; `tledge.bench.single_task`, the bench
stage's measurement, with more turns), and the sizes. Every file is checked against its
manifest before it runs.

    tledge build recipes/multitask_quickstart.toml
    python benchmarks/multitask.py models/multitask_quickstart --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROUNDS = 15  # turns: multi-task graph, then the single-task graphs, each turn (more than the
CALLS = 40  # bench stage's, for figures to quote)


def main():
    from tledge.core.machine import machine_facts
    from tledge.bench.single_task import side_by_side
    from tledge.rundir import PARITY, read_manifest, read_record, SINGLE_TASK
    from tledge.run_inputs import evaluation_split, run_splits
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
    rows = side_by_side(run, images, threads=args.threads, rounds=ROUNDS, calls=CALLS,
                        log=lambda line: None)
    print("\n| artifact | runtime | multi-task p50 ms | single-task p50 ms (one after the "
          "other) | ratio | multi-task KiB | single-task KiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['artifact']} | {row['runtime']} | {row['multi_p50_ms']:.3f} | "
              f"{row['single_p50_ms']:.3f} | {row['ratio']:.2f}x | "
              f"{row['multi_bytes'] / 1024:,.0f} | {row['single_bytes'] / 1024:,.0f} |")


if __name__ == "__main__":
    main()
