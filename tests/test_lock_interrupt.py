"""One build at a time per run directory, a stale lock taken over, Ctrl-C stops cleanly, a
damaged checkpoint is discarded rather than trusted."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from conftest import SMALL_RECIPE, assert_usage_error, invoke, write_recipe
from tests_support import killed_training, wait_for_epochs


def test_a_run_in_use_is_refused_and_a_stale_lock_taken_over(run_copy):
    lock = run_copy / ".tledge.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{socket.gethostname()} {sleeper.pid}\n")
        result = invoke("report", run_copy)
        assert_usage_error(result, str(run_copy), "in use by another tledge",
                           str(sleeper.pid))
        assert lock.is_file()  # not ours to remove
        assert_usage_error(invoke("validate", run_copy), "in use by another tledge")
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder is gone: its lock is stale, taken over, and released after
    result = invoke("report", run_copy)
    assert result.exit_code == 0, result.output
    assert not lock.exists()


def test_a_lock_that_is_a_folder_or_cannot_be_written_is_one_line(run_copy, monkeypatch):
    import errno
    import os
    lock = run_copy / ".tledge.lock"
    lock.mkdir()
    assert_usage_error(invoke("validate", run_copy), "is a folder, not tledge's lock file")
    assert lock.is_dir()  # not ours to remove
    lock.rmdir()
    real = os.fdopen

    def full_disk(handle, *args, **kwargs):  # the lock's first write finds no space
        if isinstance(handle, int):
            os.close(handle)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(handle, *args, **kwargs)
    monkeypatch.setattr(os, "fdopen", full_disk)
    assert_usage_error(invoke("report", run_copy), "No space left on device", "free some space")
    assert not lock.exists()  # no half-written lock left to refuse the next command
    monkeypatch.setattr(os, "fdopen", real)
    assert invoke("report", run_copy).exit_code == 0


def test_ctrl_c_stops_with_its_own_exit_code_and_the_next_run_resumes(tmp_path):
    text = SMALL_RECIPE.format(name="interrupted", epochs=20, threads=1).replace(
        "samples_per_class = 60", "samples_per_class = 30")
    path = write_recipe(tmp_path, text)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "tledge", "train", str(path), "--out", str(run_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_for_epochs(process, run_dir, 2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, (process.returncode, stderr[-2000:])
    assert "interrupted:" in stderr and "Traceback" not in stderr
    assert "Aborted!" not in stderr
    assert not (run_dir / ".tledge.lock").exists()
    assert not (run_dir / "model.keras").exists()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from the checkpoints" in result.stdout
    assert (run_dir / "model.keras").is_file()


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """One training killed after two checkpointed epochs, copied by each case that damages it."""
    folder = tmp_path_factory.mktemp("killed")
    command, run_dir, state = killed_training(folder, "damaged", epochs=14, samples=20,
                                              after=2)
    return folder, command, state.relative_to(folder)


@pytest.mark.parametrize("victim", ["from_scratch.best.npz",
                                    "from_scratch.backup.npz",
                                    "from_scratch.state.json"])
def test_a_damaged_checkpoint_is_discarded_and_the_phase_restarts(killed_run, tmp_path, victim):
    import shutil
    original, command, state = killed_run
    folder = shutil.copytree(original, tmp_path / "copy")
    command = [str(part).replace(str(original), str(folder)) for part in command]
    run_dir, state = folder / "run", folder / state
    damaged = state.parent / victim
    assert damaged.is_file(), sorted(p.name for p in state.parent.rglob("*"))
    damaged.write_bytes(damaged.read_bytes()[:len(damaged.read_bytes()) // 2])
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "the checkpoint of phase from_scratch in" in result.stderr
    assert "is damaged" in result.stderr and "starts again from its first epoch" in result.stderr
    import json
    phase = json.loads((run_dir / "history.json").read_text())["phases"][0]
    assert phase["resumed_from_epoch"] is None and len(phase["epochs"]) == 14
