"""The report's Domains section: how the model does where it will run, and what adapting it did.

Three sources, each written by one command: `domains.json` (`tledge evaluate`: the run's
models on other data, beside their own test split), the adaptation record of a run made by
`tledge adapt` (AdaBN: source and target accuracy before and after), and the runs beside it in
the models folder that adapted the same parent model to the same target data (AdaBN, or a few
labelled images with `model.head = "keep"`), matched by the target split's fingerprint.
"""

from __future__ import annotations

from pathlib import Path

from tledge.errors import RunDirError
from tledge.records import read_domains, read_history
from tledge.rundir import (DOMAINS, HISTORY, MANIFEST, SPLIT, read_manifest, read_record)


def section(run_dir, manifest, history, md) -> list[str]:
    """The Domains section's lines ([] when the run met no other domain)."""
    run_dir = Path(run_dir)
    domains = read_domains(run_dir)
    adaptation = (history or {}).get("adaptation")
    family = adaptations(run_dir)
    if not domains and not adaptation and not family:
        return []
    lines = ["## Domains", ""]
    try:
        if adaptation:
            lines += _adaptation_lines(adaptation, md)
        for name, result in domains.items():
            lines += _domain_lines(name, result, md)
    except (KeyError, TypeError, IndexError, AttributeError):
        raise RunDirError(f"{run_dir / DOMAINS} or {run_dir / HISTORY} is not what tledge "
                          "writes; run `tledge evaluate` (or `tledge adapt`) again") from None
    for rows in family.values():
        lines += _comparison_lines(rows, md)
    return lines


def _adaptation_lines(record, md) -> list[str]:
    before, after = record["before"], record["after"]
    lines = [f"This run is `{md(record['parent'])}` adapted to **{md(record['target'])}** "
             f"({md(record['target_data'])}) by AdaBN: {record['batchnorm_layers']} BatchNorm "
             f"layers re-estimated on {record['images']} unlabelled target images, no weight "
             "changed.", "",
             "| model | source " + md(record["source_split"]) + " split | target "
             + md(record["target_split"]) + " split |", "|---|---:|---:|",
             f"| before (the parent run's model) | {_pct(before['source'])} | "
             f"{_pct(before['target'])} |",
             f"| after AdaBN (this run) | {_pct(after['source'])} | {_pct(after['target'])} |",
             ""]
    if before["target"] is not None and after["target"] is not None:
        gained = 100 * (after["target"] - before["target"])
        lost = None if before["source"] is None or after["source"] is None else \
            100 * (after["source"] - before["source"])
        lines += [f"**Target accuracy {_pct(before['target'])} → {_pct(after['target'])} "
                  f"({gained:+.1f} points) without a label**"
                  + (f"; on the source domain {lost:+.1f} points (this model is for the "
                     "target)." if lost is not None else "."), ""]
    return lines


