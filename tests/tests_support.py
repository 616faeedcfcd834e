"""Small helpers tests share that are not fixtures."""

from __future__ import annotations


def small_classifier(folder, classes: int, size=(32, 32)):
    """tledge's small_cnn classifier, from scratch, built the way a recipe builds it."""
    from tledge.backbones import BACKBONES
    from tledge.model import build_classifier
    from tledge.recipe.load import parse_recipe
    recipe = parse_recipe({"name": "probe", "seed": 0,
                           "data": {"source": "synthetic", "image_size": list(size)},
                           "model": {"backbone": "small_cnn", "weights": "none"}},
                          folder / "recipe.toml")
    from tledge.train.stage import _fast_batchnorm
    backbone = BACKBONES["small_cnn"].create(size, weights=None, alpha=None)
    _fast_batchnorm(backbone)  # as training from scratch does: inference must work too
    return build_classifier(recipe, classes, backbone)


def wait_for_epochs(process, run_dir, epochs: int, timeout=240):
    """Wait until a `tledge train` subprocess has checkpointed `epochs` epochs of its first
    phase; returns that state file (the process is still running, or the test fails)."""
    import json
    import time
    deadline = time.time() + timeout
    states = []
    while time.time() < deadline and process.poll() is None:
        states = list(run_dir.glob("checkpoints/*/from_scratch.state.json"))
        if states and len(json.loads(states[0].read_text())["rows"]) >= epochs:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training ended before it could be interrupted"
    return states[0]


def killed_training(folder, name, *, epochs, samples, after):
    """Start `tledge train` on a small recipe in a subprocess and SIGKILL it once `after`
    epochs are checkpointed; returns (the command to run it again, run dir, state file)."""
    import signal
    import subprocess
    import sys
    from conftest import SMALL_RECIPE, write_recipe
    text = SMALL_RECIPE.format(name=name, epochs=epochs, threads=1).replace(
        "samples_per_class = 60", f"samples_per_class = {samples}")
    path = write_recipe(folder, text)
    run_dir = folder / "run"
    command = [sys.executable, "-m", "tledge", "train", str(path), "--out", str(run_dir)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = wait_for_epochs(process, run_dir, after)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return command, run_dir, state
