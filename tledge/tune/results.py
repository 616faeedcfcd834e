"""What a study found: each trial's figures read from its run directory, the accuracy /
latency / size Pareto front, the best recipe as a TOML file, and the study's report.

A trial's figures come from its own records: the validation accuracy of the weights its
training kept (what the search optimises: the test split is never used to choose), and
every artifact that passed parity and ran on [tune]'s runtime, with its p50, size, memory
and test-split accuracy. Where [tune] names a device and that device's imported result
(`tledge bench RUN --import`) timed the artifact (the same sha256), the device's p50 ranks it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tledge.bench.stage import candidates
from tledge.doctor import diagnose, report_lines
from tledge.errors import RecipeError, RunDirError
from tledge.core.metrics import wilson_lower_bound
from tledge.core.timing import beyond_noise
from tledge.plots import FIGURES, tuning_front
from tledge.recipe.dump import dump_toml
from tledge.recipe.load import parse_recipe
from tledge.records import read_bench, read_devices, read_history, read_parity
from tledge.report.document import md, to_html
from tledge.rundir import (artifacts, read_manifest, read_record, SPLIT, write_json,
                           write_text)
from tledge.tune.space import best_recipe_document, tune_threads

REPORT_MD, REPORT_HTML, SUMMARY, BEST = "report.md", "report.html", "tuning.json", "best.toml"


def kept_val_accuracy(history) -> float | None:
    """The validation accuracy of the weights a run's training kept."""
    phases = {phase.get("name"): phase for phase in history.get("phases") or []
              if not phase.get("skipped")}
    kept = (history.get("verdict") or {}).get("kept")
    if kept in phases and phases[kept].get("best_val_accuracy") is not None:
        return float(phases[kept]["best_val_accuracy"])
    scores = [phase["best_val_accuracy"] for phase in phases.values()
              if phase.get("best_val_accuracy") is not None]
    return float(max(scores)) if scores else None


def _device_rows(run_dir, device: str, checksums: dict, threads: int) -> dict:
    """{artifact: BenchRow} of the imported device result named `device`, for the artifacts
    it ran that are the files the run holds now (at `threads` where it timed those)."""
    if not device:
        return {}
    result = read_devices(run_dir).get(device)
    if result is None:
        return {}
    rows = {}
    for row in sorted(result.rows, key=lambda row: row.threads != threads):  # ours first
        if row.status == "ok" and row.batch == 1 and \
                result.artifacts.get(row.artifact) == checksums.get(row.artifact):
            rows.setdefault(row.artifact, row)
    return rows


def trial_points(run_dir, tune, threads: int) -> list[dict]:
    """Every artifact of a trial's run that passed parity and ran on [tune]'s runtime at
    `threads` and batch 1: p50, size, memory and test-split accuracy."""
    manifest = read_manifest(run_dir)
    checksums = {entry["name"]: entry.get("sha256") for entry in artifacts(manifest)}
    bench, parity = read_bench(run_dir), read_parity(run_dir)
    if bench is None or parity is None:
        return []
    memory = {(row.artifact, row.runtime): row.runtime_rss_mb for row in bench.rows
              if row.threads == threads and row.batch == 1}
    device_rows = _device_rows(run_dir, tune.device, checksums, threads)
    points = []
    for candidate in candidates(bench.rows, parity, threads=threads, batch=1,
                                checksums=checksums):
        if candidate["runtime"] != tune.runtime:
            continue
        point = {"artifact": candidate["artifact"], "runtime": candidate["runtime"],
                 "p50_ms": candidate["p50_ms"], "p90_ms": candidate["p90_ms"],
                 "size_kb": (candidate["size_bytes"] or 0) / 1024,
                 "memory_mb": memory.get((candidate["artifact"], candidate["runtime"])),
                 "test_accuracy": candidate["accuracy"], "parity": candidate["parity"],
                 "timed_on": "host"}
        on_device = device_rows.get(candidate["artifact"])
        if on_device is not None:
            point.update(p50_ms=on_device.p50_ms, p90_ms=on_device.p90_ms, timed_on=tune.device)
        points.append(point)
    return points


def excess(point, tune) -> list[float]:
    """How far a point is over each constraint (0 or less: within it), as fractions."""
    limits = [(point["p50_ms"], tune.max_latency_ms), (point["size_kb"], tune.max_size_kb),
              (point.get("memory_mb"), tune.max_memory_mb)]
    return [0.0 if limit is None or value is None else (value - limit) / max(limit, 1e-9)
            for value, limit in limits]


