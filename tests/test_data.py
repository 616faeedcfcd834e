"""tledge.data: the image loader, the generated shapes, every source, carving, calibration."""

from __future__ import annotations

import dataclasses
import json
import pickle
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tledge.data import (IMAGE_SUFFIXES, Splits, calibration_images, load_image, load_images,
                         load_splits, resize_images)
from tledge.data.cifar10 import CIFAR10_CLASSES
from tledge.data.sources import carve
from tledge.data.synthetic import SHAPES, generate
from tledge.errors import DataError

from tledge.recipe.spec import DataRecipe, SyntheticRecipe

SIZE = (24, 20)  # height != width, to catch a swapped (width, height)


def recipe(source, path=None, *, size=SIZE, val=0.2, test=0.2, **synthetic) -> DataRecipe:
    return DataRecipe(source=source, path=None if path is None else str(path),
                      image_size=size, val_fraction=val, test_fraction=test,
                      synthetic=SyntheticRecipe(**synthetic))


def check_shapes(splits: Splits, size=SIZE):
    for x, y in ((splits.x_train, splits.y_train), (splits.x_val, splits.y_val),
                 (splits.x_test, splits.y_test)):
        assert x.dtype == np.uint8 and x.shape[1:] == (*size, 3)
        assert y.dtype == np.int64 and y.shape == (len(x),)


# ---- synthetic ----------------------------------------------------------------------------

def test_shapes_registry_has_the_recipe_defaults_and_enough_kinds():
    assert len(SHAPES) >= 16 and len(set(SHAPES)) == len(SHAPES)
    assert set(SyntheticRecipe().classes) <= set(SHAPES)


def test_generate_is_deterministic_by_seed_with_shape_and_dtype():
    x, y = generate(SHAPES, 3, (32, 28), 0.1, seed=7)
    again_x, again_y = generate(SHAPES, 3, (32, 28), 0.1, seed=7)
    other_x, _ = generate(SHAPES, 3, (32, 28), 0.1, seed=8)
    assert x.shape == (3 * len(SHAPES), 32, 28, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64 and np.array_equal(np.bincount(y), [3] * len(SHAPES))
    assert np.array_equal(x, again_x) and np.array_equal(y, again_y)
    assert not np.array_equal(x, other_x)


def test_generate_rejects_unknown_class():
    with pytest.raises(DataError, match="'blob'"):
        generate(["circle", "blob"], 2, (16, 16), 0.0, seed=0)


def test_mean_colour_does_not_identify_the_class():
    x, y = generate(SHAPES[:16], 60, (32, 32), 0.08, seed=3)
    means = x.reshape(len(x), -1, 3).mean(axis=1)
    train = np.arange(len(x)) % 2 == 0
    centroids = np.stack([means[train & (y == label)].mean(axis=0) for label in range(16)])
    distances = ((means[~train, None, :] - centroids[None]) ** 2).sum(axis=-1)
    accuracy = (distances.argmin(axis=1) == y[~train]).mean()
    # Chance is 1/16 = 0.0625; with 480 test images a real cue would show far above this
    assert accuracy < 0.15


def test_classes_differ_in_structure():
    # Noise-free images of different classes should not all look alike once colours are
    # taken away: the binary foreground masks differ on average between classes.
    x, y = generate(SHAPES, 20, (32, 32), 0.0, seed=1)
    gray = x.astype(np.float32).mean(axis=-1)
    corner = gray[:, :1, :1]
    foreground = np.abs(gray - corner) > 1  # corners are always background
    coverage = np.stack([foreground[y == label].mean(axis=0) for label in range(len(SHAPES))])
    flat = coverage.reshape(len(SHAPES), -1)
    gaps = np.abs(flat[:, None] - flat[None]).mean(axis=-1)
    off_diagonal = gaps[~np.eye(len(SHAPES), dtype=bool)]
    assert off_diagonal.min() > 0.02


def test_synthetic_source_carves_stratified_and_seeded():
    data = recipe("synthetic", val=0.2, test=0.1, classes=("circle", "ring", "star"),
                  samples_per_class=20)
    splits = load_splits(data, seed=5)
    check_shapes(splits)
    assert splits.class_names == ("circle", "ring", "star") and splits.num_classes == 3
    assert np.array_equal(np.bincount(splits.y_val), [4, 4, 4])
    assert np.array_equal(np.bincount(splits.y_test), [2, 2, 2])
    assert np.array_equal(np.bincount(splits.y_train), [14, 14, 14])
    record = splits.record
    assert record["splits"]["val"] == {"count": 12, "obtained": "carved", "from": "train",
                                       "fraction": 0.2,
                                       "per_class": {"circle": 4, "ring": 4, "star": 4}}
    assert record["splits"]["train"]["obtained"] == "given"
    assert record["image_size"] == list(SIZE) and record["seed"] == 5
    assert json.loads(json.dumps(record)) == record
    again = load_splits(data, seed=5)
    assert np.array_equal(again.x_val, splits.x_val)
    assert again.record["fingerprint"] == record["fingerprint"]
    assert load_splits(data, seed=6).record["fingerprint"] != record["fingerprint"]
    # Disjoint: no generated image lands in two splits
    rows = {split: {image.tobytes() for image in getattr(splits, f"x_{split}")}
            for split in ("train", "val", "test")}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]


