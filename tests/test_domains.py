"""Domain adaptation for real: corruptions and shifted synthetic worlds, `tledge evaluate` on
other data through the runners, AdaBN that raises target accuracy (measured), and a few-label
fine-tune that keeps the trained head."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import SMALL_RECIPE, invoke, write_recipe
from tledge.data.corruptions import CORRUPTIONS, corrupt, corrupt_folder
from tledge.data.synthetic import generate
from tledge.errors import DataError, RecipeError, TrainError, WeightsError
from tledge.recipe.spec import DomainRecipe

CLASSES = ["circle", "square", "triangle", "cross", "ring", "star", "hbars", "checker"]
SHIFT = 'domain = { contrast = 0.4, brightness = -0.25, palette = "cool" }'


def shifted_recipe(folder, name="shifted", seed=1, extra=""):
    """The small run's classes in another world: dimmer, flatter, bluer (another camera)."""
    text = SMALL_RECIPE.format(name=name, epochs=1, threads=1).replace(
        "samples_per_class = 60 }", f"samples_per_class = 60, {SHIFT} }}").replace(
        "seed = 0", f"seed = {seed}") + extra
    return write_recipe(folder, text, name=f"{name}.toml")


# ---- the shifts ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_grows_with_its_severity(name):
    images, _ = generate(CLASSES[:2], 4, (32, 32), 0.0, seed=0)
    distances = [float(np.abs(corrupt(images, name, severity).astype(float) - images).mean())
                 for severity in (1, 3, 5)]
    assert 0 < distances[0] <= distances[1] <= distances[2], distances
    assert corrupt(images, name, 3).dtype == np.uint8


def test_a_corrupted_copy_of_a_folder_keeps_its_classes(tmp_path):
    images, labels = generate(CLASSES[:2], 3, (24, 24), 0.05, seed=0)
    source = tmp_path / "photos"
    for number, (image, label) in enumerate(zip(images, labels)):
        (source / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(source / CLASSES[label] / f"{number}.jpg")
    result = invoke("corrupt", source, tmp_path / "dim", "--corruption", "contrast",
                    "--severity", "4")
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(tmp_path / "dim").as_posix()
                     for p in (tmp_path / "dim").rglob("*.png"))
    assert written == sorted(f"{CLASSES[label]}/{n}.png" for n, label in enumerate(labels))
    dim = np.asarray(Image.open(tmp_path / "dim" / written[0]))
    original = np.asarray(Image.open(source / written[0].replace(".png", ".jpg")))
    assert dim.std() < 0.5 * original.std()  # contrast 0.1 of what it was
    with pytest.raises(DataError, match="not empty"):
        corrupt_folder(source, tmp_path / "dim", "contrast", 1)
    with pytest.raises(DataError, match="inside"):
        corrupt_folder(source, source / "copy", "contrast", 1)
    # class folders that are symlinks, which the folder source reads: corrupted the same
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in CLASSES[:2]:
        (linked / name).symlink_to(source / name, target_is_directory=True)
    assert corrupt_folder(linked, tmp_path / "dim_linked", "contrast", 1) == len(labels)
    assert sorted(p.relative_to(tmp_path / "dim_linked").as_posix()
                  for p in (tmp_path / "dim_linked").rglob("*.png")) == written


def test_a_synthetic_domain_shifts_the_images_and_the_default_does_not():
    plain, labels = generate(CLASSES, 5, (32, 32), 0.08, seed=0)
    default, _ = generate(CLASSES, 5, (32, 32), 0.08, seed=0, domain=DomainRecipe())
    assert np.array_equal(plain, default)  # caches and hashes of every earlier run hold
    dark, dark_labels = generate(CLASSES, 5, (32, 32), 0.08, seed=0,
                                 domain=DomainRecipe(palette="dark"))
    flat, _ = generate(CLASSES, 5, (32, 32), 0.08, seed=0, domain=DomainRecipe(contrast=0.3))
    textured, _ = generate(CLASSES, 5, (32, 32), 0.0, seed=0,
                           domain=DomainRecipe(background="texture"))
    untextured, _ = generate(CLASSES, 5, (32, 32), 0.0, seed=0)
    assert np.array_equal(labels, dark_labels)
    assert dark.mean() < 0.6 * plain.mean()
    assert flat.astype(float).std(axis=(1, 2, 3)).mean() < \
        0.5 * plain.astype(float).std(axis=(1, 2, 3)).mean()
    assert not np.array_equal(textured, untextured)


# ---- evaluate -------------------------------------------------------------------------------

@pytest.fixture
def run_copy(built_run, tmp_path):
    return shutil.copytree(built_run[0], tmp_path / "run")


