"""Streaming: training reads the cache a batch at a time, later stages read the cache only,
and a run knows which cache entry it was built from."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import write_recipe
from tledge.data.cache import clear_entries, list_entries
from tledge.errors import RunDirError

RECIPE = """
name = "stream"
seed = 0

[data]
source = "folder"
path = "photos"
image_size = [16, 16]
val_fraction = 0.2
test_fraction = 0.2
batch_size = 8
augment = {{ flip = "horizontal" }}

[model]
backbone = "small_cnn"
weights = "none"

[train.feature_extraction]
epochs = {epochs}

[export]
tflite = ["fp32"]
onnx = []
"""


def photos(root, count=10):
    for label, name in enumerate(("red", "green", "blue")):
        for index in range(count):
            rng = np.random.default_rng(100 * label + index)
            pixels = rng.integers(0, 80, (20, 20, 3), dtype=np.uint8)
            pixels[..., label] += 150
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / name / f"{index}.png")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("TLEDGE_CACHE_DIR", str(folder))
    return folder


def test_training_streams_the_split_a_batch_at_a_time(tmp_path, cache):
    from tledge.data import load_splits
    from tledge.recipe.load import load_recipe
    from tledge.train.stage import train_model
    photos(tmp_path / "photos")
    recipe = load_recipe(write_recipe(tmp_path, RECIPE.format(epochs=2)))
    splits = load_splits(recipe.data, seed=recipe.seed)
    train_model(recipe, splits, verbose=0)
    # Every epoch read every training row from disk, never more than a batch per read
    assert splits.x_train.rows_read == 2 * len(splits.y_train)
    assert 0 < splits.x_train.largest_read <= recipe.data.batch_size


def test_later_stages_read_the_cache_not_the_source(tmp_path, cache):
    from tledge.export.stage import export_run
    from tledge.stages import train_run
    from tledge.recipe.load import load_recipe
    from tledge.run_inputs import run_splits
    from tledge.validate import validate_run
    photos(tmp_path / "photos")
    recipe = load_recipe(write_recipe(tmp_path, RECIPE.format(epochs=1)))
    run_dir = train_run(recipe, tmp_path / "run", log=lambda line: None, verbose=0)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    key = manifest["data"]["cache_key"]
    assert [row["key"] for row in list_entries(cache)] == [key]
    split = json.loads((run_dir / "split.json").read_text())
    assert split["cache"]["key"] == key and manifest["data"]["fingerprint"] == split["fingerprint"]
    # The source is gone: export (calibration) and validation read the prepared entry
    shutil.move(tmp_path / "photos", tmp_path / "away")
    export_run(run_dir, log=lambda line: None)
    report = validate_run(run_dir, log=lambda line: None)
    assert report.images == split["splits"]["test"]["count"] and not report.failed

    # The entry is damaged (its labels rotated by hand): named, never used; the images the
    # run carries are read instead
    labels_path = cache / key / "train.labels.npy"
    labels = np.load(labels_path)
    np.save(labels_path, np.roll(labels, 1))
    lines = []
    carried = run_splits(run_dir, log=lines.append)
    assert any("train labels do not match their digest" in line for line in lines), lines
    assert any("reading the images the run carries" in line for line in lines), lines
    assert carried.record["fingerprint"] == split["fingerprint"]
    np.save(labels_path, labels)
    # The entry is gone: the images the run carries are read (checked against the manifest)
    shutil.move(tmp_path / "away", tmp_path / "photos")
    clear_entries(cache, [key])
    lines = []
    carried = run_splits(run_dir, log=lines.append)
    assert any("reading the images the run carries" in line for line in lines), lines
    assert len(carried.y_test) == split["splits"]["test"]["count"]
    # ...and without them (deleted), the source, back unchanged: prepared again, same data
    (run_dir / "inputs.npz").unlink()
    lines = []
    assert run_splits(run_dir, log=lines.append).record["fingerprint"] == split["fingerprint"]
    assert any("preparing it again" in line for line in lines), lines
    # An image changed while the entry exists: the run keeps reading the data it was trained
    # on
    target = tmp_path / "photos" / "red" / "0.png"
    original = target.read_bytes()
    Image.fromarray(np.full((20, 20, 3), 7, dtype=np.uint8)).save(target)
    assert run_splits(run_dir).record["fingerprint"] == split["fingerprint"]
    # The same bytes back under a new modification time (as a copy has them), and the entry
    # gone: prepared again, and the same images and labels are all that counts
    target.write_bytes(original)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    clear_entries(cache)
    assert run_splits(run_dir).record["fingerprint"] == split["fingerprint"]
    # An image changed with every entry of the old data gone: nothing honest to validate on
    Image.fromarray(np.full((20, 20, 3), 7, dtype=np.uint8)).save(target)
    clear_entries(cache)
    with pytest.raises(RunDirError, match="the folder source changed since .* images or labels"):
        run_splits(run_dir)
    shutil.rmtree(tmp_path / "photos")
    clear_entries(cache)
    with pytest.raises(RunDirError, match=f"cache entry {key}.* is gone, and its source cannot "
                                          "be read"):
        run_splits(run_dir)


def test_augmented_batches_are_the_same_each_time_a_recipe_trains():
    """The augmentation draws from one seeded state in batch order: the same seed gives the
    same augmented batches (in parallel calls the batches took their draws in any order, and
    one recipe trained to test accuracies five points apart)."""
    from tledge.data.feed import augmentation, make_dataset
    from tledge.recipe.spec import AugmentRecipe
    images = np.random.default_rng(0).integers(0, 256, (384, 16, 16, 3)).astype(np.uint8)
    labels = np.arange(384) % 4
    settings = AugmentRecipe(flip="horizontal_and_vertical", rotation=0.1, contrast=0.2)

    def batches():
        data = make_dataset(images, labels, 4, batch_size=8, seed=0, shuffle=True,
                            augment=augmentation(settings, seed=0))
        return np.concatenate([x.numpy() for x, _ in data])
    first, second = batches(), batches()
    assert not np.array_equal(first, images[:len(first)].astype(np.float32))  # augmented
    np.testing.assert_array_equal(first, second)
