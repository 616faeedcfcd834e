"""Small samples are not evidence (issue 24): parity judged on fewer images than can show its
agreement threshold is "insufficient", never "passed"; the pick and the report's headline say
so and name how many images would do; the records hold what was really used. And the Ship
line describes what it ships (a stale row is never called passed)."""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from conftest import invoke, SMALL_RECIPE, THREADS
from tledge.bench.stage import BenchRow, choose
from tledge.core.metrics import (agreement, confusion_matrix, enough_images, images_needed,
                            per_class_accuracy, wilson_lower_bound)
from tledge.parity import evidence_text, judge_evidence, ParityRow, row_is_current
from tledge.records import Parity


# -- the arithmetic --------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999])
def test_images_needed_is_the_smallest_count_whose_all_agree_bound_reaches_the_threshold(
        threshold):
    needed = images_needed(threshold)
    assert wilson_lower_bound(1.0, needed) >= threshold
    assert needed == 1 or wilson_lower_bound(1.0, needed - 1) < threshold
    assert enough_images(needed, threshold) and not enough_images(needed - 1, threshold)


def test_images_needed_for_the_default_thresholds_and_for_one():
    # one-sided 95 %: the bound with every image agreeing is n / (n + 1.645^2)
    assert (images_needed(0.97), images_needed(0.98), images_needed(0.99)) == (88, 133, 268)
    assert images_needed(1.0) is None and not enough_images(10 ** 9, 1.0)
    assert wilson_lower_bound(1.0, 6) == pytest.approx(6 / (6 + 1.6449 ** 2), abs=1e-4)


def test_the_figures_of_one_model_against_another():
    labels, predicted, reference = [0, 0, 1, 2, 2], [0, 1, 1, 2, 0], [0, 1, 1, 1, 2]
    confusion = confusion_matrix(labels, predicted, 3)
    assert confusion == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert per_class_accuracy(confusion) == [0.5, 1.0, 0.5]
    assert per_class_accuracy([[0, 0], [1, 1]]) == [None, 0.5]  # a class with no image
    assert agreement(predicted, reference) == pytest.approx(0.6)


def test_metrics_imports_nothing_of_tledge():
    from test_architecture import GRAPH
    found, third_party = GRAPH["tledge.core.metrics"]
    assert found == [] and third_party <= {"numpy", "math", "statistics", "__future__"}


# -- the verdict of a row ------------------------------------------------------------------

def _row(status="passed", threshold=0.97, **figures):
    return ParityRow("tflite_int8", "litert", status, accuracy=0.5, accuracy_drop=0.0,
                     agreement=1.0, max_abs_diff=0.1, sha256="abc",
                     thresholds={"max_accuracy_drop": 0.01, "min_agreement": threshold,
                                 "max_abs_diff": None}, **figures)


def test_a_pass_on_too_few_images_is_insufficient_with_its_figures_kept():
    row = judge_evidence(_row(), 6)
    assert row.status == "insufficient" and row.problems == []
    assert (row.accuracy, row.agreement, row.max_abs_diff) == (0.5, 1.0, 0.1)
    assert row.evidence == {"images": 6, "threshold": 0.97, "lower_bound": 0.6892,
                            "images_needed": 88}
    assert evidence_text(row.evidence, "test") == (
        "6 test images cannot show agreement >= 0.97 (95% lower bound 0.689 with every image "
        "agreeing); at least 88 would")
    assert judge_evidence(_row(), 88).status == "passed"  # enough images: a pass is a pass
    assert judge_evidence(_row(), 87).status == "insufficient"


def test_a_failure_stays_a_failure_and_the_reference_stays_the_reference():
    failed = _row("failed", problems=["agreement 0.5000 < 0.97"])
    assert judge_evidence(failed, 6).status == "failed" and failed.evidence is None
    reference = ParityRow("keras", "keras", "reference", accuracy=0.33)
    assert judge_evidence(reference, 6).status == "reference"
    skipped = ParityRow("onnx_fp32", "openvino", "skipped", problems=["not installed"])
    assert judge_evidence(skipped, 6).status == "skipped"


def test_an_agreement_of_one_can_never_be_shown():
    row = judge_evidence(_row(threshold=1.0), 10_000)
    assert row.status == "insufficient" and row.evidence["images_needed"] is None
    assert "no number of images can show an agreement of 1" in evidence_text(row.evidence)


def test_a_row_is_current_only_for_the_file_it_judged():
    row = ParityRow("tflite_int8", "litert", "passed", sha256="abc")
    assert row_is_current(row, {"name": "tflite_int8", "sha256": "abc"})
    assert not row_is_current(row, {"name": "tflite_int8", "sha256": "def"})  # re-exported
    assert not row_is_current(row, None)  # no longer in the manifest
    assert not row_is_current(ParityRow("onnx_fp32", "onnxruntime", "skipped"), {"sha256": None})


# -- the pick ------------------------------------------------------------------------------

def _bench(*timed):
    return [BenchRow(artifact, runtime, 1, 1, "ok", p50_ms=p50, size_bytes=10)
            for artifact, runtime, p50 in timed]


