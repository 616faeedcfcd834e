"""The report's figures, drawn with matplotlib (headless, Agg) from the run's JSON files only.

Each function takes what it plots (parsed JSON) and a path, writes one PNG and returns the
path, or returns None when the run holds nothing to plot. Nothing is recomputed here: a
figure shows the numbers the tables of the report show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tledge.core.metrics import per_class_accuracy as per_class
from tledge.rundir import atomic_path

# matplotlib is imported inside the functions that use it: the CLI imports this
# module at start-up, and it takes seconds to load.

FIGURES = "figures"
DPI = 110
_PNG = {"Software": None}  # no library version in the file: same JSON, same bytes


def pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    # Class names and device names are data: "$" in one is a dollar sign, not TeX to parse
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt
    return plt


def save_figure(figure, path, *, placed=False) -> Path:
    """Write `figure` as a PNG at `path` (atomically) and close it; `placed`: its axes are
    placed by hand, no layout pass."""
    path = Path(path)
    if figure.get_layout_engine() is None and not placed:  # grids use constrained layout
        figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=DPI, format="png", metadata=_PNG)
    pyplot().close(figure)
    return path


def image_grid(cells, captions, path, *, columns, title, cell_inches, fontsize=8,
               colours=None) -> Path:
    """Images in rows of `columns`, a caption above each, drawn as one picture on one axes.

    `cells` are uint8 RGB images (None leaves a cell empty); `colours`: {cell index: the
    caption's colour}, black where not given. A grid of axes, one per image, costs matplotlib seconds of layout per figure
    (every axes' bounding box measured, again and again); one image and its texts cost a tenth.
    """
    plt = pyplot()
    shown = [np.asarray(cell) for cell in cells if cell is not None]
    height, width = max(cell.shape[0] for cell in shown), max(cell.shape[1] for cell in shown)
    band, gap = max(2, round(height * 0.3)), max(1, round(width * 0.08))
    rows = -(-len(cells) // columns)
    mosaic = np.full((rows * (band + height), columns * width + (columns - 1) * gap, 3), 255,
                     np.uint8)
    title_inches = 0.18 * (title.count("\n") + 1) + 0.12
    figure = plt.figure(figsize=(cell_inches * mosaic.shape[1] / width,
                                 cell_inches * mosaic.shape[0] / width + title_inches))
    axis = figure.add_axes((0, 0, 1, 1 - title_inches / figure.get_figheight()))
    axis.axis("off")
    for index, (cell, caption) in enumerate(zip(cells, captions)):
        row, column = divmod(index, columns)
        top, left = row * (band + height) + band, column * (width + gap)
        if cell is not None:
            cell = np.asarray(cell)
            mosaic[top:top + cell.shape[0], left:left + cell.shape[1]] = cell
        if caption:
            axis.text(left + width / 2, top - band / 2, caption, ha="center", va="center",
                      fontsize=fontsize, color=(colours or {}).get(index, "black"))
    axis.imshow(mosaic, interpolation="nearest", aspect="auto")
    figure.suptitle(title, fontsize=10, y=1 - 0.04 / figure.get_figheight())
    return save_figure(figure, path, placed=True)  # no layout pass to pay for


def learning_curves(history, path) -> Path | None:
    """Accuracy and loss of both phases on one epoch axis, the phase boundary marked, and
    the from-scratch baseline's curves when the recipe had one; a multi-task model's each
    task's validation accuracy too."""
    phases = [phase for phase in (history or {}).get("phases", []) if phase["epochs"]]
    if not phases:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = {"feature_extraction": "#1f77b4", "fine_tune": "#d62728"}
    tasks = list((history.get("task_accuracy") or {}))  # a multi-task model's tasks
    for number, phase in enumerate(phases):
        epochs = [row["epoch"] for row in phase["epochs"]]  # numbered across both phases
        colour = colours.get(phase["name"], "#2ca02c")
        for axis, key in zip(axes, ("accuracy", "loss")):
            axis.plot(epochs, [row[key] for row in phase["epochs"]], "--", color=colour,
                      label=f"{phase['name']} train")
            if "val_" + key in phase["epochs"][0]:
                axis.plot(epochs, [row["val_" + key] for row in phase["epochs"]], "-o",
                          color=colour, markersize=3, label=f"{phase['name']} val"
                          + (f" ({history.get('best_by', 'mean')} of the tasks)"
                             if tasks and key == "accuracy" else ""))
            for task, marker in zip(tasks if key == "accuracy" else [], "^vsDx+"):
                column = f"val_{task}_accuracy"  # a multi-task model: each task's own curve
                if column in phase["epochs"][0]:
                    axis.plot(epochs, [row[column] for row in phase["epochs"]], ":",
                              marker=marker, color=colour, markersize=3, linewidth=1,
                              label=f"{phase['name']} val {task}")
            if number:
                axis.axvline(epochs[0] - 0.5, color="grey", linestyle=":", linewidth=1)
                axis.annotate(phase["name"].replace("_", " "), (epochs[0] - 0.4, 0.94),
                              xycoords=("data", "axes fraction"), fontsize=8, color="grey")
    baseline = history.get("baseline")
    if baseline and baseline["phase"]["epochs"]:
        rows = baseline["phase"]["epochs"]
        for axis, key in zip(axes, ("accuracy", "loss")):
            if "val_" + key in rows[0]:
                axis.plot([row["epoch"] for row in rows], [row["val_" + key] for row in rows],
                          "-s", color="#7f7f7f", markersize=3,
                          label=f"baseline {baseline['backbone']} val")
    axes[0].set_ylim(0, 1.02)
    from matplotlib.ticker import MaxNLocator
    for axis, key in zip(axes, ("accuracy", "loss")):
        axis.set_xlabel("epoch (numbered across phases)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 2.5
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    axes[0].set_title("Learning curves" + (" (dotted line: the next phase starts)"
                                           if len(phases) > 1 else ""), fontsize=10)
    return save_figure(figure, path)


def confusion(matrix, labels, title, path) -> Path | None:
    """A confusion matrix, true class down, predicted across, counts in the cells."""
    if not matrix:
        return None
    import numpy as np
    counts = np.asarray(matrix)
    plt = pyplot()
    side = max(3.5, 0.45 * len(labels) + 1.5)
    figure, axis = plt.subplots(figsize=(side + 1, side))
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for row in range(len(labels)):
        for column in range(len(labels)):
            if counts[row, column]:
                axis.text(column, row, str(counts[row, column]), ha="center", va="center",
                          fontsize=7, color="white" if shares[row, column] > 0.5 else "black")
    axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axis, fraction=0.046, label="share of the true class")
    return save_figure(figure, path)


def per_class_accuracy(series, labels, path) -> Path | None:
    """Bars of per-class accuracy (recall), one group per class, one bar per model.

    `series`: [(name, confusion matrix)]; the figures are `tledge.core.metrics`'.
    """
    series = [(name, matrix) for name, matrix in series if matrix]
    if not series:
        return None
    import numpy as np
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(labels) + 2), 3.4))
    width = 0.8 / len(series)
    for index, (name, matrix) in enumerate(series):
        # a class with no image has no bar (not a bar at 0)
        recall = [np.nan if value is None else value for value in per_class(matrix)]
        axis.bar(np.arange(len(labels)) + index * width - 0.4 + width / 2, recall, width,
                 label=name)
    axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("accuracy")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("Accuracy per class", fontsize=10)
    return save_figure(figure, path)


