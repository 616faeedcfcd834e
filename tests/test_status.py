"""One truth about a run: the pipeline's table (tledge/pipeline.py) decides every stage's
state, `tledge status` shows it, and every hand-run command obeys it."""

from __future__ import annotations

import dataclasses
import json
import zipfile

import pytest

from conftest import assert_usage_error, invoke, write_recipe


def states(run_dir, run=".") -> dict:
    result = invoke("status", run_dir, "--json")
    document = json.loads(result.output)
    found = next(item for item in document["runs"] if item["run"] == run)
    return {stage["stage"]: (stage["status"], stage["reason"]) for stage in found["stages"]}


def test_the_table_lists_every_stage_in_build_order():
    from tledge.pipeline import STAGE, STAGES
    assert [row.name for row in STAGES] == ["train", "export", "validate", "bench", "explain",
                                            "report"]
    for row in STAGES:  # each reads a stage before it: the table is an order
        assert row.after is None or [r.name for r in STAGES].index(row.after) < \
            [r.name for r in STAGES].index(row.name)
    assert STAGE["export"].retry_failed and not STAGE["validate"].retry_failed
    assert [row.name for row in STAGES if row.sub_runs] == ["train", "export", "validate",
                                                            "bench"]


def test_status_of_a_built_run_is_current_and_reads_only(built_run):
    run_dir = built_run[0]
    before = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*") if path.is_file()}
    result = invoke("status", run_dir)
    assert result.exit_code == 0, result.output
    for stage in ("train", "export", "validate", "bench", "explain", "report"):
        assert f"  {stage:<9} ok" in result.output, result.output
    assert "pick: " in result.output and "not current" not in result.output
    after = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*") if path.is_file()}
    assert after == before  # it wrote nothing


def test_a_re_export_makes_validate_and_bench_stale_and_consumers_refuse(run_copy, tmp_path):
    result = invoke("export", run_copy, "--format", "tflite")
    assert result.exit_code == 0, result.output
    assert f"tledge validate {run_copy}" in result.output  # the export says what is next
    found = states(run_copy)
    assert found["export"][0] == "current"  # every listed format is of this model
    assert found["validate"][0] == "stale" and "tflite_fp32" in found["validate"][1]
    assert found["bench"] == ("stale", "validate is stale")
    assert found["report"][0] == "stale"
    result = invoke("status", run_copy)
    assert result.exit_code == 1 and "not current: bench is stale" in result.output

    # consumers refuse, naming the command that makes the run current
    assert_usage_error(invoke("bench", run_copy, "--pick"), "validate is stale",
                       f"tledge validate {run_copy}")
    assert_usage_error(invoke("bundle", run_copy, "--out", tmp_path / "b.zip"),
                       "validate is stale", "--unvalidated")
    assert not (tmp_path / "b.zip").exists()
    image = next((run_copy / "figures").glob("*.png"))
    assert_usage_error(invoke("predict", image, "--model", run_copy), "validate is stale")

    # asked for explicitly, the bundle packs the files as they are, marked unvalidated
    result = invoke("bundle", run_copy, "--out", tmp_path / "b.zip", "--unvalidated")
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(tmp_path / "b.zip") as archive:
        listed = json.loads(archive.read("bundle.json"))["artifacts"]
    parity = {item["name"]: item["parity"] for item in listed}
    assert parity["tflite_fp32"] == parity["tflite_int8"] == "unvalidated"
    assert parity["onnx_fp32"] != "unvalidated"  # not exported again: its row still holds

    # the report written now says, above everything, what is not current
    result = invoke("report", run_copy)
    text = (run_copy / "report.md").read_text()
    above = text.split("\n## ")[0]  # in the headline, above every section
    assert "**Not current:**" in above and "validate is stale" in above

    # validate, then bench: current again, and the consumers accept the run
    assert invoke("validate", run_copy).exit_code in (0, 1)
    assert states(run_copy)["bench"][0] == "stale"
    assert invoke("bench", run_copy).exit_code == 0
    assert invoke("report", run_copy).exit_code == 0
    assert {status for status, _ in states(run_copy).values()} <= {"current", "failed"}
    assert invoke("bench", run_copy, "--pick").exit_code == 0
    assert "Not current" not in (run_copy / "report.md").read_text()


def test_a_partial_bench_leaves_the_stage_stale_and_the_build_names_why(run_copy,
                                                                        small_recipe):
    result = invoke("bench", run_copy, "--runtime", "litert")
    assert result.exit_code == 0, result.output
    status, reason = states(run_copy)["bench"]
    assert status == "stale" and "part of the run" in reason
    result = invoke("build", small_recipe, "--out", run_copy)
    assert result.exit_code in (0, 1), result.output
    assert "(bench is stale: it was run for part of the run only" in result.output
    assert "== train: up to date" in result.output and "== validate: up to date" in result.output