def test_carve_keeps_one_per_class_in_train_and_zero_fraction_is_empty():
    labels = np.array([0] * 2 + [1] * 1 + [2] * 10)
    parts = carve(labels, {"val": 0.5, "test": 0.5}, np.random.default_rng(0))
    assert set(labels[parts["train"]]) == {0, 1, 2}
    everything = np.concatenate(list(parts.values()))
    assert sorted(everything) == list(range(len(labels)))  # a partition: disjoint, complete
    first = carve(labels, {"val": 0.3}, np.random.default_rng(1))
    second = carve(labels, {"val": 0.3}, np.random.default_rng(1))
    assert all(np.array_equal(first[key], second[key]) for key in first)
    splits = load_splits(recipe("synthetic", val=0.0, test=0.0, samples_per_class=4), seed=0)
    assert splits.x_val.shape == (0, *SIZE, 3) and splits.x_test.shape == (0, *SIZE, 3)
    assert len(splits.x_train) == 4 * len(SyntheticRecipe().classes)


# ---- the image loader ---------------------------------------------------------------------

def test_load_image_converts_every_mode_to_rgb_and_resizes(tmp_path):
    gray = Image.fromarray(np.full((10, 12), 200, dtype=np.uint8), "L")
    gray.save(tmp_path / "gray.png")
    rgba = Image.new("RGBA", (12, 10), (10, 20, 30, 0))
    rgba.save(tmp_path / "rgba.png")
    palette = Image.new("RGB", (12, 10), (255, 0, 0)).convert("P")
    palette.save(tmp_path / "palette.GIF")
    deep = Image.fromarray(np.full((10, 12), 65535, dtype=np.uint16))
    deep.save(tmp_path / "deep.png")
    Image.new("CMYK", (12, 10), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")

    assert np.array_equal(load_image(tmp_path / "gray.png", (10, 12)),
                          np.full((10, 12, 3), 200, dtype=np.uint8))
    # Alpha is dropped, the stored colour kept (as keras.utils.load_img does)
    assert load_image(tmp_path / "rgba.png", (10, 12))[0, 0].tolist() == [10, 20, 30]
    assert load_image(tmp_path / "palette.GIF", (10, 12))[0, 0].tolist() == [255, 0, 0]
    assert load_image(tmp_path / "deep.png", (10, 12)).min() == 255  # scaled, not clipped
    assert load_image(tmp_path / "cmyk.jpg", (10, 12)).min() > 240  # no ink: white
    resized = load_image(tmp_path / "gray.png", (7, 5))
    assert resized.shape == (7, 5, 3) and resized.dtype == np.uint8
    assert load_images([tmp_path / "gray.png"] * 2, (7, 5)).shape == (2, 7, 5, 3)
    assert load_images([], (7, 5)).shape == (0, 7, 5, 3)


def test_resize_images_matches_load_image_and_skips_same_size(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 18, 3), dtype=np.uint8)
    Image.fromarray(pixels[0]).save(tmp_path / "a.png")
    resized = resize_images(pixels, (9, 11))
    assert np.array_equal(resized[0], load_image(tmp_path / "a.png", (9, 11)))
    assert resize_images(pixels, (16, 18)) is pixels


@pytest.mark.parametrize("name, content", [("broken.png", b"not an image"),
                                           ("truncated.jpg", None)])
def test_load_image_names_an_unreadable_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "whole.jpg")
        content = (tmp_path / "whole.jpg").read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(DataError, match="not a readable image") as caught:
        load_image(path, (8, 8))
    assert name in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(DataError, match="missing.png: not a readable image"):
        load_image(tmp_path / "missing.png", (8, 8))


# ---- folder source ------------------------------------------------------------------------

