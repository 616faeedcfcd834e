"""Fused ensembles: each fusion method is what it says, one graph that exports and passes
parity, members reused, and bad ensembles refused at check time."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import write_recipe
from tledge.errors import RecipeError
from tledge.recipe.load import load_recipe

ENSEMBLE = """
name = "{name}"
seed = 0

[data]
source = "synthetic"
image_size = [32, 32]
synthetic = {{ samples_per_class = 24 }}

[ensemble]
fusion = "{fusion}"

[[ensemble.members]]
name = "wide"
model = {{ backbone = "small_cnn", weights = "none" }}
train = {{ feature_extraction = {{ epochs = 3, learning_rate = 3e-3 }} }}

[[ensemble.members]]
name = "small"
image_size = [24, 24]
model = {{ backbone = "small_cnn", weights = "none", dropout = 0.3 }}
train = {{ feature_extraction = {{ epochs = 3, learning_rate = 3e-3 }} }}

[ensemble.concat]
epochs = 3

[export]
calibration_samples = 32
int8_repair = "off"  # the int8 search has its own tests (test_int8.py); here it would run
                     # every remedy on each of three weak models

[pick]
members = true

[bench]
threads = [1]
min_runs = 3
min_seconds = 0.0
warmup = 1
runtimes = ["litert", "onnxruntime"]
isolate = false
"""


def ensemble_recipe(folder, fusion="mean", name="fused"):
    return load_recipe(write_recipe(folder, ENSEMBLE.format(name=name, fusion=fusion),
                                    name=f"{name}.toml"))


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two members built once (full builds), and the data split they share."""
    from tledge.data import load_splits
    from tledge.stages import build_members
    folder = tmp_path_factory.mktemp("ensemble")
    recipe = ensemble_recipe(folder)
    built = build_members(recipe, folder / "models" / "fused", log=lambda line: None,
                          verbose=0)
    return recipe, built, load_splits(recipe.data, seed=recipe.seed)


def member_outputs(members_info, images):
    """Each member's probabilities on `images` resized to its own size, outside any graph."""
    import tensorflow as tf
    from tledge.model import load_model
    outputs = []
    for member in members_info:
        model = load_model(member["model"])
        size = tuple(member["image_size"])
        x = tf.constant(images, tf.float32)
        if size != images.shape[1:3]:
            x = tf.image.resize(x, size, method="bilinear")
        outputs.append(model(x, training=False).numpy())
    return outputs


