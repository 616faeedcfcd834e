"""The reliability table: what a user's disk or hands can do to a run directory, and what
tledge does about it.

Each fault is done to a private copy of a built run. The first command that meets it must
stop with its exit code and one line that names the file and the fix, never a traceback
(or, for faults tledge repairs by itself, succeed); then the next `tledge build`, without
`--force`, must redo exactly the stages the fault touched, and no other.

What a build redoes is the pipeline's plan (`tledge.pipeline.plan`, which the build prints and
follows): every fault is asserted through it, and one fault of each kind of redo (train again,
export again, validate again, ...) and every fault whose rebuild has something of its own to
show is rebuilt for real, where the stages the build ran must be the ones planned.
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import fnmatch
import io
import json
import os
import socket
import subprocess
import sys
import time
from typing import Callable

import pytest

from conftest import assert_usage_error, invoke

STAGES = ("train", "export", "validate", "bench", "explain")


@dataclasses.dataclass
class Fault:
    damage: Callable  # (run_dir) -> None: what a disk or a hand does to the run
    command: str  # the first command to meet it: "validate {run}", "bench {run} --pick", ...
    says: tuple = ()  # fragments of its one-line error (exit 2), or of its output
    redo: tuple = ()  # the stages the next build redoes ("train" redoes all of them)
    exit_code: int = 2
    during: Callable | None = None  # (monkeypatch) -> None: in force while the command runs
    after: Callable | None = None  # (run_dir) -> None: what changes before the next build
    then_says: tuple = ()  # fragments of the next build's output


# -- what can be done to a run ---------------------------------------------------------------

def manifest(run_dir) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def path_of(run_dir, name):
    return run_dir / next(entry["path"] for entry in manifest(run_dir)["artifacts"]
                          if entry["name"] == name)


def edit_manifest(change):
    def apply(run_dir):
        data = manifest(run_dir)
        change(data)
        (run_dir / "manifest.json").write_text(json.dumps(data))
    return apply


def write(name, data: bytes | str):
    def apply(run_dir):
        path = run_dir / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return apply


def manifest_is_a_folder(run_dir):
    (run_dir / "manifest.json").unlink()
    (run_dir / "manifest.json").mkdir()


def delete(name):
    def apply(run_dir):
        (run_dir / name).unlink()
    return apply


def delete_artifact(name):
    def apply(run_dir):
        path_of(run_dir, name).unlink()
    return apply


def truncate_artifact(name, keep=4096):
    def apply(run_dir):
        path = path_of(run_dir, name)
        path.write_bytes(path.read_bytes()[:keep])
    return apply


def flip_bits(name):
    """Damage inside the file, same size (a bad sector, a careless hex editor)."""
    def apply(run_dir):
        path = path_of(run_dir, name)
        data = bytearray(path.read_bytes())
        for offset in range(len(data) // 3, len(data) // 3 + 64):
            data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
    return apply


def swap(name):
    """Replace an artifact's bytes with another artifact's (a file swapped by hand)."""
    def apply(run_dir):
        target = path_of(run_dir, name)
        other = path_of(run_dir, "tflite_fp32" if name != "tflite_fp32" else "tflite_int8")
        target.write_bytes(other.read_bytes())
    return apply


def swap_and_photograph(name):
    """A swapped artifact, and a photo beside the run to classify with it."""
    def apply(run_dir):
        from PIL import Image
        swap(name)(run_dir)
        Image.new("RGB", (32, 32), (200, 30, 30)).save(run_dir.parent / "photo.png")
    return apply


def delete_pick(run_dir):
    pick = json.loads((run_dir / "bench.json").read_text())["pick"]
    path_of(run_dir, pick["artifact"]).unlink()


def left_by_a_killed_export(run_dir):
    (run_dir / ".model_fp32.k1ll3d.tmp.onnx").write_bytes(b"\x08\x07half an onnx file")


def lock_of(holder):
    def apply(run_dir):
        (run_dir / ".tledge.lock").write_text(holder() + "\n")
    return apply


def dead_pid() -> str:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return f"{socket.gethostname()} {process.pid}"


_HOLDERS = []


def live_holder() -> str:
    """A live process that is not this one holds the run (another build)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    _HOLDERS.append(process)
    return f"{socket.gethostname()} {process.pid}"


