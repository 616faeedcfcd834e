"""OpenVINO as a runtime: the .onnx artifacts (fp32, int8 QDQ) validated and timed like every
other runtime, what OpenVINO ran recorded, a clear skipped row where it is absent; and every
.onnx file clean (full check, no unused opset domains)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from conftest import invoke


@pytest.fixture(scope="module")
def onnx_run(built_run, tmp_path_factory):
    """A copy of the session run with ONNX int8 too, validated and benchmarked in OpenVINO."""
    run_dir = shutil.copytree(built_run[0], tmp_path_factory.mktemp("openvino") / "run")
    for command in (["export", run_dir, "--format", "onnx", "--precision", "int8"],
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
    assert {row["artifact"] for row in timed} == {"onnx_fp32", "onnx_int8"}
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
    assert not [row for row in report.rows if row.runtime == "openvino"]  # nothing to judge
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