def _val_images(run_dir) -> int | None:
    """How many validation images a run's accuracy on validation was measured on."""
    try:
        return int(read_record(Path(run_dir) / SPLIT)["splits"]["val"]["count"])
    except (RunDirError, KeyError, TypeError, ValueError):
        return None


def validation_noise(value: float, images: int) -> float:
    """Half the width of the 95 % interval of an accuracy measured on `images` images (the
    Wilson interval's lower side): trials closer than this are not told apart by the split."""
    return value - wilson_lower_bound(value, images, confidence=0.975)


def trial_summary(run_dir, tune, threads: int) -> dict:
    """A finished trial's figures (see the module's docstring), as the study keeps them."""
    history = read_history(run_dir) or {}
    value = kept_val_accuracy(history)
    points = trial_points(run_dir, tune, threads)
    feasible = [point for point in points if max(excess(point, tune)) <= 0]
    deployable = min(feasible, key=lambda p: (p["p50_ms"], -(p["test_accuracy"] or 0.0))) \
        if feasible else None
    closest = min(points, key=lambda p: max(excess(p, tune))) if points else None
    summary = {"value": value, "test_accuracy": history.get("test_accuracy"),
               "val_images": _val_images(run_dir),
               "points": points, "deployable": deployable, "closest": closest,
               "constraints": excess(closest, tune) if closest else [1.0, 1.0, 1.0],
               "doctor": [finding.kind for finding in diagnose(history)]}
    if not points:
        summary["problem"] = f"no artifact passed parity and ran on {tune.runtime}"
    elif deployable is None:
        summary["problem"] = "no artifact within the constraints"
    shown = f"validation accuracy {value:.4f}" if value is not None else "no validation accuracy"
    if deployable:
        shown += (f", {deployable['artifact']} on {deployable['runtime']}: p50 "
                  f"{deployable['p50_ms']:.3f} ms, {deployable['size_kb']:.0f} KiB, test "
                  f"accuracy {_cell(deployable['test_accuracy'])}")
    else:
        shown += f"; {summary['problem']}"
    summary["line"] = shown
    return summary


# -- the study's results ------------------------------------------------------------------


def _trials(study, recipe, study_dir) -> list[dict]:
    """Every trial as plain data, a finished one's figures read again from its run directory
    when this host has it (a device result imported since ranks it now)."""
    import optuna
    found = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == optuna.trial.TrialState.WAITING:
            continue
        attrs = dict(trial.user_attrs)
        run = attrs.get("run")
        if trial.state == optuna.trial.TrialState.COMPLETE and run and \
                (Path(study_dir) / run).is_dir():
            try:
                attrs.update(trial_summary(Path(study_dir) / run, recipe.tune,
                                           tune_threads(recipe)))
            except RunDirError:  # changed or damaged since: the figures it had then stand
                pass
        found.append({"number": trial.number, "state": trial.state.name.lower(),
                      "seed": attrs.get("seed", "sampled"), "values": attrs.get("values") or {},
                      "value": attrs.get("value"), "test_accuracy": attrs.get("test_accuracy"),
                      "deployable": attrs.get("deployable"), "points": attrs.get("points") or [],
                      "error": attrs.get("error"), "pruned": attrs.get("pruned"),
                      "last": ([trial.intermediate_values[max(trial.intermediate_values)]]
                               if trial.intermediate_values else [None])[0],
                      "seconds": attrs.get("seconds"), "run": run, "doctor": attrs.get("doctor"),
                      "val_images": attrs.get("val_images"),
                      "feasible": attrs.get("deployable") is not None,
                      "again": attrs.get("again")})
    return found


def _beats(one, other) -> bool:
    """Whether trial `one` is at least as good as `other` on validation accuracy, size and p50
    (speeds within the measured noise count as one: `beyond_noise`), and better on one."""
    a, b = one["deployable"], other["deployable"]
    timing = lambda point: (point["p50_ms"], point.get("p90_ms"))  # noqa: E731
    two_speeds = beyond_noise(timing(a), timing(b))
    if one["value"] < other["value"] or a["size_kb"] > b["size_kb"] or \
            (two_speeds and a["p50_ms"] > b["p50_ms"]):
        return False
    return one["value"] > other["value"] or a["size_kb"] < b["size_kb"] or two_speeds