def holder_exits(run_dir):
    for process in _HOLDERS:
        process.kill()
        process.wait()
    _HOLDERS.clear()


def garbage_lock_left_long_ago(run_dir):
    lock = run_dir / ".tledge.lock"
    lock.write_bytes(b"\x00\x00")
    old = time.time() - 3600
    os.utime(lock, (old, old))


def disk_full(pattern):
    """While the command runs, writing a file whose name matches `pattern` fails the way a
    full disk fails: the open succeeds, the write raises ENOSPC."""
    def apply(monkeypatch):
        real_open = io.open

        class Full(io.RawIOBase):
            def __init__(self, handle):
                self.handle = handle

            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.handle.name)

            def writable(self):
                return True

            def close(self):
                self.handle.close()
                super().close()

        def full_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            writing = any(flag in mode for flag in "wax+")
            if writing and isinstance(file, (str, os.PathLike)) \
                    and fnmatch.fnmatch(os.path.basename(os.fspath(file)), pattern):
                return Full(handle)
            return handle
        monkeypatch.setattr(builtins, "open", full_open)
        monkeypatch.setattr(io, "open", full_open)
    return apply


# -- the table -------------------------------------------------------------------------------

MANIFEST_FAULTS = {
    "manifest: empty object": (write("manifest.json", "{}"), "'recipe' is missing"),
    "manifest: a list": (write("manifest.json", "[]"), "a JSON list instead of an object"),
    "manifest: a string": (write("manifest.json", '"m"'), "a JSON str instead of an object"),
    "manifest: truncated": (write("manifest.json", '{"recipe": {"name": '), "not valid JSON"),
    "manifest: binary": (write("manifest.json", bytes(range(256))), "is not text"),
    "manifest: a folder": (manifest_is_a_folder, "manifest.json"),
    "manifest: deleted": (delete("manifest.json"), "not a tledge run directory"),
    "manifest: labels not a list": (edit_manifest(lambda m: m.update(labels="cats")),
                                    "'labels'"),
    "manifest: labels not names": (edit_manifest(lambda m: m.update(labels=[1, 2])),
                                   "'labels' holds"),
    "manifest: stages not an object": (edit_manifest(lambda m: m.update(stages=[])),
                                       "'stages'"),
    "manifest: artifact without a name": (edit_manifest(lambda m: m["artifacts"].append({})),
                                          "has no name"),
    "manifest: absolute artifact path": (edit_manifest(lambda m: m["artifacts"][0].update(
        path="/etc/passwd")), "points outside the run directory: /etc/passwd"),
    "manifest: artifact path up and out": (edit_manifest(lambda m: m["artifacts"][0].update(
        path="../other/model.keras")), "points outside the run directory"),
    "manifest: artifact without a checksum": (edit_manifest(
        lambda m: m["artifacts"][0].pop("sha256")), "has no sha256"),
    "manifest: pick not an object": (edit_manifest(lambda m: m.update(pick=["tflite_int8"])),
                                     "'pick' is not an object"),
}

RECORD_FAULTS = {
    "parity: a list": ("parity.json", "[]", "a JSON list instead of an object", "report {run}",
                       ("validate", "bench")),
    "parity: no rows": ("parity.json", '{"split": "test", "images": 3}', "'rows' is missing",
                        "report {run}", ("validate", "bench")),
    "parity: rows not objects": ("parity.json", '{"split": "test", "images": 3, "rows": [1]}',
                                 "'rows' holds something other than objects", "report {run}",
                                 ("validate", "bench")),
    "parity: row without artifact": ("parity.json", '{"split": "test", "images": 3, '
                                     '"rows": [{"status": "passed"}]}', "rows[0] has no artifact",
                                     "report {run}", ("validate", "bench")),
    "bench: rows not a list": ("bench.json", '{"rows": 3, "pick": null}',
                               "'rows' is missing or not list", "bench {run} --pick", ("bench",)),
    "bench: empty object": ("bench.json", "{}", "'rows' is missing", "report {run}", ("bench",)),
    "bench: row without runtime": ("bench.json", '{"rows": [{"artifact": "keras", "status": '
                                   '"ok"}], "pick": null}', "rows[0] has no runtime",
                                   "bench {run} --pick", ("bench",)),
    "split: a string": ("split.json", '"split"', "a JSON str instead of an object",
                        "validate {run}", ("train",)),
    "split: no fingerprint": ("split.json", '{"splits": {}}', "'fingerprint' is missing",
                              "validate {run}", ("train",)),
    "history: phases not a list": ("history.json", '{"phases": "two"}',
                                   "'phases' is missing or not list", "report {run}", ("train",)),
    "explain: figures not a list": ("explain.json", '{"figures": {}}',
                                    "'figures' is missing or not list", "report {run}",
                                    ("explain",)),
}

