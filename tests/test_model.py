"""Backbone weights from every kind of source, and the two training phases."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import SMALL_RECIPE, write_recipe
from tledge.errors import RecipeError, WeightsError
from tledge.recipe.load import load_recipe

MOBILENET = """
name = "mobile"
[data]
source = "synthetic"
image_size = [96, 96]
synthetic = {{ samples_per_class = 6 }}
[model]
backbone = "mobilenet_v2"
alpha = 0.35
weights = "{weights}"
[train.feature_extraction]
epochs = 1
[train.fine_tune]
epochs = 1
unfreeze = {unfreeze}
learning_rate = 1e-2
"""


def mobilenet_recipe(folder, weights="imagenet", unfreeze=20):
    return load_recipe(write_recipe(folder, MOBILENET.format(weights=weights, unfreeze=unfreeze)))


def run_python(code, env_extra):
    """Run code in a fresh interpreter: keras reads KERAS_HOME once, at import."""
    import os
    env = {**os.environ, **env_extra, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


def save_legacy_h5(model, path):
    """Write weights the way keras.applications' own downloads are laid out."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)


OFFLINE = """
import sys, urllib.error, urllib.request
def refuse(*args, **kwargs):
    raise urllib.error.URLError("no network in this test")
urllib.request.urlretrieve = refuse
urllib.request.urlopen = refuse
from tledge.model import build_backbone
from tledge.recipe.load import load_recipe
from tledge.errors import WeightsError
try:
    backbone = build_backbone(load_recipe(sys.argv[1] if len(sys.argv) > 1 else {recipe!r}))
except WeightsError as error:
    print("WEIGHTS-ERROR", error)
else:
    import numpy as np
    np.save({out!r}, backbone.get_weights()[0])
    print("LOADED")
"""


def test_imagenet_offline_says_what_to_download_and_where(tmp_path):
    recipe = mobilenet_recipe(tmp_path)
    home = tmp_path / "keras_home"
    result = run_python(OFFLINE.format(recipe=recipe.path, out=str(tmp_path / "w.npy")),
                        {"KERAS_HOME": str(home)})
    assert "WEIGHTS-ERROR" in result.stdout, result.stdout + result.stderr
    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"
    assert f"https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/{name}" \
        in result.stdout
    assert str(home / "models" / name) in result.stdout


def test_imagenet_weights_are_read_from_the_keras_cache_when_present(tmp_path):
    import keras
    recipe = mobilenet_recipe(tmp_path)
    source = keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False,
                                            weights=None, alpha=0.35)
    cache = tmp_path / "keras_home" / "models"
    cache.mkdir(parents=True)
    save_legacy_h5(source, cache / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5")
    result = run_python(OFFLINE.format(recipe=recipe.path, out=str(tmp_path / "w.npy")),
                        {"KERAS_HOME": str(tmp_path / "keras_home")})
    assert "LOADED" in result.stdout, result.stdout + result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), source.get_weights()[0])


def test_weights_file_in_keras_download_layout_loads_by_path(tmp_path):
    import keras
    from tledge.model import build_backbone
    source = keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False,
                                            weights=None, alpha=0.35)
    save_legacy_h5(source, tmp_path / "downloaded.h5")
    backbone = build_backbone(mobilenet_recipe(tmp_path, weights="downloaded.h5"))
    for mine, theirs in zip(backbone.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(mine, theirs)


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    import keras
    from tledge.model import build_backbone
    other = keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False,
                                           weights=None, alpha=1.0)
    other.save_weights(tmp_path / "wide.weights.h5")
    with pytest.raises(WeightsError, match=r"does not fit backbone 'mobilenet_v2'.*name=Conv1"):
        build_backbone(mobilenet_recipe(tmp_path, weights="wide.weights.h5"))