def _parity(*rows):
    evidence = {"images": 6, "threshold": 0.99, "lower_bound": 0.6892, "images_needed": 268}
    return Parity("test", 6, [ParityRow("keras", "keras", "reference", accuracy=0.33)] + [
        ParityRow(artifact, runtime, status, accuracy=0.33,
                  evidence=evidence if status == "insufficient" else None)
        for artifact, runtime, status in rows])


TIMED = _bench(("keras", "keras", 5.0), ("tflite_fp32", "litert", 0.2),
               ("tflite_int8", "litert", 0.1))


def test_when_nothing_has_enough_evidence_the_pick_is_marked_unproven():
    pick = choose(TIMED, _parity(("tflite_fp32", "litert", "insufficient"),
                                 ("tflite_int8", "litert", "insufficient")), threads=1, batch=1)
    assert pick["artifact"] == "tflite_int8" and pick["parity"] == "insufficient"
    assert pick["evidence"]["images_needed"] == 268


def test_what_passed_ships_before_what_could_not_be_shown():
    pick = choose(TIMED, _parity(("tflite_fp32", "litert", "passed"),
                                 ("tflite_int8", "litert", "insufficient")), threads=1, batch=1)
    assert (pick["artifact"], pick["parity"]) == ("tflite_fp32", "passed")
    # the trade still names the faster file, as unproven
    assert [(c["artifact"], c["parity"]) for c in pick["alternatives"]] == [
        ("tflite_int8", "insufficient")]
    # a failed row never qualifies, with or without evidence
    pick = choose(TIMED, _parity(("tflite_fp32", "litert", "failed"),
                                 ("tflite_int8", "litert", "failed")), threads=1, batch=1)
    assert (pick["artifact"], pick["parity"]) == ("keras", "reference")


# -- a real build on a tiny split ----------------------------------------------------------

def tiny_recipe() -> str:
    """The shared small recipe on 3 classes x 20 images (6 validation and 6 test images, 48
    to train on), one epoch, timed in Keras and LiteRT only."""
    text = SMALL_RECIPE.format(name="tiny", epochs=1, threads=THREADS)
    for old, new in (("val_fraction = 0.15", "val_fraction = 0.1"),
                     ("test_fraction = 0.25", "test_fraction = 0.1"),
                     ('onnx = ["fp32"]', "onnx = []"),
                     ("[export]\n", "[export]\nint8_repair_attempts = 1\n"),
                     ("[bench]\n", '[bench]\nruntimes = ["keras", "litert"]\n')):
        assert old in text, old
        text = text.replace(old, new)
    return re.sub(r"synthetic = \{.*\}", 'synthetic = { classes = ["circle", "square", '
                  '"cross"], samples_per_class = 20 }', text)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tledge.stages import build
    folder = tmp_path_factory.mktemp("tiny")
    recipe = folder / "tiny.toml"
    recipe.write_text(textwrap.dedent(tiny_recipe()), encoding="utf-8")
    lines = []
    _, parity = build(recipe, out=folder / "run", log=lines.append, verbose=0)
    return folder / "run", parity, lines


def test_a_tiny_split_is_not_enough_evidence_for_any_artifact(tiny_run):
    run_dir, parity, lines = tiny_run
    assert parity.images == 6
    rows = {row.artifact: row for row in parity.rows}
    assert rows["keras"].status == "reference" and rows["keras"].evidence is None
    fp32 = rows["tflite_fp32"]
    assert fp32.status == "insufficient" and fp32.problems == [] and fp32.agreement == 1.0
    assert fp32.evidence["images_needed"] == 268 and fp32.evidence["images"] == 6
    assert rows["tflite_int8"].status in ("insufficient", "failed")  # never "passed"
    assert not [row for row in parity.rows if row.status == "passed"]
    saved = json.loads((run_dir / "parity.json").read_text())
    assert {row["artifact"]: row["status"] for row in saved["rows"]}["tflite_fp32"] == \
        "insufficient"
    warning = [line for line in lines if line.startswith("warning: NOT ENOUGH EVIDENCE")]
    assert warning and "tflite_fp32" in warning[0] and "at least 268 would" in warning[0]


def test_the_pick_of_a_tiny_split_is_unproven_and_the_headline_says_so(tiny_run):
    run_dir, _, _ = tiny_run
    pick = json.loads((run_dir / "bench.json").read_text())["pick"]
    assert pick["parity"] == "insufficient" and pick["artifact"].startswith("tflite_")
    needed = pick["evidence"]["images_needed"]
    head = (run_dir / "report.md").read_text().split("## Data")[0]
    assert f"**Ship `{pick['artifact']}` on litert: UNPROVEN, not enough evidence**" in head
    assert f"at least {needed} would" in head and "NOT ENOUGH EVIDENCE: tflite_fp32" in head
    assert "passed" not in head.replace("not passed", "").replace(
        "No artifact passed parity", "")  # nothing is said to have passed
    assert "not enough evidence" in head.split("Its parity:")[1].split("\n")[0]
    assert "| tflite_fp32 | litert | not enough evidence: 6 images cannot show agreement " \
           ">= 0.99" in (run_dir / "report.md").read_text()


