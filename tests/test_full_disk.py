"""A real disk that fills: a size-limited tmpfs the test mounts (as root, where the machine
allows it; skipped with the reason elsewhere), holding the run directory and $TMPDIR, where the
converters and h5py write for real. Each command ends in one line, nothing half-written is
trusted, and once space is freed the next build resumes. (The fault table of
test_reliability.py injects ENOSPC at Python's `open`; this is the disk itself.)"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import invoke

SIZE_MIB = 48


@pytest.fixture
def disk(tmp_path):
    """A tmpfs of SIZE_MIB, mounted for this test alone."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MIB}m", "tmpfs",
                              str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(disk: Path, leave_kib: int) -> None:
    """Fill `disk` with one file, leaving about `leave_kib` KiB free."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(chunk)
                handle.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    size = filler.stat().st_size
    os.truncate(filler, max(size - leave_kib * 1024, 0))


def one_line(result, *fragments, exit_code):
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def test_a_disk_that_fills_ends_each_command_in_one_line_and_the_next_build_resumes(
        disk, built_run, small_recipe, monkeypatch):
    temporary = disk / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))  # the converters' files too
    run = shutil.copytree(built_run[0], disk / "run")

    fill(disk, 0)  # not even the lock can be written
    for command in (["validate", run], ["bench", run], ["report", run]):
        one_line(invoke(*command), "No space left on device", exit_code=2)

    fill(disk, 200)  # a little: the exports fail where they write, and say where
    result = invoke("export", run)
    one_line(result, "FAILED", exit_code=1)
    assert "temporary folder" in result.output and str(temporary) in result.output
    assert "No space left on device" in result.output  # the ONNX file in the run directory
    result = invoke("validate", run)
    one_line(result, "not exported", exit_code=1)
    assert "parity FAILED" not in result.output  # a file never written is not a parity failure
    one_line(invoke("report", run), "cannot write", "No space left on device",
             "nothing half-written was kept", exit_code=2)

    # training: each epoch's checkpoint, and the model h5py writes (which can crash the process
    # on a disk that fills under it instead of raising), start only where the disk has room
    fill(disk, 300)
    trained = disk / "trained"
    process = subprocess.run([sys.executable, "-m", "tledge", "train", str(small_recipe),
                              "--out", str(trained)], capture_output=True, text=True,
                             env={**os.environ, "TMPDIR": str(temporary)}, timeout=600)
    assert process.returncode == 2, (process.returncode, process.stderr[-2000:])
    assert "Traceback" not in process.stderr
    errors = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "free" in errors[0] and "needs about" in errors[0], \
        process.stderr[-2000:]
    checkpoints = [path for path in trained.rglob("*") if path.suffix in (".npz", ".h5")]
    assert not checkpoints  # nothing half-written left to resume from

    (disk / "filler").unlink()  # space again: the next build redoes what failed, and only that
    result = invoke("build", small_recipe, "--out", run)
    one_line(result, "plan:", exit_code=0)
    plan = next(line for line in result.output.splitlines() if line.startswith("plan:"))
    assert "train" not in plan.split(";")[0] and "export" in plan, plan
    assert "parity FAILED" not in result.output
