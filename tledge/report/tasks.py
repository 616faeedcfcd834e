"""The report's Tasks section: a multi-task model task by task, and whether it is worth it.

Per task: its classes, the Keras model's test accuracy and each artifact's accuracy and
agreement (from parity.json). With `train.compare_single_task`, the single-task models the
build trained beside it (`single_task/<task>/`, run directories of their own, exported,
validated and benchmarked like the run) are put side by side with it: accuracy per task, size,
and p50 latency of the one multi-task graph against the sum of the single-task graphs (each
from its own run's bench, same runtime, threads and batch). `benchmarks/multitask.py`
measures the latencies in turns in one process, for figures to quote.
"""

from __future__ import annotations

from pathlib import Path

from tledge import plots
from tledge.rundir import (artifacts, BENCH, MANIFEST, PARITY, read_manifest, read_record,
                           SINGLE_TASK)

ACCURACY_POINTS = 2.0  # a task may lose this much against its single-task model and still
LATENCY_RATIO = 1.0  # ... count as "worth it", when the multi-task graph is also faster


def draw(run_dir, manifest, judged, split="test") -> dict:
    """{key: (caption, path)}: a confusion matrix per task of the reference model."""
    reference = (judged.get("keras") or {}).get("tasks") or {}
    folder = Path(run_dir) / plots.FIGURES
    drawn = {}
    for task in manifest.get("tasks") or []:
        figures = (reference.get(task["name"]) or {}).get("confusion")
        path = plots.confusion(figures, task["labels"],
                               f"Reference (Keras), task {task['name']}, {split} split",
                               folder / f"confusion_{task['name']}.png")
        drawn[f"confusion_{task['name']}"] = (f"Confusion matrix of task {task['name']}", path)
    return drawn


def section(run_dir, manifest, parity, bench, figures, md) -> list[str]:
    """The Tasks section's lines ([] for a single-task run)."""
    tasks = manifest.get("tasks")
    if not tasks:
        return []
    lines = ["## Tasks", ""]
    lines.append(f"One backbone, {len(tasks)} heads: each task is an output of its own, named "
                 "after it, in every artifact.")
    lines += ["", "| task | classes | loss weight |", "|---|---|---:|"]
    for task in tasks:
        lines.append(f"| {md(task['name'])} | {len(task['labels'])}: "
                     f"{', '.join(md(label) for label in task['labels'])} | "
                     f"{task.get('loss_weight', 1.0):g} |")
    rows = [row for row in (parity or {}).get("rows", []) if row.get("tasks")]
    if rows:
        names = [task["name"] for task in tasks]
        lines += ["", f"Accuracy per task on the {parity['split']} split (agreement with the "
                      "Keras model in brackets):", "",
                  "| artifact | runtime | " + " | ".join(md(name) for name in names) + " |",
                  "|---|---|" + "---:|" * len(names)]
        for row in rows:
            cells = []
            for name in names:
                part = row["tasks"].get(name) or {}
                cell = _percent(part.get("accuracy"))
                if part.get("agreement") is not None:
                    cell += f" ({part['agreement']:.3f})"
                cells.append(cell)
            lines.append(f"| {row['artifact']} | {row['runtime']} | " + " | ".join(cells) + " |")
    for task in tasks:
        key = f"confusion_{task['name']}"
        if key in figures:
            caption, path = figures[key]
            lines += ["", f"![{caption}]({path})"]
    lines += [""] + comparison_lines(run_dir, manifest, parity, bench, md)
    return lines


def comparison(run_dir, manifest, parity, bench) -> dict | None:
    """The multi-task model against its single-task models (None when it has none): accuracy
    per task, and per (artifact, runtime) the p50 and size of the one graph against the sums.

    Raises:
        RunDirError: a single-task run's records are not what tledge writes.
    """
    tasks = manifest.get("tasks") or []
    folder = Path(run_dir) / SINGLE_TASK
    singles = {task["name"]: folder / task["name"] for task in tasks
               if (folder / task["name"] / MANIFEST).is_file()}
    if not singles or not parity:
        return None
    if len(singles) < len(tasks):
        missing = [task["name"] for task in tasks if task["name"] not in singles]
        return {"missing": missing}
    mine = _reference_tasks(parity)
    result = {"accuracy": [], "artifacts": [], "missing": []}
    single_records = {}
    for name, path in singles.items():
        single_parity = read_record(path / PARITY) if (path / PARITY).is_file() else None
        single_bench = read_record(path / BENCH) if (path / BENCH).is_file() else None
        single_records[name] = (read_manifest(path), single_parity, single_bench)
        theirs = _reference_tasks(single_parity).get(name) if single_parity else None
        result["accuracy"].append({"task": name, "multi": mine.get(name), "single": theirs})
    for key, row in _latencies(bench).items():
        artifact, runtime, threads, batch = key
        sizes = {"multi": _size(manifest, artifact)}
        p50s = []
        for name, (single_manifest, _, single_bench) in single_records.items():
            other = _latencies(single_bench).get(key)
            p50s.append(other["p50_ms"] if other else None)
            sizes[name] = _size(single_manifest, artifact)
        if None in p50s:
            continue
        single_sizes = [sizes[name] for name in single_records]
        result["artifacts"].append({
            "artifact": artifact, "runtime": runtime, "threads": threads, "batch": batch,
            "multi_p50_ms": row["p50_ms"], "single_p50_ms": p50s,
            "sum_p50_ms": sum(p50s), "ratio": row["p50_ms"] / sum(p50s) if sum(p50s) else None,
            "multi_bytes": sizes["multi"],
            "sum_bytes": sum(single_sizes) if None not in single_sizes else None})
    return result