def _domain_lines(name, result, md) -> list[str]:
    rows = result["rows"]
    keras = rows[0]
    lines = [f"### {md(name)}", "",
             f"{md(result['data'])}: {result['images']} images"
             + (" (its test split)" if result["judged"] == "test" else " (all of them)")
             + f", evaluated {md(result['evaluated'])}.", ""]
    if keras.get("source_accuracy") is not None:
        shift = 100 * (keras["accuracy"] - keras["source_accuracy"])
        lines += [f"**{keras['source_accuracy']:.1%} on the source {md(keras['source_split'])} "
                  f"split, {keras['accuracy']:.1%} on {md(name)} ({shift:+.1f} points).**", ""]
    lines += ["| artifact | runtime | source accuracy | target accuracy | shift | "
              "agreement with Keras |", "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        shift = "" if row.get("source_accuracy") is None else \
            f"{100 * (row['accuracy'] - row['source_accuracy']):+.1f}"
        lines.append(f"| {md(row['artifact'])} | {md(row['runtime'])} | "
                     f"{_pct(row.get('source_accuracy'))} | {_pct(row['accuracy'])} | {shift} | "
                     f"{row['agreement']:.4f} |")
    lines += ["", "Per class (Keras model):", "", "| class | source | target |",
              "|---|---:|---:|"]
    for label, value in keras["per_class"].items():
        lines.append(f"| {md(label)} | {_pct(keras.get('source_per_class', {}).get(label))} | "
                     f"{_pct(value)} |")
    return lines + [""]


def _comparison_lines(rows, md) -> list[str]:
    target = next((row["target"] for row in rows if row["target"] != row["run"]),
                  rows[0]["target"])
    order = ("before", "AdaBN", "fine-tuned")
    rows = sorted(rows, key=lambda row: next((i for i, how in enumerate(order)
                                              if row["how"].startswith(how)), len(order)))
    lines = [f"### Adapting to {md(target)}", "",
             "The same parent model adapted to the same target test split (matched by the "
             "split's fingerprint), each a run of the models folder:", "",
             "| run | how | target accuracy |", "|---|---|---:|"]
    lines += [f"| {md(row['run'])} | {md(row['how'])} | {_pct(row['accuracy'])} |"
              for row in rows]
    return lines + [""]


def adaptations(run_dir) -> dict:
    """{target fingerprint: [rows]} comparing, for each target split that more than one model
    of this run's family was judged on, the parent before adaptation, its AdaBN runs and its
    few-label runs (`model.head = "keep"`). The family: this run's parent (or the run itself)
    and every run beside it in the models folder made from that parent's model."""
    run_dir = Path(run_dir).resolve()
    parent = _parent(run_dir) or run_dir
    family = {}
    for folder in sorted({parent, *(path.parent for path in parent.parent.glob(f"*/{MANIFEST}"))}):
        origin = _parent(folder)
        if folder != parent and origin != parent:
            continue
        try:
            judged = _judged(folder, folder == parent)
        except (KeyError, TypeError, IndexError):  # a damaged record of a run beside this
            continue  # one: that run's own commands report it
        for fingerprint, row in judged.items():
            family.setdefault(fingerprint, []).append(row)
    return {key: rows for key, rows in family.items() if len(rows) > 1}


def _parent(folder: Path) -> Path | None:
    """The run whose model `folder` adapted: AdaBN's parent, or the run that made the weights
    file of a `model.head = "keep"` run."""
    try:
        train = read_manifest(folder)["stages"].get("train", {})
    except RunDirError:
        return None
    if train.get("adapted_from"):
        return (folder / train["adapted_from"]).resolve()
    weights = train.get("weights_from")
    history = _quietly(read_history, folder)
    if isinstance(weights, str) and weights.endswith(".keras") and history and \
            history.get("head") == "keep":
        return (folder / weights).resolve().parent
    return None


def _judged(folder: Path, is_parent: bool) -> dict:
    """{target fingerprint: row} of what this run's Keras model scored on target splits."""
    found = {}
    history = _quietly(read_history, folder) or {}
    split = _record(folder / SPLIT) or {}
    if is_parent:
        for name, result in (_quietly(read_domains, folder) or {}).items():
            if result.get("fingerprint") and result["judged"] == "test":
                found[result["fingerprint"]] = {
                    "run": folder.name, "how": "before adaptation", "target": name,
                    "accuracy": result["rows"][0]["accuracy"]}
    elif history.get("adaptation"):
        found[split.get("fingerprint")] = {
            "run": folder.name, "how": f"AdaBN ({history['adaptation']['images']} unlabelled "
                                       "images)",
            "target": history["adaptation"]["target"],
            "accuracy": history["adaptation"]["after"]["target"]}
    elif history.get("head") == "keep":
        count = (split.get("splits") or {}).get("train", {}).get("count")
        found[split.get("fingerprint")] = {
            "run": folder.name, "target": folder.name,
            "how": "fine-tuned, head kept" + (f" ({count} labelled images)"
                                              if isinstance(count, int) else ""),
            "accuracy": history.get("test_accuracy")}
    found.pop(None, None)
    return found


def _quietly(reader, folder):
    """A sibling run's record, or None when it is damaged (its own stages report that)."""
    try:
        return reader(folder)
    except RunDirError:
        return None


def _record(path: Path):
    """A run record, or None when it is missing or damaged (its own stage reports that)."""
    if not path.is_file():
        return None
    try:
        return read_record(path)
    except RunDirError:
        return None


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"
