"""End to end on generated data: recipe -> train -> export -> validate -> bench -> report."""

from __future__ import annotations

import json

import numpy as np

from tledge.formats import FORMATS
from tledge.rundir import sha256
from tledge.runners import load


def manifest_of(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


def test_manifest_lists_every_artifact_with_matching_sha256(built_run):
    run_dir, _, _ = built_run
    manifest = manifest_of(run_dir)
    names = {entry["name"] for entry in manifest["artifacts"]}
    assert names == {"keras", "tflite_fp32", "tflite_int8", "onnx_fp32"}
    for entry in manifest["artifacts"]:
        path = run_dir / entry["path"]
        assert entry["status"] == "ok"
        assert path.stat().st_size == entry["size_bytes"]
        assert sha256(path) == entry["sha256"]
        assert entry["labels"] == manifest["labels"]
        assert entry["recipe_hash"] == manifest["recipe"]["hash"]
        assert entry["versions"]["tensorflow"] and entry["versions"]["numpy"]
        # a .tflite declares batch 1 (LiteRT.js cannot resize an input), the others any batch
        batch = 1 if entry["family"] == "tflite" else -1
        assert entry["input"]["shape"] == [batch, 32, 32, 3]
        assert entry["output"]["shape"] == [batch, 8]
        assert entry["input"]["dtype"] == FORMATS[entry["name"]].input_dtype


def test_int8_takes_raw_pixels_and_records_its_quantization(built_run):
    run_dir, _, _ = built_run
    entry = next(e for e in manifest_of(run_dir)["artifacts"] if e["name"] == "tflite_int8")
    assert entry["input"]["dtype"] == "uint8"
    assert entry["input"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    assert entry["output"]["dtype"] == "uint8"
    assert abs(entry["output"]["quantization"]["scale"] - 1 / 256) < 1e-6
    assert entry["calibration_samples"] == 64


def test_float_artifacts_match_keras_in_their_real_runtimes(built_run):
    from tledge.data.synthetic import generate
    run_dir, _, _ = built_run
    manifest = manifest_of(run_dir)
    images, _ = generate(["circle", "star", "hbars"], 4, (32, 32), 0.08, seed=123)
    entries = {entry["name"]: entry for entry in manifest["artifacts"]}
    reference = load(entries["keras"], run_dir).predict(images)
    np.testing.assert_allclose(reference.sum(axis=1), 1.0, atol=1e-5)
    for name in ("tflite_fp32", "onnx_fp32"):
        runner = load(entries[name], run_dir)
        np.testing.assert_allclose(runner.predict(images), reference, atol=1e-5)
    int8 = load(entries["tflite_int8"], run_dir).predict(images)
    assert np.abs(int8 - reference).max() < 0.5  # quantized, but the same function


def test_parity_is_measured_and_reasonable_on_a_trained_model(built_run):
    run_dir, parity, _ = built_run
    rows = {row.artifact: row for row in parity.rows}
    assert rows["keras"].status == "reference"
    assert rows["keras"].accuracy > 0.5, "the small model should learn the shapes"
    for name in ("tflite_fp32", "onnx_fp32"):  # every threshold met, but 120 images cannot
        assert rows[name].status == "insufficient" and rows[name].problems == []  # show 0.99
        assert rows[name].evidence["images_needed"] == 268
        assert rows[name].max_abs_diff < 1e-4 and rows[name].agreement == 1.0
    assert rows["tflite_int8"].agreement >= 0.85
    assert rows["tflite_int8"].accuracy_drop <= 0.05
    saved = json.loads((run_dir / "parity.json").read_text())
    assert {row["artifact"] for row in saved["rows"]} == set(rows)
    assert saved["images"] == parity.images == 120  # 25 % of 8 x 60


def test_bench_has_a_row_per_artifact_and_a_pick(built_run):
    run_dir, _, _ = built_run
    bench = json.loads((run_dir / "bench.json").read_text())
    gpu = {"keras_gpu", "onnxruntime_cuda", "onnxruntime_tensorrt"}
    for row in bench["rows"]:  # on this machine: a row that says why, not a crash
        if row["runtime"] in gpu and row["status"] == "skipped":
            assert "GPU" in row["reason"] or "ExecutionProvider" in row["reason"]
    rows = {(row["artifact"], row["runtime"]): row for row in bench["rows"]
            if row["runtime"] not in gpu}
    assert set(rows) == {("keras", "keras"), ("tflite_fp32", "litert"),
                         ("tflite_int8", "litert"), ("onnx_fp32", "onnxruntime"),
                         ("onnx_fp32", "openvino")}  # OpenVINO is in the dev extras
    assert {row["runtime"] for row in bench["rows"]} >= gpu
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["runs"] >= 5
        assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["load_ms"] > 0 and row["first_ms"] > 0
    pick = bench["pick"]
    assert pick == manifest_of(run_dir)["pick"]
    passed = _passed_artifacts(run_dir)
    assert pick["artifact"] in passed
    assert pick["p50_ms"] == min(row["p50_ms"] for row in rows.values()
                                 if row["artifact"] in passed)


def _passed_artifacts(run_dir):
    parity = json.loads((run_dir / "parity.json").read_text())
    return {row["artifact"] for row in parity["rows"] if row["status"] in ("passed", "reference")}


def test_report_names_the_pick_and_every_section(built_run):
    run_dir, _, _ = built_run
    report = (run_dir / "report.md").read_text()
    pick = manifest_of(run_dir)["pick"]
    assert f"Ship `{pick['artifact']}` on {pick['runtime']}" in report
    for heading in ("## Data", "## Training", "## Parity", "## Latency", "## Artifacts"):
        assert heading in report
    assert "tflite_int8" in report and "onnx_fp32" in report
    assert "| test | 120 | carved (25% of train) |" in report
    assert "## Recipe" in report and 'backbone = "small_cnn"' in report
    assert "Test accuracy of the trained model:" in report


def test_run_directory_records_split_history_and_resolved_recipe(built_run):
    from tledge.recipe.load import load_recipe
    run_dir, _, _ = built_run
    split = json.loads((run_dir / "split.json").read_text())
    assert split["fingerprint"] and split["splits"]["test"]["count"] == 120
    history = json.loads((run_dir / "history.json").read_text())
    assert history["phases"][0]["name"] == "from_scratch"
    assert len(history["phases"][0]["epochs"]) == 10
    stored = load_recipe(run_dir / "recipe.toml")
    assert stored.name == "small" and stored.data.image_size == (32, 32)
    leftovers = [p.name for p in run_dir.iterdir() if ".tmp" in p.name]
    assert leftovers == []


def test_every_exported_file_carries_its_own_metadata(built_run):
    from tledge.export.metadata import read_metadata
    run_dir, _, _ = built_run
    manifest = manifest_of(run_dir)
    for entry in manifest["artifacts"]:
        if entry["family"] not in ("tflite", "onnx"):
            continue
        metadata = read_metadata(run_dir / entry["path"])
        assert metadata["labels"] == manifest["labels"]
        assert metadata["format"] == entry["name"] and metadata["precision"] == entry["precision"]
        assert metadata["recipe_hash"] == manifest["recipe"]["hash"]
        assert metadata["input"]["value_range"] == [0, 255]
