"""The `tledge` command through click's CliRunner: help, each command on the session run,
and bad input, which must end in exit code 2 with one `error:` line and nothing half-written.

Nothing here trains a model: the run commands work on copies of the session `built_run`, and
every bad-input build must fail before training starts (`no_training` makes sure of it).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import SMALL_RECIPE, assert_usage_error, invoke, write_recipe
from tledge.cli import main
from tledge.rundir import sha256

COMMANDS = sorted(main.commands)


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a build gets as far as training."""
    import tledge.stages

    def train_model(*args, **kwargs):
        raise AssertionError("bad input reached training; it must fail before")
    monkeypatch.setattr(tledge.stages, "train_model", train_model)  # the name stages call


def manifest_of(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


# -- help ------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[]] + [[name] for name in COMMANDS],
                         ids=["tledge"] + COMMANDS)
def test_help_exits_0_and_shows_an_example(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def test_python_dash_m_tledge_help():
    result = subprocess.run([sys.executable, "-m", "tledge", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout and "build" in result.stdout


# -- check and backbones ---------------------------------------------------------------------

def test_check_prints_the_resolved_recipe(tmp_path):
    text = SMALL_RECIPE.format(name="resolved", epochs=1, threads=1).replace("image_size = [32, 32]\n", "")
    recipe = write_recipe(tmp_path, text)
    result = invoke("check", recipe)
    assert result.exit_code == 0, result.output
    assert f"{recipe}: valid" in result.output
    assert "image_size = [64, 64]" in result.output  # small_cnn's default size
    assert "dropout = 0.2" in result.output  # a default the recipe does not set
    assert "unfreeze = 6" in result.output  # small_cnn's default_unfreeze


def test_check_lists_every_problem_with_its_key_path(tmp_path):
    text = SMALL_RECIPE.format(name="broken", epochs=-1, threads=1)
    text = text.replace('backbone = "small_cnn"', 'backbone = "resnet_9000"')
    text = text.replace("batch_size = 32", "batch_size = 32\ncolour = true")
    recipe = write_recipe(tmp_path, text)
    result = invoke("check", recipe)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith(f"error: {recipe}: ")
    for key_path in ("train.feature_extraction.epochs", "model.backbone", "data.colour"):
        assert key_path in result.stderr, key_path


def test_backbones_lists_the_registry():
    result = invoke("backbones")
    assert result.exit_code == 0, result.output
    for name in ("mobilenet_v2", "efficientnet_b0", "small_cnn"):
        assert name in result.output


# -- the stages on an existing run -----------------------------------------------------------

def test_report_rewrites_report_md(run_copy):
    (run_copy / "report.md").unlink()
    result = invoke("report", run_copy)
    assert result.exit_code == 0, result.output
    assert "report.md" in result.output
    assert "## Parity" in (run_copy / "report.md").read_text()


def test_validate_prints_every_artifact(run_copy):
    result = invoke("validate", run_copy)
    assert result.exit_code == 0, result.output
    for entry in manifest_of(run_copy)["artifacts"]:
        assert entry["name"] in result.output


def test_bench_prints_rows_and_the_pick(run_copy):
    result = invoke("bench", run_copy, "--runtime", "litert", "--threads", "1", "--batch", "1,2")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "litert" in line and "p50" in line]
    assert len(rows) == 4, result.output  # tflite_fp32 and tflite_int8, batch 1 and 2
    assert "pick: tflite_" in result.output
    bench = json.loads((run_copy / "bench.json").read_text())
    assert {row["runtime"] for row in bench["rows"]} == {"litert"}
    assert {row["batch"] for row in bench["rows"]} == {1, 2}


def test_export_one_family_leaves_the_others_alone(run_copy):
    before = {entry["name"]: entry for entry in manifest_of(run_copy)["artifacts"]}
    result = invoke("export", run_copy, "--format", "onnx")
    assert result.exit_code == 0, result.output
    assert "onnx_fp32" in result.output and "tflite" not in result.output
    manifest = manifest_of(run_copy)
    after = {entry["name"]: entry for entry in manifest["artifacts"]}
    # the export record keeps every format; an export of one family of a current run
    # completes the stage (every listed format is of this model), and what read the rewritten
    # file is stale: validate, then bench
    assert manifest["stages"]["export"]["formats"] == ["tflite_fp32", "tflite_int8", "onnx_fp32"]
    assert manifest["stages"]["export"]["hash"] is not None
    status = json.loads(invoke("status", run_copy, "--json").output)["runs"][0]["stages"]
    states = {stage["stage"]: stage["status"] for stage in status}
    assert states["export"] == "current" and states["validate"] == "stale"
    for name in ("keras", "tflite_fp32", "tflite_int8"):
        assert after[name] == before[name]
        assert sha256(run_copy / after[name]["path"]) == after[name]["sha256"]
    onnx = after["onnx_fp32"]
    assert onnx["status"] == "ok"
    assert sha256(run_copy / onnx["path"]) == onnx["sha256"]
    assert (run_copy / onnx["path"]).stat().st_size == onnx["size_bytes"]


# -- bad input: exit 2, one line, nothing half-written ---------------------------------------

def folder_recipe(folder, data_path, name="pets"):
    text = SMALL_RECIPE.format(name=name, epochs=1, threads=1)
    start, end = text.index('source = "synthetic"'), text.index("[model]")
    data = f'source = "folder"\npath = "{data_path}"\nimage_size = [32, 32]\n\n'
    return write_recipe(folder, text[:start] + data + text[end:])


def write_png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), colour, dtype=np.uint8)).save(path)


