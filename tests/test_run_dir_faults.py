"""A run directory's manifest that tledge did not write is one clear error, never a traceback."""

from __future__ import annotations

import json

import pytest

from conftest import assert_usage_error, invoke


def edit_manifest(change):
    def apply(run_dir):
        path = run_dir / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
    return apply


def write_manifest(text: bytes):
    def apply(run_dir):
        (run_dir / "manifest.json").write_bytes(text)
    return apply


def manifest_is_a_folder(run_dir):
    (run_dir / "manifest.json").unlink()
    (run_dir / "manifest.json").mkdir()


FAULTS = {
    "empty object": (write_manifest(b"{}"), "'recipe' is missing"),
    "a list": (write_manifest(b"[]"), "a JSON list instead of an object"),
    "a string": (write_manifest(b'"manifest"'), "a JSON str instead of an object"),
    "truncated": (write_manifest(b'{"recipe": {"name": '), "is not valid JSON"),
    "binary": (write_manifest(bytes(range(256))), "is not text"),
    "a folder": (manifest_is_a_folder, "manifest.json"),
    "labels not a list": (edit_manifest(lambda m: m.update(labels="cats")), "'labels'"),
    "labels not names": (edit_manifest(lambda m: m.update(labels=[1, 2])), "'labels' holds"),
    "stages not an object": (edit_manifest(lambda m: m.update(stages=[])), "'stages'"),
    "artifact without a name": (edit_manifest(lambda m: m["artifacts"].append({})),
                                "has no name"),
    "absolute artifact path": (edit_manifest(lambda m: m["artifacts"][0].update(
        path="/etc/passwd")), "points outside the run directory: /etc/passwd"),
    "artifact path up and out": (edit_manifest(lambda m: m["artifacts"][0].update(
        path="../other/model.keras")), "points outside the run directory"),
    "artifact without a checksum": (edit_manifest(lambda m: m["artifacts"][0].pop("sha256")),
                                    "has no sha256"),
    "pick not an object": (edit_manifest(lambda m: m.update(pick=["tflite_int8"])),
                           "'pick' is not an object"),
}


@pytest.mark.parametrize("command", ["report", "validate"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_malformed_manifest_is_one_clear_error(run_copy, fault, command):
    damage, fragment = FAULTS[fault]
    damage(run_copy)
    assert_usage_error(invoke(command, run_copy), fragment)



def swap(run_dir, name):
    """Replace an artifact's bytes with another artifact's (a file swapped by hand)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    paths = {entry["name"]: run_dir / entry["path"] for entry in manifest["artifacts"]
             if entry.get("status", "ok") == "ok"}
    other = next(path for key, path in paths.items() if key != name and path.is_file()
                 and path.suffix == paths[name].suffix) if name != "onnx_fp32" \
        else paths["tflite_fp32"]
    paths[name].write_bytes(other.read_bytes())
    return paths[name]


@pytest.mark.parametrize("command", [["validate"], ["bench", "--runtime", "onnxruntime"],
                                     ["bundle", "--out", "{tmp}/b.zip"]])
def test_a_swapped_artifact_is_refused(run_copy, tmp_path, command):
    path = swap(run_copy, "onnx_fp32")
    args = [part.format(tmp=tmp_path) for part in command]
    assert_usage_error(invoke(args[0], run_copy, *args[1:]), str(path), "sha256 differs",
                       "tledge export")


def test_the_pick_is_checked_against_its_file(run_copy):
    pick = json.loads((run_copy / "bench.json").read_text())["pick"]
    manifest = json.loads((run_copy / "manifest.json").read_text())
    entry = next(entry for entry in manifest["artifacts"] if entry["name"] == pick["artifact"])
    assert invoke("bench", run_copy, "--pick").exit_code == 0
    (run_copy / entry["path"]).unlink()
    assert_usage_error(invoke("bench", run_copy, "--pick"), entry["path"], "is missing")
    (run_copy / "bench.json").write_text("[]")
    assert_usage_error(invoke("bench", run_copy, "--pick"), "bench.json is not what tledge writes")


def test_a_build_reexports_revalidates_and_rebenchmarks_a_changed_file(run_copy, small_recipe):
    swap(run_copy, "onnx_fp32")
    result = invoke("build", small_recipe, "--out", run_copy)
    assert result.exit_code == 0, result.output
    assert "== train: up to date" in result.output  # the model itself is intact
    for stage in ("export", "validate", "bench"):
        assert f"== {stage}\n" in result.output, result.output
    assert invoke("validate", run_copy).exit_code == 0


RECORD_FAULTS = [
    ("parity.json", "[]", "a JSON list instead of an object", ["report"]),
    ("parity.json", '{"split": "test", "images": 3}', "'rows' is missing", ["report"]),
    ("parity.json", '{"split": "test", "images": 3, "rows": [1, 2]}',
     "'rows' holds something other than objects", ["report"]),
    ("bench.json", '{"rows": 3, "pick": null}', "'rows' is missing or not list",
     ["report", "bench --pick"]),
    ("bench.json", "{}", "'rows' is missing", ["bench --pick"]),
    ("parity.json", '{"split": "test", "images": 3, "rows": [{"status": "passed"}]}',
     "rows[0] has no artifact", ["report"]),
    ("bench.json", '{"rows": [{"artifact": "keras", "status": "ok"}], "pick": null}',
     "rows[0] has no runtime", ["report", "bench --pick"]),
    ("split.json", '"split"', "a JSON str instead of an object", ["report", "validate"]),
    ("split.json", '{"splits": {}}', "'fingerprint' is missing", ["validate"]),
    ("history.json", '{"phases": "two"}', "'phases' is missing or not list", ["report"]),
    ("explain.json", '{"figures": {}}', "'figures' is missing or not list", ["report"]),
]


@pytest.mark.parametrize("name, text, fragment, commands", RECORD_FAULTS,
                         ids=[f"{case[0]}:{case[2][:24]}" for case in RECORD_FAULTS])
def test_a_malformed_run_record_is_one_clear_error(run_copy, name, text, fragment, commands):
    (run_copy / name).write_text(text)
    for command in commands:
        first, *rest = command.split()
        assert_usage_error(invoke(first, run_copy, *rest), name, fragment, "again")
