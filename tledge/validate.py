"""The validate stage: does every artifact still classify like the trained model?

Each artifact runs the whole test split through its real runtime (the same runner the
benchmark times) and is compared with the Keras reference: accuracy, accuracy drop, top-1
agreement, and the largest and mean absolute difference of the probabilities. Thresholds
come from the recipe, else from the format table. Every failed check is listed, not the
first one only.

A row that meets its thresholds on fewer images than can show its `min_agreement` (the
agreement's 95 % lower bound stays below it even with every image agreeing) is
"insufficient", not "passed" (`tledge.parity.judge_evidence`): the split is too small to be
evidence. It is no parity failure (`tledge validate` exits 0), but validate warns and names
how many images would do.
"""

from __future__ import annotations

from pathlib import Path


from tledge.core.machine import machine_facts
from tledge.errors import first_line, RuntimeUnavailable
from tledge.formats import FORMATS
from tledge.export.int8 import diagnose_entry
from tledge.parity import (compare, NOT_EXPORTED, evidence_text, judge_evidence, ParityRow, predict_all,
                           reference_row)
from tledge.pipeline import stage_record
from tledge.records import Parity
from tledge.run_inputs import evaluation_split, run_recipe, run_splits
from tledge.rundir import (artifacts, PARITY, read_manifest, record_stage,
                           write_json, write_manifest)
from tledge.runners import load, RUNTIMES, runtimes_for
from tledge.tasks import targets

def parity_pairs(entries, bench_runtimes) -> list[tuple[dict, str]]:
    """Every (artifact, runtime) pair that needs a parity check: each exported artifact in its
    own runtime, then every other runtime of the recipe's [bench] that runs it and is present
    on this machine (Keras included: on a GPU it is another code path). Bench times no pair
    that is not here, and the pick takes only pairs that passed."""
    exported = [(entry, runtimes_for(entry["family"])[0]) for entry in entries
                if entry["name"] != "keras"]
    others = []
    for entry in entries:
        own = runtimes_for(entry["family"])[0]
        for runtime in bench_runtimes:
            row = RUNTIMES.get(runtime)
            if runtime == own or row is None or entry["family"] not in row.families:
                continue
            if row.unavailable() is None:
                others.append((entry, runtime))
    return exported + others