def front(trials) -> list[int]:
    """Numbers of the finished trials within the constraints that no other beats on
    validation accuracy, p50 and size (each at its fastest artifact within them)."""
    shown = [trial for trial in trials if trial["state"] == "complete" and trial["feasible"]
             and trial["value"] is not None]
    return [trial["number"] for trial in shown
            if not any(_beats(other, trial) for other in shown if other is not trial)]


def best_trial(trials) -> dict | None:
    """The most accurate finished trial within the constraints (on validation), the faster
    on a tie."""
    pool = [trial for trial in trials if trial["state"] == "complete" and trial["feasible"]
            and trial["value"] is not None]
    return max(pool, key=lambda t: (round(t["value"], 6), -t["deployable"]["p50_ms"])) \
        if pool else None


def _importances(study, recipe) -> dict:
    """{key: share of the spread in validation accuracy it explains} (Optuna's fANOVA), {}
    with fewer than three finished trials."""
    import optuna
    complete = [t for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 3:
        return {}
    try:
        return {key: float(value) for key, value in optuna.importance.get_param_importances(
            study, target=(lambda t: t.values[0]) if len(study.directions) > 1 else None).items()}
    except (RuntimeError, ValueError, ZeroDivisionError):  # one value, or every trial alike
        return {}


def weakest_choice(as_written, best, importances) -> dict | None:
    """The choice of the recipe as written that the study most clearly improved on: among the
    keys the best trial sets otherwise, the one that explains the most of the spread."""
    if not as_written or not best or best["number"] == as_written["number"]:
        return None
    changed = [key for key, value in best["values"].items()
               if as_written["values"].get(key) != value]
    if not changed:
        return None
    key = max(changed, key=lambda k: importances.get(k, 0.0))
    return {"key": key, "as_written": as_written["values"].get(key),
            "best": best["values"][key], "importance": importances.get(key)}


def write_results(study, recipe, document, found, study_dir, *, log=print) -> Path:
    """tuning.json, best.toml, figures/tuning.png, report.md and report.html of the study;
    returns the report's path."""
    study_dir = Path(study_dir)
    trials = _trials(study, recipe, study_dir)
    best = best_trial(trials)
    as_written = next((t for t in trials if t["seed"] == "as written"
                       and t["state"] == "complete"), None)
    importances = _importances(study, recipe)
    weakest = weakest_choice(as_written, best, importances)
    on_front = front(trials)
    best_path = study_dir / BEST
    if best is not None:
        _write_best(recipe, document, best, best_path, study_dir)
    figure = tuning_front(trials, on_front, best, as_written, recipe.tune,
                          study_dir / FIGURES / "tuning.png")
    summary = {"recipe": recipe.name, "objective": recipe.tune.objective,
               "runtime": recipe.tune.runtime, "threads": tune_threads(recipe),
               "device": recipe.tune.device or None,
               "space": {d.key: d.describe() for d in found}, "trials": trials,
               "front": on_front, "best": best["number"] if best else None,
               "as_written": as_written["number"] if as_written else None,
               "importances": importances, "weakest": weakest,
               "best_recipe": BEST if best is not None else None}
    write_json(study_dir / SUMMARY, summary)
    history = None
    if as_written and as_written.get("run"):
        try:
            history = read_history(study_dir / as_written["run"])
        except RunDirError:
            history = None
    text = "\n".join(report_text(summary, recipe, history, figure, study_dir))
    write_text(study_dir / REPORT_MD, text)
    write_text(study_dir / REPORT_HTML, to_html(text, study_dir, f"tledge tune: {recipe.name}"))
    log(f"tune: report {study_dir / REPORT_MD}" + (f"; best recipe {best_path}" if best else ""))
    return study_dir / REPORT_MD


def _write_best(recipe, document, best, path, study_dir) -> None:
    """best.toml: the recipe as written with the best trial's values, every key resolved,
    its file paths relative to the study folder."""
    try:
        resolved = parse_recipe(best_recipe_document(recipe, document, best["values"]),
                                recipe.path)
    except RecipeError:  # the recipe file changed under the study: keep the last best.toml
        return
    relative = lambda value: os.path.relpath(value, Path(study_dir).resolve())  # noqa: E731
    header = (f"# tledge tune: the best of the trials of {Path(recipe.path).name}: trial "
              f"{best['number']}, validation accuracy {best['value']:.4f}\n# build it: tledge "
              f"build {path}\n")
    write_text(path, header + dump_toml(resolved.to_dict(relative)) + "\n")


def _cell(value, spec=".4f") -> str:
    return "-" if value is None else format(value, spec)


def shown_value(value) -> str:
    """A value as the report shows it: floats to 3 significant digits."""
    if isinstance(value, float):
        return f"{value:.3g}"
    return json.dumps(value)


def short_keys(keys) -> dict:
    """{key: its shortest dotted tail of two names or more that no other key ends with}
    (fine_tune.learning_rate, data.image_size)."""
    keys = list(keys)
    short = {}
    for key in keys:
        parts = key.split(".")
        for size in range(min(2, len(parts)), len(parts) + 1):
            tail = ".".join(parts[-size:])
            if not any(other != key and (other == tail or other.endswith("." + tail))
                       for other in keys):
                break
        short[key] = tail
    return short


def _values(values, keys=None) -> str:
    names = short_keys(keys or values)
    return ", ".join(f"{names.get(key, key)} = {shown_value(value)}"
                     for key, value in values.items())


def report_text(summary, recipe, history, figure, study_dir) -> list[str]:
    """The study's report, as Markdown."""
    trials = summary["trials"]
    by_number = {trial["number"]: trial for trial in trials}
    best = by_number.get(summary["best"])
    written = by_number.get(summary["as_written"])
    tune = recipe.tune
    timed = f"{tune.runtime} at {summary['threads']} threads" + \
        (f" (the device {tune.device}'s timings where it ran the file)" if tune.device else "")
    states = {}
    for trial in trials:
        states[trial["state"]] = states.get(trial["state"], 0) + 1
    lines = [f"# tledge tune: {md(recipe.name)}", "", "## Tuning", ""]
    lines.append(f"{len(trials)} trials ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}"
                 f") searched {len(summary['space'])} keys of the recipe. Each trial is a tledge "
                 f"run: trained, exported, its artifacts judged by parity and timed on {timed}. "
                 "Trials are chosen by validation accuracy; the test split only reports.")
    constraints = [f"p50 at most {tune.max_latency_ms:g} ms" if tune.max_latency_ms else None,
                   f"size at most {tune.max_size_kb:g} KiB" if tune.max_size_kb else None,
                   f"runtime memory at most {tune.max_memory_mb:g} MiB"
                   if tune.max_memory_mb else None]
    constraints = [text for text in constraints if text]
    lines += ["", "Constraints: " + ("; ".join(constraints) if constraints else "none") + "."]
    if best and written:
        lines += ["", _comparison(best, written)]
        images = best.get("val_images")
        if images and best["number"] != written["number"]:
            noise = validation_noise(best["value"], images)
            if best["value"] - written["value"] < noise:
                lines += ["", f"**Within the noise of the validation split**: on {images} "
                          f"validation images an accuracy near {best['value']:.2f} is known to "
                          f"about ±{noise * 100:.1f} points (95 %), and the best trial is "
                          f"{(best['value'] - written['value']) * 100:+.1f} points above the "
                          "recipe as written: this split cannot tell them apart. Give the "
                          "search more validation images (data.val_fraction, or more data) "
                          "before trusting its ranking."]
    elif not best:
        lines += ["", "**No trial finished within the constraints yet.**"]
    lines += ["", "| key | searched |", "|---|---|"]
    lines += [f"| {md(key)} | {md(text)} |" for key, text in summary["space"].items()]
    if figure:
        lines += ["", f"![Validation accuracy against p50 latency]({FIGURES}/{Path(figure).name})"]
    lines += ["", "### Pareto front", "",
              "Trials no other beats on validation accuracy, p50 and size at once (each at its "
              "fastest artifact within the constraints):", "",
              "| trial | values | val. accuracy | artifact | p50 ms | KiB | the artifact's test "
              "accuracy |",
              "|---|---|---|---|---|---|---|"]
    for number in sorted(summary["front"], key=lambda n: by_number[n]["deployable"]["p50_ms"]):
        trial = by_number[number]
        point = trial["deployable"]
        lines.append(f"| {number}{' (best)' if number == summary['best'] else ''} | "
                     f"{md(_values(trial['values'], summary['space']))} | {_cell(trial['value'])} | "
                     f"{md(point['artifact'])} | {_cell(point['p50_ms'], '.3f')}"
                     f"{'' if point['timed_on'] == 'host' else ' (' + md(point['timed_on']) + ')'}"
                     f" | {point['size_kb']:.0f} | {_cell(point['test_accuracy'])} |")
    if best:
        lines += ["", "### The best recipe", "",
                  f"Trial {best['number']}: {md(_values(best['values'], summary['space']))}. Written to "
                  f"`{BEST}`, every key resolved; build it with "
                  f"`tledge build {Path(study_dir) / BEST}`."]
    lines += _doctor_lines(summary, history, by_number, md)
    lines += ["", "### Every trial", "",
              "| trial | how chosen | values | state | val. accuracy | p50 ms | KiB | the model's "
              "test accuracy | s |", "|---|---|---|---|---|---|---|---|---|"]
    for trial in trials:
        point = trial["deployable"] or {}
        state = trial["state"] + ("" if trial["state"] != "complete" or trial["feasible"]
                                  else " (outside the constraints)")
        value = _cell(trial["value"]) if trial["state"] != "pruned" else \
            f"({_cell(trial.get('last'))} when pruned)"
        lines.append(f"| {trial['number']} | {md(trial['seed'])} | {md(_values(trial['values'], summary['space']))}"
                     f" | {state} | {value} | {_cell(point.get('p50_ms'), '.3f')}"
                     f" | {_cell(point.get('size_kb'), '.0f')} | {_cell(trial['test_accuracy'])}"
                     f" | {_cell(trial['seconds'], '.0f')} |")
    trouble = [trial for trial in trials if trial["error"] or trial["pruned"]]
    if trouble:
        lines += ["", "Failed and pruned trials:", ""]
        lines += [f"- trial {trial['number']}: {md(trial['error'] or 'pruned: ' + trial['pruned'])}"
                  for trial in trouble]
    return lines + [""]


def _comparison(best, written) -> str:
    if best["number"] == written["number"]:
        return (f"**The recipe as written (trial {written['number']}) is the best trial**: "
                f"validation accuracy {written['value']:.4f}.")
    b, w = best["deployable"], written["deployable"] or {}
    latency = (f"; p50 {w['p50_ms']:.3f} -> {b['p50_ms']:.3f} ms on {b['runtime']}"
               if w.get("p50_ms") else "")
    test = (f"; the Keras model's test accuracy {written['test_accuracy']:.4f} -> "
            f"{best['test_accuracy']:.4f}"
            if written.get("test_accuracy") is not None and best.get("test_accuracy") is not None
            else "")
    return (f"**Best: trial {best['number']}**, validation accuracy {written['value']:.4f} -> "
            f"{best['value']:.4f} against the recipe as written (trial {written['number']})"
            f"{test}{latency}.")


def _doctor_lines(summary, history, by_number, md) -> list[str]:
    """The training doctor on the recipe as written, what its change gave, and the weakest
    choice the study found."""
    lines = []
    doctor = report_lines(history, md) if history else []
    if doctor:
        lines += ["", "### Training doctor: the recipe as written"] + doctor[2:]
    seeded = [trial for trial in by_number.values() if str(trial["seed"]).startswith("doctor")]
    written = by_number.get(summary["as_written"])
    for trial in seeded:
        change = f"{trial['seed'].split(': ')[-1].replace('_', ' ')}'s change"
        if trial["state"] == "complete" and written and trial["value"] is not None:
            lines += [f"The study tried the {md(change)} as trial {trial['number']} "
                      f"({md(_values(trial['values'], summary['space']))}): validation "
                      f"accuracy {written['value']:.4f} -> {trial['value']:.4f}.", ""]
        elif trial["state"] in ("pruned", "fail"):
            lines += [f"The study tried the {md(change)} as trial {trial['number']}: "
                      f"{trial['state'] if trial['state'] == 'pruned' else 'failed'}.", ""]
    weakest = summary.get("weakest")
    if weakest:
        share = (f"; it explains {weakest['importance']:.0%} of the spread in validation "
                 "accuracy across the trials" if weakest.get("importance") is not None else "")
        lines += ["", f"**The weakest choice of the recipe as written**: {md(weakest['key'])} = "
                  f"{md(shown_value(weakest['as_written']))}; the best trial has "
                  f"{md(shown_value(weakest['best']))}{share}.", ""]
    if summary.get("importances"):
        finished = sum(trial["state"] == "complete" for trial in by_number.values())
        lines += [f"What mattered, by Optuna's fANOVA importance on validation accuracy over "
                  f"the {finished} finished trials (few trials: a hint, not a measurement): "
                  + ", ".join(f"{md(key)} {value:.0%}" for key, value in
                              summary["importances"].items()) + ".", ""]
    return lines
