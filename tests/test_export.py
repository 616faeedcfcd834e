"""Every row of the format table: export, run in its real runtime, compare with Keras."""

from __future__ import annotations

import numpy as np
import pytest

from tledge.formats import FORMATS
from tledge.rundir import artifact_entry

EXPORTED = [row for row in FORMATS.values() if row.family != "keras"]


@pytest.fixture(scope="module")
def trained(built_run):
    from tledge.data.synthetic import generate
    from tledge.model import load_model
    run_dir, _, _ = built_run
    images, _ = generate(["circle", "square", "triangle", "cross"], 8, (32, 32), 0.08, seed=5)
    # int8 is calibrated on other images than those it is judged on
    calibration, _ = generate(["circle", "square", "triangle", "cross"], 8, (32, 32), 0.08,
                              seed=6)
    return load_model(run_dir / "model.keras"), images, calibration


@pytest.mark.parametrize("fmt", EXPORTED, ids=[row.name for row in EXPORTED])
def test_round_trip_in_the_real_runtime(fmt, trained, tmp_path):
    from tledge.export.stage import export_artifacts
    from tledge.rundir import empty_manifest
    from tledge.runners import load
    model, images, calibration = trained
    manifest = empty_manifest({"name": "x", "hash": "x"}, list("abcdefgh"), (32, 32))
    # the real export path: convert, embed the metadata, rename into place, enter it
    [entry] = export_artifacts(model, tmp_path, manifest, [fmt], calibration=calibration,
                               log=lambda line: None)
    assert entry["status"] == "ok", entry
    assert entry["input"]["dtype"] == fmt.input_dtype
    assert entry["input"]["shape"][1:] == [32, 32, 3]
    if fmt.family == "onnx":  # what stricter consumers than ONNX Runtime check first
        import onnx
        onnx.checker.check_model(onnx.load(str(tmp_path / entry["path"])), full_check=True)
    reference = model(images.astype(np.float32), training=False).numpy()
    probabilities = load(entry, tmp_path).predict(images)
    assert probabilities.shape == reference.shape and probabilities.dtype == np.float32
    agreement = np.mean(probabilities.argmax(1) == reference.argmax(1))
    if fmt.precision == "fp32":
        np.testing.assert_allclose(probabilities, reference, atol=1e-5)
    else:
        assert agreement >= 0.8, agreement
        assert np.abs(probabilities - reference).max() < 0.5


def test_onnx_has_named_io_and_a_dynamic_batch(trained, tmp_path):
    import onnxruntime
    from tledge.export.onnx import export_onnx
    model, images, _ = trained
    spec = export_onnx(model, tmp_path / "m.onnx", precision="fp32")
    assert spec["input"]["name"] == "image" and spec["output"]["name"] == "probabilities"
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    for batch in (1, 5):
        out = session.run(["probabilities"], {"image": images[:batch].astype(np.float32)})[0]
        assert out.shape == (batch, 8)


def test_int8_without_calibration_is_an_export_error(trained, tmp_path):
    from tledge.errors import ExportError
    from tledge.export.tflite import export_tflite
    with pytest.raises(ExportError, match="calibration"):
        export_tflite(trained[0], tmp_path / "m.tflite", precision="int8", calibration=None)


def test_a_failed_format_is_recorded_and_the_others_still_export(built_run, tmp_path):
    import shutil
    from tledge.export.stage import export_run
    from tledge.rundir import read_manifest
    run_dir = tmp_path / "run"
    shutil.copytree(built_run[0], run_dir)
    (run_dir / "model_fp32.onnx").unlink()
    (run_dir / "model_fp32.onnx").mkdir()  # a directory where the file must go: rename fails
    (run_dir / "model_fp32.onnx" / "keep").write_text("")
    entries = {entry["name"]: entry for entry in export_run(run_dir, log=lambda line: None)}
    assert entries["onnx_fp32"]["status"] == "failed" and entries["onnx_fp32"]["error"]
    assert entries["tflite_fp32"]["status"] == "ok"
    manifest = {entry["name"]: entry for entry in read_manifest(run_dir)["artifacts"]}
    assert manifest["onnx_fp32"]["status"] == "failed"
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("int8_io", ["int8", "float32"])
def test_int8_with_other_io_types_takes_raw_pixels_through_the_runner(int8_io, trained, tmp_path):
    from tledge.export.tflite import export_tflite
    from tledge.runners import load
    model, images, calibration = trained
    row = FORMATS["tflite_int8"]
    path = tmp_path / row.file_name
    spec = export_tflite(model, path, precision="int8", calibration=calibration, int8_io=int8_io)
    assert spec["input"]["dtype"] == int8_io
    entry = artifact_entry(tmp_path, path, row, recipe_hash="x", labels=list("abcdefgh"),
                           input_spec=spec["input"], output_spec=spec["output"])
    reference = model(images.astype(np.float32), training=False).numpy()
    probabilities = load(entry, tmp_path).predict(images)
    assert np.mean(probabilities.argmax(1) == reference.argmax(1)) >= 0.8
    assert np.abs(probabilities - reference).max() < 0.5