def test_validate_exits_0_on_insufficient_evidence_but_warns(tiny_run, tmp_path):
    import shutil
    run_dir = shutil.copytree(tiny_run[0], tmp_path / "run")
    result = invoke("validate", run_dir)
    assert result.exit_code == 0, result.output
    assert "warning: NOT ENOUGH EVIDENCE for tflite_fp32" in result.output
    assert "not enough evidence: 6 test images cannot show agreement >= 0.99" in result.output


def test_the_records_hold_what_was_used(tiny_run):
    run_dir, _, _ = tiny_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    split = json.loads((run_dir / "split.json").read_text())["splits"]
    assert (split["train"]["count"], split["val"]["count"], split["test"]["count"]) == \
        (48, 6, 6)
    int8 = next(entry for entry in manifest["artifacts"] if entry["name"] == "tflite_int8")
    assert int8["quantization"]["settings"]["calibration_samples"] == 64  # asked for
    assert int8["calibration_samples"] == 48  # had: every training image, no more
    story = (run_dir / "report.md").read_text().split("## Data")[0]
    assert "on 48 `synthetic` training images" in story and "(held apart: val 6, test 6)" in story


def test_a_normal_split_still_passes(built_run):
    """The shared run's 120 test images can show int8's 0.97 (88 would do), not fp32's 0.99
    (268 would): each row is judged against its own threshold."""
    _, parity, _ = built_run
    assert parity.images == 120
    rows = {(row.artifact, row.runtime): row for row in parity.rows}
    int8 = rows["tflite_int8", "litert"]  # judged by its thresholds, not deferred
    assert int8.evidence is None and int8.status == ("failed" if int8.problems else "passed")
    fp32 = rows["tflite_fp32", "litert"]
    assert fp32.status == "insufficient" and fp32.evidence["images_needed"] == 268


# -- the Ship line describes what it ships -------------------------------------------------

def test_a_stale_pick_is_never_called_passed(run_copy):
    """The shipped file changed since it was validated: the table calls its row stale, and
    so does the headline, naming the command that makes it current."""
    from tledge.report.document import report_run
    manifest = json.loads((run_copy / "manifest.json").read_text())
    pick = manifest["pick"]
    entry = next(entry for entry in manifest["artifacts"] if entry["name"] == pick["artifact"])
    entry["sha256"] = "0" * 64  # as a re-export would record it
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    head = report_run(run_copy).read_text().split("## Data")[0]
    assert f"**Ship `{pick['artifact']}` on {pick['runtime']}? Its file changed since it was " \
           "validated**" in head
    assert "run `tledge validate RUN_DIR`" in head
    ship = head[head.index("**Ship"):]
    assert "passed" not in ship.split("Reference (Keras)")[0]


def test_the_ship_line_of_a_shipped_baseline_gives_the_baselines_figures(run_copy,
                                                                           built_run):
    """A pick of the baseline's file: the parity, quantization, latency and reference accuracy
    beside the Ship line are the baseline's (its own run directory, `baseline/`), not the
    transfer model's. The baseline here is a copy of a built run with its figures marked."""
    import shutil
    from tledge.report.document import report_run
    baseline = shutil.copytree(built_run[0], run_copy / "baseline")
    for folder, reference, int8 in ((run_copy, 0.5710, 0.5600), (baseline, 0.9123, 0.9012)):
        parity = json.loads((folder / "parity.json").read_text())
        for row in parity["rows"]:
            row["accuracy"] = {"keras": reference, "tflite_int8": int8}.get(
                row["artifact"], row["accuracy"])
        (folder / "parity.json").write_text(json.dumps(parity))
    bench = json.loads((run_copy / "bench.json").read_text())
    timed = next(row for row in json.loads((baseline / "bench.json").read_text())["rows"]
                 if (row["artifact"], row["runtime"]) == ("tflite_int8", "litert"))
    bench["pick"] = dict(bench["pick"], model="baseline", artifact="tflite_int8",
                         runtime="litert", p50_ms=timed["p50_ms"], parity="passed",
                         alternatives=[])
    (run_copy / "bench.json").write_text(json.dumps(bench))
    report = report_run(run_copy).read_text()
    ship = report[report.index("**Ship"):]
    ship = ship[:ship.index("\n\n")]
    assert ship.startswith("**Ship `baseline/tflite_int8` on litert**: ")
    assert f"p50 {timed['p50_ms']:.3f} ms" in ship
    assert "Its parity: accuracy 0.9012" in ship and ": passed." in ship
    assert "Reference (Keras) accuracy of the shipped model (baseline): 0.9123 on 120 test " \
           "images" in ship
    assert "0.5710" not in ship and "0.5600" not in ship  # the transfer model's figures
    section = report[report.index("## The shipped model: baseline"):report.index("## Data")]
    assert "### Parity" in section and "| tflite_int8 | litert | passed | 0.9012 |" in section
    assert "### Latency" in section and "### Quantization" in section
    assert "| keras | keras | reference | 0.9123 |" in section