def test_evaluate_measures_the_shift_in_every_validated_artifact(run_copy, tmp_path):
    target = shifted_recipe(tmp_path)
    result = invoke("evaluate", run_copy, "--data", target)
    assert result.exit_code == 0, result.output
    domains = json.loads((run_copy / "domains.json").read_text())["domains"]
    entry = domains["shifted"]
    parity = json.loads((run_copy / "parity.json").read_text())
    passed = {(row["artifact"], row["runtime"]) for row in parity["rows"]  # every threshold
              if row["status"] in ("passed", "insufficient")}  # met, on however few images
    rows = {(row["artifact"], row["runtime"]): row for row in entry["rows"]}
    assert set(rows) == {("keras", "keras")} | passed
    keras = rows[("keras", "keras")]
    reference = next(row for row in parity["rows"] if row["status"] == "reference")
    assert keras["source_accuracy"] == reference["accuracy"] and keras["agreement"] == 1.0
    assert entry["images"] == sum(sum(row) for row in keras["confusion"]) == \
        len(keras["confusion"]) * 15  # the target's test split: a quarter of 60 per class
    assert keras["accuracy"] < keras["source_accuracy"] - 0.2  # a real shift, measured
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and set(row["per_class"]) == set(CLASSES)
    assert f"{keras['accuracy']:.1%} on shifted" in result.output
    report = (run_copy / "report.md").read_text()
    assert "## Domains" in report and "### shifted" in report


def test_evaluate_on_a_folder_with_other_classes_lists_the_difference(run_copy, tmp_path):
    folder = tmp_path / "photos"
    images, labels = generate(["circle", "square", "plus"], 2, (32, 32), 0.05, seed=0)
    for number, (image, label) in enumerate(zip(images, labels)):
        name = ["circle", "square", "plus"][label]
        (folder / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name / f"{number}.png")
    result = invoke("evaluate", run_copy, "--data", folder)
    assert result.exit_code == 2
    assert "missing triangle, cross" in result.output and "not in the run plus" in result.output
    assert "Traceback" not in result.output and not (run_copy / "domains.json").exists()


# ---- AdaBN ----------------------------------------------------------------------------------

def without_int8_search(run_dir):
    """The run's recipe with int8's repair search off: a test of adaptation exports plain int8
    and judges it; the search has its own tests (tests/test_int8.py), and on a weak adapted
    model it runs every remedy (a minute of CPU)."""
    path = run_dir / "recipe.toml"
    assert 'int8_repair = "auto"' in path.read_text()
    path.write_text(path.read_text().replace('int8_repair = "auto"', 'int8_repair = "off"'))
    return run_dir