def assert_nothing_written(run_dir):
    assert not (run_dir / "manifest.json").exists()
    if run_dir.exists():
        assert [path.name for path in run_dir.rglob("*")] == []


@pytest.mark.parametrize("command", ["check", "build"])
def test_missing_recipe_file(tmp_path, command):
    missing = tmp_path / "nosuch.toml"
    assert_usage_error(invoke(command, missing), missing, "check the path")


def test_build_with_an_invalid_recipe_writes_nothing(tmp_path, no_training):
    recipe = write_recipe(tmp_path, SMALL_RECIPE.format(name="broken", epochs=-1, threads=1))
    run_dir = tmp_path / "run"
    result = invoke("build", recipe, "--out", run_dir)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith(f"error: {recipe}: train.feature_extraction.epochs")
    assert not run_dir.exists()


def test_build_from_a_missing_folder_fails_before_training(tmp_path, no_training):
    recipe = folder_recipe(tmp_path, "no_such_images")
    run_dir = tmp_path / "run"
    assert_usage_error(invoke("build", recipe, "--out", run_dir),
                       tmp_path / "no_such_images", "data.path")
    assert_nothing_written(run_dir)


@pytest.mark.parametrize("layout", ["empty", "empty_class_folders"])
def test_build_from_a_folder_without_images(tmp_path, no_training, layout):
    images = tmp_path / "images"
    images.mkdir()
    if layout == "empty_class_folders":
        for name in ("cats", "dogs"):
            (images / name).mkdir()
        (images / "cats" / "notes.txt").write_text("not an image")
    recipe = folder_recipe(tmp_path, "images")
    run_dir = tmp_path / "run"
    line = assert_usage_error(invoke("build", recipe, "--out", run_dir), images)
    assert ("sub-folder" in line) if layout == "empty" else ("add images" in line)
    assert_nothing_written(run_dir)


def test_build_with_an_undecodable_image(tmp_path, no_training):
    images = tmp_path / "images"
    for index in range(3):
        write_png(images / "cats" / f"{index}.png", 40)
        write_png(images / "dogs" / f"{index}.png", 200)
    broken = images / "dogs" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg " * 10)
    recipe = folder_recipe(tmp_path, "images")
    run_dir = tmp_path / "run"
    assert_usage_error(invoke("build", recipe, "--out", run_dir), broken, "replace or remove",
                       "bad_images.txt")
    # Nothing but the list of bad images the error points to (one here; thousands at scale)
    assert sorted(path.name for path in run_dir.iterdir()) == ["bad_images.txt"]
    assert "dogs/broken.jpg" in (run_dir / "bad_images.txt").read_text()


def test_build_into_an_unwritable_directory(tmp_path, small_recipe, no_training):
    blocker = tmp_path / "afile"
    blocker.write_text("a file where a folder should be")
    run_dir = blocker / "run"
    assert_usage_error(invoke("build", small_recipe, "--out", run_dir), blocker, "--out")
    assert blocker.read_text() == "a file where a folder should be"


def test_validate_a_folder_that_is_not_a_run(tmp_path):
    assert_usage_error(invoke("validate", tmp_path), tmp_path, "manifest.json", "tledge build")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["validate", "bench", "export", "report"])
def test_run_commands_on_a_missing_directory(tmp_path, command):
    assert_usage_error(invoke(command, tmp_path / "nosuch"), tmp_path / "nosuch")


@pytest.mark.parametrize("args, fragments", [
    (["bench", "--threads", "0"], ["--threads", "at least 1"]),
    (["bench", "--batch", "1,x"], ["--batch", "'1,x'"]),
    (["bench", "--runtime", "nosuch"], ["nosuch", "litert"]),
    (["export", "--format", "nosuch"], ["nosuch", "tflite_int8"]),
], ids=["threads-0", "batch-not-a-number", "unknown-runtime", "unknown-format"])
def test_bad_options_on_a_run(run_copy, args, fragments):
    manifest = (run_copy / "manifest.json").read_bytes()
    files = sorted(path.name for path in run_copy.iterdir())
    command, *options = args
    assert_usage_error(invoke(command, run_copy, *options), *fragments)
    assert (run_copy / "manifest.json").read_bytes() == manifest
    assert sorted(path.name for path in run_copy.iterdir()) == files


def test_export_of_a_format_the_recipe_does_not_list(run_copy):
    recipe = run_copy / "recipe.toml"
    recipe.write_text(recipe.read_text().replace('onnx = ["fp32"]', "onnx = []"))
    before = {entry["name"]: entry for entry in manifest_of(run_copy)["artifacts"]}
    assert_usage_error(invoke("export", run_copy, "--format", "onnx"), recipe, "[export]")
    after = {entry["name"]: entry for entry in manifest_of(run_copy)["artifacts"]}
    assert after == before


def test_unknown_command_and_missing_argument_are_one_line():
    assert_usage_error(invoke("nosuch"), "nosuch", "tledge --help")
    assert_usage_error(invoke("validate"), "RUN_DIR", "tledge validate --help")