def write_image(path, colour, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (30, 26), colour)
    if mode == "L":
        image = image.convert("L")
    elif mode == "RGBA":
        image = image.convert("RGBA")
    elif mode == "P":
        image = image.convert("P")
    image.save(path)


def make_class_folder(root, name, count, suffixes=(".jpg", ".png", ".bmp", ".gif")):
    for index in range(count):
        suffix = suffixes[index % len(suffixes)]
        write_image(root / name / f"{index:02d}{suffix}", (40 * index % 256, 90, 30))


def test_folder_source_mixed_formats_and_modes(tmp_path):
    make_class_folder(tmp_path, "dogs", 10)
    make_class_folder(tmp_path, "cats", 10, suffixes=(".JPEG", ".PNG"))
    write_image(tmp_path / "cats" / "gray.png", (120, 120, 120), mode="L")
    write_image(tmp_path / "cats" / "nested" / "alpha.png", (5, 6, 7), mode="RGBA")
    write_image(tmp_path / "dogs" / "palette.png", (200, 10, 10), mode="P")
    (tmp_path / "dogs" / "notes.txt").write_text("ignored")
    write_image(tmp_path / "dogs" / ".hidden.png", (0, 0, 0))
    (tmp_path / ".cache").mkdir()
    splits = load_splits(recipe("folder", tmp_path, val=0.25, test=0.0), seed=1)
    check_shapes(splits)
    assert splits.class_names == ("cats", "dogs")
    assert len(splits.x_train) + len(splits.x_val) == 23 and len(splits.x_test) == 0
    files = splits.record["splits"]
    assert files["val"]["obtained"] == "carved" and files["val"]["fraction"] == 0.25
    listed = files["train"]["files"] + files["val"]["files"]
    assert "cats/nested/alpha.png" in listed and "dogs/palette.png" in listed
    assert not any("hidden" in name or name.endswith(".txt") for name in listed)
    assert json.loads(json.dumps(splits.record)) == splits.record
    # The record's file list lines up with the arrays
    index = files["train"]["files"].index("cats/gray.png") if "cats/gray.png" in \
        files["train"]["files"] else None
    if index is not None:
        assert splits.y_train[index] == 0
        assert np.array_equal(splits.x_train[index],
                              load_image(tmp_path / "cats" / "gray.png", SIZE))


def test_folder_source_with_train_and_test_trees(tmp_path):
    for split, count in (("train", 6), ("test", 2)):
        for name in ("a", "b", "c"):
            make_class_folder(tmp_path / split, name, count)
    splits = load_splits(recipe("folder", tmp_path, val=0.5, test=0.3), seed=0)
    check_shapes(splits)
    assert splits.class_names == ("a", "b", "c")
    assert np.array_equal(np.bincount(splits.y_test), [2, 2, 2])
    assert np.array_equal(np.bincount(splits.y_val), [3, 3, 3])
    record = splits.record["splits"]
    assert record["test"]["obtained"] == "given" and record["val"]["obtained"] == "carved"
    assert all(name.startswith("test/") for name in record["test"]["files"])


def test_folder_source_validation_tree_and_mismatched_classes(tmp_path):
    for name in ("a", "b"):
        make_class_folder(tmp_path / "train", name, 3)
        make_class_folder(tmp_path / "validation", name, 1)
    splits = load_splits(recipe("folder", tmp_path), seed=0)
    assert splits.record["splits"]["val"]["obtained"] == "given" and len(splits.x_val) == 2
    make_class_folder(tmp_path / "validation", "z", 1)
    with pytest.raises(DataError, match="different class folders.*only in val: z"):
        load_splits(recipe("folder", tmp_path), seed=0)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such folder"):
        load_splits(recipe("folder", tmp_path / "nowhere"), seed=0)
    with pytest.raises(DataError, match="no class sub-folders"):
        load_splits(recipe("folder", tmp_path), seed=0)
    make_class_folder(tmp_path, "only", 3)
    with pytest.raises(DataError, match="at least 2 classes"):
        load_splits(recipe("folder", tmp_path), seed=0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="class folder 'empty' has no images"):
        load_splits(recipe("folder", tmp_path), seed=0)
    make_class_folder(tmp_path, "empty", 2)
    (tmp_path / "empty" / "bad.jpg").write_bytes(b"\x00" * 50)
    with pytest.raises(DataError, match=r"bad\.jpg: not a readable image"):
        load_splits(recipe("folder", tmp_path), seed=0)


# ---- npz source ---------------------------------------------------------------------------

