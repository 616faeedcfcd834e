"""The report's Quantization section: for each int8 artifact, whether it passed as exported or
what repaired it, every attempt as a row, and (when it failed or needed repair) where its
error comes from, layer by layer. Everything comes from the manifest's `quantization` record
of each int8 entry (written by `tledge.export.int8`) and parity.json."""

from __future__ import annotations

from pathlib import Path

from tledge import plots
from tledge.core.metrics import CONFIDENCE
from tledge.core.timing import compare_p50
from tledge.export.int8 import GRAPH_SETTINGS, has_vnni, int8_needs
from tledge.rundir import artifacts
from tledge.runners import runtimes_for


def int8_records(manifest) -> list[tuple[dict, dict]]:
    """(entry, quantization record) of each int8 artifact that has one, in manifest order."""
    return [(entry, entry["quantization"]) for entry in artifacts(manifest)
            if isinstance(entry.get("quantization"), dict)]


def needs_explaining(record, parity_row) -> bool:
    """An artifact whose diagnosis the report shows: it failed parity, or needed repair."""
    failed = parity_row is not None and parity_row.status == "failed"
    return bool(record.get("diagnosis")) and (failed or record.get("remedy") != "plain"
                                              or record.get("passed") is False)


def draw(run_dir, manifest, parity_rows) -> dict:
    """{key: (caption, path)} of the per-layer error figures the section shows."""
    drawn = {}
    for entry, record in int8_records(manifest):
        if not needs_explaining(record, parity_rows.get(entry["name"])):
            continue
        path = plots.quantization_error(record["diagnosis"], entry["name"],
                                        Path(run_dir) / plots.FIGURES /
                                        f"quantization_{entry['name']}.png")
        if path is not None:
            worst = _worst(record["diagnosis"])
            drawn[f"quantization_{entry['name']}"] = (
                f"Error per layer of {entry['name']}; worst: {worst}", path)
    return drawn


def section(manifest, parity_rows, split, figures, md, bench=None, parity=None) -> list[str]:
    """The "Quantization" section (empty when the run has no int8 artifact). `parity_rows`:
    {artifact: its `ParityRow` in its own runtime} (`Parity.own_rows`); `bench`: the run's
    `tledge.records.Bench`, for what int8 costs or buys in time on this machine; `parity`:
    the run's `Parity` (every runtime's rows), for the OpenVINO routes compared."""
    records = int8_records(manifest)
    routes = openvino_routes(manifest, parity, bench, md) if parity else []
    if not records and not routes:
        return []
    lines = ["## Quantization", ""] + routes
    for entry, record in records:
        name = entry["name"]
        lines += [f"**{name}**: " + sentence(record, parity_rows.get(name), split)
                  + speed(entry, bench, md) + kernels(entry, record, bench, md), ""]
        attempts = record.get("attempts") or []
        if len(attempts) > 1 or record.get("passed") is False:
            lines += [f"Attempts, judged in the artifact's own runtime on {_judged_on(record)} "
                      "(the validate stage then judges the kept one on its own split). Each "
                      "remedy is tried on top of the ones kept before it; a candidate replaces "
                      "the kept file only when its gain in agreement exceeds the noise of the "
                      f"comparison (one-sided {CONFIDENCE:.0%}, a sign test on the images where "
                      "the two differ):", "",
                      "| # | remedy | accuracy | agreement | 95 % lower bound | gain / noise "
                      "| size KiB | p50 ms | result |",
                      "|---:|---|---:|---:|---:|---|---:|---:|---|"]
            kept = _kept(record)
            for number, row in enumerate(attempts, 1):
                size = row["size_bytes"] / 1024 if row.get("size_bytes") else None
                versus = "-" if row.get("gain") is None else (
                    f"{row['gain']:+.4f} / {_num(row.get('noise'))}"
                    + (" kept" if row.get("kept") else ""))
                lines.append(f"| {number} | {md(row['remedy'])}"
                             f"{' **(kept)**' if row is kept else ''} | "
                             f"{_num(row.get('accuracy'))} | {_num(row.get('agreement'))} | "
                             f"{_num(row.get('agreement_low'))} | {versus} | "
                             f"{_num(size, ',.0f')} | {_num(row.get('p50_ms'), '.3f')} | "
                             f"{_result(row, md)} |")
            lines.append("")
            if record.get("stopped"):
                lines += [f"The search {record['stopped']}.", ""]
        key = f"quantization_{name}"
        if key in figures:
            lines += [f"![{figures[key][0]}]({figures[key][1]})", ""]
            lines += [f"Worst layers ({md(record['diagnosis']['metric'])}): "
                      + ", ".join(f"`{md(layer['name'].split(';')[0])}` ({layer['op']}, "
                                  f"{layer['error']:.3g})"
                                  for layer in _ranked(record["diagnosis"])[:5]) + "."
                      + _verdict(record["diagnosis"]), ""]
    return lines


