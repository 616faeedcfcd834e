"""The prepared-data cache, the csv source, bad images at scale and the leakage check."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tledge.cli import main
from tledge.data import load_image, load_splits
from tledge.data.cache import cache_root, list_entries, open_entry
from tledge.errors import DataError
from tledge.recipe.spec import CsvRecipe, DataRecipe

SIZE = (20, 24)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of this test's own, so entries and counts are the test's alone."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("TLEDGE_CACHE_DIR", str(folder))
    return folder


def data(source, path, **settings) -> DataRecipe:
    return DataRecipe(source=source, path=str(path), image_size=SIZE,
                      **{"val_fraction": 0.25, "test_fraction": 0.25, **settings})


def photo(path, seed, size=(30, 26)):
    """A noisy image, distinct for each seed (so no two are duplicates by accident)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)


def class_folders(root, classes=("ants", "bees", "wasps"), count=8, start=0):
    for label, name in enumerate(classes):
        for index in range(count):
            photo(root / name / f"{index:03d}.png", start + 1000 * label + index)


# ---- the cache ----------------------------------------------------------------------------

def test_prepared_once_then_read_from_the_cache_not_the_files(tmp_path, cache):
    class_folders(tmp_path / "photos")
    first = load_splits(data("folder", tmp_path / "photos"), seed=0)
    key = first.record["cache"]["key"]
    assert [row["key"] for row in list_entries(cache)] == [key]
    target = tmp_path / "photos" / "ants" / "000.png"
    original = load_image(target, SIZE)
    # Rewrite the file's pixels but keep its size and modification time: the source's
    # identity is unchanged, so a later load must read the cache, never this file
    stat = target.stat()
    pixels = np.asarray(Image.open(target)).copy()
    Image.fromarray(255 - pixels).save(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == stat.st_size
    again = load_splits(data("folder", tmp_path / "photos"), seed=0)
    assert again.record["cache"]["key"] == key
    assert again.record["fingerprint"] == first.record["fingerprint"]
    every = {bytes(row) for split in ("train", "val", "test")
             for row in getattr(again, f"x_{split}").digests}
    from tledge.data.cache import pixel_digest
    assert pixel_digest(original) in every
    # A changed modification time is a changed source: a new entry, with the new pixels
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = load_splits(data("folder", tmp_path / "photos"), seed=0)
    assert changed.record["cache"]["key"] != key
    assert changed.record["fingerprint"] != first.record["fingerprint"]
    assert len(list_entries(cache)) == 2


def test_parallel_preparation_gives_the_same_rows_as_one_process(tmp_path, cache):
    class_folders(tmp_path / "photos", count=50)  # 150 files: more than one chunk
    (tmp_path / "photos" / "bees" / "broken.png").write_bytes(b"\x89PNG broken")
    one = load_splits(data("folder", tmp_path / "photos", workers=1, on_bad_image="skip"),
                      seed=0)
    key = one.record["cache"]["key"]
    rows_one = np.asarray(one.x_train)
    from tledge.data.cache import clear_entries
    clear_entries(cache, [key])
    two = load_splits(data("folder", tmp_path / "photos", workers=2, on_bad_image="skip"),
                      seed=0)
    assert two.record["cache"]["key"] == key  # workers are not part of the identity
    assert two.record["bad_images"] == one.record["bad_images"]
    assert two.record["bad_images"]["files"] == ["train/bees/broken.png"]
    assert np.array_equal(np.asarray(two.x_train), rows_one)
    assert two.record["fingerprint"] == one.record["fingerprint"]
    names = two.record["splits"]["train"]["files"]
    for index in (0, 17, len(names) - 1):
        assert np.array_equal(two.x_train[index],
                              load_image(tmp_path / "photos" / names[index], SIZE))


def test_the_cache_root_moves_with_the_recipe_key(tmp_path, cache):
    class_folders(tmp_path / "photos", count=3)
    moved = tmp_path / "elsewhere"
    splits = load_splits(data("folder", tmp_path / "photos", cache_dir=str(moved)), seed=0)
    assert splits.record["cache"]["root"] == str(moved)
    assert list_entries(moved) and not list_entries(cache)
    assert cache_root() == cache and cache_root(str(moved)) == moved


def test_a_tampered_cache_row_is_refused_and_a_truncated_entry_prepared_again(tmp_path, cache):
    class_folders(tmp_path / "photos", count=4)
    recipe = data("folder", tmp_path / "photos")
    splits = load_splits(recipe, seed=0)
    entry = open_entry(cache, splits.record["cache"]["key"])
    images = entry.folder / "train.images.npy"
    raw = bytearray(images.read_bytes())
    raw[-5] ^= 0xFF  # one byte of the last row
    images.write_bytes(bytes(raw))
    tampered = load_splits(recipe, seed=0)
    with pytest.raises(DataError, match="differs from the image prepared there"):
        for split in ("train", "val", "test"):  # the last row is in one of them
            np.asarray(getattr(tampered, f"x_{split}"))
    images.write_bytes(bytes(raw[:-100]))  # truncated: the entry is not an entry any more
    assert open_entry(cache, entry.key) is None
    again = load_splits(recipe, seed=0)
    assert again.record["fingerprint"] == splits.record["fingerprint"]
    for split in ("train", "val", "test"):
        np.asarray(getattr(again, f"x_{split}"))  # every row verifies


def test_synthetic_and_npz_sources_are_cached_too(tmp_path, cache):
    synthetic = DataRecipe(source="synthetic", image_size=SIZE)
    first = load_splits(synthetic, seed=3)
    assert load_splits(synthetic, seed=3).record["cache"] == first.record["cache"]
    assert load_splits(synthetic, seed=4).record["cache"]["key"] != first.record["cache"]["key"]
    path = tmp_path / "arrays.npz"
    np.savez(path, x_train=np.zeros((6, 8, 8, 3), np.uint8), y_train=np.arange(6) % 2)
    key = load_splits(data("npz", path), seed=0).record["cache"]["key"]
    np.savez(path, x_train=np.ones((6, 8, 8, 3), np.uint8), y_train=np.arange(6) % 2)
    assert load_splits(data("npz", path), seed=0).record["cache"]["key"] != key


def test_cache_list_clear_and_prepare_from_the_cli(tmp_path, cache):
    class_folders(tmp_path / "photos", count=3)
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\n[data]\nsource = "folder"\npath = "photos"\n'
                      'image_size = [20, 24]\n[model]\nbackbone = "small_cnn"\nweights = "none"\n')
    runner = CliRunner()
    result = runner.invoke(main, ["cache", "prepare", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "train " in result.output and "cache entry" in result.output
    listed = runner.invoke(main, ["cache", "list"])
    key = list_entries(cache)[0]["key"]
    assert listed.exit_code == 0 and key in listed.output and "folder" in listed.output
    assert "9 images" in listed.output
    wrong = runner.invoke(main, ["cache", "clear", "nope"])
    assert wrong.exit_code == 2 and "no cache entry 'nope'" in wrong.output
    assert list_entries(cache)  # a typo deletes nothing
    cleared = runner.invoke(main, ["cache", "clear", key])
    assert cleared.exit_code == 0 and not list_entries(cache)
    assert runner.invoke(main, ["cache", "clear"]).exit_code == 2


# ---- bad images ---------------------------------------------------------------------------

def bad_folder(root):
    class_folders(root, count=6)
    (root / "ants" / "empty.jpg").write_bytes(b"")
    (root / "bees" / "text.png").write_text("not an image")
    good = (root / "wasps" / "000.png").read_bytes()
    (root / "wasps" / "cut.png").write_bytes(good[:len(good) // 3])


def test_every_bad_image_is_listed_in_one_pass(tmp_path, cache):
    bad_folder(tmp_path / "photos")
    report = tmp_path / "run"
    with pytest.raises(DataError) as caught:
        load_splits(data("folder", tmp_path / "photos"), seed=0, report_dir=report)
    message = str(caught.value)
    assert "3 unreadable image(s)" in message
    for name in ("ants/empty.jpg", "bees/text.png", "wasps/cut.png"):
        assert name in message
    assert 'on_bad_image = "skip"' in message
    listed = (report / "bad_images.txt").read_text().splitlines()
    assert listed[0] == "split\tfile\treason" and len(listed) == 4
    # Skipping reuses the same prepared entry and leaves the three out, recorded
    splits = load_splits(data("folder", tmp_path / "photos", on_bad_image="skip"), seed=0,
                         report_dir=report, log=lambda line: None)
    assert len(list_entries(cache)) == 1
    assert len(splits.y_train) + len(splits.y_val) + len(splits.y_test) == 18
    record = splits.record["bad_images"]
    assert record["count"] == 3 and "train/bees/text.png" in record["files"]
    every = sum((splits.record["splits"][s].get("files", []) for s in ("train", "val", "test")),
                [])
    assert "ants/empty.jpg" not in every and len(every) == 18


def test_bad_images_from_the_cli_keep_their_list(tmp_path, cache):
    bad_folder(tmp_path / "photos")
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\n[data]\nsource = "folder"\npath = "photos"\n'
                      'image_size = [20, 24]\n[model]\nbackbone = "small_cnn"\nweights = "none"\n')
    result = CliRunner().invoke(main, ["train", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "3 unreadable image(s)" in result.output
    assert "Traceback" not in result.output
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["bad_images.txt"]


# ---- the csv source -----------------------------------------------------------------------

def write_csv(path, rows, header="image,label,split"):
    path.write_text(header + "\n" + "\n".join(",".join(row) for row in rows) + "\n")


def test_csv_source_with_a_split_column(tmp_path, cache):
    rows = []
    for label, name in enumerate(("10", "2", "3")):  # numeric names sort as numbers
        for index in range(6):
            photo(tmp_path / "img" / f"{name}_{index}.jpg", 100 * label + index)
            split = "test" if index == 5 else "Validation" if index == 4 else "train"
            rows.append((f"img/{name}_{index}.jpg", name, split))
    write_csv(tmp_path / "labels.csv", rows)
    splits = load_splits(data("csv", tmp_path / "labels.csv",
                              csv=CsvRecipe(split_column="split")), seed=0)
    assert splits.class_names == ("2", "3", "10")
    assert np.array_equal(np.bincount(splits.y_test), [1, 1, 1])
    assert np.array_equal(np.bincount(splits.y_val), [1, 1, 1])
    record = splits.record["splits"]
    assert record["test"]["obtained"] == "given" and record["val"]["obtained"] == "given"
    index = record["train"]["files"].index("img/3_2.jpg")
    assert splits.y_train[index] == 1
    assert np.array_equal(splits.x_train[index], load_image(tmp_path / "img" / "3_2.jpg", SIZE))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_csv_row_naming_a_pipe_is_a_bad_image_not_a_hang(tmp_path, cache, workers):
    """A named pipe would block the decoder forever (in this process or a worker): it is a
    bad image like any unreadable file, listed, and nothing half-prepared is left."""
    import signal
    rows = []
    for label, name in enumerate(("ants", "bees")):
        for index in range(6):
            photo(tmp_path / "img" / f"{name}_{index}.jpg", 10 * label + index)
            rows.append((f"img/{name}_{index}.jpg", name, "train"))
    os.mkfifo(tmp_path / "img" / "pipe.jpg")
    rows.append(("img/pipe.jpg", "ants", "train"))
    write_csv(tmp_path / "labels.csv", rows)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading a named pipe hung"))
    signal.alarm(120)
    try:
        with pytest.raises(DataError) as caught:
            load_splits(data("csv", tmp_path / "labels.csv", workers=workers), seed=0)
    finally:
        signal.alarm(0)
    assert "img/pipe.jpg: not a readable image" in str(caught.value)
    listed = next(cache.rglob("bad_images.txt")).read_text()
    assert "pipe.jpg" in listed and "not a regular file" in listed
    assert not [entry for entry in cache.iterdir() if "partial" in entry.name]


def test_csv_source_carves_and_names_its_columns(tmp_path, cache):
    rows = []
    for name in ("cat", "dog"):
        for index in range(8):
            photo(tmp_path / f"{name}{index}.png", hash(name) % 1000 + index)
            rows.append((f"{name}{index}.png", name))
    write_csv(tmp_path / "data.csv", rows, header="file,species")
    recipe = data("csv", tmp_path / "data.csv",
                  csv=CsvRecipe(image_column="file", label_column="species"))
    splits = load_splits(recipe, seed=0)
    assert splits.class_names == ("cat", "dog")
    assert splits.record["splits"]["val"]["obtained"] == "carved"
    assert len(splits.y_train) + len(splits.y_val) + len(splits.y_test) == 16


def test_csv_errors_name_the_problem(tmp_path, cache):
    photo(tmp_path / "a.png", 1)
    csv_file = tmp_path / "data.csv"

    def fails(match, header="image,label,split", rows=(), **columns):
        write_csv(csv_file, rows, header)
        with pytest.raises(DataError, match=match):
            load_splits(data("csv", csv_file, csv=CsvRecipe(**columns)), seed=0)

    fails(r"no column 'label' \(data.csv.label_column\).*did you mean 'labels'",
          header="image,labels", rows=[("a.png", "x")])
    fails("names only one class", rows=[("a.png", "x", "train"), ("a.png", "x", "train")])
    fails(r"missing label in 'label' on line\(s\) 3", rows=[("a.png", "x"), ("a.png", "")],
          header="image,label")
    fails(r"split in 'split' is not train.*line\(s\) 2 \('holdout'\)",
          rows=[("a.png", "x", "holdout"), ("a.png", "y", "train")], split_column="split")
    fails("has a header but no rows")
    fails("class\\(es\\) y appear in test rows but not in train",
          rows=[("a.png", "x", "train"), ("a.png", "z", "train"), ("a.png", "y", "test")],
          split_column="split")
    with pytest.raises(DataError, match="no such .csv file"):
        load_splits(data("csv", tmp_path / "none.csv"), seed=0)
    # A row whose file is missing is a bad image, listed with the others
    write_csv(csv_file, [("a.png", "x"), ("gone.png", "y"), ("a.png", "y")], "image,label")
    with pytest.raises(DataError, match=r"train/gone.png: not a readable image \(no such "
                                        r"file\) \(the full list is in .*bad_images.txt"):
        load_splits(data("csv", csv_file), seed=0)


# ---- leakage ------------------------------------------------------------------------------

def test_duplicates_within_and_across_splits_are_counted_and_paired(tmp_path, cache):
    root = tmp_path / "photos"
    for name in ("a", "b"):
        class_folders(root / "train", (name,), count=5, start=ord(name) * 100)
        class_folders(root / "test", (name,), count=2, start=ord(name) * 100 + 50)
    # test/a/000 is train/a/003 again; train/b/004 repeats train/b/001 under another name
    (root / "test" / "a" / "000.png").write_bytes((root / "train" / "a" / "003.png").read_bytes())
    (root / "train" / "b" / "004.png").write_bytes((root / "train" / "b" / "001.png").read_bytes())
    lines = []
    splits = load_splits(data("folder", root, val_fraction=0.0), seed=0, report_dir=tmp_path,
                         log=lines.append)
    summary = splits.record["duplicates"]
    assert summary["total"] == 2
    assert summary["across"]["train/test"] == 1 and summary["within"]["train"] == 1
    assert any("2 exact duplicate image(s)" in line and "1 train/test" in line for line in lines)
    pairs = json.loads((tmp_path / "duplicates.json").read_text())["pairs"]
    files = {(pair["first"]["file"], pair["duplicate"]["file"]) for pair in pairs}
    assert files == {("train/a/003.png", "test/a/000.png"), ("train/b/001.png", "train/b/004.png")}
    clean = tmp_path / "clean"
    class_folders(clean, count=4)
    assert load_splits(data("folder", clean), seed=0,
                       report_dir=tmp_path).record["duplicates"]["total"] == 0
    assert not (tmp_path / "duplicates.json").exists()  # the old list went with its data


def test_labels_and_class_names_are_verified_and_a_damaged_entry_is_prepared_again(
        tmp_path, cache):
    """Labels rotated inside an entry, or its class names swapped in meta.json: the entry is
    named as damaged, never used, and prepared again from the source (the labels trained on
    are the source's)."""
    from tledge.data.cache import labels_digest
    class_folders(tmp_path / "photos", count=6)
    recipe = data("folder", tmp_path / "photos")
    first = load_splits(recipe, seed=0)
    key = first.record["cache"]["key"]
    entry = open_entry(cache, key)
    meta = json.loads((entry.folder / "meta.json").read_text())
    assert meta["splits"]["train"]["labels_sha256"] == \
        labels_digest(entry.splits["train"].labels)
    labels_path = entry.folder / "train.labels.npy"
    original_labels = np.load(labels_path)
    np.save(labels_path, np.roll(original_labels, 1))
    damage = []
    assert open_entry(cache, key, damage) is None
    assert damage == [f"cache entry {entry.folder} is not usable: its train labels do not "
                      "match their digest"]
    lines = []
    again = load_splits(recipe, seed=0, log=lines.append)
    assert any("train labels do not match their digest; preparing it again from the source"
               in line for line in lines), lines
    assert np.array_equal(np.load(labels_path), original_labels)
    assert again.record["fingerprint"] == first.record["fingerprint"]
    assert np.array_equal(again.y_train, first.y_train)
    # class names swapped by hand
    meta = json.loads((entry.folder / "meta.json").read_text())
    meta["class_names"] = meta["class_names"][::-1]
    (entry.folder / "meta.json").write_text(json.dumps(meta))
    damage = []
    assert open_entry(cache, key, damage) is None and "class names" in damage[0]
    assert load_splits(recipe, seed=0).class_names == first.class_names
    # an entry of the format before digests: prepared again, said so
    meta = json.loads((entry.folder / "meta.json").read_text())
    meta["format"] = 1
    (entry.folder / "meta.json").write_text(json.dumps(meta))
    damage = []
    assert open_entry(cache, key, damage) is None and "another version" in damage[0]


def test_an_entry_a_running_process_holds_is_not_cleared(tmp_path, cache):
    """`tledge cache clear KEY` refuses an entry another running tledge process reads, naming
    its pid; `--all` keeps it and says so; once that process has ended (killed: its marker is
    stale) the entry is cleared."""
    import signal
    import subprocess
    import sys
    import time
    class_folders(tmp_path / "photos", count=3)
    key = load_splits(data("folder", tmp_path / "photos"), seed=0).record["cache"]["key"]
    reader = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom tledge.data.cache import open_entry\n"
         f"assert open_entry({str(cache)!r}, {key!r}) is not None\nprint('open', flush=True)\n"
         "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "open"
        runner = CliRunner()
        refused = runner.invoke(main, ["cache", "clear", key])
        assert refused.exit_code == 2, refused.output
        assert f"cache entry {key} is in use by a running tledge process (pid {reader.pid})" \
            in refused.output and "nothing was deleted" in refused.output
        every = runner.invoke(main, ["cache", "clear", "--all"])
        assert every.exit_code == 0 and "deleted 0 entries" in every.output
        assert f"kept {key}: in use by a running tledge process (pid {reader.pid})" \
            in every.output
        assert open_entry(cache, key) is not None
    finally:
        reader.send_signal(signal.SIGKILL)  # no exit handler runs: its marker stays behind
        reader.wait()
    time.sleep(0.1)
    cleared = CliRunner().invoke(main, ["cache", "clear", key])
    assert cleared.exit_code == 0 and "deleted 1 entry" in cleared.output
    assert not list_entries(cache)