def comparison_lines(run_dir, manifest, parity, bench, md) -> list[str]:
    found = comparison(run_dir, manifest, parity, bench)
    if found is None:
        return []
    lines = ["### One multi-task model or one model per task?", ""]
    if found.get("missing") and not found.get("accuracy"):
        return lines + [f"(the single-task models of {', '.join(found['missing'])} are not "
                        "built; `tledge build` with train.compare_single_task = true)", ""]
    lines += [f"With `train.compare_single_task`, the build also trained one single-task model "
              f"per task on the same split (in `{SINGLE_TASK}/`), with the same backbone and "
              "training.", "", "| task | multi-task model | single-task model | difference |",
              "|---|---:|---:|---:|"]
    for row in found["accuracy"]:
        difference = (row["multi"] - row["single"]) * 100 \
            if row["multi"] is not None and row["single"] is not None else None
        lines.append(f"| {md(row['task'])} | {_percent(row['multi'])} | "
                     f"{_percent(row['single'])} | "
                     + (f"{difference:+.1f} points |" if difference is not None else "n/a |"))
    if found["artifacts"]:
        lines += ["", "Latency (p50, each run's own bench; the single-task models run one after "
                      "the other) and size:", "",
                  "| artifact | runtime | threads | batch | multi-task ms | single-task ms | "
                  "ratio | multi-task KiB | single-task KiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in found["artifacts"]:
            singles = " + ".join(f"{value:.3f}" for value in row["single_p50_ms"])
            lines.append(
                f"| {row['artifact']} | {row['runtime']} | {row['threads']} | {row['batch']} | "
                f"{row['multi_p50_ms']:.3f} | {singles} = {row['sum_p50_ms']:.3f} | "
                f"{_ratio(row['ratio'])} | {_kib(row['multi_bytes'])} | {_kib(row['sum_bytes'])} |")
    lines += ["", verdict(found, manifest), ""]
    return lines


def verdict(found, manifest) -> str:
    """One sentence: is one multi-task model worth it, here?"""
    pick = (manifest.get("pick") or {}).get("artifact")
    rows = found.get("artifacts") or []
    row = next((row for row in rows if row["artifact"] == pick), None) or \
        next((row for row in rows if row["artifact"] == "tflite_int8"), None) or \
        (rows[0] if rows else None)
    losses = [(item["task"], (item["multi"] - item["single"]) * 100)
              for item in found.get("accuracy", [])
              if item["multi"] is not None and item["single"] is not None]
    worse = [(task, points) for task, points in losses if points < -ACCURACY_POINTS]
    if row is None or row["ratio"] is None:
        return "(no latency to compare: bench the run and its single-task models)"
    speed = (f"{row['artifact']} on {row['runtime']}: {row['multi_p50_ms']:.3f} ms for every "
             f"task at once against {row['sum_p50_ms']:.3f} ms for the single-task models one "
             f"after the other ({row['ratio']:.2f}x)")
    if worse:
        lost = ", ".join(f"{task} {points:+.1f} points" for task, points in worse)
        return (f"**Not worth it as trained: the multi-task model loses accuracy ({lost}; more "
                f"than {ACCURACY_POINTS:g} points against its single-task model)**, although "
                f"it is faster: {speed}. Weigh the tasks (`loss_weight`) or train longer.")
    if row["ratio"] >= LATENCY_RATIO:
        return f"**Not worth it here: one multi-task graph is not faster** ({speed})."
    within = ", ".join(f"{task} {points:+.1f}" for task, points in losses)
    return (f"**Worth it: one multi-task model answers every task {1 / row['ratio']:.1f}x "
            f"faster than the single-task models** ({speed}), each task within "
            f"{ACCURACY_POINTS:g} points of its own model ({within} points).")


def _reference_tasks(parity) -> dict:
    """{task: the Keras model's accuracy} from a parity record."""
    for row in (parity or {}).get("rows", []):
        if row.get("status") == "reference":
            return {name: part.get("accuracy") for name, part in (row.get("tasks") or {}).items()}
    return {}


def _latencies(bench) -> dict:
    """{(artifact, runtime, threads, batch): row} of a bench record's measured rows."""
    return {(row["artifact"], row["runtime"], row["threads"], row["batch"]): row
            for row in (bench or {}).get("rows", [])
            if row.get("status") == "ok" and row.get("p50_ms") is not None}


def _size(manifest, name):
    entry = next((entry for entry in artifacts(manifest) if entry["name"] == name), None)
    return entry.get("size_bytes") if entry else None


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _kib(value) -> str:
    return "n/a" if value is None else f"{value / 1024:,.0f}"
