"""Relocatable runs: what a run depends on is content, not where the checkout lives; a copied
run directory works wherever it is; a bench from another machine is not current here."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
from PIL import Image

from conftest import invoke, write_recipe

RECIPE = """
name = "moved"
seed = 0

[data]
source = "folder"
path = "photos"
image_size = [16, 16]
val_fraction = 0.2
test_fraction = 0.25
batch_size = 8

[model]
backbone = "small_cnn"
weights = "none"

[train.feature_extraction]
epochs = 3

[export]
tflite = ["fp32"]
onnx = ["fp32"]

[bench]
min_runs = 3
min_seconds = 0.0
warmup = 1
isolate = false
"""


def checkout(root):
    """A project folder: a recipe beside its photos (three colours, 12 of each)."""
    for label, name in enumerate(("red", "green", "blue")):
        (root / "photos" / name).mkdir(parents=True)
        for index in range(12):
            pixels = np.random.default_rng(100 * label + index).integers(0, 80, (20, 20, 3),
                                                                         dtype=np.uint8)
            pixels[..., label] += 150
            Image.fromarray(pixels).save(root / "photos" / name / f"{index}.png")
    return write_recipe(root, RECIPE)


def stages_redone(output) -> set:
    return {stage for stage in ("train", "export", "validate", "bench", "explain")
            if f"== {stage} " in output or f"== {stage}\n" in output}


def test_a_moved_checkout_and_a_copied_run_need_nothing_redone(tmp_path, monkeypatch):
    first = tmp_path / "first"
    recipe = checkout(first)
    result = invoke("build", recipe, "--out", first / "models" / "moved")
    assert result.exit_code == 0, result.output
    stored = (first / "models" / "moved" / "recipe.toml").read_text()
    manifest = json.loads((first / "models" / "moved" / "manifest.json").read_text())
    assert str(tmp_path) not in stored, stored  # the stored recipe's paths are relative...
    assert 'path = "../../photos"' in stored
    assert str(tmp_path) not in json.dumps(manifest["recipe"]) + json.dumps(manifest["stages"])

    # A copy of the whole checkout, made with new modification times on every file (as a
    # fresh clone or `cp -r` makes it), and the original gone: same content, same hashes
    second = tmp_path / "second"
    shutil.copytree(first, second, copy_function=shutil.copy)
    shutil.rmtree(first)
    result = invoke("build", second / "recipe.toml", "--out", second / "models" / "moved")
    assert result.exit_code == 0, result.output
    assert stages_redone(result.output) == set(), result.output
    assert "data: preparing" in result.output  # the copy's files were read, not trusted

    # The run directory alone, copied elsewhere, with the checkout (recipes and photos) and
    # the data cache gone: every command but training works from the images the run carries
    alone = shutil.copytree(second / "models" / "moved", tmp_path / "elsewhere" / "run")
    shutil.rmtree(second)
    monkeypatch.setenv("TLEDGE_CACHE_DIR", str(tmp_path / "empty-cache"))
    result = invoke("status", alone)
    assert result.exit_code == 0 and "STALE" not in result.output, result.output
    for command in (["export", "--format", "tflite", "--precision", "int8"], ["validate"], ["bench"],
                    ["explain"], ["report"], ["bundle", "--out", tmp_path / "b.zip"],
                    ["bench", "--pick"]):
        result = invoke(command[0], alone, *command[1:])
        assert result.exit_code == 0, (command, result.output)
    empty = tmp_path / "empty-cache"  # nothing was prepared: the carried images were read
    assert not empty.exists() or not any(empty.iterdir())
    result = invoke("status", alone, "--json")
    states = {stage["stage"]: stage["status"]
              for stage in json.loads(result.output)["runs"][0]["stages"]}
    assert result.exit_code == 0 and set(states.values()) == {"current"}, result.output
    result = invoke("train", alone)  # only training needs what the run was trained from
    assert result.exit_code == 2 and "photos" in result.output, result.output


def test_a_bench_from_another_machine_is_not_current_here(built_run, tmp_path, small_recipe,
                                                          monkeypatch):
    import tledge.bench.stage
    import tledge.core.machine
    run_dir = shutil.copytree(built_run[0], tmp_path / "run")
    result = invoke("build", small_recipe, "--out", run_dir)
    assert stages_redone(result.output) == set(), result.output
    real = tledge.core.machine.machine_facts
    # another machine, as every module that asks sees it (each holds its own name for it)
    for module in [module for name, module in sys.modules.items()
                   if name.startswith("tledge") and hasattr(module, "machine_facts")]:
        monkeypatch.setattr(module, "machine_facts",
                            lambda: {**real(), "cpu": "Another CPU", "isa": "AVX2"})
    result = invoke("build", small_recipe, "--out", run_dir)
    assert result.exit_code == 0, result.output
    assert stages_redone(result.output) == {"bench"}, result.output
    bench = json.loads((run_dir / "bench.json").read_text())
    assert bench["machine"]["cpu"] == "Another CPU" and bench["machine"]["isa"] == "AVX2"
    assert "Another CPU, AVX2" in (run_dir / "report.md").read_text()