def test_npz_source_gray_float_and_given_splits(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "set.npz"
    np.savez(path, x_train=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
             y_train=np.arange(12) % 3, x_test=rng.uniform(0, 255, (3, 8, 8, 3)),
             y_test=np.array([[0], [1], [2]]), class_names=np.array(["x", "y", "z"]))
    splits = load_splits(recipe("npz", path, val=0.25), seed=0)
    check_shapes(splits)
    assert splits.class_names == ("x", "y", "z")
    assert len(splits.x_test) == 3 and len(splits.x_val) == 3 and len(splits.x_train) == 9
    assert splits.record["splits"]["test"]["obtained"] == "given"
    gray = splits.x_train[0]
    assert np.array_equal(gray[..., 0], gray[..., 2])  # grayscale became RGB

    np.savez(path, x_train=np.zeros((4, 8, 8, 3), np.uint8), y_train=np.array([0, 1, 0, 1]))
    splits = load_splits(recipe("npz", path, size=(8, 8), val=0, test=0), seed=0)
    assert splits.class_names == ("0", "1") and splits.x_train.shape == (4, 8, 8, 3)


@pytest.mark.parametrize("pixels, fragment", [
    (np.full((4, 8, 8, 3), np.nan), "holds 768 NaN or infinite pixel values"),
    (np.where(np.arange(4 * 8 * 8 * 3).reshape(4, 8, 8, 3) == 5, np.inf, 7.0),
     "holds 1 NaN or infinite"),
    (np.zeros((4, 0, 0, 3), np.uint8), "images of size 0x0"),
])
def test_npz_garbage_pixels_are_errors_that_say_what_was_found(tmp_path, pixels, fragment):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=pixels, y_train=np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match=fragment):
        load_splits(recipe("npz", path), seed=0)


def test_npz_errors_name_key_and_shape(tmp_path):
    path = tmp_path / "set.npz"
    np.savez(path, x_train=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="has 'x_train' but no 'y_train'"):
        load_splits(recipe("npz", path), seed=0)
    np.savez(path, x_train=np.zeros((4, 8, 8, 2), np.uint8), y_train=np.zeros(4, int))
    with pytest.raises(DataError, match=r"'x_train'.*found shape \[4, 8, 8, 2\]"):
        load_splits(recipe("npz", path), seed=0)
    np.savez(path, x_train=np.full((4, 8, 8), 0.5), y_train=np.zeros(4, int))
    with pytest.raises(DataError, match="'x_train' holds floats in 0-1"):
        load_splits(recipe("npz", path), seed=0)
    np.savez(path, images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="unknown array.s. images; tledge reads class_names"):
        load_splits(recipe("npz", path), seed=0)
    np.savez(path, x_val=np.zeros((4, 8, 8, 3), np.uint8), y_val=np.zeros(4, int))
    with pytest.raises(DataError, match="missing keys 'x_train' and 'y_train'"):
        load_splits(recipe("npz", path), seed=0)
    np.savez(path, x_train=np.zeros((4, 8, 8, 3), np.uint8), y_train=np.zeros(4, int))
    with pytest.raises(DataError, match="only one class"):
        load_splits(recipe("npz", path), seed=0)
    np.savez(path, x_train=np.full((4, 8, 8, 3), 300.0), y_train=np.arange(4))
    with pytest.raises(DataError, match="values outside 0-255"):
        load_splits(recipe("npz", path), seed=0)
    np.savez(path, x_train=np.zeros((4, 8, 8, 3)), y_train=np.zeros(3, int))
    with pytest.raises(DataError, match="'y_train' must be integer labels"):
        load_splits(recipe("npz", path), seed=0)
    with pytest.raises(DataError, match="no such .npz"):
        load_splits(recipe("npz", tmp_path / "none.npz"), seed=0)
    path.write_text("x_train,y_train\n1,2\n")  # a text file named .npz
    with pytest.raises(DataError, match="not a .npz archive") as caught:
        load_splits(recipe("npz", path), seed=0)
    assert "pickle" not in str(caught.value)  # no advice to load it unsafely


# ---- cifar10 ------------------------------------------------------------------------------