def test_a_changed_model_file_and_a_damaged_record_are_named(run_copy):
    (run_copy / "parity.json").write_text("[]")
    status, reason = states(run_copy)["validate"]
    assert status == "stale" and "parity.json" in reason
    with open(run_copy / "model.keras", "ab") as handle:
        handle.write(b"\0")
    found = states(run_copy)
    assert found["train"][0] == "stale" and "model.keras" in found["train"][1]
    assert found["export"] == ("stale", "train is stale")


def test_status_refuses_what_is_not_a_run(tmp_path):
    assert_usage_error(invoke("status", tmp_path), "not a tledge run directory")


def test_check_refuses_a_recipe_whose_derived_baseline_would_not_load(tmp_path, monkeypatch):
    """The baseline's recipe is derived at train time; `check` derives and reads it back as
    the run will, so a bad derivation fails in a blink, not after training."""
    import tledge.pipeline as pipeline
    recipe = write_recipe(tmp_path, """
        name = "with_baseline"
        [data]
        source = "synthetic"
        image_size = [32, 32]
        synthetic = { classes = ["circle", "square"], samples_per_class = 20 }
        [model]
        backbone = "mobilenet_v2"
        weights = "none"
        [baseline]
        backbone = "small_cnn"
        """)
    assert invoke("check", recipe).exit_code == 0
    # what the derivation did before it took the baseline backbone's own default: the
    # transfer backbone's unfreeze count, more layers than small_cnn has
    real = pipeline.baseline_recipe

    def copies_the_transfer_unfreeze(source):
        derived = real(source)
        return dataclasses.replace(derived, train=dataclasses.replace(
            derived.train, fine_tune=source.train.fine_tune))
    monkeypatch.setattr(pipeline, "baseline_recipe", copies_the_transfer_unfreeze)
    assert_usage_error(invoke("check", recipe), "baseline/recipe.toml",
                       "train.fine_tune.unfreeze")


def test_export_options_are_honoured_or_refused(built_run, tmp_path):
    run_dir = built_run[0]
    for option, value in (("--out", tmp_path / "x"), ("--calibration-dir", tmp_path)):
        assert_usage_error(invoke("export", run_dir, option, value), option,
                           "for a .keras file")
    model = run_dir / "model.keras"
    out = tmp_path / "exported"
    assert_usage_error(invoke("export", model, "--precision", "int8", "--out", out),
                       "--calibration-dir")
    assert not out.exists()  # an input mistake writes nothing


@pytest.mark.parametrize("name", ["notes.txt", "existing.zip"])
def test_bundle_overwrites_only_a_bundle(built_run, tmp_path, name):
    target = tmp_path / name
    target.write_text("my notes")
    result = invoke("bundle", built_run[0], "--out", target)
    assert_usage_error(result, str(target))
    assert target.read_text() == "my notes"


def test_commands_that_report_print_json_alone(run_copy, small_recipe):
    """--json: stdout is one JSON document; progress lines go to stderr."""
    result = invoke("check", small_recipe, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["name"] == "small"
    result = invoke("validate", run_copy, "--json")
    parity = json.loads(result.stdout)
    assert {row["artifact"] for row in parity["rows"]} >= {"keras", "tflite_int8"}
    assert "accuracy" in result.stderr  # the progress, beside the document
    result = invoke("bench", run_copy, "--runtime", "litert", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["rows"]
    invoke("bench", run_copy)
    result = invoke("bench", run_copy, "--pick", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["artifact"]


def test_help_examples_name_files_that_exist():
    """Every recipe a help text names is shipped, and every run it names is one a shipped
    recipe builds (models/<name>); the user's own files are named in capitals (PHOTOS/)."""
    import re
    from pathlib import Path
    from tledge.cli import main
    root = Path(__file__).resolve().parents[1]
    texts = [main.help] + [command.help or "" for command in main.commands.values()]
    texts += [sub.help or "" for command in main.commands.values()
              for sub in getattr(command, "commands", {}).values()]
    named = {path for text in texts for path in re.findall(r"(?:recipes|models)/[\w./-]+", text)}
    assert any(path.startswith("recipes/") for path in named)
    for path in named:
        if path.startswith("recipes/"):
            assert (root / path).is_file(), path
        else:
            run = path.split("/")[1]
            assert (root / "recipes" / f"{run}.toml").is_file(), path