REEXPORT = ("export", "validate", "bench")

FAULTS = {
    **{name: Fault(damage, "validate {run}", (says,), ("train",))
       for name, (damage, says) in MANIFEST_FAULTS.items()},
    **{name: Fault(write(file, text), command, (file, says, "again"), redo)
       for name, (file, text, says, command, redo) in RECORD_FAULTS.items()},
    "onnx swapped, then validated": Fault(swap("onnx_fp32"), "validate {run}",
                                          ("model_fp32.onnx", "sha256 differs", "tledge export"),
                                          REEXPORT),
    "onnx swapped, then benchmarked": Fault(swap("onnx_fp32"), "bench {run} --runtime onnxruntime",
                                            ("model_fp32.onnx", "sha256 differs"), REEXPORT),
    "onnx swapped, then bundled": Fault(swap("onnx_fp32"), "bundle {run} --out {tmp}/b.zip",
                                        ("model_fp32.onnx", "sha256 differs"), REEXPORT),
    "tflite swapped, then predicted with": Fault(swap_and_photograph("tflite_int8"),
                                                 "predict {tmp}/photo.png --model "
                                                 "{run}/model_int8.tflite",
                                                 ("model_int8.tflite", "sha256 differs"),
                                                 REEXPORT),
    "tflite truncated": Fault(truncate_artifact("tflite_int8"), "validate {run}",
                              ("model_int8.tflite", "sha256 differs"), REEXPORT),
    "tflite bits flipped": Fault(flip_bits("tflite_fp32"), "bench {run} --runtime litert",
                                 ("model_fp32.tflite", "sha256 differs"), REEXPORT),
    "tflite deleted": Fault(delete_artifact("tflite_fp32"), "validate {run}",
                            ("model_fp32.tflite", "is missing"), REEXPORT),
    "the pick's file deleted": Fault(delete_pick, "bench {run} --pick", ("is missing",), REEXPORT),
    "model.keras bits flipped": Fault(flip_bits("keras"), "validate {run}",
                                      ("model.keras", "sha256 differs", "tledge train"),
                                      ("train",)),
    "model.keras truncated": Fault(truncate_artifact("keras"), "export {run}",
                                   ("model.keras", "sha256 differs"), ("train",)),
    "model.keras deleted": Fault(delete_artifact("keras"), "explain --run {run}",
                                 ("model.keras", "is missing"), ("train",)),
    "parity.json deleted": Fault(delete("parity.json"), "bench {run}",
                                 ("parity.json is missing (not validated)",
                                  "pick: keras on keras"),  # the reference needs no parity
                                 ("validate", "bench"), exit_code=0),
    "bench.json deleted": Fault(delete("bench.json"), "bench {run} --pick",
                                ("bench.json is missing",), ("bench",)),
    "stored recipe deleted": Fault(delete("recipe.toml"), "validate {run}",
                                   ("recipe.toml", "no such recipe file"), ()),
    "stored recipe not TOML": Fault(write("recipe.toml", "name = [unclosed"), "export {run}",
                                    ("recipe.toml", "not valid TOML"), ()),
    "a figure deleted": Fault(delete("figures/gradcam.png"), "report {run}", ("wrote",),
                              ("explain",), exit_code=0),
    "half a file left by a killed export": Fault(left_by_a_killed_export, "validate {run}",
                                                 ("passed",), (), exit_code=0),
    "run in use by another build": Fault(lock_of(live_holder), "build {recipe} --out {run}",
                                         ("in use by another tledge",), (),
                                         after=holder_exits),
    "lock left by a killed build": Fault(lock_of(dead_pid), "validate {run}", ("passed",), (),
                                         exit_code=0),
    "unreadable lock left long ago": Fault(garbage_lock_left_long_ago, "report {run}",
                                           ("wrote",), (), exit_code=0),
    "disk full: exporting onnx": Fault(delete_artifact("onnx_fp32"), "export {run} --format onnx",
                                       ("onnx_fp32", "FAILED", "No space left on device"),
                                       REEXPORT, exit_code=1,
                                       during=disk_full(".model_fp32.*.onnx")),
    "disk full: writing parity.json": Fault(delete("parity.json"), "validate {run}",
                                            ("cannot write", "parity.json",
                                             "No space left on device"), ("validate", "bench"),
                                            during=disk_full(".parity.*.json")),
    "disk full: writing the manifest": Fault(delete("bench.json"), "bench {run} --runtime litert",
                                             ("cannot write", "manifest.json",
                                              "No space left on device"), ("bench",),
                                             during=disk_full(".manifest.*.json")),
    "disk full: saving the trained model": Fault(delete_artifact("keras"),
                                                 "train {recipe} --out {run}",
                                                 ("cannot write", "model.keras",
                                                  "No space left on device"), ("train",),
                                                 during=disk_full(".model.*.keras"),
                                                 then_says=("resuming from the checkpoints",)),
    "disk full: writing the report": Fault(delete("report.md"), "report {run}",
                                           ("cannot write", "report.md",
                                            "No space left on device"), (),
                                           during=disk_full(".report.*.md")),
}


