"""The pretrained backbone the checkout ships (`models/quickstart_pretrain`): it is the model
`recipes/quickstart_pretrain.toml` trains, so `tledge build recipes/quickstart.toml` reuses it
instead of training it again (what makes the quickstart a few minutes), and it is as good as its
run says. Delete the folder and the quickstart trains it again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "quickstart_pretrain"


def test_the_quickstart_reuses_the_shipped_backbone_as_its_recipe_trains_it():
    """The two conditions under which a build reuses a weights recipe's run (`resolve_weights`):
    a trained model.keras whose sha256 is the manifest's, trained with the hash the recipe and
    its data give now. A change to the recipe, the data generator or the hash fails here: train
    it again (`tledge train recipes/quickstart_pretrain.toml`) and commit the run."""
    from tledge.recipe.load import load_recipe
    from tledge.rundir import read_manifest
    from tledge.stages import models_root, train_hash, trained_model
    quickstart = load_recipe(ROOT / "recipes" / "quickstart.toml")
    assert Path(quickstart.model.weights).resolve() == \
        (ROOT / "recipes" / "quickstart_pretrain.toml").resolve()
    assert models_root(ROOT / "models" / "quickstart") / "quickstart_pretrain" == SHIPPED
    recipe = load_recipe(ROOT / "recipes" / "quickstart_pretrain.toml")
    assert trained_model(SHIPPED) == SHIPPED / "model.keras"
    assert read_manifest(SHIPPED)["stages"]["train"]["hash"] == train_hash(recipe, [])


def test_the_shipped_backbone_is_as_accurate_as_its_run_says():
    from tledge.data import load_splits
    from tledge.model import load_model, predict_in_batches
    from tledge.recipe.load import load_recipe
    recipe = load_recipe(ROOT / "recipes" / "quickstart_pretrain.toml")
    splits = load_splits(recipe.data, seed=recipe.seed)
    model = load_model(SHIPPED / "model.keras")
    predicted = predict_in_batches(model, splits.x_test).argmax(axis=1)
    accuracy = float(np.mean(predicted == splits.y_test))
    recorded = json.loads((SHIPPED / "history.json").read_text())["test_accuracy"]
    # trained on an AVX2 CPU; another CPU's float kernels round differently, which can move
    # an image that sits on a class boundary: one image of the 200, no more
    assert abs(accuracy - recorded) <= 1 / len(splits.y_test) + 1e-9, (accuracy, recorded)
    assert accuracy >= 0.8  # eight shapes: chance is 0.125
