"""Small helpers tests share that are not fixtures."""

from __future__ import annotations


def small_classifier(folder, classes: int, size=(32, 32)):
    """tledge's small_cnn classifier, from scratch, built the way a recipe builds it."""
    from tledge.backbones import BACKBONES
    from tledge.model import build_classifier
    from tledge.recipe import parse_recipe
    recipe = parse_recipe({"name": "probe", "seed": 0,
                           "data": {"source": "synthetic", "image_size": list(size)},
                           "model": {"backbone": "small_cnn", "weights": "none"}},
                          folder / "recipe.toml")
    from tledge.train import _fast_batchnorm
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