@pytest.mark.parametrize("fusion", ["mean", "weighted", "concat"])
def test_fused_output_is_the_fusion_of_the_members_outputs(members, fusion):
    from tledge.train.ensemble import train_ensemble
    recipe, built, splits = members
    recipe = dataclasses.replace(recipe, ensemble=dataclasses.replace(recipe.ensemble,
                                                                      fusion=fusion))
    fused, history = train_ensemble(recipe, splits, built, verbose=0, log=lambda line: None)
    images = splits.x_test[:16]
    got = fused(images.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    if fusion == "mean":
        expected = np.mean(member_outputs(built, images), axis=0)
    elif fusion == "weighted":
        weights = history["ensemble"]["weights"]
        assert len(weights) == 2 and sum(weights) == pytest.approx(1.0)
        expected = sum(w * p for w, p in zip(weights, member_outputs(built, images)))
    else:
        import tensorflow as tf
        from tledge.train.bottlenecks import feature_extractor
        from tledge.model import load_model
        features = []
        for member in built:
            x = tf.image.resize(tf.constant(images, tf.float32), member["image_size"]) \
                if tuple(member["image_size"]) != (32, 32) else images.astype(np.float32)
            features.append(feature_extractor(load_model(member["model"]))(x).numpy())
        kernel, bias = fused.get_layer("probabilities").get_weights()
        logits = np.concatenate(features, axis=1) @ kernel + bias
        expected = np.exp(logits - logits.max(axis=1, keepdims=True))
        expected /= expected.sum(axis=1, keepdims=True)
        assert history["phases"][0]["name"] == "concat_head"
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_weighted_fusion_never_looks_at_the_test_split(members):
    from tledge.train.ensemble import train_ensemble
    recipe, built, splits = members
    recipe = dataclasses.replace(recipe, ensemble=dataclasses.replace(recipe.ensemble,
                                                                      fusion="weighted"))
    _, first = train_ensemble(recipe, splits, built, verbose=0, log=lambda line: None)
    rng = np.random.default_rng(1)
    scrambled = dataclasses.replace(
        splits, x_test=rng.integers(0, 256, splits.x_test.shape, dtype=np.uint8),
        y_test=rng.permutation(splits.y_test))
    _, second = train_ensemble(recipe, scrambled, built, verbose=0, log=lambda line: None)
    assert first["ensemble"]["weights"] == second["ensemble"]["weights"]


def test_fit_weights_trusts_the_member_that_is_right():
    from tledge.train.ensemble import fit_weights
    labels = np.array([0, 1, 2, 0, 1, 2])
    right = np.eye(3)[labels] * 0.9 + 0.1 / 3
    wrong = np.full((6, 3), 1 / 3)
    weights = fit_weights([wrong, right], labels)
    assert weights[1] > 0.95 and weights.sum() == pytest.approx(1.0)
    same = fit_weights([right, right], labels)
    np.testing.assert_allclose(same, [0.5, 0.5])


def test_a_fused_model_builds_exports_passes_parity_and_reuses_its_members(tmp_path):
    from tledge.stages import build
    recipe = ensemble_recipe(tmp_path, fusion="weighted", name="whole")
    run_dir = tmp_path / "models" / "whole"
    lines = []
    _, parity = build(recipe.path, out=run_dir, log=lines.append, verbose=0)
    rows = {row.artifact: row for row in parity.rows}
    assert {"keras", "tflite_fp32", "tflite_int8", "onnx_fp32"} <= set(rows)
    for name in ("tflite_fp32", "onnx_fp32", "tflite_int8"):  # every threshold met; but the
        assert rows[name].status == "insufficient" and not rows[name].problems, rows[name]
        assert rows[name].evidence["images"] == parity.images < 88  # split cannot show 0.97
    history = json.loads((run_dir / "history.json").read_text())
    assert [m["name"] for m in history["ensemble"]["members"]] == ["whole.wide", "whole.small"]
    from tledge.inspection import describe_file  # the fused .tflite describes itself to clients
    labels = json.loads((run_dir / "manifest.json").read_text())["labels"]
    for name in ("model_fp32.tflite", "model_int8.tflite"):
        standard = describe_file(run_dir / name)["standard_metadata"]
        assert standard["name"] == "whole" and standard["labels"] == labels
    report = (run_dir / "report.md").read_text()
    assert "## Ensemble" in report and "| **fused** | weighted |" in report
    # [pick] members = true: each member is a candidate; the pick is of the most accurate model
    pick = json.loads((run_dir / "manifest.json").read_text())["pick"]
    assert pick["models"] == ["model", "members/small", "members/wide"]
    accuracies = [json.loads((folder / "parity.json").read_text())["rows"][0]["accuracy"]
                  for folder in (run_dir, run_dir / "members" / "small",
                                 run_dir / "members" / "wide")]
    assert pick["model_accuracy"] == max(accuracies)
    from tledge.bench.stage import load_pick, pick_name
    assert load_pick(run_dir) == pick  # its file verified, in the model's own folder
    assert pick["parity"] == "insufficient"  # on 16 test images nothing can pass
    assert f"**Ship `{pick_name(pick)}` on {pick['runtime']}: UNPROVEN, not enough " \
           "evidence**" in report
    members_before = {p: p.stat().st_mtime_ns for p in run_dir.glob("members/*/model.keras")}
    assert len(members_before) == 2
    lines.clear()
    build(recipe.path, out=run_dir, log=lines.append, verbose=0)
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("members/*/model.keras")} == \
        members_before
    # train, export, validate and bench are current for both members and the fused model
    assert sum("up to date" in line for line in lines) == 15  # 5 stages x 3 runs
    assert any(line.startswith("== train: up to date") for line in lines)


def test_recipe_members_are_built_beside_the_ensemble(tmp_path):
    from tledge.stages import member_run_dir
    from tledge.recipe.load import member_recipes
    write_recipe(tmp_path, ENSEMBLE.split("[ensemble]")[0].replace('"{name}"', '"solo"')
                 .replace("{{", "{").replace("}}", "}") +
                 '[model]\nbackbone = "small_cnn"\nweights = "none"\n', name="solo.toml")
    text = ENSEMBLE.format(name="mix", fusion="mean").replace(
        '[[ensemble.members]]\nname = "wide"', '[[ensemble.members]]\nrecipe = "solo.toml"\n'
        '\n[[ensemble.members]]\nname = "wide"')
    recipe = load_recipe(write_recipe(tmp_path, text, name="mix.toml"))
    resolved = member_recipes(recipe)
    assert [m.name for m in resolved] == ["solo", "mix.wide", "mix.small"]
    run_dir = tmp_path / "models" / "mix"
    assert member_run_dir(recipe, resolved[0], run_dir) == tmp_path / "models" / "solo"
    assert member_run_dir(recipe, resolved[1], run_dir) == run_dir / "members" / "wide"


