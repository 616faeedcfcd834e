"""The report stage: `report.md`, written only from the run's own JSON files."""

from __future__ import annotations

import base64
import dataclasses
import html
import re
from pathlib import Path

from tledge import plots
from tledge.bench.stage import pick_folder, pick_name, unavailable_line
from tledge.core.timing import compare_p50
from tledge.errors import RunDirError
from tledge.formats import RUNTIME_ROWS
from tledge.plots import FIGURES
from tledge import doctor
from tledge.report import deploy as report_deploy
from tledge.report import domains as report_domains
from tledge.report import int8 as report_int8
from tledge.report import tasks as report_tasks
from tledge.parity import evidence_text, row_is_current
from tledge.pipeline import report_inputs, run_status
from tledge.records import read_bench, read_devices, read_history, read_parity
from tledge.rundir import (artifacts, EXPLAIN, read_manifest, read_record, RECIPE,
                           record_stage, REPORT, REPORT_HTML, SPLIT, write_manifest, write_text)


def md(value) -> str:
    """A value from data, a recipe, a device or a file, as Markdown text that renders as
    itself: no emphasis, link, image, code span, table cell break or HTML can come from it."""
    text = " ".join(str(value).split())  # no line breaks: one table cell, one line
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char in "\\`*{}[]()#!|":  # "_" stays: mid-word it is no emphasis, and names have it
        text = text.replace(char, "\\" + char)
    return text


def own_runtime_rows(parity) -> dict:
    """{artifact: its `ParityRow` in its own runtime} of a `Parity` ({} for None)."""
    return parity.own_rows() if parity else {}


def _rows(parity) -> list:
    return parity.rows if parity else []


def _split(parity) -> str:
    return parity.split if parity else "test"


def _optional(path):
    return read_record(path) if Path(path).is_file() else None


def report_run(run_dir) -> Path:
    """Write report.md, report.html and figures/ from the run's JSON files.

    manifest.json, split.json, history.json, parity.json, bench.json and explain.json: every
    number and every plot comes from them (Grad-CAM grids are made by the build's report
    stage or `tledge explain --run`, and only embedded here).
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    split = _optional(run_dir / SPLIT)
    history = read_history(run_dir)
    parity = read_parity(run_dir)
    bench = read_bench(run_dir)
    explain = _optional(run_dir / EXPLAIN)
    devices = read_devices(run_dir)
    figures = draw_figures(run_dir, manifest, history, parity, bench)
    title = f"tledge report: {manifest['recipe']['name']}"
    lines = [f"# tledge report: {md(manifest['recipe']['name'])}", ""]
    lines += _headline(run_dir, manifest, history, parity, bench)
    lines += _multitask_headline(run_dir, manifest, parity, bench)
    lines += _not_current_lines(run_dir)
    checksums = {entry["name"]: entry.get("sha256") for entry in manifest["artifacts"]}
    crossed = cross_architecture(devices, parity, bench, checksums)
    lines += _cross_architecture_warning(crossed, manifest.get("pick"))
    lines += _story(manifest, split, history, parity, bench)
    lines += _shipped_section(run_dir, manifest, parity, bench)
    pick = manifest.get("pick")
    lines += report_deploy.section(run_dir, manifest, pick,
                                   pick_folder(run_dir, pick) if pick else run_dir, md)
    lines += _data_section(manifest, split)
    training = _training_section(history)
    at = next((i for i, line in enumerate(training) if line.startswith("| epoch |")),
              len(training))  # the curves before the epoch-by-epoch table they draw
    lines += training[:at] + _figure_lines(figures, "learning_curves") + training[at:]
    lines += _ensemble_section(history, bench)
    lines += _parity_section(parity, checksums)
    lines += report_tasks.section(run_dir, manifest, parity, bench, figures, md)
    lines += _cross_architecture_lines(crossed)
    lines += report_int8.section(manifest, own_runtime_rows(parity), _split(parity), figures,
                                 md, bench, parity)
    lines += _figure_lines(figures, "confusion_reference", "confusion_pick", "per_class")
    lines += _bench_section(bench, parity, checksums)
    lines += _figure_lines(figures, "pareto", "latency")
    lines += _devices_section(devices, bench, checksums,
                              [task["labels"] for task in manifest["tasks"]]
                              if manifest.get("tasks") else manifest["labels"])
    lines += report_domains.section(run_dir, manifest, history, md)
    lines += _explain_section(run_dir, explain)
    lines += _artifacts_section(manifest)
    lines += _figure_lines(figures, "sizes")
    lines += _recipe_section(run_dir)
    markdown_text = "\n".join(lines).rstrip() + "\n"
    write_text(run_dir / REPORT_HTML, to_html(markdown_text, run_dir, title))
    written = write_text(run_dir / REPORT, markdown_text)
    manifest = read_manifest(run_dir)  # the report's entry: what it was written from
    record_stage(manifest, "report", inputs=report_inputs(run_dir, manifest))
    write_manifest(run_dir, manifest)
    return written


def _not_current_lines(run_dir) -> list[str]:
    """A warning above everything when a stage of the run (or of a sub-run) is not current:
    the report then describes files or results that are not the run's as it is now."""
    stale = [(run["run"], stage) for run in run_status(run_dir)["runs"]
             for stage in run["stages"] if stage["status"] in ("stale", "missing")
             and stage["stage"] != "report"]
    if not stale:
        return []
    listed = "; ".join(f"{stage['stage']}{'' if where == '.' else f' ({where})'} is "
                       f"{stage['status']}" + (f" ({stage['reason']})" if stage["reason"] else "")
                       for where, stage in stale)
    return [f"**Not current:** {md(listed)}. What follows describes the run as its records "
            f"stand; run `tledge build` (or `{md(stale[0][1]['command'])}`) to bring it up to "
            "date, and `tledge status` to see every stage.", ""]


QUANTIZED = ("int8", "fp16", "dynamic")