def _log_milliseconds(axis, values) -> None:
    """A log axis over `values`, with a few plain-number ticks (0.1, 1, 10) and no clutter."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    axis.axes.set_xscale("log")
    low, high = min(values), max(values)
    axis.axes.set_xlim(low / 1.6, high * 1.6)
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _label(row) -> str:
    return f"{row.artifact} · {row.runtime} · {row.threads}t · b{row.batch}"


def latency_bars(rows, path) -> Path | None:
    """p50 (bar) and p90 (tick) of every combination that ran (`rows`: `BenchRow`s)."""
    rows = [row for row in rows if row.status == "ok"]
    if not rows:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.3))
    positions = range(len(rows))
    axis.barh(positions, [row.p50_ms for row in rows], color="#1f77b4", label="p50")
    axis.scatter([row.p90_ms for row in rows], positions, marker="|", s=200,
                 color="#d62728", label="p90", zorder=3)
    axis.set_yticks(positions, [_label(row) for row in rows], fontsize=8)
    axis.invert_yaxis()
    _log_milliseconds(axis.xaxis, [row.p90_ms for row in rows] + [row.p50_ms for row in rows])
    axis.set_xlabel("latency per call, ms (log scale)")
    axis.grid(axis="x", alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("Latency per artifact and runtime", fontsize=10)
    return save_figure(figure, path)


def pareto_front(points):
    """Indices of the points no other point beats on both latency (lower) and accuracy
    (higher): `points` is [(latency, accuracy)]."""
    front = []
    for index, (latency, accuracy) in enumerate(points):
        dominated = any(other_latency <= latency and other_accuracy >= accuracy
                        and (other_latency, other_accuracy) != (latency, accuracy)
                        for other_latency, other_accuracy in points)
        if not dominated:
            front.append(index)
    return front


def pareto(rows, parity, pick, path) -> Path | None:
    """Accuracy against p50 latency for every combination that ran and was validated; the
    front drawn, failed parity in red, the pick starred. `rows`: `BenchRow`s; `parity`: a
    `tledge.records.Parity` (or None)."""
    checked = {(row.artifact, row.runtime): row
               for row in (parity.rows if parity else []) if row.accuracy is not None}

    def judged(row):  # the parity row of this (artifact, runtime) pair, if it was validated
        return checked.get((row.artifact, row.runtime))
    rows = [row for row in rows if row.status == "ok" and judged(row)]
    if not rows:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.2))
    points = [(row.p50_ms, judged(row).accuracy) for row in rows]
    front = pareto_front(points)
    labels = []
    for index, row in enumerate(rows):
        failed = judged(row).status == "failed"
        axis.scatter(*points[index], s=36, zorder=3,
                     color="#d62728" if failed else ("#1f77b4" if index in front else "#aaaaaa"))
        labels.append(axis.annotate(f"{row.artifact} / {row.runtime}", points[index], fontsize=7,
                                    xytext=(5, 4), textcoords="offset points"))
    ordered = sorted(points[index] for index in front)
    axis.plot(*zip(*ordered), "-", color="#1f77b4", linewidth=1, label="Pareto front")
    if pick:
        chosen = next((points[i] for i, row in enumerate(rows)
                       if (row.artifact, row.runtime, row.threads, row.batch) ==
                       (pick["artifact"], pick["runtime"], pick["threads"], pick["batch"])),
                      None)
        if chosen:
            axis.scatter(*chosen, marker="*", s=320, color="#ff7f0e", zorder=4,
                         label=f"pick: {pick['artifact']} / {pick['runtime']}")
    _log_milliseconds(axis.xaxis, [point[0] for point in points])
    accuracies = [point[1] for point in points]
    middle, half = (max(accuracies) + min(accuracies)) / 2, \
        max(0.03, (max(accuracies) - min(accuracies)) * 0.6)
    axis.set_ylim(max(0.0, middle - half), min(1.005, middle + half))
    axis.set_xlabel("p50 latency, ms (log scale)")
    axis.set_ylabel(f"accuracy ({parity.split} split)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    axis.set_title("Accuracy against latency (red: failed parity)", fontsize=10)
    figure.tight_layout()
    separate_labels(figure, labels)
    return save_figure(figure, path, placed=True)


def separate_labels(figure, labels, step: float = 9.0, tries: int = 16) -> None:
    """Move each point label that overlaps one placed before it (or a point) a line down or
    up, alternately further, until it overlaps none: two files of one speed and accuracy
    otherwise print their names over each other. Labels are placed from the left."""
    renderer = figure.canvas.get_renderer()
    placed = []
    for label in sorted(labels, key=lambda text: text.xy[0]):
        x, y = label.xyann
        for attempt in range(tries + 1):
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            shift = step * (attempt // 2 + 1) * (-1 if attempt % 2 == 0 else 1)
            label.xyann = (x, y + shift)
        placed.append(label.get_window_extent(renderer))


def sizes(entries, path) -> Path | None:
    """File size of every artifact, KiB."""
    entries = [entry for entry in entries if entry.get("size_bytes")]
    if not entries:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 0.35 * len(entries) + 1.2))
    positions = range(len(entries))
    kib = [entry["size_bytes"] / 1024 for entry in entries]
    axis.barh(positions, kib, color="#2ca02c")
    for position, value in zip(positions, kib):
        axis.annotate(f"{value:,.0f} KiB", (value, position), xytext=(3, -3),
                      textcoords="offset points", fontsize=7)
    axis.set_yticks(positions, [entry["name"] for entry in entries], fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("size, KiB")
    axis.set_xlim(0, max(kib) * 1.25)
    axis.set_title("Artifact size", fontsize=10)
    return save_figure(figure, path)


def quantization_error(diagnosis, name, path, worst: int = 3) -> Path | None:
    """Error per layer of one int8 artifact, input to output, the worst layers named."""
    layers = [layer for layer in (diagnosis or {}).get("layers", [])
              if layer.get("error") is not None]
    if not layers:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 3.2))
    errors = [layer["error"] for layer in layers]
    ranked = sorted(range(len(layers)), key=lambda index: -errors[index])[:worst]
    colors = ["#d62728" if index in ranked else "#1f77b4" for index in range(len(layers))]
    axis.bar(range(len(layers)), errors, color=colors, width=0.8)
    for place, index in enumerate(sorted(ranked)):
        label = layers[index]["name"].split(";")[0].split("/")[-2:]
        axis.annotate("/".join(label)[-32:], (index, errors[index]),
                      xytext=(0, 4 + 10 * place), textcoords="offset points", ha="center",
                      fontsize=7, color="#d62728")
    axis.set_xlabel(f"layer, input to output ({len(layers)} measured on "
                    f"{diagnosis.get('images', '?')} calibration images)")
    axis.set_ylabel(diagnosis.get("metric", "error"), fontsize=8)
    if diagnosis.get("metric", "").startswith("RMSE / quantization step"):
        axis.axhline(12 ** -0.5, color="#7f7f7f", linestyle="--", linewidth=1,
                     label="rounding alone (0.29)")
        axis.legend(fontsize=7, loc="lower right")
    axis.set_ylim(0, max(errors) * 1.35 or 1)
    axis.grid(axis="y", alpha=0.3)
    axis.set_title(f"Where {name}'s quantization error comes from", fontsize=10)
    return save_figure(figure, path)


def tuning_front(trials, front, best, as_written, tune, path) -> Path | None:
    """A study's trials: validation accuracy against the p50 of each finished trial's fastest
    artifact within the constraints (marker area: file size), the Pareto front drawn, the
    recipe as written and the best trial marked; trials outside the constraints hollow."""
    shown = [trial for trial in trials if trial["state"] == "complete"
             and trial["value"] is not None and trial.get("points")]
    if not shown:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.2))

    def where(trial):
        point = trial["deployable"] or min(trial["points"], key=lambda p: p["p50_ms"])
        return point["p50_ms"], trial["value"], point["size_kb"]
    sizes = [where(trial)[2] for trial in shown]
    largest = max(sizes) or 1.0
    labels = []
    for trial in shown:
        x, y, size = where(trial)
        inside = trial["deployable"] is not None
        colour = "#1f77b4" if trial["number"] in front else "#999999"
        axis.scatter(x, y, s=30 + 170 * size / largest, zorder=3,
                     facecolors=colour if inside else "none", edgecolors=colour)
        labels.append(axis.annotate(str(trial["number"]), (x, y), fontsize=7, xytext=(5, 4),
                                    textcoords="offset points"))
    ordered = sorted(where(trial)[:2] for trial in shown if trial["number"] in front)
    if ordered:
        axis.plot(*zip(*ordered), "-", color="#1f77b4", linewidth=1, label="Pareto front")
    for trial, marker, colour, name in ((as_written, "s", "#2ca02c", "as written"),
                                        (best, "*", "#ff7f0e", "best")):
        if trial is not None and trial in shown:
            x, y, _ = where(trial)
            axis.scatter(x, y, marker=marker, s=220 if marker == "*" else 90, color=colour,
                         zorder=4, label=f"{name} (trial {trial['number']})", alpha=0.85)
    if tune.max_latency_ms:
        axis.axvline(tune.max_latency_ms, color="#d62728", linestyle="--", linewidth=1,
                     label=f"max_latency_ms {tune.max_latency_ms:g}")
    _log_milliseconds(axis.xaxis, [where(trial)[0] for trial in shown])
    axis.set_xlabel(f"p50 latency on {tune.runtime}, ms (log scale)")
    axis.set_ylabel("validation accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    axis.set_title("Trials: accuracy against latency (area: file size; hollow: outside the "
                   "constraints)", fontsize=9)
    figure.tight_layout()
    separate_labels(figure, labels)
    return save_figure(figure, path, placed=True)