def validate_run(run_dir, *, runtimes=(), log=print) -> Parity:
    """Run every artifact of the run over the evaluation split; write parity.json.
    `runtimes`: judge the artifacts in these too, beside the recipe's [bench] runtimes (a
    browser runtime, which no recipe needs to list)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    recipe = run_recipe(run_dir)
    images, labels, split = evaluation_split(run_splits(run_dir, recipe))
    tasks = manifest.get("tasks")
    labels = targets(labels, tasks, manifest["labels"])
    entries = artifacts(manifest)
    reference_entry = next(entry for entry in entries if entry["name"] == "keras")
    runner = load(reference_entry, run_dir)
    reference = predict_all(runner, images)
    runner.close()
    facts = machine_facts()
    where = f"{facts['cpu']} ({facts['isa']})"
    rows = [reference_row(reference, labels, tasks, sha256=reference_entry["sha256"],
                          machine=where)]
    reference_accuracy = rows[0].accuracy
    unproven = []  # (name shown, evidence) of the rows with too few images to show a pass
    log(f"  {'keras':<16} accuracy {reference_accuracy:.4f} on {len(labels)} {split} images "
        "(reference" + (": mean of " + ", ".join(
            f"{name} {part['accuracy']:.4f}" for name, part in rows[0].tasks.items())
            if tasks else "") + ")")
    asked = tuple(dict.fromkeys((*recipe.bench.runtimes, *runtimes)))
    for entry, runtime in parity_pairs(entries, asked):
        # Keras elsewhere (a GPU) is float32 on other kernels: judged as an fp32 export
        thresholds = recipe.validate.tolerance("tflite_fp32" if entry["name"] == "keras"
                                               else entry["name"])
        shown = entry["name"] if runtime == runtimes_for(entry["family"])[0] \
            else f"{entry['name']} on {runtime}"
        try:
            runner = load(entry, run_dir, runtime)
        except RuntimeUnavailable as error:
            rows.append(ParityRow(entry["name"], runtime, "skipped", problems=[str(error)]))
            log(f"  {shown:<16} skipped: {error}")
            continue
        try:
            predicted = predict_all(runner, images)
        except Exception as error:  # the runtime refused to run the file: a row, not a crash
            runner.close()
            reason = f"{runtime} cannot run it: {first_line(error)}"
            rows.append(ParityRow(entry["name"], runtime, "failed", problems=[reason],
                                  sha256=entry["sha256"], executed=runner.executed,
                                  machine=where))
            log(f"  {shown:<16} FAILED: {reason}")
            continue
        row = judge_evidence(compare(predicted, reference, labels, reference_accuracy,
                                     thresholds, tasks), len(labels))
        runner.close()
        row.artifact, row.runtime, row.sha256 = entry["name"], runtime, entry["sha256"]
        row.executed, row.machine = runner.executed, where
        rows.append(row)
        if row.evidence:
            unproven.append((shown, row.evidence))
        verdict = "passed" if row.status == "passed" else \
            "not enough evidence: " + evidence_text(row.evidence, split) \
            if row.status == "insufficient" else "FAILED: " + "; ".join(row.problems)
        log(f"  {shown:<16} accuracy {row.accuracy:.4f}  drop {row.accuracy_drop:+.4f}  "
            f"agreement {row.agreement:.4f}  max|diff| {row.max_abs_diff:.1e}  {verdict}"
            + (f"  ({row.executed})" if row.executed else ""))
    for entry in artifacts(manifest, include_failed=True):
        if entry.get("status") == "failed":
            rows.append(ParityRow(entry["name"], "", "failed",
                                  problems=[f"{NOT_EXPORTED}: {entry['error']}"]))
            log(f"  {entry['name']:<16} not exported: {entry['error']}")
    _diagnose_failed_int8(run_dir, manifest, recipe, rows, log)
    _warn_insufficient(unproven, split, log)
    report = Parity(split, len(labels), rows)
    written = write_json(run_dir / PARITY, report.to_json())
    record_stage(manifest, "validate", outputs=[written], split=split, images=len(labels),
                 **stage_record(manifest, recipe, "validate"),
                 failed=[row.artifact for row in report.failed])
    write_manifest(run_dir, manifest)
    return report


def _warn_insufficient(unproven, split, log) -> None:
    """One warning per threshold that the split is too small to show, naming the rows
    ([(shown name, evidence)]) and how many images would do. An unproven row is no parity
    failure: it does not change `tledge validate`'s exit code."""
    groups = {}
    for name, evidence in unproven:
        groups.setdefault(evidence["threshold"], (evidence, []))[1].append(name)
    for evidence, names in groups.values():
        log(f"warning: NOT ENOUGH EVIDENCE for {', '.join(names)}: "
            + evidence_text(evidence, split)
            + f". Not passed, not failed: validate on a larger {split} split to decide.")


def _diagnose_failed_int8(run_dir, manifest, recipe, rows, log) -> None:
    """An int8 artifact that fails parity gets its per-layer diagnosis (into its manifest
    entry, not saved), when its export did not already make one: the report then shows where
    the error comes from."""
    failed = {row.artifact for row in rows if row.status == "failed" and row.runtime
              and row.runtime == runtimes_for(FORMATS[row.artifact].family)[0]
              if row.artifact in FORMATS}  # in its own runtime: another may refuse the file
    for entry in artifacts(manifest):
        record = entry.get("quantization")
        if entry["name"] not in failed or entry.get("precision") != "int8" or \
                entry.get("family") not in ("tflite", "onnx") or \
                (isinstance(record, dict) and record.get("diagnosis")):  # NNCF's IR: its own
            continue
        log(f"  {entry['name']:<16} measuring its quantization error layer by layer")
        try:
            diagnosis = diagnose_entry(run_dir, entry, recipe)
        except Exception as error:  # an explanation must not cost the parity results
            log(f"  {entry['name']:<16} no per-layer diagnosis: {first_line(error)}")
            continue
        if not isinstance(record, dict):
            record = entry["quantization"] = {"settings": None, "remedy": "plain",
                                              "attempts": [], "passed": False}
        record["diagnosis"] = diagnosis