def test_adabn_raises_target_accuracy_without_labels(run_copy, tmp_path):
    without_int8_search(run_copy)
    target = shifted_recipe(tmp_path)
    out = tmp_path / "adapted"
    result = invoke("adapt", run_copy, "--data", target, "--out", out)
    assert result.exit_code in (0, 1), result.output  # 1: an artifact failed parity
    history = json.loads((out / "history.json").read_text())
    adaptation = history["adaptation"]
    before, after = adaptation["before"], adaptation["after"]
    # the claim: target accuracy measured before and after, on the target's test split
    assert after["target"] >= before["target"] + 0.15, adaptation
    assert adaptation["batchnorm_layers"] == 4 and adaptation["images"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["train"]["adapted_from"] == "../run"
    assert {"export", "validate", "bench"} <= set(manifest["stages"])
    # int8 calibrated and judged on the target's images: the run's data is the target's
    split = json.loads((out / "split.json").read_text())
    assert split["generator"]["domain"]["palette"] == "cool"
    report = (out / "report.md").read_text()
    assert "adapted to **shifted**" in report and "without a label" in report
    # the model really is the parent's with other statistics: same weights otherwise
    from tledge.model import load_model
    from tledge.train.adabn import batchnorm_layers
    parent, adapted = load_model(run_copy / "model.keras"), load_model(out / "model.keras")
    assert all(np.array_equal(a, b) for a, b in zip(parent.get_layer("probabilities").get_weights(),
                                                     adapted.get_layer("probabilities").get_weights()))
    assert not np.allclose(batchnorm_layers(parent)[0].moving_mean,
                           batchnorm_layers(adapted)[0].moving_mean)


def test_adabn_says_plainly_when_a_model_has_no_batchnorm():
    import keras
    from tledge.train.adabn import adapt_batchnorm
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    with pytest.raises(TrainError, match="no BatchNorm layer.*model.head = \"keep\""):
        adapt_batchnorm(model, np.zeros((4, 8, 8, 3), np.uint8))


# ---- a few labels, the head kept ------------------------------------------------------------

def test_the_kept_head_is_the_source_models_in_this_datas_class_order(built_run, tmp_path):
    from tledge.model import keep_head, load_model
    run_dir = built_run[0]
    source = load_model(run_dir / "model.keras")
    copy = load_model(run_dir / "model.keras")
    copy.get_layer("probabilities").set_weights(
        [np.zeros_like(w) for w in copy.get_layer("probabilities").get_weights()])
    reordered = list(reversed(CLASSES))
    keep_head(copy, run_dir / "model.keras", reordered)
    kernel, bias = source.get_layer("probabilities").get_weights()
    kept_kernel, kept_bias = copy.get_layer("probabilities").get_weights()
    assert np.array_equal(kept_kernel, kernel[:, ::-1]) and np.array_equal(kept_bias, bias[::-1])
    with pytest.raises(WeightsError, match="same classes"):
        keep_head(copy, run_dir / "model.keras", CLASSES[:-1] + ["plus"])


def test_keeping_a_head_needs_a_trained_model_to_keep_it_from(tmp_path):
    from tledge.recipe.load import load_recipe
    bad = shifted_recipe(tmp_path, extra="").read_text().replace(
        'weights = "none"', 'weights = "none"\nhead = "keep"')
    with pytest.raises(RecipeError, match="model.head"):
        load_recipe(write_recipe(tmp_path, bad, name="bad.toml"))


def test_a_few_labelled_target_images_fine_tune_the_kept_head(built_run, tmp_path):
    shutil.copy(built_run[0] / "recipe.toml", tmp_path / "small.toml")
    shutil.copytree(built_run[0], tmp_path / "models" / "small")  # already trained: reused
    few = shifted_recipe(tmp_path, name="few").read_text().replace(
        'weights = "none"', 'weights = "small.toml"\nhead = "keep"').replace(
        "batch_size = 32", "batch_size = 16\ntrain_per_class = 10").replace(
        "[export]\n", '[export]\nint8_repair = "off"\n')  # as without_int8_search says
    few = write_recipe(tmp_path, few, name="few.toml")
    result = invoke("build", few, "--out", tmp_path / "models" / "few")
    assert result.exit_code in (0, 1), result.output
    assert "reusing the trained model of small" in result.output
    history = json.loads((tmp_path / "models" / "few" / "history.json").read_text())
    split = json.loads((tmp_path / "models" / "few" / "split.json").read_text())
    assert history["head"] == "keep"
    assert split["splits"]["train"]["count"] == 10 * len(CLASSES)  # ten labels per class
    assert split["splits"]["test"]["count"] == 15 * len(CLASSES)  # the test split as carved
    # the parent before, its AdaBN run and this run, on the same target test split: compared
    target = tmp_path / "shifted.toml"
    shifted_recipe(tmp_path)
    parent = tmp_path / "models" / "small"
    assert invoke("evaluate", parent, "--data", target).exit_code == 0
    without_int8_search(parent)
    assert invoke("adapt", parent, "--data", target).exit_code in (0, 1)
    assert invoke("report", tmp_path / "models" / "few").exit_code == 0
    report = (tmp_path / "models" / "few" / "report.md").read_text()
    table = report[report.index("### Adapting to shifted"):].splitlines()[6:9]
    assert table[0].startswith("| small | before adaptation |")
    assert table[1].startswith("| small_adabn_shifted | AdaBN")
    assert table[2].startswith("| few | fine-tuned, head kept") and "80 labelled" in table[2]


def test_an_adapted_run_keeps_the_models_class_order_for_a_folder_listed_otherwise(
        run_copy, tmp_path):
    """A folder's classes come sorted by name; the run's in its recipe's order. The adapted
    run's later stages (validate, the pick, bundles) must score in the model's order."""
    images, labels = generate(CLASSES, 20, (32, 32), 0.08, seed=3,
                              domain=DomainRecipe(contrast=0.4, brightness=-0.25))
    folder = tmp_path / "camera"
    for number, (image, label) in enumerate(zip(images, labels)):
        (folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / CLASSES[label] / f"{number}.png")
    assert sorted(CLASSES) != CLASSES
    out = tmp_path / "adapted"
    result = invoke("adapt", run_copy, "--data", folder, "--out", out)
    assert result.exit_code in (0, 1), result.output
    history = json.loads((out / "history.json").read_text())
    parity = json.loads((out / "parity.json").read_text())
    reference = next(row for row in parity["rows"] if row["status"] == "reference")
    assert reference["accuracy"] == pytest.approx(history["test_accuracy"])
    assert json.loads((out / "manifest.json").read_text())["labels"] == CLASSES


def test_adapt_refuses_to_write_over_the_run_it_adapts(run_copy, tmp_path):
    result = invoke("adapt", run_copy, "--data", shifted_recipe(tmp_path), "--out", run_copy)
    assert result.exit_code == 2 and "is the run being adapted" in result.output
    assert (run_copy / "model.keras").is_file() and (run_copy / "parity.json").is_file()
    # a --name that would put the adapted run outside the runs' folder: refused, nothing made
    before = sorted(path.name for path in run_copy.parent.iterdir())
    result = invoke("adapt", run_copy, "--data", shifted_recipe(tmp_path), "--name", "../../x")
    assert result.exit_code == 2 and "--name" in result.output and "'../../x'" in result.output
    assert sorted(path.name for path in run_copy.parent.iterdir()) == before  # nothing made
