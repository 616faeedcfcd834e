"""OpenVINO as a runtime and as a format: the .onnx artifacts (fp32, int8 QDQ) and the IR
family (fp32, fp16, int8 through NNCF with accuracy control) validated and timed like every
other artifact, what OpenVINO ran recorded, a clear skipped row where it is absent; every
.onnx file clean (full check, no unused opset domains); the IR describing itself where
OpenVINO's tools look."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from conftest import invoke


@pytest.fixture(scope="module")
def onnx_run(built_run, tmp_path_factory):
    """A copy of the session run with ONNX int8 and the OpenVINO IR family too, validated and
    benchmarked in OpenVINO."""
    run_dir = shutil.copytree(built_run[0], tmp_path_factory.mktemp("openvino") / "run")
    for command in (["export", run_dir, "--format", "onnx", "--precision", "int8"],
                    ["export", run_dir, "--format", "openvino", "--precision", "fp32",
                     "--precision", "fp16", "--precision", "int8"],
                    ["validate", run_dir],
                    ["bench", run_dir, "--runtime", "openvino", "--runtime", "onnxruntime"]):
        result = invoke(*command)
        assert result.exit_code == 0, result.output
    return run_dir


def test_openvino_rows_are_validated_and_timed_with_what_ran(onnx_run):
    parity = json.loads((onnx_run / "parity.json").read_text())
    rows = {(row["artifact"], row["runtime"]): row for row in parity["rows"]}
    # fp32's agreement 0.99 needs 268 images to be shown, the run has 120; int8's 0.97, 88
    for name, status in (("onnx_fp32", "insufficient"), ("onnx_int8", "passed")):
        row = rows[(name, "openvino")]
        assert row["status"] == status and not row["problems"], row
        assert row["executed"].startswith("inference precision ")
    # an fp32 file runs as fp32: OpenVINO's bf16 default would not be what parity judged
    assert rows[("onnx_fp32", "openvino")]["executed"] == "inference precision f32"
    assert rows[("onnx_fp32", "openvino")]["max_abs_diff"] < 1e-4
    bench = json.loads((onnx_run / "bench.json").read_text())
    timed = [row for row in bench["rows"] if row["runtime"] == "openvino"]
    assert {row["artifact"] for row in timed} == {"onnx_fp32", "onnx_int8", "openvino_fp32",
                                                  "openvino_fp16", "openvino_int8"}
    assert all(row["status"] == "ok" and row["p50_ms"] > 0 and row["executed"] for row in timed)


def test_the_pick_takes_an_openvino_row_only_when_it_passed(onnx_run):
    from tledge.bench.stage import BenchRow, choose
    from tledge.records import read_parity
    parity = read_parity(onnx_run)
    bench = json.loads((onnx_run / "bench.json").read_text())
    rows = [BenchRow(**row) for row in bench["rows"] if row["runtime"] == "openvino"]
    pick = choose(rows, parity, threads=rows[0].threads, batch=rows[0].batch)
    assert pick["runtime"] == "openvino"
    for row in parity.rows:
        if row.runtime == "openvino":
            row.status = "failed"
    assert choose(rows, parity, threads=rows[0].threads, batch=rows[0].batch) is None


def test_without_openvino_its_rows_are_skipped_with_the_reason(onnx_run, tmp_path,
                                                               monkeypatch):
    from tledge.bench.stage import bench_run
    from tledge.validate import validate_run
    run_dir = shutil.copytree(onnx_run, tmp_path / "run")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    report = validate_run(run_dir, log=lambda line: None)
    # the .onnx files are judged in their own runtime; the IR, whose own runtime is missing,
    # is a skipped row that says why
    skipped = [row for row in report.rows if row.runtime == "openvino"]
    assert {row.artifact for row in skipped} == {"openvino_fp32", "openvino_fp16",
                                                 "openvino_int8"}
    assert all(row.status == "skipped" and "openvino is not installed" in row.problems[0]
               for row in skipped), skipped
    assert not report.failed
    result = bench_run(run_dir, runtimes=["openvino"], log=lambda line: None)
    rows = [row for row in result["rows"] if row["runtime"] == "openvino"]
    assert rows and all(row["status"] == "skipped" for row in rows)
    assert "openvino is not installed" in rows[0]["reason"]
    assert result["pick"] is None or result["pick"]["runtime"] != "openvino"


@pytest.mark.parametrize("name", ["model_fp32.onnx", "model_int8.onnx"])
def test_every_onnx_file_passes_the_full_check_and_declares_only_what_it_uses(onnx_run,
                                                                              name):
    import onnx
    from tledge.export.metadata import IMAGE_PROPS
    model = onnx.load(str(onnx_run / name))
    onnx.checker.check_model(model, full_check=True)
    props = {prop.key: prop.value for prop in model.metadata_props}
    assert {key: props.get(key) for key in IMAGE_PROPS} == IMAGE_PROPS  # as exported
    assert model.graph.input[0].type.denotation == "IMAGE"
    used = {node.domain for node in model.graph.node}
    declared = {entry.domain for entry in model.opset_import}
    assert declared == used | {""}, (declared, used)


def test_a_bundle_runs_its_onnx_files_in_openvino_on_the_device(onnx_run, tmp_path):
    from test_bundle import bench_on_device, unpack
    folder = unpack(onnx_run, tmp_path, "--images", "16")
    result, _ = bench_on_device(folder, "--runtime", "openvino",
                                "--artifacts", "onnx_fp32,onnx_int8")
    assert {(row["artifact"], row["runtime"], row["status"]) for row in result["rows"]} == {
        ("onnx_fp32", "openvino", "ok"), ("onnx_int8", "openvino", "ok")}
    checks = {row["artifact"]: row for row in result["accuracy"]}
    assert checks["onnx_fp32"]["agreement_with_host"] == 1.0  # f32 on the device too
    assert checks["onnx_int8"]["agreement_with_host"] >= 0.9
    assert result["device"]["runtimes"]["openvino"]  # its version, for the report


# -- the IR family --------------------------------------------------------------------------

def test_the_ir_family_runs_in_openvino_as_the_keras_model_does(onnx_run):
    parity = json.loads((onnx_run / "parity.json").read_text())
    rows = {(row["artifact"], row["runtime"]): row for row in parity["rows"]}
    for name, limit in (("openvino_fp32", 1e-4), ("openvino_fp16", 0.05)):
        row = rows[(name, "openvino")]
        # 120 test images cannot show 0.99 (fp32) nor 0.98 (fp16): not enough evidence,
        # with every figure inside its threshold
        assert row["status"] == "insufficient" and not row["problems"], row
        assert row["agreement"] == 1.0 and row["max_abs_diff"] < limit
        assert row["executed"] == "inference precision f32"  # fp16 weights, f32 compute
    manifest = json.loads((onnx_run / "manifest.json").read_text())
    entries = {entry["name"]: entry for entry in manifest["artifacts"]}
    sizes = {name: entries[name]["size_bytes"] for name in ("openvino_fp32", "openvino_fp16")}
    assert sizes["openvino_fp16"] < 0.6 * sizes["openvino_fp32"]  # weights stored in 16 bits
    assert rows[("openvino_int8", "openvino")]["status"] in ("passed", "failed",
                                                              "insufficient")


def test_nncf_keeps_accuracy_within_the_recipes_drop_on_the_images_it_was_given(onnx_run):
    """NNCF's promise checked independently: on the repair images (never the test split),
    the int8 IR's accuracy is at most max_accuracy_drop below the float IR's."""
    import numpy as np
    from tledge.run_inputs import int8_order, run_recipe, run_splits
    from tledge.runners import load
    manifest = json.loads((onnx_run / "manifest.json").read_text())
    entries = {entry["name"]: entry for entry in manifest["artifacts"]}
    record = entries["openvino_int8"]["nncf"]
    recipe = run_recipe(onnx_run)
    splits = run_splits(onnx_run, recipe)
    _, repair = int8_order(splits, recipe)
    images = np.concatenate([np.asarray(splits.x_train[repair]), np.asarray(splits.x_val)])
    labels = np.concatenate([np.asarray(splits.y_train)[repair], np.asarray(splits.y_val)])
    assert record["route"] == "nncf_accuracy_control" and record["split"] == "repair"
    assert record["images"] == len(labels) and record["calibration_samples"] == 64
    assert record["max_drop"] == recipe.validate.tolerance("openvino_int8")["max_accuracy_drop"]
    assert record["quantizers"] > 0  # something is int8
    assert entries["openvino_int8"]["calibration_samples"] == 64
    accuracy = {}
    for name in ("openvino_fp32", "openvino_int8"):
        runner = load(entries[name], onnx_run)
        accuracy[name] = float(np.mean(runner.predict(images).argmax(1) == labels))
        runner.close()
    assert accuracy["openvino_int8"] >= accuracy["openvino_fp32"] - record["max_drop"] - 1e-9


def test_an_ir_carries_its_labels_and_contract_where_openvino_tools_read_them(onnx_run):
    import openvino
    manifest = json.loads((onnx_run / "manifest.json").read_text())
    for precision in ("fp32", "fp16", "int8"):
        assert {path.name for path in (onnx_run / f"openvino_{precision}").iterdir()} == {
            "model.xml", "model.bin"}
        model = openvino.Core().read_model(str(onnx_run / f"openvino_{precision}" / "model.xml"))
        info = {key: model.get_rt_info(["model_info", key]).astype(str)
                for key in ("model_type", "labels", "resize_type", "scale_values")}
        assert info == {"model_type": "Classification", "labels": " ".join(manifest["labels"]),
                        "resize_type": "standard", "scale_values": "1 1 1"}
        facts = json.loads(model.get_rt_info(["tledge"]).astype(str))
        assert facts["labels"] == manifest["labels"] and facts["precision"] == precision
        assert facts["recipe_hash"] == manifest["recipe"]["hash"]
        assert model.inputs[0].get_any_name() == "image"
        assert model.outputs[0].get_any_name() == "probabilities"
    result = invoke("inspect", onnx_run / "openvino_int8", "--json")
    assert result.exit_code == 0, result.output
    described = json.loads(result.output)
    assert (described["family"], described["precision"]) == ("openvino", "int8")
    assert described["labels"] == manifest["labels"]
    assert described["operators"].get("FakeQuantize", 0) > 0


def test_predict_and_the_deploy_code_run_an_ir_as_the_onnx_file(onnx_run, tmp_path):
    """`tledge predict` takes an IR folder (or its .xml), and the report's OpenVINO code for
    an IR answers as tledge does."""
    import subprocess
    from PIL import Image
    from tledge.data.synthetic import generate
    from tledge.predict import predict_files
    from tledge.report.deploy import pick_code
    pixels, _ = generate(["star"], 1, (56, 40), noise=0.05, seed=5)
    Image.fromarray(pixels[0]).save(tmp_path / "photo.jpg", quality=92)
    photo = tmp_path / "photo.jpg"
    ir = predict_files([photo], onnx_run / "openvino_fp32")[0]
    onnx = predict_files([photo], onnx_run / "model_fp32.onnx", runtime="openvino")[0]
    assert ir["runtime"] == "openvino" and ir["top"][0]["label"] == onnx["top"][0]["label"]
    assert abs(ir["top"][0]["probability"] - onnx["top"][0]["probability"]) < 1e-5
    result = invoke("predict", photo, "--model", onnx_run / "openvino_fp32" / "model.xml",
                    "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["top"][0]["label"] == ir["top"][0]["label"]
    for precision in ("fp32", "int8"):
        _, code = pick_code("openvino", str(onnx_run / f"openvino_{precision}" / "model.xml"),
                            str(onnx_run / "manifest.json"), precision)
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        label, probability = done.stdout.strip().splitlines()[-1].rsplit(" ", 1)
        best = predict_files([photo], onnx_run / f"openvino_{precision}")[0]["top"][0]
        assert label == best["label"] and abs(float(probability) - best["probability"]) <= 1e-4


def test_the_report_sets_the_two_int8_routes_side_by_side(onnx_run):
    result = invoke("report", onnx_run)
    assert result.exit_code == 0, result.output
    text = (onnx_run / "report.md").read_text()
    section = text[text.index("## Quantization"):]
    table = section[section.index("| route |"):section.index("\n\n", section.index("| route |"))]
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4])
            for line in table.splitlines()[2:]}
    assert rows == {("float IR", "openvino_fp32", "openvino"),
                    ("QDQ ONNX, tledge's repair", "onnx_int8", "onnxruntime"),
                    ("QDQ ONNX, tledge's repair", "onnx_int8", "openvino"),
                    ("NNCF, accuracy control", "openvino_int8", "openvino")}
    assert "quantizers to float" in section and "Timed on " in section