NNCF = "openvino_int8"


def openvino_routes(manifest, parity, bench, md) -> list[str]:
    """Two routes to int8 for OpenVINO, side by side: the QDQ ONNX file (tledge's own repair,
    run in ONNX Runtime and in OpenVINO) and the IR quantized by NNCF with accuracy control,
    with the float IR for reference: accuracy and agreement on the validate stage's split,
    size, and p50 timed by the bench stage on this CPU. Empty without an NNCF IR."""
    entries = {entry["name"]: entry for entry in artifacts(manifest)}
    nncf = (entries.get(NNCF) or {}).get("nncf")
    if not nncf:
        return []
    candidates = [("float IR", "openvino_fp32", "openvino"),
                  ("QDQ ONNX, tledge's repair", "onnx_int8", "onnxruntime"),
                  ("QDQ ONNX, tledge's repair", "onnx_int8", "openvino"),
                  ("NNCF, accuracy control" if nncf.get("route") == "nncf_accuracy_control"
                   else "NNCF, plain", NNCF, "openvino")]
    timed = {}
    for row in (bench.timed() if bench else []):
        timed.setdefault((row.artifact, row.runtime), row)
    lines = ["Two routes to int8 for OpenVINO (accuracy and agreement on the "
             f"{md(parity.split)} split; p50 timed by "
             "the bench stage):", "",
             "| route | artifact | runtime | accuracy | agreement | parity | size KiB | p50 ms |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    shown = 0
    for route, name, runtime in candidates:
        row = parity.find(name, runtime)
        if name not in entries or row is None:
            continue
        bench_row = timed.get((name, runtime))
        size = entries[name].get("size_bytes")
        lines.append(f"| {route} | {md(name)} | {runtime} | {_num(row.accuracy)} | "
                     f"{_num(row.agreement)} | {row.status} | "
                     f"{_num(size / 1024 if size else None, ',.0f')} | "
                     f"{_num(bench_row.p50_ms if bench_row else None, '.3f')} |")
        shown += 1
    if shown < 2:
        return []
    machine = (bench.machine or {}) if bench else {}
    where = md(machine.get("cpu", "this machine")) + (f", {md(machine['isa'])}"
                                                      if machine.get("isa") else "")
    if nncf.get("route") == "nncf_accuracy_control":
        how = (f"NNCF quantized the IR and returned {nncf['reverted']} of "
               f"{nncf['reverted'] + nncf['quantizers']} quantizers to float, so that accuracy "
               f"on {nncf['images']} {md(nncf['split'])} images (never the test split) stays at "
               f"most {nncf['max_drop']:g} below the float IR's (the recipe's "
               "max_accuracy_drop); tledge's repair of the QDQ file is judged on the same "
               "images, and on agreement with the Keras model as well.")
    else:
        how = ("NNCF quantized the IR without accuracy control (a multi-task model, or no "
               "images to judge on).")
    return lines + ["", f"{how} Timed on {where}.", ""]


def repair_note(manifest, name) -> str:
    """" It needed repair: ..." for an artifact whose plain int8 export failed parity."""
    record = next((record for entry, record in int8_records(manifest) if entry["name"] == name),
                  None)
    if not record or record.get("remedy") == "plain" or not record.get("passed"):
        return ""
    if record.get("narrow"):
        return (f" Its plain int8 export passed only narrowly; it ships with "
                f"{record['remedy']}, the closest of the remedies that change no kernel on the "
                "same images (see Quantization).")
    return (f" Its plain int8 export failed parity on the {record.get('split') or 'validation'}"
            f" split; {record['remedy']} passed there (see Quantization).")


def sentence(record, parity_row, split="test") -> str:
    """What happened to one int8 artifact, in one sentence. "Repaired" is said only of a file
    that passes, on the repair split and on the validate stage's split; a file that fails is
    said to fail."""
    attempts = record.get("attempts") or []
    plain, kept = (attempts[0] if attempts else {}), _kept(record)
    final, fails = "", False
    if parity_row and parity_row.agreement is not None:
        fails = parity_row.status == "failed"
        verdict = {"passed": "passes parity", "insufficient": "has not enough evidence for "
                   "parity: its figures meet the thresholds, on too few images to show them"}.get(
            parity_row.status, "FAILS parity")
        final = (f"; on the {split} split it {verdict} "
                 f"(accuracy {parity_row.accuracy:.4f}, agreement "
                 f"{parity_row.agreement:.4f})")
    if len(attempts) <= 1 and record.get("remedy") not in (None, "plain"):
        return (f"reproduced the settings an earlier export kept ({record['remedy']})"
                + final + ".")
    if len(attempts) <= 1:
        how = "exported with the plain settings" + (
            ", which passed on " + _judged_on(record) if plain.get("passed") else
            ", which FAILED on " + _judged_on(record) if plain.get("passed") is False else "")
        return how + final + "."
    if plain.get("remedy") != "plain":  # a rebuild reproduced an earlier repair
        return (f"reproduced the settings an earlier export kept ({record['remedy']})"
                + final + ".")
    cost = _cost(kept, plain)
    kept_name = "the plain export itself" if record["remedy"] == "plain" else record["remedy"]
    bound = (f"agreement {kept.get('agreement') or 0:.4f}, 95 % lower bound "
             f"{_num(kept.get('agreement_low'))}")
    if record.get("narrow"):
        return (f"the plain export passed only narrowly (agreement {plain.get('agreement', 0):.4f}"
                f" on {_judged_on(record)}, too few images to trust a margin that thin); of "
                f"the remedies that change no kernel, kept {kept_name} ({bound}{cost}){final}.")
    why = "; ".join(plain.get("problems") or []) or "it failed parity"
    if record.get("passed") and not fails:
        outcome = f"repaired by {kept_name}"
    elif record.get("passed"):
        outcome = (f"the search kept {kept_name}, which passed on the repair split, but the "
                   "file FAILS on the test split: not repaired")
    else:
        outcome = (f"no remedy passed: FAILED; kept the closest attempt, {kept_name}"
                   if record["remedy"] != "plain" else
                   "no remedy passed and none beat the plain file by more than the noise: "
                   "FAILED; kept the plain export")
    return (f"the plain export failed ({why}); {outcome} ({bound}{cost}){_floats(record, plain)}"
            f"{_tuned(record)}{final}.")


def speed(entry, bench, md) -> str:
    """What int8 buys or costs in time here: its p50 against its float32 file's, timed in the
    same runtime, threads and batch by the bench stage on this machine (CPU and ISA named: on
    a CPU without fast int8 kernels int8 can be the slower file). "" when both were not timed."""
    if bench is None:
        return ""
    fp32 = entry["name"].replace("int8", "fp32")
    runtime = runtimes_for(entry["family"])[0]
    timed = {}
    for row in bench.timed(runtime=runtime):
        timed.setdefault((row.threads, row.batch), {})[row.artifact] = row
    pair = next((rows for rows in timed.values() if entry["name"] in rows and fp32 in rows), None)
    if pair is None:
        return ""
    mine, theirs = pair[entry["name"]], pair[fp32]
    ratio, clear = compare_p50(mine, theirs)
    machine = bench.machine or {}
    where = f"{md(machine.get('cpu', 'this machine'))}" + (
        f", {md(machine['isa'])}" if machine.get("isa") else "")
    verdict = ("int8 and fp32 run at about the same speed here (the difference is inside "
               "the measured spread)" if not clear
               else f"**int8 is slower than fp32 here**: {1 / ratio:.2f}x the fp32 file's time"
               if ratio < 1 else f"int8 is {ratio:.2f}x faster than fp32")
    return (f" Timed on {where} in {runtime} ({mine.threads} thread(s), batch {mine.batch}): "
            f"p50 {mine.p50_ms:.3f} ms against {theirs.p50_ms:.3f} ms for {fp32}; {verdict}.")


def kernels(entry, record, bench, md) -> str:
    """What this CPU's int8 kernels need (`int8_needs`, the rule the repair follows), said where
    it shaped the file: an ONNX int8 file on an x86 CPU without VNNI."""
    isa = record.get("isa") or ((bench.machine or {}).get("isa") if bench else None)
    if entry["family"] != "onnx" or not isa or has_vnni(isa):
        return ""
    kept = bool((record.get("settings") or {}).get("reduce_range"))
    needed = int8_needs(isa)["onnx"]
    return (f" This CPU ({md(isa)}) has no VNNI: ONNX Runtime's uint8 x int8 kernels can "
            f"saturate there, so int8 needs {', '.join(needed)} (7-bit weights)"
            + ("; the kept file has it." if kept else
               "; the kept file was made without it: expect it to disagree more here."))


def _judged_on(record) -> str:
    split, images = record.get("split") or "validation", record.get("images")
    if split == "repair":
        return (f"the repair split ({images} training images held apart from calibration)"
                if images else "the repair split")
    return f"the {split} split" + (f" ({images} images)" if images else "")


def _cost(kept, plain) -> str:
    if same_kernels(kept, plain):
        return ", the same kernels as the plain file, so the same speed"
    if kept.get("p50_ms") and plain.get("p50_ms"):
        change = kept["p50_ms"] / plain["p50_ms"] - 1
        return (f", p50 {kept['p50_ms']:.3f} ms against {plain['p50_ms']:.3f} ms "
                + ("unrepaired" if abs(change) < 0.005 else f"unrepaired, {change:+.0%}"))
    return ""


def _floats(record, plain) -> str:
    """Which layers stayed in float and what they cost in size (latency: `_cost`)."""
    kept = _kept(record)
    names = (kept.get("settings") or {}).get("float_layers") or \
        (kept.get("settings") or {}).get("float_nodes") or []
    if not names:
        return ""
    size = ""
    if kept.get("size_bytes") and plain.get("size_bytes"):
        size = (f", {kept['size_bytes'] / 1024:,.0f} KiB against "
                f"{plain['size_bytes'] / 1024:,.0f} KiB all-int8")
    return (f"; {len(names)} layer{'s' if len(names) > 1 else ''} stayed in float ("
            + ", ".join(f"`{md_name(name)}`" for name in names[:6])
            + (", …" if len(names) > 6 else "") + f"{size})")


def _tuned(record) -> str:
    """What a kept quantization-aware fine-tune changed: the file is of a copy of the model."""
    tuned = (record.get("settings") or {}).get("qat")
    if not isinstance(tuned, dict):
        return ""
    return (f"; the file quantizes a copy of the model fine-tuned for {tuned.get('steps')} "
            "steps with int8 simulated, distilling the Keras model (which is unchanged, and "
            "which parity compares it with)")


def same_kernels(row, plain) -> bool:
    """Whether an attempt runs the plain file's kernels (only numbers changed)."""
    return all((row.get("settings") or {}).get(key) == (plain.get("settings") or {}).get(key)
               for key in GRAPH_SETTINGS)


def _kept(record) -> dict:
    attempts = record.get("attempts") or []
    return next((row for row in reversed(attempts) if row.get("remedy") == record.get("remedy")
                 and row.get("settings") == record.get("settings")),
                attempts[-1] if attempts else {})


ROUNDING_ONLY = 0.5  # RMSE in quantization steps below which a layer adds rounding alone


def _verdict(diagnosis) -> str:
    """What the per-layer figures say, where they say something plain."""
    ranked = _ranked(diagnosis)
    if not ranked or not diagnosis.get("metric", "").startswith("RMSE / quantization step"):
        return ""
    if ranked[0]["error"] < ROUNDING_ONLY:
        return (f" No layer stands out: each adds about rounding alone (at most "
                f"{ranked[0]['error']:.2f} of a step, 0.29 being rounding), so the images that "
                "flip are those the float model itself barely separates; more calibration "
                "images or a more confident model help more than layers kept in float.")
    return (f" `{md_name(ranked[0]['name'])}` adds {ranked[0]['error']:.2f} steps of error, "
            f"well above rounding alone (0.29): the layer to look at first, and the first a "
            f"repair keeps in float.")


def md_name(name: str) -> str:
    return name.split(";")[0].replace("`", "'")


def _ranked(diagnosis) -> list[dict]:
    return sorted((layer for layer in diagnosis.get("layers", [])
                   if layer.get("error") is not None), key=lambda layer: -layer["error"])


def _worst(diagnosis) -> str:
    ranked = _ranked(diagnosis)
    return ranked[0]["name"].split(";")[0] if ranked else "?"


def _result(row, md) -> str:
    if row.get("passed"):
        return "passed"
    return "failed: " + md("; ".join(row.get("problems") or ["no result"]))


def _num(value, spec=".4f") -> str:
    return "-" if value is None else format(value, spec)