def draw_figures(run_dir, manifest, history, parity, bench) -> dict:
    """{key: (caption, path relative to the run)} of every figure the JSON files allow."""
    folder = Path(run_dir) / plots.FIGURES
    labels = manifest["labels"]
    rows = bench.rows if bench else []
    pick = bench.pick if bench else None
    judged = own_runtime_rows(parity)
    keras, picked = judged.get("keras"), judged.get((pick or {}).get("artifact"))
    reference = keras.confusion if keras else None
    quantized_pick = picked.confusion if picked and pick.get("model", "model") == "model" \
        and pick["artifact"].rsplit("_", 1)[-1] in QUANTIZED else None
    split = _split(parity)
    drawn = {
        "learning_curves": ("Learning curves", plots.learning_curves(
            history, folder / "learning_curves.png")),
        "confusion_reference": (f"Confusion matrix of the reference model ({split} split)",
                                plots.confusion(reference, labels,
                                                f"Reference (Keras), {split} split",
                                                folder / "confusion_reference.png")),
        "confusion_pick": (f"Confusion matrix of the pick, {(pick or {}).get('artifact')}",
                           plots.confusion(quantized_pick, labels,
                                           f"Pick: {(pick or {}).get('artifact')}, {split} split",
                                           folder / "confusion_pick.png")),
        "per_class": ("Accuracy per class", plots.per_class_accuracy(
            [("reference", reference)] + ([(pick["artifact"], quantized_pick)]
                                          if quantized_pick else []),
            labels, folder / "per_class_accuracy.png")),
        "latency": ("Latency per artifact and runtime", plots.latency_bars(
            rows, folder / "latency.png")),
        "pareto": ("Accuracy against latency", plots.pareto(rows, parity, pick,
                                                            folder / "pareto.png")),
        "sizes": ("Artifact size", plots.sizes(artifacts(manifest), folder / "sizes.png")),
    }
    drawn.update(report_int8.draw(run_dir, manifest, judged))
    drawn.update(report_tasks.draw(run_dir, manifest, judged, split))
    return {key: (caption, path.relative_to(run_dir).as_posix())
            for key, (caption, path) in drawn.items() if path is not None}


def _figure_lines(figures, *keys) -> list[str]:
    lines = [f"![{figures[key][0]}]({figures[key][1]})" for key in keys if key in figures]
    return [line for figure in lines for line in (figure, "")]


def _explain_section(run_dir, explain) -> list[str]:
    lines = ["## Where the model looks", ""]
    if not explain:
        return lines + ["(no Grad-CAM yet: `tledge explain --run RUN_DIR`)", ""]
    lines += ["Grad-CAM heat maps (red: what drove the predicted class) over test images of "
              "each class, two it got right and one it got wrong where there is one; a red "
              "caption names a wrong prediction.", ""]
    for figure in explain["figures"]:
        if (Path(run_dir) / figure["file"]).is_file():
            cells = figure.get("heat_map_cells")
            if cells:
                lines += [f"{figure['title'].capitalize()}: the heat map has the resolution "
                          f"of the backbone's last feature map, {cells[0]}x{cells[1]} cells, "
                          "smoothed to the image.", ""]
            lines += [f"![Grad-CAM, {figure['title']}]({figure['file']})", ""]
    maps = explain.get("feature_maps")
    if maps and (Path(run_dir) / maps["file"]).is_file():
        lines += [f"![Feature maps of {maps['layer']}]({maps['file']})", ""]
    return lines


def to_html(markdown_text: str, run_dir, title: str) -> str:
    """The report as one self-contained HTML page: every image embedded as a data URI.

    Safe to mail: raw HTML in the Markdown is shown as text, never as markup; links are
    dropped (the report has none of its own); an image is embedded only from the run's own
    `figures/` folder, and any other image is dropped.
    """
    import markdown
    converter = markdown.Markdown(extensions=["tables", "fenced_code"])
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    body = converter.convert(markdown_text)
    figures = (Path(run_dir) / FIGURES).resolve()

    def embed(match):
        source = html.unescape(match.group(2))
        path = (Path(run_dir) / source).resolve()
        if source.startswith(f"{FIGURES}/") and path.suffix == ".png" \
                and path.parent == figures and path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            return f'{match.group(1)}src="data:image/png;base64,{data}"{match.group(3)}'
        return ""
    body = re.sub(r'(<img\b[^>]*?)\bsrc="([^"]*)"([^>]*>)', embed, body)
    body = re.sub(r"</?a\b[^>]*>", "", body)
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
            f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


_CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: #1f2328; background: #fff; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { border-bottom: 1px solid #d0d7de; padding-bottom: 8px; }
h2 { border-bottom: 1px solid #eaeef2; padding-bottom: 4px; margin-top: 36px; }
table { border-collapse: collapse; margin: 12px 0; font-size: 13px; display: block;
        overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fafbfc; }
blockquote { margin: 12px 0; padding: 8px 16px; background: #fff1f0;
             border-left: 4px solid #cf222e; color: #82071e; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; font-size: 90%; }
pre { background: #f6f8fa; padding: 12px; overflow-x: auto; }
pre code { padding: 0; }
img { max-width: 100%; display: block; margin: 8px 0; }
"""


def _story(manifest, split, history, parity, bench) -> list[str]:
    """The run in words: what was trained on what, how well, what int8 costs and buys."""
    if not history:
        return []
    facts = (split or {}).get("splits", {})
    trained = (facts.get("train") or {}).get("count")
    if history.get("ensemble"):
        model = ("a fused ensemble of " + ", ".join(
            member["backbone"] for member in history["ensemble"]["members"]))
    else:
        model = (f"{history['backbone']} " + ("from pretrained weights"
                                              if history.get("pretrained") else "from scratch"))
    size = "x".join(map(str, manifest["image_size"]))
    tasks = manifest.get("tasks")
    what = (f"{len(manifest['labels'])} classes" if not tasks else
            f"{len(tasks)} tasks (" + ", ".join(f"{md(task['name'])}: {len(task['labels'])} "
                                                "classes" for task in tasks) + ")")
    held = [f"{name} {facts[name]['count']}" for name in ("val", "test")
            if (facts.get(name) or {}).get("count") is not None]
    sentences = [f"Trained {model} on {trained if trained is not None else 'the'} "
                 f"`{(split or {}).get('source', '?')}` training images of {what} at {size}"
                 + (f" (held apart: {', '.join(held)})" if held else "") + "."]
    judged = own_runtime_rows(parity)
    reference = judged.get("keras")
    if reference and reference.accuracy is not None:
        sentences.append(f"The trained model classifies {reference.accuracy:.1%} of the "
                         f"{parity.images} {parity.split} images correctly"
                         + (" (the mean of its tasks)." if tasks else "."))
    sentences += _int8_sentences(judged, manifest, bench)
    return [" ".join(sentences), ""]


def _int8_sentences(judged, manifest, bench) -> list[str]:
    """What full int8 costs in accuracy and buys in speed and size, against fp32 TFLite."""
    int8, fp32 = judged.get("tflite_int8"), judged.get("tflite_fp32")
    if not int8 or int8.accuracy is None:
        return []
    sizes = {entry["name"]: entry["size_bytes"] for entry in artifacts(manifest)}
    change = -int8.accuracy_drop * 100
    words = [f"Full int8 (tflite_int8) scores {int8.accuracy:.1%}, "
             + (f"{abs(change):.1f} points {'above' if change > 0 else 'below'} the trained model"
                if round(change, 1) else "the same as the trained model")]
    if "tflite_fp32" in sizes and "tflite_int8" in sizes:
        words.append(f"is {sizes['tflite_fp32'] / sizes['tflite_int8']:.1f}x smaller than "
                     f"fp32 ({sizes['tflite_int8'] / 1024:,.0f} KiB against "
                     f"{sizes['tflite_fp32'] / 1024:,.0f} KiB)")
    pick = (bench.pick if bench else None) or {}
    at = {row.artifact: row for row in (bench.timed(runtime="litert") if bench else [])
          if row.threads == pick.get("threads") and row.batch == pick.get("batch")}
    if fp32 and "tflite_int8" in at and "tflite_fp32" in at:
        ratio, clear = compare_p50(at["tflite_int8"], at["tflite_fp32"])
        how = (f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower") if clear \
            else "as fast as fp32, within the measured noise,"
        words.append(f"and runs {how} on LiteRT (p50 {at['tflite_int8'].p50_ms:.3f} ms "
                     f"against {at['tflite_fp32'].p50_ms:.3f} ms)")
    return [", ".join(words) + "."]


def _headline(run_dir, manifest, history, parity, bench) -> list[str]:
    """The verdict first: failed and unproven parity, a regression, the baseline beating the
    transfer, then what to ship, with the shipped model's own figures beside it (its parity,
    quantization, latency and reference accuracy, whichever model of the run it is)."""
    lines = []
    entries = {entry["name"]: entry for entry in artifacts(manifest)}
    for row in parity.failed if parity else []:
        lines.append(f"> **FAILED PARITY: {_row_name(row, parity)}**: "
                     + "; ".join(md(problem) for problem in row.problems)
                     + _stale_note(row, entries.get(row.artifact), "RUN_DIR"))
    lines += _insufficient_lines(parity, entries, "RUN_DIR")
    if history and (history.get("verdict") or {}).get("regressed"):
        lines.append(f"> **{history['verdict']['message']}**")
    warning = baseline_warning(history)
    if warning:
        lines.append(f"> **{warning}**")
    if lines:
        lines.append("")
    pick = bench.pick if bench else None
    shipped = _shipped(run_dir, pick, manifest, parity) if pick else None
    if pick:
        lines += _ship_lines(pick, shipped, history)
    elif bench is not None:
        lines.append("**No artifact to recommend**: none was benchmarked successfully after "
                     "passing parity.")
    lines += _reference_line(shipped["parity"] if shipped else parity,
                             shipped["model"] if shipped else "model")
    return lines + [""]


def _row_name(row, parity) -> str:
    """An artifact, with its runtime when the row is not the one in its own runtime."""
    own = parity.is_own(row)
    return row.artifact + ("" if own or not row.runtime else f" on {row.runtime}")


def _stale(row, entry) -> bool:
    """A parity row of a file the manifest no longer records (`row_is_current`); a row that
    judged no file (skipped, export failed, or written before rows had a sha256) is not."""
    return bool(row.sha256) and not row_is_current(row, entry)


def _stale_note(row, entry, where) -> str:
    """" (stale: ...)" for a parity row of a file the manifest no longer records."""
    if not _stale(row, entry):
        return ""
    return f" (stale: the file changed since it was validated; run `tledge validate {where}`)"


def _insufficient_lines(parity, entries, where, model="") -> list[str]:
    """One headline warning per threshold that the split was too small to show."""
    groups = {}
    for row in parity.insufficient if parity else []:
        if row.evidence:
            groups.setdefault(row.evidence["threshold"], []).append(row)
    lines = []
    for rows in groups.values():
        names = ", ".join(model + _row_name(row, parity) + _stale_note(
            row, entries.get(row.artifact), where) for row in rows)
        lines.append(f"> **NOT ENOUGH EVIDENCE: {names}**: "
                     + evidence_text(rows[0].evidence, parity.split)
                     + ". The figures meet the thresholds, on too few images to show them: "
                     "not passed.")
    return lines


def _shipped(run_dir, pick, manifest, parity) -> dict:
    """What the pick is: its model's folder name, manifest, parity, its parity row and its
    manifest entry (the run's own model, the baseline's or an ensemble member's)."""
    model = pick.get("model", "model")
    if model == "model":
        where = "RUN_DIR"
    else:
        folder = pick_folder(run_dir, pick)
        where = f"RUN_DIR/{model}"
        try:
            manifest = read_manifest(folder)
        except RunDirError:
            manifest = {"artifacts": []}
        parity = read_parity(folder)
    entry = next((entry for entry in artifacts(manifest)
                  if entry["name"] == pick["artifact"]), None)
    reference = (pick["artifact"], pick["runtime"]) == ("keras", "keras")
    row = None if parity is None else parity.reference if reference \
        else parity.find(pick["artifact"], pick["runtime"])
    return {"model": model, "where": where, "manifest": manifest, "parity": parity,
            "row": row, "entry": entry}


def _ship_lines(pick, shipped, history) -> list[str]:
    """The Ship line and the trade, never calling "passed" a row that is stale or that had
    too few images to show its thresholds."""
    row, name = shipped["row"], f"`{md(pick_name(pick))}` on {pick['runtime']}"
    figures = (f"p50 {pick['p50_ms']:.3f} ms at batch {pick['batch']} with {pick['threads']} "
               f"thread(s), {(pick.get('size_bytes') or 0) / 1024:,.0f} KiB")
    if row is None or _stale(row, shipped["entry"]):
        lines = [f"**Ship {name}? Its file changed since it was validated**: "
                 + ("its parity figures are of an earlier file" if row is not None else
                    "parity has no row of it") + f"; run `tledge validate {shipped['where']}` "
                 f"(then `tledge bench {shipped['where']}`) before shipping it. "
                 f"Timed then: {figures}."]
    elif row.status == "insufficient" or pick.get("parity") == "insufficient":
        evidence = row.evidence or pick.get("evidence") or {}
        lines = [f"**Ship {name}: UNPROVEN, not enough evidence**: "
                 + (evidence_text(evidence, _split(shipped["parity"])) + ". "
                    if evidence else "")
                 + "No artifact passed parity; among those that met their thresholds on too "
                 f"few images to show them, it is {_pick_reason(pick, history, proven=False)}, "
                 f"{figures}."]
    else:
        lines = [f"**Ship {name}**: {_pick_reason(pick, history)}, {figures}."
                 + report_int8.repair_note(shipped["manifest"], pick["artifact"])]
    if row is not None and row.status != "reference":
        status = "stale" if _stale(row, shipped["entry"]) else row.status
        lines.append(f"Its parity: accuracy {_num(row.accuracy)} (drop "
                     f"{_num(row.accuracy_drop, '+.4f')}), agreement "
                     f"{_num(row.agreement)} with its Keras model on "
                     f"{shipped['parity'].images} {shipped['parity'].split} images: "
                     f"{'not enough evidence' if status == 'insufficient' else status}.")
    if pick.get("alternatives"):
        lines.append("The trade: " + "; ".join(
            f"{label} `{md(pick_name(candidate))}` on {candidate['runtime']}: "
            f"{candidate['p50_ms']:.3f} ms, {_percent(candidate.get('accuracy'))}"
            + (" (unproven)" if candidate.get("parity") == "insufficient" else "")
            for label, candidate in [("picked", pick)] + [
                ({"most_accurate": "most accurate", "fastest": "fastest"}[c["why"]], c)
                for c in pick["alternatives"]]) + ".")
    return lines


def _reference_line(parity, model="model") -> list[str]:
    """The Keras model's accuracy on the images validate judged (the shipped model's)."""
    reference = parity.reference if parity else None
    if not reference:
        return []
    whose = "" if model == "model" else f" of the shipped model ({md(model)})"
    return [f"Reference (Keras) accuracy{whose}: {reference.accuracy:.4f} on "
            f"{parity.images} {parity.split} images"
            + (" (the mean of its tasks': " + ", ".join(
                f"{md(name)} {part['accuracy']:.4f}"
                for name, part in reference.tasks.items()) + ")"
               if reference.tasks else "") + "."]


def _shipped_section(run_dir, manifest, parity, bench) -> list[str]:
    """When the pick is another model's (the baseline, an ensemble member): that model's
    parity, quantization and latency, since the Ship line describes it."""
    pick = bench.pick if bench else None
    if not pick or pick.get("model", "model") == "model":
        return []
    shipped = _shipped(run_dir, pick, manifest, parity)
    model = shipped["model"]
    lines = [f"## The shipped model: {md(model)}", "",
             f"The pick is `{md(pick_name(pick))}`, a file of the {md(model)} model (its own "
             f"run directory, `{md(model)}/`), not of this run's model. Its figures:", ""]
    checksums = {entry["name"]: entry.get("sha256")
                 for entry in artifacts(shipped["manifest"])}
    its_bench = read_bench(pick_folder(run_dir, pick))
    lines += _insufficient_lines(shipped["parity"], {e["name"]: e for e in artifacts(
        shipped["manifest"])}, shipped["where"], f"{model}/")
    lines += [""] if lines[-1] != "" else []
    for part in (_parity_section(shipped["parity"], checksums),
                 report_int8.section(shipped["manifest"], own_runtime_rows(shipped["parity"]),
                                     _split(shipped["parity"]), {}, md, its_bench,
                                     shipped["parity"]),
                 _bench_section(its_bench, shipped["parity"], checksums)):
        lines += [("#" + line) if line.startswith("## ") else line for line in part]
    return lines


def _multitask_headline(run_dir, manifest, parity, bench) -> list[str]:
    """A multi-task run with single-task models beside it: whether it is worth it."""
    found = report_tasks.comparison(run_dir, manifest, parity, bench)
    if not found or not found.get("accuracy"):
        return []
    return [report_tasks.verdict(found, manifest), ""]


def _pick_reason(pick, history, proven=True) -> str:
    """Why the pick is the pick, in the words of the recipe's [pick] objective and
    constraints; it says so when the pick's model is less accurate than another. `proven`
    False: chosen among artifacts with too few images to show their parity (nothing passed)."""
    passed = " that passed parity" if proven else ""
    constraints = pick.get("constraints") or {}
    limits = [f"{key} = {constraints[key]}" for key in ("max_latency_ms", "max_size_kb")
              if constraints.get(key) is not None]
    within = f" within [pick] {', '.join(limits)}" if limits else ""
    if pick.get("objective") == "most_accurate":
        return f"the most accurate candidate{passed}{within}"
    best, own = pick.get("best_model_accuracy"), pick.get("model_accuracy")
    if best is not None and own is not None and own < best - 1e-12:
        return (f"the fastest artifact{passed}{within}, from a model "
                f"{(best - own) * 100:.1f} points less accurate than the best one (allowed by "
                f"[pick] max_accuracy_drop = {constraints.get('max_accuracy_drop')})")
    weighed = [("this run's model" if name == "model" else name)
               for name in pick.get("models") or []]
    models = "" if len(weighed) < 2 else \
        f" of the most accurate model (weighed: {', '.join(weighed)})"
    tie = pick.get("within_noise_of")
    if tie:
        return (f"the most accurate of the artifacts{models}{passed}{within} that are as fast "
                f"as the fastest within the measured noise ({md(tie['artifact'])} on "
                f"{md(tie['runtime'])}, p50 {tie['p50_ms']:.3f} ms)")
    return f"the fastest artifact{models}{passed}{within}"


def _percent(value) -> str:
    return "accuracy n/a" if value is None else f"{value:.1%}"


def _data_section(manifest, split) -> list[str]:
    lines = ["## Data", ""]
    if not split:
        return lines + ["(no split.json)", ""]
    if manifest.get("tasks"):  # classes are combinations of the tasks' labels
        lines.append(f"Source `{split.get('source')}`, images {manifest['image_size'][0]}x"
                     f"{manifest['image_size'][1]}, labelled {len(manifest['tasks'])} ways: "
                     + "; ".join(f"{md(task['name'])} ({len(task['labels'])} classes)"
                                 for task in manifest["tasks"])
                     + f". Each of the {len(manifest['labels'])} combinations is a class of "
                       "its own for splitting, so every split holds every combination.")
    else:
        lines.append(f"Source `{split.get('source')}`, images {manifest['image_size'][0]}x"
                     f"{manifest['image_size'][1]}, {len(manifest['labels'])} classes: "
                     + ", ".join(md(label) for label in manifest["labels"]) + ".")
    splits = split.get("splits", {})
    if splits:
        lines += ["", "| split | images | obtained |", "|---|---:|---|"]
        carved = [name for name, facts in splits.items() if facts.get("from") == "train"]
        for name, facts in splits.items():
            how = facts.get("obtained", "")
            if facts.get("fraction") is not None:
                how += f" ({facts['fraction']:.0%} of {facts.get('from', 'train')})"
            if name == "train" and how == "given" and carved:
                how = f"given, less what {' and '.join(carved)} took from it"
            lines.append(f"| {name} | {facts['count']} | {how} |")
    cache = split.get("cache")
    if cache:
        lines += ["", f"Prepared once into the data cache (entry `{cache.get('key')}`); every "
                      "stage read the images from there."]
    bad = split.get("bad_images")
    if bad:
        lines += ["", f"**{bad['count']} unreadable image(s) left out** "
                      f"(`data.on_bad_image = \"skip\"`), listed in `{bad.get('file')}`: "
                  + ", ".join(md(name) for name in bad.get("files", [])[:10])
                  + (" …" if bad["count"] > 10 else "") + "."]
    lines += _duplicate_lines(split.get("duplicates"))
    return lines + [""]


def _duplicate_lines(duplicates) -> list[str]:
    """The leakage check: exact duplicates across and within splits."""
    if not duplicates:
        return []
    if not duplicates.get("total"):
        return ["", "Leakage check: no two images have the same pixels, within or across "
                    "splits."]
    across = {name: count for name, count in duplicates.get("across", {}).items() if count}
    within = {name: count for name, count in duplicates.get("within", {}).items() if count}
    lines = ["", f"**Leakage check: {duplicates['total']} exact duplicate image(s)**"
                 + (" — images of one split repeated in another inflate validation and test "
                    "accuracy" if across else "") + "; the pairs are in `duplicates.json`.", "",
             "| where | duplicates |", "|---|---:|"]
    lines += [f"| across {name} | {count} |" for name, count in across.items()]
    lines += [f"| within {name} | {count} |" for name, count in within.items()]
    return lines


def _training_section(history) -> list[str]:
    lines = ["## Training", ""]
    if not history:
        return lines + ["(no history.json)", ""]
    if history.get("adaptation"):
        return lines + ["No training: the parent run's model, adapted by AdaBN (see Domains).",
                        ""]
    lines.append(f"Backbone `{history['backbone']}`, "
                 + ("pretrained weights." if history.get("pretrained") else "trained from scratch."))
    if history.get("task_accuracy"):
        lines += ["", f"One head per task; the best epoch by the {history.get('best_by', 'mean')}"
                      " of the tasks' validation accuracies (`train.best_by`). Test accuracy: "
                  + ", ".join(f"{md(name)} {_percent(value)}"
                              for name, value in history["task_accuracy"].items()) + "."]
    lines += ["", "Epochs are numbered across the phases (a fine-tune after 8 epochs of feature "
                  "extraction starts at 9), in this table, the curves and the epoch table.",
              "", "| phase | epochs (count) | best epoch | best val accuracy | wall s | img/s | "
                  "trainable / total params |", "|---|---:|---:|---:|---:|---:|---:|"]
    for phase in history["phases"]:
        if phase["skipped"]:
            lines.append(f"| {phase['name']} | skipped: {phase['skipped']} | | | | | |")
            continue
        best = phase["best_val_accuracy"]
        numbers = [epoch["epoch"] for epoch in phase["epochs"]] or [0]
        span = f"{numbers[0]}-{numbers[-1]} ({len(phase['epochs'])})" if len(numbers) > 1 \
            else f"{numbers[0]} (1)"
        lines.append(f"| {phase['name']} | {span} | {phase['best_epoch']} | "
                     f"{best:.4f} | {phase['wall_seconds']:.1f} | {phase['images_per_second']:.0f}"
                     f" | {phase['trainable_params']:,} / {phase['total_params']:,} |")
    lines += ["", f"Kept the weights of: **{history['verdict']['kept']}**."]
    if history.get("test_accuracy") is not None:
        lines.append(f"Test accuracy of the trained model: {history['test_accuracy']:.4f}"
                     + (f" (its tasks' score by train.best_by = \"{history.get('best_by')}\")."
                        if history.get("task_accuracy") else "."))
    for phase in history["phases"]:
        if phase.get("bottlenecks"):
            lines.append(f"{phase['name']} trained the head on cached backbone features "
                         f"({phase['bottlenecks']}).")
        if phase.get("stopped_early"):
            lines.append(f"{phase['name']} stopped early after {len(phase['epochs'])} epochs.")
        if phase.get("resumed_from_epoch"):
            lines.append(f"{phase['name']} resumed after epoch {phase['resumed_from_epoch']} "
                         "from a checkpoint.")
    lines += _baseline_lines(history)
    lines += ["",
              "| epoch | phase | loss | accuracy | val loss | val accuracy |",
              "|---:|---|---:|---:|---:|---:|"]
    for phase in history["phases"]:
        for epoch in phase["epochs"]:
            lines.append(f"| {epoch['epoch']} | {phase['name']} | {epoch.get('loss', 0):.4f} | "
                         f"{epoch.get('accuracy', 0):.4f} | {_num(epoch.get('val_loss'))} | "
                         f"{_num(epoch.get('val_accuracy'))} |")
    return lines + (doctor.report_lines(history, md) or [""])


def baseline_warning(history) -> str:
    """A loud line when training from scratch beat the transfer model on the test split."""
    baseline = (history or {}).get("baseline")
    if not baseline or baseline["test_accuracy"] is None or history["test_accuracy"] is None:
        return ""
    if baseline["test_accuracy"] <= history["test_accuracy"]:
        return ""
    return (f"THE FROM-SCRATCH BASELINE BEATS THE TRANSFER MODEL: {baseline['test_accuracy']:.1%} "
            f"against {history['test_accuracy']:.1%} on the test split. The transfer is not "
            "working: check the backbone's weights, its preprocessing and the fine-tuning "
            "learning rate.")


def _baseline_lines(history) -> list[str]:
    baseline = history.get("baseline")
    if not baseline:
        return []
    phase = baseline["phase"]
    transfer_epochs = sum(len(p["epochs"]) for p in history["phases"])
    transfer_seconds = sum(p["wall_seconds"] for p in history["phases"])
    return ["", "### Transfer against a from-scratch baseline", "",
            "| model | test accuracy | epochs | wall s | parameters |",
            "|---|---:|---:|---:|---:|",
            f"| transfer ({history['backbone']}) | {_num(history.get('test_accuracy'))} | "
            f"{transfer_epochs} | {transfer_seconds:.1f} | "
            f"{history['phases'][0]['total_params']:,} |",
            f"| baseline ({baseline['backbone']}, from scratch) | "
            f"{_num(baseline['test_accuracy'])} | {len(phase['epochs'])} | "
            f"{phase['wall_seconds']:.1f} | {baseline['params']:,} |"]


def _ensemble_section(history, bench) -> list[str]:
    """Each member beside the fused model: what the fusion buys and what it costs."""
    ensemble = (history or {}).get("ensemble")
    if not ensemble:
        return []

    def p50(rows, artifact, runtime):
        found = [row["p50_ms"] for row in rows if row["artifact"] == artifact
                 and row["runtime"] == runtime]
        return _num(min(found), ".3f") if found else ""

    def size(rows, artifact):
        found = [row["size_bytes"] for row in rows if row["artifact"] == artifact]
        return f"{found[0] / 1024:,.0f}" if found and found[0] else ""
    lines = ["## Ensemble", "",
             f"Fusion `{ensemble['fusion']}` of {len(ensemble['members'])} members."]
    if ensemble.get("weights"):
        lines.append("Weights fitted on the validation split: " + ", ".join(
            f"{member['name']} {weight:.3f}"
            for member, weight in zip(ensemble["members"], ensemble["weights"])) + ".")
    lines += ["", "| model | backbone | input | test acc | in fused graph | keras p50 ms | "
                  "int8 TFLite acc | int8 p50 ms | int8 KiB |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    in_graph = ensemble.get("member_test_accuracy_in_graph") or [None] * len(ensemble["members"])
    for member, accuracy in zip(ensemble["members"], in_graph):
        rows = member["latency"]
        lines.append(f"| {member['name']} | {member['backbone']} | "
                     f"{'x'.join(map(str, member['image_size']))} | "
                     f"{_num(member['test_accuracy'])} | {_num(accuracy)} | "
                     f"{p50(rows, 'keras', 'keras')} | "
                     f"{_num(member['accuracy'].get('tflite_int8'))} | "
                     f"{p50(rows, 'tflite_int8', 'litert')} | {size(rows, 'tflite_int8')} |")
    # as the members' latency lists (history.json) keep them
    own = [dataclasses.asdict(row) for row in (bench.timed() if bench else [])]
    lines.append(f"| **fused** | {ensemble['fusion']} | | {_num(history.get('test_accuracy'))} "
                 f"| | {p50(own, 'keras', 'keras')} | | {p50(own, 'tflite_int8', 'litert')} | "
                 f"{size(own, 'tflite_int8')} |")
    best = max((m["test_accuracy"] or 0 for m in ensemble["members"]), default=0)
    fused = history.get("test_accuracy") or 0
    lines += ["", f"The fused model is {fused - best:+.1%} against the best member on the test "
                  "split." + (" **The fusion does not beat its best member.**"
                              if fused < best else "")]
    return lines + [""]


def cross_architecture(devices, parity, bench, checksums) -> list[dict]:
    """Each quantized artifact's check on a device of another architecture than the build
    machine's (an emulated arm64 userland, a Raspberry Pi), beside its parity here and the
    recipe's agreement threshold. A check of a file that was exported again since is left
    out (the On devices section marks it stale)."""
    own = own_runtime_rows(parity)
    here = (bench.machine if bench else {}).get("arch") or "x86_64"
    rows = []
    for name, result in devices.items():
        arch = result.device.get("arch")
        if not arch or arch == here:
            continue
        for check in result.checks:
            if result.artifacts.get(check.artifact) != checksums.get(check.artifact) \
                    or check.error is not None or "int8" not in check.artifact:
                continue
            parity_row = own.get(check.artifact)
            threshold = ((parity_row.thresholds if parity_row else None) or {}).get(
                "min_agreement")
            rows.append({"device": name, "arch": arch, "emulated": result.device.get("emulated"),
                         "artifact": check.artifact,
                         "here": parity_row.agreement if parity_row else None,
                         "there": check.agreement_with_host, "threshold": threshold,
                         "difference": check.max_difference, "unit": check.difference_unit,
                         "below": threshold is not None and
                         check.agreement_with_host < threshold})
    return rows


def _cross_architecture_lines(rows) -> list[str]:
    if not rows:
        return []
    lines = ["### Across architectures", "",
             "int8 kernels differ between CPU architectures (x86 and ARM round differently), "
             "so the int8 files were checked on another one too: agreement there is with this "
             "machine's outputs of the same file on the bundled images.", "",
             "| artifact | device | agreement with Keras here | agreement there with here | "
             "largest output difference | recipe's agreement threshold |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        where = f"{md(row['device'])} ({md(row['arch'])}" + \
            (f", {md(row['emulated'])})" if row["emulated"] else ")")
        lines.append(f"| {md(row['artifact'])} | {where} | {_num(row['here'])} | "
                     f"{'**' if row['below'] else ''}{_num(row['there'])}"
                     f"{' (below)**' if row['below'] else ''} | "
                     f"{'' if row['difference'] is None else format(row['difference'], 'g')} "
                     f"{md(row['unit'])} | {_num(row['threshold'])} |")
    return lines + [""]


def _cross_architecture_warning(rows, pick) -> list[str]:
    """A headline warning when the pick's file classifies differently on another
    architecture than the recipe's int8 threshold allows."""
    if not pick:
        return []
    name = pick.get("artifact", "").split("/")[-1]
    lines = []
    for row in rows:
        if row["below"] and row["artifact"] == name:
            lines += [f"> **The pick {md(name)} changes class on {md(row['arch'])}"
                      + (f" ({md(row['emulated'])})" if row["emulated"] else "")
                      + f" for {1 - row['there']:.1%} of the bundled images, beyond the "
                      f"recipe's int8 agreement {row['threshold']}: its parity here does not "
                      "hold there; check it on the device (see Parity).**", ""]
    return lines


def _parity_section(parity, checksums) -> list[str]:
    lines = ["## Parity", ""]
    if not parity:
        return lines + ["(not validated yet: `tledge validate RUN_DIR`)", ""]
    machines = sorted({row.machine for row in parity.rows if row.machine})
    where = f" on {md(', '.join(machines))} (int8 results can differ on another CPU)" \
        if machines else ""
    lines += [f"Every artifact ran the {parity.images} {parity.split} images in its own "
              f"runtime and was compared with the Keras model{where}.", "",
              "| artifact | runtime | status | accuracy | drop | agreement | max abs diff |",
              "|---|---|---|---:|---:|---:|---:|"]
    for row in parity.rows:
        status = row.status if not row.problems else f"{row.status}: " + "; ".join(row.problems)
        if row.status == "insufficient" and row.evidence:
            status = "not enough evidence: " + evidence_text(row.evidence)
        if _stale(row, {"sha256": checksums.get(row.artifact)}):
            status += " (stale: the file changed since; run `tledge validate`)"
        lines.append(f"| {row.artifact} | {row.runtime} | {status} | "
                     f"{_num(row.accuracy)} | {_num(row.accuracy_drop)} | "
                     f"{_num(row.agreement)} | {_num(row.max_abs_diff, '.1e')} |")
    return lines + [""]


_LATENCY_HEAD = ("| p50 ms | p90 ms | p99 ms | img/s | GFLOP/s | load ms | first ms | peak MiB "
                 "| size KiB |")
_LATENCY_RULE = "---:|---:|---:|---:|---:|---:|---:|---:|---:|"


def _latency_cells(row) -> str:
    """The statistics columns of one bench row, host or device."""
    size = f"{row.size_bytes / 1024:,.0f}" if row.size_bytes else ""
    return (f"{_num(row.p50_ms, '.3f')} | {_num(row.p90_ms, '.3f')} | "
            f"{_num(row.p99_ms, '.3f')} | {_num(row.throughput_ips, '.1f')} | "
            f"{_num(row.gflops_per_second, '.1f')} | {_num(row.load_ms, '.0f')} | "
            f"{_num(row.first_ms, '.1f')} | {_num(row.peak_rss_mb, '.0f')} | "
            f"{size} |")


def _status(row) -> str:
    return row.status if row.status == "ok" else f"{row.status}: {row.reason}"


_GPU_RUNTIMES = {row.name for row in RUNTIME_ROWS if row.device == "gpu"}


def _bench_section(bench, parity, checksums=None) -> list[str]:
    lines = ["## Latency", ""]
    if not bench or not bench.rows:
        return lines + ["(not benchmarked on this machine yet: `tledge bench RUN_DIR`)", ""]
    machine, flops = bench.machine, bench.flops_per_image
    isa = f", {md(machine['isa'])}" if machine.get("isa") else ""
    lines += [f"Measured on {md(machine.get('cpu', 'an unrecorded CPU'))}{isa} "
              f"({md(machine.get('cores', '?'))} cores), {md(machine.get('system', '?'))}."
              + (f" The model costs {flops / 1e9:.3f} GFLOPs per image."
                 if isinstance(flops, (int, float)) and flops else ""),
              "Accuracy and parity are the validate stage's, for the same artifact. "
              + ("Each row ran in its own process; peak MiB is that process's peak resident "
                 "memory." if bench.isolated else
                 "Every row ran in one process (`bench.isolate = false`): peak MiB is that "
                 "process's peak so far, not the row's own."), "",
              "| artifact | runtime | threads | batch | status | parity | accuracy "
              + _LATENCY_HEAD, "|---|---|---:|---:|---|---|---:|" + _LATENCY_RULE]
    judged = own_runtime_rows(parity)
    unavailable = {}  # runtimes this machine cannot have: one line under the table
    for row in bench.rows:
        if row.status == "skipped" and row.runtime in _GPU_RUNTIMES:
            unavailable.setdefault(row.runtime, row.reason)
            continue
        check = judged.get(row.artifact)
        verdict = check.status if check else "not validated"
        if check and checksums is not None and \
                _stale(check, {"sha256": checksums.get(row.artifact)}):
            verdict += " (stale)"
        lines.append(f"| {row.artifact} | {row.runtime} | {row.threads} | "
                     f"{row.batch} | {_status(row)} | {verdict} | "
                     f"{_num(check.accuracy if check else None)} | " + _latency_cells(row))
    if unavailable:
        said = unavailable_line(unavailable)
        lines += ["", md(said[0].upper() + said[1:]) + "."]
    return lines + [""]


def _devices_section(devices, bench, checksums, labels=()) -> list[str]:
    """Results measured on devices with `tledge bundle` and imported with `--import`
    (`devices`: {name: `DeviceResult`})."""
    if not devices:
        return []
    lines = ["## On devices", "",
             "Measured on each device by the bundle's bench_device.py (`tledge bundle`), "
             "imported with `tledge bench RUN_DIR --import`. Accuracy is on the bundled "
             "images; agreement is with the build machine's predictions for the same images.",
             ""]
    for name, result in devices.items():
        device = result.device
        runtimes = ", ".join(f"{md(module)} {md(version)}" for module, version
                             in device.get("runtimes", {}).items())
        emulated = device.get("emulated")
        marked = emulated and "emulated" not in name
        lines += [f"### {md(name)}" + (f" (emulated: {md(emulated)})" if marked else ""), "",
                  (f"{md(device['model'])}: " if device.get("model") else "")
                  + f"{md(device.get('cpu', '?'))}, "
                  f"{md(device.get('cores', '?'))} cores, {md(device.get('system', '?'))}; "
                  f"{runtimes}. Measured {md(result.measured or '?')}.", ""]
        if emulated:
            lines += [f"**Emulated, not a device**: this {md(device.get('arch', '?'))} userland "
                      f"ran under {md(emulated)} on the build machine. Its outputs are the "
                      "emulated CPU's kernels' (what parity across architectures needs); its "
                      "latencies are the emulator's and say nothing of a device's speed.", ""]
        stale = result.stale(checksums)
        if stale:
            lines += [f"**Stale**: {', '.join(stale)} changed since this device measured it; "
                      "bundle and measure again.", ""]
        accuracy = {check.artifact: check for check in result.checks}
        lines += _device_checks(accuracy, labels)
        lines += ["| artifact | runtime | threads | batch | status | accuracy | agreement "
                  + _LATENCY_HEAD, "|---|---|---:|---:|---|---:|---:|" + _LATENCY_RULE]
        for row in result.rows:
            check = accuracy.get(row.artifact)
            lines.append(f"| {md(row.artifact)} | {md(row.runtime)} | {row.threads} | "
                         f"{row.batch} | {md(_status(row))} | "
                         f"{_num(check.accuracy if check else None)} | "
                         f"{_num(check.agreement_with_host if check else None)} | "
                         + _latency_cells(row))
        lines += [""] + _kernel_differences(accuracy, bench)
    return lines


def _device_checks(accuracy: dict, labels=()) -> list[str]:
    """Per artifact, how the device's outputs compare with the build machine's on the bundled
    images: agreement, the largest difference, the images that changed class."""
    if not any(check.max_difference is not None or check.error is not None
               for check in accuracy.values()):
        return []  # a result of an older bench_device.py: agreement only, in the table below
    lines = ["| artifact | images | accuracy (build machine) | agreement | largest output "
             "difference | changed class |", "|---|---:|---:|---:|---:|---|"]
    for name, check in accuracy.items():
        if check.error is not None:
            lines.append(f"| {md(name)} | | | | | check failed: {md(check.error)} |")
            continue
        def name_of(index):  # a class index, or one per task (labels: one list per task)
            if isinstance(index, list):
                return "/".join(str(name_of_task(task, value)) for task, value in
                                enumerate(index))
            return labels[index] if 0 <= index < len(labels) else index

        def name_of_task(task, index):
            names = labels[task] if task < len(labels) and isinstance(labels[task], list) \
                else []
            return names[index] if 0 <= index < len(names) else index
        flips = ", ".join(f"#{flip['image']} ({name_of(flip['build'])}→{name_of(flip['device'])})"
                          for flip in check.flipped[:8])
        more = check.flipped_count - min(len(check.flipped), 8)
        lines.append(
            f"| {md(name)} | {check.images} | {_num(check.accuracy)} "
            f"({_num(check.host_accuracy)}) | {_num(check.agreement_with_host)} | "
            f"{check.max_difference:g} {md(check.difference_unit)} | "
            + (md(flips) + (f" and {more} more" if more > 0 else "") if flips else "none")
            + " |")
    return lines + [""]


def _kernel_differences(accuracy: dict, bench) -> list[str]:
    """A warning for each int8 artifact whose top class on the device differs from the build
    machine's on some bundled image: int8 kernels differ between CPUs (VNNI or not, ARM dot
    product or not), so parity measured on the build machine does not hold there."""
    machine = bench.machine if bench else {}
    host = f"{md(machine.get('cpu', 'the build machine'))}" + (
        f", {md(machine['isa'])}" if machine.get("isa") else "")
    lines = []
    for name, check in accuracy.items():
        agreement = check.agreement_with_host
        if "int8" in str(name) and isinstance(agreement, (int, float)) and agreement < 1.0:
            lines += [f"**int8 kernels differ**: on this device {md(name)} predicts another "
                      f"class than the build machine ({host}) for {1 - agreement:.1%} of the "
                      "bundled images; its parity was measured on the build machine's kernels, "
                      "so check its accuracy here before shipping it.", ""]
    return lines


def _artifacts_section(manifest) -> list[str]:
    lines = ["## Artifacts", "", "| artifact | file | size KiB | sha256 |", "|---|---|---:|---|"]
    for entry in manifest["artifacts"]:
        if entry.get("status") == "failed":
            lines.append(f"| {entry['name']} | export failed: {md(entry['error'])} | | |")
        else:
            lines.append(f"| {entry['name']} | `{entry['path']}` | "
                         f"{entry['size_bytes'] / 1024:,.0f} | `{entry['sha256'][:16]}…` |")
    return lines + [""]


def _recipe_section(run_dir) -> list[str]:
    path = Path(run_dir) / RECIPE
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8").rstrip()
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return ["## Recipe", "", "The resolved recipe (every default filled in):", "",
            f"{fence}toml", text, fence, ""]


def _num(value, spec=".4f") -> str:
    return "" if value is None else format(value, spec)