def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def write_fake_cifar(folder, per_batch=4):
    """CIFAR-10's python format: pickled dicts with bytes keys, data [N, 3072] uint8
    stored channels-first, labels a list of ints."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(),
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(label) for label in rng.integers(0, 10, per_batch)],
                 b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file, protocol=4)


@pytest.mark.parametrize("layout", ["cifar-10-batches-py",
                                    "cifar-10-batches-py-target/cifar-10-batches-py"])
def test_cifar10_reads_a_local_copy_without_download(tmp_path, monkeypatch, layout):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    no_network(monkeypatch)
    folder = tmp_path / "datasets" / layout
    write_fake_cifar(folder)
    splits = load_splits(recipe("cifar10", val=0.0, test=0.0), seed=0)
    check_shapes(splits)
    assert splits.class_names == CIFAR10_CLASSES == (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
        "truck")
    assert len(splits.x_train) == 20 and len(splits.x_test) == 4
    assert splits.record["splits"]["test"]["obtained"] == "given"
    with open(folder / "test_batch", "rb") as file:
        batch = pickle.load(file, encoding="bytes")
    first = batch[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(splits.x_test[0], resize_images(first[None], SIZE)[0])
    assert splits.y_test.tolist() == batch[b"labels"]


def test_cifar10_offline_says_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    no_network(monkeypatch)
    with pytest.raises(DataError) as caught:
        load_splits(recipe("cifar10"), seed=0)
    message = str(caught.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert str(tmp_path / "datasets") in message and "data_batch_1" in message
    assert "\n" not in message


def test_cifar10_refuses_a_pickle_that_runs_code(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    folder = tmp_path / "datasets" / "cifar-10-batches-py"
    write_fake_cifar(folder)
    with open(folder / "data_batch_3", "wb") as file:
        pickle.dump({b"data": dataclasses.replace}, file)  # any non-numpy global
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR-10 batch"):
        load_splits(recipe("cifar10"), seed=0)


# ---- calibration --------------------------------------------------------------------------

def test_calibration_is_stratified_from_train_only_and_seeded():
    splits = load_splits(recipe("synthetic", classes=("circle", "ring", "star", "cross"),
                                samples_per_class=20), seed=0)
    picked = calibration_images(splits, 10, seed=3)
    assert picked.shape == (10, *SIZE, 3) and picked.dtype == np.uint8
    train_rows = {image.tobytes(): label for image, label in zip(splits.x_train,
                                                                 splits.y_train)}
    labels = [train_rows[image.tobytes()] for image in picked]  # KeyError if not train
    assert sorted(np.bincount(labels, minlength=4)) == [2, 2, 3, 3]
    assert np.array_equal(picked, calibration_images(splits, 10, seed=3))
    assert not np.array_equal(picked, calibration_images(splits, 10, seed=4))


def test_calibration_warns_when_train_is_short_and_fails_when_empty():
    splits = load_splits(recipe("synthetic", val=0.0, test=0.0, samples_per_class=4), seed=0)
    with pytest.warns(UserWarning, match=r"only 32; calibrating with 32"):
        picked = calibration_images(splits, 100, seed=0)
    assert len(picked) == 32
    empty = dataclasses.replace(splits, x_train=splits.x_train[:0], y_train=splits.y_train[:0])
    with pytest.raises(DataError, match="no training images"):
        calibration_images(empty, 5, seed=0)


def test_image_suffixes_are_the_documented_ones():
    assert IMAGE_SUFFIXES == (".jpg", ".jpeg", ".png", ".bmp", ".gif")


# ---- preparing in worker processes --------------------------------------------------------

def test_worker_processes_decode_files_and_say_nothing_on_stderr(tmp_path, capfd, monkeypatch):
    """The data-preparation workers are real child processes; what they write to stderr reaches
    the user's terminal (it is inherited), so it must hold no warning, such as runpy's
    "'tledge.data.prepare_worker' found in sys.modules" that `python -m` gives a module its
    package imports."""
    import subprocess
    from tledge.data import prepare
    started = []
    real_popen = subprocess.Popen

    def popen(command, *args, **kwargs):  # the real Popen, counted
        started.append(command)
        return real_popen(command, *args, **kwargs)
    monkeypatch.setattr(prepare.subprocess, "Popen", popen)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(200):  # more than one chunk of 64 for each decoder
        path = tmp_path / "images" / f"{index}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    capfd.readouterr()
    digests, failed = prepare._decode_files(tmp_path / "x.npy", paths, (12, 10), 3, False,
                                            "train")
    err = capfd.readouterr().err
    assert len(started) == 2, started  # workers - 1 processes, and this one
    assert not failed and np.count_nonzero(digests.any(axis=1)) == len(paths)
    decoded = np.load(tmp_path / "x.npy")
    assert all(np.array_equal(decoded[index], load_image(path, (12, 10)))
               for index, path in enumerate(paths))
    assert "Warning" not in err and "warning" not in err, err
