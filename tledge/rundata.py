"""What later stages read back from a run directory: its recipe and its data split."""

from __future__ import annotations

from pathlib import Path

from tledge.errors import RunDirError
from tledge.recipe import load_recipe
from tledge.rundir import RECIPE, SPLIT, check_run_dir, read_json


def run_recipe(run_dir):
    """The resolved recipe a run was made from (stored in the run directory)."""
    return load_recipe(check_run_dir(run_dir) / RECIPE)


def run_splits(run_dir, recipe=None):
    """Load the run's data again and check it is the data the run was trained on.

    Raises:
        RunDirError: the source now yields different images than when the run was made.
    """
    from tledge.data import load_splits
    recipe = recipe or run_recipe(run_dir)
    splits = load_splits(recipe.data, seed=recipe.seed)
    recorded = read_json(Path(run_dir) / SPLIT)
    if recorded.get("fingerprint") != splits.record.get("fingerprint"):
        raise RunDirError(f"the data of {recipe.data.source} source changed since {run_dir} was "
                          "trained (its fingerprint differs from split.json); retrain with "
                          "`tledge build` so validation compares like with like")
    return splits


def evaluation_split(splits):
    """(images, labels, name) of the split parity is judged on: test, else validation."""
    if len(splits.y_test):
        return splits.x_test, splits.y_test, "test"
    if len(splits.y_val):
        return splits.x_val, splits.y_val, "val"
    raise RunDirError("the run has neither a test nor a validation split to validate on; "
                      "set data.test_fraction > 0")