def test_the_table_has_forty_faults_or_more():
    assert len(FAULTS) >= 40, len(FAULTS)


def expected_redo(fault) -> list[str]:
    return list(STAGES) if "train" in fault.redo else [s for s in STAGES if s in fault.redo]


def rebuilt_for_real() -> set[str]:
    """The first fault of each kind of redo, and every fault with an `after` or `then_says`."""
    chosen, kinds = set(), set()
    for name, fault in FAULTS.items():
        kind = tuple(expected_redo(fault))
        if kind not in kinds or fault.after or fault.then_says:
            chosen.add(name)
            kinds.add(kind)
    return chosen


REBUILT = rebuilt_for_real()


def test_every_kind_of_redo_is_rebuilt_for_real_once_at_least():
    kinds = {tuple(expected_redo(fault)) for fault in FAULTS.values()}
    assert kinds == {tuple(expected_redo(FAULTS[name])) for name in REBUILT}
    assert len(kinds) >= 6, kinds  # train, export, validate, bench, explain, nothing


def build_plan(recipe_path, run_dir) -> list[str]:
    """What `tledge build` would run now, as it decides it (the small recipe starts from no
    weights file, so its train hash needs no starting files)."""
    from tledge.pipeline import plan
    from tledge.recipe.load import load_recipe
    from tledge.stages import train_hash
    recipe = load_recipe(recipe_path)
    return plan(run_dir, recipe=recipe, expected_train=train_hash(recipe, []))


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_fault_is_one_clear_line_and_the_next_build_recovers(name, run_copy, small_recipe,
                                                               tmp_path, monkeypatch):
    fault = FAULTS[name]
    fault.damage(run_copy)
    first, *rest = fault.command.format(tmp=tmp_path, recipe=small_recipe, run=run_copy).split()
    if fault.during:
        fault.during(monkeypatch)
    try:
        result = invoke(first, *rest)
    finally:
        monkeypatch.undo()
    if fault.exit_code == 2:
        assert_usage_error(result, *fault.says)
    else:
        assert result.exit_code == fault.exit_code, (result.exit_code, result.output)
        assert "Traceback" not in result.output
        for fragment in fault.says:
            assert fragment in result.output, (fragment, result.output)
    if fault.after:
        fault.after(run_copy)

    planned = build_plan(small_recipe, run_copy)
    assert planned == expected_redo(fault), planned
    if name not in REBUILT:
        return
    rebuilt = invoke("build", small_recipe, "--out", run_copy)
    assert rebuilt.exit_code == 0, rebuilt.output
    redone = [stage for stage in STAGES if f"== {stage} " in rebuilt.output
              or f"== {stage}\n" in rebuilt.output]
    assert redone == planned, (redone, rebuilt.output)
    assert f"plan: {', '.join(planned) or 'every stage is current'}" in rebuilt.output
    for fragment in fault.then_says:
        assert fragment in rebuilt.output, (fragment, rebuilt.output)
    assert not (run_copy / ".tledge.lock").exists()
    assert invoke("bench", run_copy, "--pick").exit_code == 0  # a pick, and its file checks
