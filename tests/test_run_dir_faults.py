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

