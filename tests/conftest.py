"""Shared fixtures: a small trained run, built once per test session on generated data."""

from __future__ import annotations

import os
import shutil
import textwrap

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the tests' own choice, like the CLI's


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the default, pyproject.toml): one worker per core, at most four (each worker
    holds TensorFlow and a few models: about 3 GiB at its peak)."""
    return max(1, min(os.cpu_count() or 1, 4))


# The files that take longest go to the workers first, so that no worker is left with one of
# them when the others are done (xdist hands out files in collection order).
LONGEST_FIRST = ("test_multitask.py", "test_backbones.py", "test_reliability.py",
                 "test_emulate.py", "test_tune.py", "test_domains.py", "test_ensemble.py",
                 "test_train.py", "test_lock_interrupt.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept


@pytest.fixture(autouse=True, scope="session")
def data_cache(tmp_path_factory):
    """Every test prepares data into one throwaway cache, never the user's ~/.cache; tests that
    need a cache of their own point TLEDGE_CACHE_DIR elsewhere with monkeypatch."""
    folder = tmp_path_factory.mktemp("data-cache")
    previous = os.environ.get("TLEDGE_CACHE_DIR")
    os.environ["TLEDGE_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("TLEDGE_CACHE_DIR", None)
    else:
        os.environ["TLEDGE_CACHE_DIR"] = previous

# TensorFlow fixes its thread pool at the machine's CPU count once training has run; a Keras
# bench row at another count is skipped (honestly), so the shared run benchmarks at that count.
THREADS = os.cpu_count()

SMALL_RECIPE = """
name = "{name}"
seed = 0

[data]
source = "synthetic"
image_size = [32, 32]
val_fraction = 0.15
test_fraction = 0.25
batch_size = 32
synthetic = {{ classes = ["circle", "square", "triangle", "cross", "ring", "star", "hbars", "checker"], samples_per_class = 60 }}

[model]
backbone = "small_cnn"
weights = "none"

[train.feature_extraction]
epochs = {epochs}
learning_rate = 3e-3

[export]
tflite = ["fp32", "int8"]
onnx = ["fp32"]
calibration_samples = 64

[bench]
threads = [{threads}]
min_runs = 5
min_seconds = 0.0
warmup = 1
isolate = false
"""


def write_recipe(folder, text, name="recipe.toml"):
    """Write a recipe file (dedented) and return its path."""
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_recipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipes")
    # the shared run benchmarks each row in its own process, as a user's build does (the tests
    # of that read its bench.json); the other test builds time in-process, where isolation is
    # not what they test
    text = SMALL_RECIPE.format(name="small", epochs=10, threads=THREADS)
    return write_recipe(folder, text.replace("isolate = false", "isolate = true"))


@pytest.fixture(scope="session")
def built_run(small_recipe, tmp_path_factory, request):
    """A complete run directory: trained, exported, validated, benchmarked, reported.

    Built once per test session: under pytest-xdist the first worker to need it builds it
    and leaves a copy in the session's own folder (pytest-N, shared by the workers of this
    session only); another worker copies that instead of building again. Each worker gets a
    private copy, so a command one worker runs in it never meets another's lock. The copy is
    a run moved to another folder, which needs nothing redone (tests/test_relocate.py)."""
    import fcntl
    from tledge.records import read_parity
    from tledge.stages import build
    run_dir = tmp_path_factory.mktemp("models") / "small"
    worker = getattr(request.config, "workerinput", None)
    if worker is None:  # one process: nothing to share
        lines = []
        _, parity = build(small_recipe, out=run_dir, log=lines.append, verbose=0)
        return run_dir, parity, lines
    shared = tmp_path_factory.getbasetemp().parent / "built-run"
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits while one builds
        if (shared / ".complete").is_file():
            shutil.copytree(shared / "small", run_dir, symlinks=True)
            return run_dir, read_parity(run_dir), []
        lines = []
        _, parity = build(small_recipe, out=run_dir, log=lines.append, verbose=0)
        shutil.copytree(run_dir, shared / "small", symlinks=True)
        (shared / ".complete").touch()
    return run_dir, parity, lines


# -- the command line ------------------------------------------------------------------------

def invoke(*args):
    """Run `tledge ARGS...` in-process through click's CliRunner."""
    from click.testing import CliRunner
    from tledge.cli import main
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_usage_error(result, *fragments):
    """Exit code 2, no traceback, and stderr is one line `error: ...` naming each fragment."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def run_copy(built_run, tmp_path):
    """A private copy of the session run, for commands that write into it."""
    run_dir, _, _ = built_run
    return shutil.copytree(run_dir, tmp_path / "run")
