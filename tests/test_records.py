"""The records of results, each read one way (`tledge.records`): typed rows, their helpers,
and one clear line for a record tledge did not write."""

from __future__ import annotations

import json

import pytest

from tledge.core.timing import BenchRow
from tledge.errors import RunDirError
from tledge.parity import ParityRow
from tledge.records import (check_record, DeviceCheck, DeviceResult, Parity, read_bench,
                            read_devices, read_domains, read_history, read_parity)


def _parity():
    confusion = [[3, 1], [0, 0]]  # the second class has no image
    return Parity("test", 4, [
        ParityRow("keras", "keras", "reference", accuracy=0.75, confusion=confusion),
        ParityRow("onnx_int8", "onnxruntime", "passed", accuracy=0.75, agreement=1.0,
                  sha256="abc", confusion=confusion,
                  tasks={"shape": {"accuracy": 0.75, "agreement": 1.0}}),
        ParityRow("onnx_int8", "openvino", "failed", accuracy=0.5, agreement=0.5,
                  problems=["agreement 0.5 < 0.97"])])


def test_parity_reads_back_as_typed_rows_with_its_helpers(tmp_path):
    (tmp_path / "parity.json").write_text(json.dumps(_parity().to_json()))
    parity = read_parity(tmp_path)
    assert parity == _parity()
    assert parity.own("onnx_int8").runtime == "onnxruntime"  # its own runtime's row first
    assert parity.find("onnx_int8", "openvino").status == "failed"
    assert parity.is_own(parity.find("onnx_int8", "onnxruntime"))
    assert not parity.is_own(parity.find("onnx_int8", "openvino"))
    assert parity.reference.artifact == "keras"
    assert [row.runtime for row in parity.failed] == ["openvino"]
    assert parity.per_class("keras") == [0.75, None]  # tledge.core.metrics: no image, None
    assert parity.task("onnx_int8", "shape") == {"accuracy": 0.75, "agreement": 1.0}
    assert "tasks" not in json.loads((tmp_path / "parity.json").read_text())["rows"][0]
    assert read_parity(tmp_path / "nowhere") is None


@pytest.mark.parametrize("name, data, says", [
    ("parity.json", {"split": "test", "images": 4, "rows": [
        {"artifact": "keras", "runtime": "keras", "status": "reference", "colour": "red"}]},
     "tledge validate"),
    ("bench.json", {"rows": [], "settings": {}}, "it has no pick"),
    ("bench.json", {"rows": [{"artifact": "keras", "runtime": "keras", "status": "ok",
                              "threads": 1, "batch": 1, "p51_ms": 2.0}], "pick": None},
     "tledge bench"),
    ("devices.json", {"devices": {"pi": {"device": {}, "rows": [], "artifacts": {},
                                         "accuracy": [{"artifact": "a", "oops": 1}]}}},
     "--import"),
])
def test_a_record_tledge_did_not_write_is_one_line_naming_what_writes_it(tmp_path, name, data,
                                                                         says):
    (tmp_path / name).write_text(json.dumps(data))
    with pytest.raises(RunDirError) as caught:
        check_record(tmp_path / name)
    assert says in str(caught.value) and "\n" not in str(caught.value)
    assert str(tmp_path / name) in str(caught.value)


def test_bench_and_devices_read_back_as_bench_rows(tmp_path):
    rows = [BenchRow("keras", "keras", 2, 1, "ok", p50_ms=3.0),
            BenchRow("tflite_int8", "litert", 2, 1, "ok", p50_ms=0.2),
            BenchRow("onnx_int8", "onnxruntime_cuda", 2, 1, "skipped", reason="no GPU")]
    (tmp_path / "bench.json").write_text(json.dumps({
        "rows": [row.__dict__ for row in rows], "pick": {"artifact": "tflite_int8"},
        "settings": {"isolate": False}, "machine": {"isa": "AVX2"}}))
    bench = read_bench(tmp_path)
    assert bench.rows == rows and bench.pick == {"artifact": "tflite_int8"}
    assert [row.artifact for row in bench.timed()] == ["keras", "tflite_int8"]
    assert bench.timed(runtime="litert") == [rows[1]] and not bench.isolated
    device = DeviceResult("pi", {"arch": "aarch64"}, rows[1:2],
                          [DeviceCheck("tflite_int8", "ai_edge_litert", images=8, accuracy=0.9,
                                       agreement_with_host=0.875),
                           DeviceCheck("onnx_int8", "onnxruntime", error="it crashed")],
                          {"tflite_int8": "abc", "onnx_int8": "def"})
    (tmp_path / "devices.json").write_text(json.dumps({"devices": {"pi": device.to_json()}}))
    again = read_devices(tmp_path)["pi"]
    assert again == device
    assert again.check("tflite_int8").agreement_with_host == 0.875
    assert again.stale({"tflite_int8": "abc", "onnx_int8": "xyz"}) == ["onnx_int8"]
    assert json.loads((tmp_path / "devices.json").read_text())["devices"]["pi"]["accuracy"][1] \
        == {"artifact": "onnx_int8", "runtime": "onnxruntime", "error": "it crashed"}


def test_missing_records_read_as_nothing(tmp_path):
    assert read_bench(tmp_path) is None and read_history(tmp_path) is None
    assert read_devices(tmp_path) == {} and read_domains(tmp_path) == {}
    with pytest.raises(RunDirError, match="missing"):
        check_record(tmp_path / "parity.json")
