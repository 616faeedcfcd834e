"""One multi-task graph against its single-task models' graphs, timed side by side.

A multi-task run built with `train.compare_single_task` has one single-task model per task in
`single_task/<task>/`. Whether the one graph is worth it is a ratio of latencies, and a ratio
of figures measured at different moments (each run's own bench, minutes apart on a shared
machine) measures the machine as much as the models. So the bench stage of the multi-task run
times them here, in one process and in turns: the multi-task graph for a few calls, then the
single-task graphs one after the other for as many, and again, each artifact in its own
runtime at the first [bench] thread count and batch 1. `benchmarks/multitask.py` prints the
same measurement.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tledge.rundir import artifacts, MANIFEST, read_manifest, SINGLE_TASK
from tledge.runners import load, runtimes_for

ROUNDS = 9  # turns: the multi-task graph, then the single-task graphs, each turn
CALLS = 25  # timed calls per turn and side
WARM = 3  # untimed calls per turn and side
FAMILIES = ("tflite", "onnx")  # what ships; the Keras model is the reference, not a candidate


def single_task_folders(run_dir, manifest=None) -> dict:
    """{task: its single-task run directory} for each task of a multi-task run that has one,
    in task order (`train.compare_single_task`)."""
    manifest = manifest or read_manifest(run_dir)
    folders = {task["name"]: Path(run_dir) / SINGLE_TASK / task["name"]
               for task in manifest.get("tasks") or []}
    return {task: folder for task, folder in folders.items() if (folder / MANIFEST).is_file()}


def single_task_runs(run_dir) -> dict:
    """`single_task_folders` of a multi-task run that has one for every task; {} otherwise."""
    manifest = read_manifest(run_dir)
    folders = single_task_folders(run_dir, manifest)
    return folders if folders and len(folders) == len(manifest["tasks"]) else {}


def side_by_side(run_dir, images, *, threads: int, rounds: int = ROUNDS, calls: int = CALLS,
                 log=print) -> list[dict]:
    """Per artifact that the run and every single-task model have: p50 (batch 1) of the
    multi-task graph and of the single-task graphs run one after the other, in turns.

    Every file is verified against its run's manifest before it runs (`runners.load`)."""
    folders = single_task_runs(run_dir)
    if not folders:
        return []
    image = np.asarray(images[:1])
    mine = {entry["name"]: entry for entry in artifacts(read_manifest(run_dir))
            if entry["family"] in FAMILIES}
    theirs = {task: {entry["name"]: entry for entry in artifacts(read_manifest(folder))}
              for task, folder in folders.items()}
    rows = []
    for name, entry in mine.items():
        if not all(name in found for found in theirs.values()):
            continue
        runtime = runtimes_for(entry["family"])[0]
        runners = {None: load(entry, run_dir, runtime, threads=threads)}
        for task, folder in folders.items():
            runners[task] = load(theirs[task][name], folder, runtime, threads=threads)
        try:
            prepared = {key: runner.prepare(image) for key, runner in runners.items()}
            samples = {"multi": [], "single": []}
            for _ in range(rounds):
                for side, keys in (("multi", [None]), ("single", list(folders))):
                    for _ in range(WARM):
                        for key in keys:
                            runners[key].run(prepared[key])
                    for _ in range(calls):
                        start = time.perf_counter_ns()
                        for key in keys:
                            runners[key].run(prepared[key])
                        samples[side].append(time.perf_counter_ns() - start)
        finally:
            for runner in runners.values():
                runner.close()
        multi, single = (float(np.median(samples[side])) / 1e6 for side in ("multi", "single"))
        row = {"artifact": name, "runtime": runtime, "threads": threads, "batch": 1,
               "multi_p50_ms": round(multi, 4), "single_p50_ms": round(single, 4),
               "ratio": round(multi / single, 4) if single else None,
               "multi_bytes": entry["size_bytes"],
               "single_bytes": sum(found[name]["size_bytes"] for found in theirs.values()),
               "calls": rounds * calls}
        rows.append(row)
        log(f"  {name:<16} {runtime:<18} one multi-task graph {multi:.3f} ms, the "
            f"{len(folders)} single-task graphs one after the other {single:.3f} ms "
            f"({row['ratio']:.2f}x), timed in turns")
    return rows