def problems(tmp_path, text, name="bad.toml"):
    with pytest.raises(RecipeError) as raised:
        load_recipe(write_recipe(tmp_path, text, name=name))
    return raised.value.problems


def test_an_ensemble_of_one_is_refused(tmp_path):
    text = ENSEMBLE.format(name="one", fusion="mean").split('[[ensemble.members]]\nname = "small"')[0]
    assert "ensemble.members: an ensemble needs at least 2 members, found 1" in \
        problems(tmp_path, text + "\n[bench]\nthreads = [1]\n")


def test_members_with_other_classes_are_refused_naming_both_recipes(tmp_path):
    write_recipe(tmp_path, '''
name = "other"
[data]
source = "synthetic"
image_size = [32, 32]
synthetic = { samples_per_class = 24, classes = ["ring", "circle", "square", "triangle", "cross", "star", "hbars", "checker"] }
[model]
backbone = "small_cnn"
weights = "none"
''', name="other.toml")
    text = ENSEMBLE.format(name="mixed", fusion="mean").replace(
        '[[ensemble.members]]\nname = "wide"', '[[ensemble.members]]\nrecipe = "other.toml"\n'
        '\n[[ensemble.members]]\nname = "wide"')
    found = problems(tmp_path, text)
    assert any(p.startswith("ensemble.members[0]: other.toml and bad.toml must share the data")
               and "the classes or their order differ" in p for p in found), found


def test_a_missing_member_recipe_and_a_cycle_are_refused(tmp_path):
    write_recipe(tmp_path, '''
name = "loop"
[data]
source = "synthetic"
[model]
backbone = "small_cnn"
weights = "bad.toml"
''', name="loop.toml")
    text = ENSEMBLE.format(name="cyclic", fusion="mean").replace(
        '[[ensemble.members]]\nname = "wide"', '[[ensemble.members]]\nrecipe = "loop.toml"\n\n'
        '[[ensemble.members]]\nrecipe = "missing.toml"\n\n[[ensemble.members]]\nname = "wide"')
    found = problems(tmp_path, text)
    assert "ensemble.members[0].recipe: recipes refer to each other in a cycle: bad.toml -> " \
           "loop.toml -> bad.toml" in found
    assert any(p.startswith("ensemble.members[1].recipe: no such recipe") for p in found)


def test_check_cli_refuses_a_bad_ensemble_with_exit_2(tmp_path):
    from click.testing import CliRunner
    from tledge.cli import main
    text = ENSEMBLE.format(name="one", fusion="mean").split('[[ensemble.members]]\nname = "small"')[0]
    path = write_recipe(tmp_path, text + "\n[bench]\nthreads = [1]\n")
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 2
    assert "at least 2 members" in result.output and "Traceback" not in result.output


def test_an_ensemble_recipe_with_a_model_table_is_refused(tmp_path):
    text = ENSEMBLE.format(name="extra", fusion="mean") + '\n[model]\nbackbone = "small_cnn"\n'
    assert any(p.startswith("model: an ensemble recipe takes its models from")
               for p in problems(tmp_path, text))


def test_weighted_fusion_without_a_validation_split_is_refused_at_check_time(tmp_path):
    text = ENSEMBLE.format(name="noval", fusion="weighted").replace(
        'image_size = [32, 32]', 'image_size = [32, 32]\nval_fraction = 0.0')
    assert any(p.startswith('ensemble.fusion: "weighted" fits its weights on the validation')
               for p in problems(tmp_path, text))


def test_concat_fine_tuning_keeps_nested_batchnorm_frozen(members):
    import keras
    from tledge.train.ensemble import _all_layers, train_ensemble
    recipe, built, splits = members
    concat = dataclasses.replace(recipe.ensemble.concat, epochs=1, fine_tune_epochs=1)
    recipe = dataclasses.replace(recipe, ensemble=dataclasses.replace(
        recipe.ensemble, fusion="concat", concat=concat))
    fused, history = train_ensemble(recipe, splits, built, verbose=0, log=lambda line: None)
    assert [phase["name"] for phase in history["phases"]] == ["concat_head", "concat_fine_tune"]
    norms = [layer for layer in _all_layers(fused)
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and not any(layer.trainable for layer in norms)