def test_a_keras_file_tledge_did_not_train_exports_with_calibration_images(built_run, tmp_path):
    from PIL import Image
    from tledge.data.synthetic import generate
    from tledge.export.stage import export_model_file
    from tledge.rundir import read_manifest, sha256
    images, _ = generate(["circle", "ring", "star", "cross"], 6, (40, 40), 0.08, seed=3)
    (tmp_path / "calib" / "sub").mkdir(parents=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "calib" / ("sub" if index % 2 else "") /
                                    f"{index}.png")
    lines = []
    out, entries = export_model_file(built_run[0] / "model.keras", tmp_path / "out",
                                     only=("tflite", "onnx"), precisions=("fp32", "int8"),
                                     calibration_dir=tmp_path / "calib", log=lines.append)
    assert {entry["name"] for entry in entries} == {"tflite_fp32", "tflite_int8", "onnx_fp32",
                                                    "onnx_int8"}
    manifest = read_manifest(out)
    for entry in manifest["artifacts"]:
        assert entry["status"] == "ok" and sha256(out / entry["path"]) == entry["sha256"]
    int8 = next(e for e in manifest["artifacts"] if e["name"] == "tflite_int8")
    assert int8["calibration_samples"] == 24 and int8["input"]["shape"] == [1, 32, 32, 3]
    assert len(lines) == 4 and all("KiB" in line for line in lines)


def test_named_precisions_are_exported_even_when_the_recipe_lists_others(built_run, tmp_path):
    import shutil
    from click.testing import CliRunner
    from tledge.cli import main
    from tledge.rundir import read_manifest
    run_dir = tmp_path / "run"
    shutil.copytree(built_run[0], run_dir)
    result = CliRunner().invoke(main, ["export", str(run_dir), "--format", "tflite",
                                       "--precision", "fp16", "--precision", "dynamic"])
    assert result.exit_code == 0, result.output
    names = {entry["name"] for entry in read_manifest(run_dir)["artifacts"]}
    assert {"tflite_fp16", "tflite_dynamic", "tflite_int8", "onnx_fp32"} <= names
    assert "model_fp16.tflite" in result.output and "KiB" in result.output
    result = CliRunner().invoke(main, ["export", str(run_dir), "--precision", "fp64"])
    assert result.exit_code == 2 and "fp64" in result.output


def _cli(*args):
    from click.testing import CliRunner
    from tledge.cli import main
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_export_bad_input_is_one_line_and_exit_2(built_run, tmp_path):
    import keras
    (tmp_path / "afile").write_text("")
    result = _cli("export", built_run[0] / "model.keras", "--format", "onnx",
                  "--out", tmp_path / "afile" / "out")
    assert result.exit_code == 2 and "cannot write to" in result.output
    inputs = keras.Input((8, 8, 3))
    unsafe = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(inputs))
    unsafe.save(tmp_path / "unsafe.keras")
    result = _cli("export", tmp_path / "unsafe.keras", "--format", "onnx")
    assert result.exit_code == 2 and "never enables unsafe deserialization" in result.output
    empty = tmp_path / "empty_run"
    empty.mkdir()
    result = _cli("export", empty)
    assert result.exit_code == 2 and "not a tledge run directory" in result.output
    for result in (_cli("export", built_run[0], "--format", "coreml"),
                   _cli("export", built_run[0], "--precision", "int4")):
        assert result.exit_code == 2 and "Traceback" not in result.output


def test_a_foreign_model_takes_its_labels_and_inspect_names_what_it_shows(built_run, tmp_path):
    """`--labels` (a file or class folders) goes into the metadata clients read instead of
    0..7; a wrong count is an input mistake; `inspect` says the file is of a model tledge did
    not train (no recipe hash) and names the .keras output by its layer."""
    import json
    from tledge.inspection import describe_file, format_description
    from tledge.rundir import read_manifest, sha256
    model = tmp_path / "theirs.keras"
    model.write_bytes((built_run[0] / "model.keras").read_bytes())
    classes = json.loads((built_run[0] / "manifest.json").read_text())["labels"]
    (tmp_path / "labels.txt").write_text("\n".join(classes) + "\n\n")
    result = _cli("export", model, "--format", "tflite_fp32", "--labels", tmp_path / "labels.txt",
                  "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "out")["labels"] == classes
    described = describe_file(tmp_path / "out" / "model_fp32.tflite")
    assert described["standard_metadata"]["labels"] == classes
    assert described["metadata"]["recipe_hash"] is None
    assert described["metadata"]["model_sha256"] == sha256(model)
    text = format_description(described)
    assert "recipe hash" not in text and f"did not train (sha256 {sha256(model)[:16]})" in text
    for name in reversed(classes):  # class folders, sorted by name
        (tmp_path / "photos" / name).mkdir(parents=True)
    result = _cli("export", model, "--format", "onnx_fp32", "--labels", tmp_path / "photos",
                  "--out", tmp_path / "folders")
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "folders")["labels"] == sorted(classes)
    (tmp_path / "short.txt").write_text("a\nb\n")
    result = _cli("export", model, "--format", "tflite_fp32", "--labels", tmp_path / "short.txt",
                  "--out", tmp_path / "short")
    assert result.exit_code == 2 and "2 labels given for a model with 8 outputs" in result.output
    assert not (tmp_path / "short").exists()  # nothing written
    result = _cli("export", built_run[0], "--labels", tmp_path / "labels.txt")
    assert result.exit_code == 2 and "--labels is for a .keras file" in result.output
    keras_view = describe_file(model)
    assert keras_view["output"]["name"] == "probabilities"
