"""Multi-worker training for real: two worker processes on 127.0.0.1, each reading its own
shard of the cached training rows, ending with identical weights; only the chief writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import SMALL_RECIPE, write_recipe

# Each worker trains through the library's train stage. The wrapper around train_model only
# observes: it keeps the final weights and how many training rows this worker read, in a
# file outside any run directory, so the test can compare the two workers.
WORKER = """
import json, sys
import numpy as np
import tledge.stages
from tledge.stages import train_run
from tledge.recipe.load import load_recipe

recipe_path, run_dir, observed = sys.argv[1:4]
real = tledge.stages.train_model

def observing(recipe, splits, **kwargs):
    model, history = real(recipe, splits, **kwargs)
    np.savez(observed, *model.get_weights())
    with open(observed + ".json", "w") as handle:
        json.dump({"train_rows": len(splits.y_train), "rows_read": splits.x_train.rows_read,
                   "largest_read": splits.x_train.largest_read,
                   "devices": history["devices"]}, handle)
    return model, history

tledge.stages.train_model = observing  # the name the train stage calls it by
train_run(load_recipe(recipe_path), run_dir, verbose=0)
"""


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def test_two_workers_train_their_shards_to_identical_weights(tmp_path):
    text = SMALL_RECIPE.format(name="two_workers", epochs=1, threads=1).replace(
        "[export]", '[train]\ndistribute = "multi_worker"\n\n[export]').replace(
        "samples_per_class = 60", "samples_per_class = 12").replace(
        "batch_size = 32", "batch_size = 8")
    recipe = write_recipe(tmp_path, text)
    cluster = [f"127.0.0.1:{port}" for port in free_ports(2)]
    workers = []
    for index in range(2):
        config = {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(config), "TF_CPP_MIN_LOG_LEVEL": "3",
               "CUDA_VISIBLE_DEVICES": ""}
        workers.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(recipe), str(tmp_path / f"run{index}"),
             str(tmp_path / f"observed{index}.npz")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=400)[0])
    finally:
        for worker in workers:
            worker.kill()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    chief, other = (np.load(tmp_path / f"observed{index}.npz") for index in range(2))
    assert len(chief.files) == len(other.files) > 0
    for name in chief.files:
        assert np.array_equal(chief[name], other[name]), name
    facts = [json.loads((tmp_path / f"observed{index}.npz.json").read_text()) for index in (0, 1)]
    for fact in facts:
        assert fact["devices"] == 2
        # One epoch: each worker read half of the training rows (its shard), a batch at a time
        assert fact["rows_read"] == fact["train_rows"] // 2
        assert fact["largest_read"] <= 4  # the per-replica batch: 8 over two workers
    # Only the chief (worker 0) wrote a run directory
    assert (tmp_path / "run0" / "manifest.json").is_file()
    assert (tmp_path / "run0" / "model.keras").is_file()
    assert not (tmp_path / "run1").exists()
    assert "the chief writes" in outputs[1]