def test_small_cnn_loads_a_weights_file_and_refuses_one_that_does_not_fit(tmp_path):
    import dataclasses
    import keras
    from tledge.backbones import BACKBONES
    from tledge.model import build_backbone
    recipe = load_recipe(write_recipe(tmp_path, SMALL_RECIPE.format(name="w", epochs=1,
                                                                     threads=1)))
    source = BACKBONES["small_cnn"].create((32, 32), weights=None, alpha=None)
    source.save_weights(tmp_path / "cnn.weights.h5")
    with_file = dataclasses.replace(recipe, model=dataclasses.replace(
        recipe.model, weights=str(tmp_path / "cnn.weights.h5")))
    backbone = build_backbone(with_file)  # before: the file was ignored, weights random
    for mine, theirs in zip(backbone.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    other = keras.applications.MobileNetV2(input_shape=(32, 32, 3), include_top=False,
                                           weights=None, alpha=0.35)
    other.save_weights(tmp_path / "mobile.weights.h5")
    wrong = dataclasses.replace(recipe, model=dataclasses.replace(
        recipe.model, weights=str(tmp_path / "mobile.weights.h5")))
    with pytest.raises(WeightsError, match="does not fit backbone 'small_cnn'"):
        build_backbone(wrong)


def test_backbone_from_a_tledge_keras_file(built_run, tmp_path):
    from tledge.model import build_backbone, find_backbone, load_model
    run_dir, _, _ = built_run
    text = SMALL_RECIPE.format(name="again", epochs=1, threads=1).replace(
        'weights = "none"', f'weights = "{run_dir / "model.keras"}"')
    backbone = build_backbone(load_recipe(write_recipe(tmp_path, text)))
    trained = find_backbone(load_model(run_dir / "model.keras"))
    for mine, theirs in zip(backbone.get_weights(), trained.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    with pytest.raises(WeightsError, match=r"does not match 'mobilenet_v2'.*first difference at "
                                           r"Conv1/kernel"):
        build_backbone(mobilenet_recipe(tmp_path, weights=str(run_dir / "model.keras")))


def test_fine_tuning_keeps_batchnorm_frozen_and_the_lower_layers_fixed(tmp_path):
    import keras
    from tledge.data import load_splits
    from tledge.model import find_backbone
    from tledge.train.stage import train_model
    source = keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False,
                                            weights=None, alpha=0.35)
    source.save_weights(tmp_path / "start.weights.h5")
    recipe = mobilenet_recipe(tmp_path, weights="start.weights.h5", unfreeze=20)
    model, history = train_model(recipe, load_splits(recipe.data, seed=0), verbose=0)
    backbone = find_backbone(model)
    changed = []
    for layer, before in zip(backbone.layers, source.layers):
        moved = any(not np.array_equal(a, b)
                    for a, b in zip(layer.get_weights(), before.get_weights()))
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not moved, f"BatchNorm {layer.name} changed during training"
        elif moved:
            changed.append(layer.name)
    top = {layer.name for layer in backbone.layers[-20:]}
    assert changed and set(changed) <= top, changed
    fine_tune = history["phases"][1]
    assert fine_tune["name"] == "fine_tune" and len(fine_tune["epochs"]) == 1
    assert fine_tune["trainable_params"] > history["phases"][0]["trainable_params"]


def test_a_fine_tune_that_made_things_worse_is_undone_loudly():
    from tledge.train.stage import PhaseResult, _verdict
    extraction = PhaseResult("feature_extraction", [], 3, 0.80, 1.0, 1.0, 1, 1)
    worse = PhaseResult("fine_tune", [], 2, 0.60, 1.0, 1.0, 1, 1)
    verdict = _verdict([extraction, worse])
    assert verdict["kept"] == "feature_extraction" and verdict["regressed"]
    assert "FINE-TUNING MADE THE MODEL WORSE" in verdict["message"]
    assert "0.600" in verdict["message"] and "0.800" in verdict["message"]
    better = PhaseResult("fine_tune", [], 2, 0.85, 1.0, 1.0, 1, 1)
    assert _verdict([extraction, better]) == {"kept": "fine_tune", "regressed": False,
                                              "message": ""}


def test_weights_from_another_recipe_train_it_first_then_reuse_it(tmp_path):
    from tledge.stages import train_run
    tiny = SMALL_RECIPE.format(name="base", epochs=1, threads=1).replace(
        "samples_per_class = 60", "samples_per_class = 8")
    write_recipe(tmp_path, tiny, name="base.toml")
    child = tiny.replace('name = "base"', 'name = "child"').replace(
        'weights = "none"', 'weights = "base.toml"').replace(
        "[export]", "[train.fine_tune]\nepochs = 1\nunfreeze = 4\n\n[export]")
    recipe = load_recipe(write_recipe(tmp_path, child, name="child.toml"))
    lines = []
    train_run(recipe, tmp_path / "models" / "child", log=lines.append, verbose=0)
    assert (tmp_path / "models" / "base" / "model.keras").is_file()
    assert any("training it first" in line for line in lines)
    manifest = json.loads((tmp_path / "models" / "child" / "manifest.json").read_text())
    assert manifest["stages"]["train"]["weights_from"].endswith("base/model.keras")
    lines.clear()
    train_run(recipe, tmp_path / "models" / "child", log=lines.append, verbose=0)
    assert any("reusing the trained model of base" in line for line in lines)


def test_recipes_whose_weights_refer_to_each_other_are_a_cycle(tmp_path):
    from tledge.stages import train_run
    for name, other in (("left", "right"), ("right", "left")):
        write_recipe(tmp_path, SMALL_RECIPE.format(name=name, epochs=1, threads=1).replace(
            'weights = "none"', f'weights = "{other}.toml"'), name=f"{name}.toml")
    with pytest.raises(RecipeError, match="cycle: left.toml -> right.toml -> left.toml"):
        train_run(load_recipe(tmp_path / "left.toml"), tmp_path / "models" / "left",
                  log=lambda line: None)
