"""The report's Tasks section: a multi-task model task by task, and whether it is worth it.

Per task: its classes, the Keras model's test accuracy and each artifact's accuracy and
agreement (from parity.json). With `train.compare_single_task`, the single-task models the
build trained beside it (`single_task/<task>/`, run directories of their own, exported,
validated and benchmarked like the run) are put side by side with it: accuracy per task, size,
and p50 latency of the one multi-task graph against the single-task graphs one after the other,
as the run's bench stage timed them side by side (`tledge.bench.single_task`).
"""

from __future__ import annotations

from pathlib import Path

from tledge import plots
from tledge.bench.single_task import single_task_folders
from tledge.records import read_parity
from tledge.rundir import read_manifest, SINGLE_TASK

ACCURACY_POINTS = 2.0  # a task may lose this much against its single-task model and still
LATENCY_RATIO = 1.0  # ... count as "worth it", when the multi-task graph is also faster


def draw(run_dir, manifest, judged, split="test") -> dict:
    """{key: (caption, path)}: a confusion matrix per task of the reference model."""
    keras = judged.get("keras")
    reference = (keras.tasks if keras else None) or {}
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
    rows = [row for row in (parity.rows if parity else []) if row.tasks]
    if rows:
        names = [task["name"] for task in tasks]
        lines += ["", f"Accuracy per task on the {parity.split} split (agreement with the "
                      "Keras model in brackets):", "",
                  "| artifact | runtime | " + " | ".join(md(name) for name in names) + " |",
                  "|---|---|" + "---:|" * len(names)]
        for row in rows:
            cells = []
            for name in names:
                part = row.tasks.get(name) or {}
                cell = _percent(part.get("accuracy"))
                if part.get("agreement") is not None:
                    cell += f" ({part['agreement']:.3f})"
                cells.append(cell)
            lines.append(f"| {row.artifact} | {row.runtime} | " + " | ".join(cells) + " |")
    for task in tasks:
        key = f"confusion_{task['name']}"
        if key in figures:
            caption, path = figures[key]
            lines += ["", f"![{caption}]({path})"]
    lines += [""] + comparison_lines(run_dir, manifest, parity, bench, md)
    return lines


def comparison(run_dir, manifest, parity, bench) -> dict | None:
    """The multi-task model against its single-task models (None when it has none): accuracy
    per task (each model's Keras reference on the same split), and per artifact the p50 and
    size of the one graph against the single-task graphs (bench.json's "single_task": timed
    side by side, in turns, by the bench stage).

    Raises:
        RunDirError: a single-task run's records are not what tledge writes.
    """
    tasks = manifest.get("tasks") or []
    singles = single_task_folders(run_dir, manifest)
    if not singles or not parity:
        return None
    mine = _reference_tasks(parity)
    result = {"accuracy": [], "artifacts": [],
              "missing": [task["name"] for task in tasks if task["name"] not in singles]}
    for name, path in singles.items():
        read_manifest(path)  # a single-task run tledge wrote, or a one-line error
        theirs = _reference_tasks(read_parity(path)).get(name)
        result["accuracy"].append({"task": name, "multi": mine.get(name), "single": theirs})
    if not result["missing"]:
        result["artifacts"] = list(bench.single_task) if bench else []
    return result


def comparison_lines(run_dir, manifest, parity, bench, md) -> list[str]:
    found = comparison(run_dir, manifest, parity, bench)
    if found is None:
        return []
    lines = ["### One multi-task model or one model per task?", ""]
    if found["missing"]:
        lines += [f"(no single-task model of {', '.join(found['missing'])}: build the run with "
                  "train.compare_single_task = true)", ""]
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
        lines += ["", "Latency at batch 1 (p50, timed side by side by the bench stage: the "
                      "multi-task graph and the single-task graphs one after the other, in "
                      "turns, in one process) and size:", "",
                  "| artifact | runtime | threads | multi-task ms | single-task ms | ratio | "
                  "multi-task KiB | single-task KiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in found["artifacts"]:
            lines.append(
                f"| {row['artifact']} | {row['runtime']} | {row['threads']} | "
                f"{row['multi_p50_ms']:.3f} | {row['single_p50_ms']:.3f} | "
                f"{_ratio(row['ratio'])} | {_kib(row['multi_bytes'])} | "
                f"{_kib(row['single_bytes'])} |")
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
        return ("(no latency to compare yet: `tledge bench` the run, with its single-task "
                "models built, times them side by side)")
    speed = (f"{row['artifact']} on {row['runtime']}: {row['multi_p50_ms']:.3f} ms for every "
             f"task at once against {row['single_p50_ms']:.3f} ms for the single-task models "
             f"one after the other ({row['ratio']:.2f}x)")
    if worse:
        lost = ", ".join(f"{task} {points:+.1f} points" for task, points in worse)
        return (f"**Not worth it as trained: the multi-task model loses accuracy ({lost}; more "
                f"than {ACCURACY_POINTS:g} points against its single-task model)**, although "
                f"it is faster: {speed}. Weigh the tasks (`loss_weight`) or train longer.")
    if row["ratio"] >= LATENCY_RATIO:
        return f"**Not worth it here: one multi-task graph is not faster** ({speed})."
    within = ", ".join(f"{task} {points:+.1f}" for task, points in losses)
    return (f"**Worth it: one multi-task model answers every task {1 / row['ratio']:.1f}x "
            f"faster than the single-task models** ({speed}), and no task more than "
            f"{ACCURACY_POINTS:g} points below its own single-task model ({within} points).")


def _reference_tasks(parity) -> dict:
    """{task: the Keras model's accuracy} from a `Parity` (None: {})."""
    reference = parity.reference if parity else None
    return {name: part.get("accuracy")
            for name, part in ((reference.tasks if reference else None) or {}).items()}


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _kib(value) -> str:
    return "n/a" if value is None else f"{value / 1024:,.0f}"
