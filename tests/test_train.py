"""Training in depth: bottlenecks, schedules, early stopping, class weights, augmentation,
the baseline, distribution, mixed precision, resume and skipping stages that are current."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import SMALL_RECIPE, THREADS, write_recipe
from tledge.recipe.load import load_recipe

TRANSFER_TABLES = """
[train.feature_extraction]
epochs = {fe_epochs}
learning_rate = {fe_lr}
{fe_extra}

[train.fine_tune]
epochs = {ft_epochs}
learning_rate = {ft_lr}
unfreeze = 6
{ft_extra}
"""


def transfer_recipe(folder, base_model, *, name="transfer", fe_epochs=3, ft_epochs=0,
                    fe_lr=3e-3, ft_lr=1e-4, fe_extra="", ft_extra="", train_extra="", extra_tables="", samples=30):
    """A small_cnn transfer recipe starting from `base_model` (a trained .keras file)."""
    # the bench at the machine's thread count: in-process (isolate = false), Keras times only there
    text = SMALL_RECIPE.format(name=name, epochs=fe_epochs, threads=THREADS)
    text = text.replace('weights = "none"', f'weights = "{base_model}"')
    text = text.replace("samples_per_class = 60", f"samples_per_class = {samples}")
    head, rest = text.split("[train.feature_extraction]", 1)
    rest = rest.split("[export]", 1)[1]
    tables = TRANSFER_TABLES.format(fe_epochs=fe_epochs, ft_epochs=ft_epochs, fe_lr=fe_lr, ft_lr=ft_lr,
                                    fe_extra=fe_extra, ft_extra=ft_extra)
    text = head + f"[train]\n{train_extra}\n" + tables + extra_tables + "\n[export]" + rest
    return load_recipe(write_recipe(folder, text, name=f"{name}.toml"))


@pytest.fixture(scope="module")
def base_model(built_run):
    return built_run[0] / "model.keras"


def train(recipe, **kwargs):
    from tledge.data import load_splits
    from tledge.train.stage import train_model
    splits = load_splits(recipe.data, seed=recipe.seed)
    model, history = train_model(recipe, splits, verbose=0, log=lambda line: None, **kwargs)
    return model, history, splits


def test_bottlenecks_train_the_same_head_and_are_cached(base_model, tmp_path):
    cached = transfer_recipe(tmp_path, base_model, fe_epochs=4)
    plain = transfer_recipe(tmp_path, base_model, name="plain", fe_epochs=4,
                            train_extra='cache_bottlenecks = "never"')
    _, with_cache, _ = train(cached, cache_dir=tmp_path / "cache")
    _, without, _ = train(plain)
    first = with_cache["phases"][0]
    assert first["bottlenecks"] == "computed" and without["phases"][0]["bottlenecks"] is None
    assert abs(first["best_val_accuracy"] - without["phases"][0]["best_val_accuracy"]) <= 0.15
    assert abs(with_cache["test_accuracy"] - without["test_accuracy"]) <= 0.15
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    _, again, _ = train(cached, cache_dir=tmp_path / "cache")
    assert again["phases"][0]["bottlenecks"] == "cached"


def test_augmentation_turns_the_cache_off_unless_the_recipe_allows_it(base_model, tmp_path):
    from tledge.train.stage import _use_bottlenecks
    augmented = transfer_recipe(tmp_path, base_model).data.augment.__class__(flip="horizontal")
    import dataclasses
    recipe = transfer_recipe(tmp_path, base_model)
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, augment=augmented))
    assert not _use_bottlenecks(recipe)
    always = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train,
                                                                    cache_bottlenecks="always"))
    assert _use_bottlenecks(always)


def test_the_head_on_cached_features_equals_the_full_model(base_model, tmp_path):
    from tledge.train.bottlenecks import compute_features, feature_extractor, head_model
    model, _, splits = train(transfer_recipe(tmp_path, base_model, fe_epochs=1))
    images = splits.x_test[:8]
    features = compute_features(feature_extractor(model), images)
    np.testing.assert_allclose(head_model(model)(features, training=False).numpy(),
                               model(images.astype(np.float32), training=False).numpy(),
                               atol=1e-5)


def test_cosine_warmup_rises_then_falls_and_plateau_halves(base_model, tmp_path):
    cosine = transfer_recipe(tmp_path, base_model, fe_epochs=6,
                             fe_extra='schedule = "cosine"\nwarmup_epochs = 2')
    _, history, _ = train(cosine)
    rates = [row["learning_rate"] for row in history["phases"][0]["epochs"]]
    assert rates[0] < rates[1] and rates[1] == pytest.approx(3e-3, rel=0.05)
    assert rates[-1] < rates[2] < rates[1]


def test_early_stopping_ends_a_phase_that_stops_improving(base_model, tmp_path):
    recipe = transfer_recipe(tmp_path, base_model, fe_epochs=30, fe_lr=0.0,
                             fe_extra="early_stopping = 1")
    _, history, _ = train(recipe)
    phase = history["phases"][0]
    assert phase["stopped_early"] and len(phase["epochs"]) < 30


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "rmsprop"])
def test_every_optimizer_trains_with_label_smoothing(base_model, tmp_path, optimizer):
    recipe = transfer_recipe(tmp_path, base_model, fe_epochs=1, ft_epochs=1,
                             ft_extra=f'optimizer = "{optimizer}"\nlabel_smoothing = 0.1')
    _, history, _ = train(recipe)
    assert history["phases"][1]["epochs"][0]["loss"] > 0


def test_balanced_class_weights():
    from tledge.data.feed import class_weights
    weights = class_weights(np.array([0, 0, 0, 1, 2, 2]), 4)
    np.testing.assert_allclose(weights, [6 / 9, 2.0, 1.0, 0.0])
    assert np.sum(weights[[0, 0, 0, 1, 2, 2]]) == pytest.approx(6.0)


def test_augmentation_layers_change_training_images_only_within_pixel_range():
    from tledge.data.feed import augmentation, make_dataset
    from tledge.recipe.spec import AugmentRecipe
    augment = augmentation(AugmentRecipe(flip="horizontal", rotation=0.1, zoom=0.1,
                                         translation=0.1, contrast=0.3, brightness=0.2), seed=0)
    assert len(augment.layers) == 6
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(8) % 2
    batch, _ = next(iter(make_dataset(images, labels, 2, batch_size=8, seed=0, augment=augment)))
    plain, _ = next(iter(make_dataset(images, labels, 2, batch_size=8, seed=0)))
    assert not np.array_equal(batch.numpy(), plain.numpy())
    assert np.array_equal(plain.numpy(), images.astype(np.float32))
    assert batch.numpy().min() >= 0 and batch.numpy().max() <= 255
    assert augmentation(AugmentRecipe(), seed=0) is None


def test_fine_tune_that_regresses_restores_the_extraction_weights(base_model, tmp_path):
    recipe = transfer_recipe(tmp_path, base_model, fe_epochs=4, ft_epochs=2, ft_lr=5.0,
                             ft_extra='optimizer = "sgd"')
    model, history, splits = train(recipe)
    verdict = history["verdict"]
    assert verdict["regressed"] and verdict["kept"] == "feature_extraction"
    from tledge.train.stage import evaluate
    assert evaluate(model, splits.x_val, splits.y_val) == pytest.approx(
        history["phases"][0]["best_val_accuracy"], abs=1e-6)


def test_baseline_is_trained_and_reported_beside_the_transfer(base_model, tmp_path):
    from tledge.stages import train_run
    from tledge.report.document import report_run
    recipe = transfer_recipe(tmp_path, base_model, fe_epochs=2,
                             extra_tables="[baseline]\nepochs = 2\n")
    run_dir = train_run(recipe, tmp_path / "run", log=lambda line: None, verbose=0)
    history = json.loads((run_dir / "history.json").read_text())
    assert history["baseline"]["backbone"] == "small_cnn"
    assert len(history["baseline"]["phase"]["epochs"]) == 2
    assert 0.0 <= history["baseline"]["test_accuracy"] <= 1.0
    # the baseline is a run directory of its own, which later stages export and judge
    assert (run_dir / "baseline" / "model.keras").is_file()
    baseline = json.loads((run_dir / "baseline" / "manifest.json").read_text())
    assert [entry["name"] for entry in baseline["artifacts"]] == ["keras"]
    assert baseline["recipe"]["name"] == "transfer.baseline"
    report = report_run(run_dir).read_text()
    assert "Transfer against a from-scratch baseline" in report
    assert "baseline (small_cnn, from scratch)" in report


def test_a_baseline_that_beats_the_transfer_is_exported_judged_and_shipped(base_model,
                                                                           tmp_path):
    from tledge.stages import build
    from tledge.rundir import read_manifest
    # a transfer head trained at a learning rate too small to learn: the baseline wins
    recipe = transfer_recipe(tmp_path, base_model, fe_epochs=1, fe_lr=1e-7, samples=60,
                             extra_tables="[baseline]\nepochs = 12\nlearning_rate = 3e-3\n")
    lines = []
    run_dir, _ = build(recipe, out=tmp_path / "run", log=lines.append, verbose=0)
    history = json.loads((run_dir / "history.json").read_text())
    assert history["baseline"]["test_accuracy"] > history["test_accuracy"] + 0.1
    baseline = run_dir / "baseline"
    exported = {entry["name"] for entry in read_manifest(baseline)["artifacts"]}
    assert {"keras", "tflite_fp32", "tflite_int8", "onnx_fp32"} <= exported
    assert (baseline / "parity.json").is_file() and (baseline / "bench.json").is_file()
    pick = read_manifest(run_dir)["pick"]
    assert pick["model"] == "baseline", pick  # the report calls the transfer worse: not shipped
    parity = json.loads((baseline / "parity.json").read_text())
    assert any(row["artifact"] == pick["artifact"] and row["status"] in ("passed", "reference")
               for row in parity["rows"])
    report = (run_dir / "report.md").read_text()
    assert f"**Ship `baseline/{pick['artifact']}` on {pick['runtime']}**" in report
    assert "of the most accurate model (weighed: this run's model, baseline)" in report
    # the trade is stated when the fastest or the most accurate of all is not the pick (the
    # two models are the same small_cnn: which is fastest is the timing's to say)
    assert ("The trade: picked" in report) == bool(pick["alternatives"]), pick["alternatives"]
    # a second build finds every stage of both models current
    again = []
    build(recipe, out=run_dir, log=again.append, verbose=0)
    for stage in ("export", "validate", "bench"):
        assert any(line.startswith(f"== {stage}: up to date") for line in again), again
        assert any(line.startswith(f"== {stage} (baseline): up to date") for line in again)
    # asked for the fastest of any model, the pick may be the transfer's
    text = open(recipe.path).read() + "\n[pick]\nmax_accuracy_drop = 1.0\n"
    open(recipe.path, "w").write(text)
    lines = []
    build(recipe.path, out=run_dir, log=lines.append, verbose=0)
    assert "== bench" in lines  # what the pick weighs changed: the run's bench ran again
    pick = read_manifest(run_dir)["pick"]
    candidates = [row for folder in (run_dir, baseline)
                  for row in json.loads((folder / "bench.json").read_text())["rows"]
                  if row["status"] == "ok"]
    assert pick["p50_ms"] <= min(row["p50_ms"] for row in candidates
                                 if row["artifact"] == "keras") + 1e-9
    if pick["model"] == "model":  # then the report says what that costs
        report = (run_dir / "report.md").read_text()
        assert "points less accurate than the best one (allowed by [pick] " \
               "max_accuracy_drop = 1.0)" in report


def test_report_says_loudly_when_the_baseline_wins():
    from tledge.report.document import baseline_warning
    history = {"test_accuracy": 0.33, "baseline": {"test_accuracy": 0.63}}
    assert "THE FROM-SCRATCH BASELINE BEATS THE TRANSFER MODEL: 63.0% against 33.0%" in \
        baseline_warning(history)
    assert baseline_warning({"test_accuracy": 0.7, "baseline": {"test_accuracy": 0.6}}) == ""


MIRRORED = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * {n})
from tledge.data import load_splits
from tledge.recipe.load import load_recipe
from tledge.train.stage import train_model
from tledge.errors import TrainError
recipe = load_recipe(sys.argv[1])
try:
    model, history = train_model(recipe, load_splits(recipe.data, seed=0), verbose=0)
except TrainError as error:
    print("TRAIN-ERROR", error)
else:
    print("DEVICES", history["devices"], "ACCURACY", history["test_accuracy"])
"""


@pytest.mark.parametrize("devices", [2, 1])
def test_mirrored_strategy_on_logical_cpus(tmp_path, devices):
    text = SMALL_RECIPE.format(name="mirror", epochs=2, threads=1).replace(
        "[export]", '[train]\ndistribute = "mirrored"\n\n[export]').replace(
        "samples_per_class = 60", "samples_per_class = 16")
    path = write_recipe(tmp_path, text)
    result = subprocess.run([sys.executable, "-c", MIRRORED.format(n=devices), str(path)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if devices == 2:
        assert "DEVICES 2" in result.stdout, result.stdout + result.stderr[-2000:]
    else:
        assert "TRAIN-ERROR" in result.stdout and "needs at least 2 devices" in result.stdout


def test_multi_worker_without_tf_config_is_a_clear_error(tmp_path, monkeypatch):
    from tledge.train.distribute import strategy_for
    from tledge.errors import TrainError
    monkeypatch.delenv("TF_CONFIG", raising=False)
    recipe = load_recipe(write_recipe(tmp_path, SMALL_RECIPE.format(
        name="multi", epochs=1, threads=1).replace(
        "[export]", '[train]\ndistribute = "multi_worker"\n\n[export]')))
    with pytest.raises(TrainError, match="TF_CONFIG"):
        strategy_for(recipe.train)


def test_mixed_precision_trains_and_hands_over_a_float32_model(tmp_path):
    import keras
    text = SMALL_RECIPE.format(name="mixed", epochs=1, threads=1).replace(
        "[export]", "[train]\nmixed_precision = true\n\n[export]").replace(
        "samples_per_class = 60", "samples_per_class = 8")
    with pytest.warns(UserWarning, match="without a GPU"):
        model, history, _ = train(load_recipe(write_recipe(tmp_path, text)))
    assert keras.mixed_precision.global_policy().name == "float32"
    assert {w.dtype for w in model.weights} == {"float32"}
    assert all(layer.compute_dtype == "float32" for layer in model.layers)


def test_a_second_build_skips_current_stages_and_force_redoes_them(base_model, tmp_path):
    from tledge.stages import build
    recipe = transfer_recipe(tmp_path, base_model, fe_epochs=1, ft_epochs=1, samples=10)
    text = open(recipe.path).read().replace("calibration_samples = 64",
                                            "calibration_samples = 64\nsavedmodel = true")
    open(recipe.path, "w").write(text)  # a folder artifact must not make export look stale
    lines = []
    build(recipe.path, out=tmp_path / "run", log=lines.append, verbose=0)
    assert (tmp_path / "run" / "bench.json").is_file()
    assert (tmp_path / "run" / "saved_model" / "saved_model.pb").is_file()
    lines.clear()
    build(recipe.path, out=tmp_path / "run", log=lines.append, verbose=0)
    skipped = [line for line in lines if "up to date" in line]
    assert len(skipped) == 5, lines  # train, export, validate, bench, explain
    lines.clear()
    build(recipe.path, out=tmp_path / "run", log=lines.append, verbose=0, force=True)
    assert not [line for line in lines if "up to date" in line]
    assert any(line.startswith("== train") for line in lines)


def test_a_changed_section_redoes_its_stage_and_the_ones_after(base_model, tmp_path):
    from tledge.stages import build
    recipe = transfer_recipe(tmp_path, base_model, fe_epochs=1, samples=10)
    build(recipe.path, out=tmp_path / "run", log=lambda line: None, verbose=0)
    text = open(recipe.path).read().replace("min_runs = 5", "min_runs = 6")
    open(recipe.path, "w").write(text)
    lines = []
    build(recipe.path, out=tmp_path / "run", log=lines.append, verbose=0)
    skipped = {line.split()[1].rstrip(":") for line in lines if "up to date" in line}
    assert skipped == {"train", "export", "validate", "explain"}  # bench and report redone


def test_a_build_killed_mid_training_resumes_from_its_last_epoch(tmp_path):
    from tests_support import killed_training
    command, run_dir, state = killed_training(tmp_path, "killed", epochs=20, samples=30,
                                              after=3)
    done = len(json.loads(state.read_text())["rows"])
    assert not (run_dir / "model.keras").exists()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from the checkpoints" in result.stdout, result.stdout[-2000:]
    history = json.loads((run_dir / "history.json").read_text())
    phase = history["phases"][0]
    assert phase["resumed_from_epoch"] >= done, (phase["resumed_from_epoch"], done)
    assert [row["epoch"] for row in phase["epochs"]] == list(range(1, 21))
    assert not (run_dir / "checkpoints").exists()


def test_unfreeze_by_count_name_or_all_and_batchnorm_on_request():
    import keras
    from tledge.backbones import BACKBONES
    from tledge.errors import TrainError
    from tledge.train.stage import unfreeze_top
    backbone = BACKBONES["small_cnn"].create((32, 32))

    def trainable_names():
        return [layer.name for layer in backbone.layers if layer.trainable and layer.weights]
    is_bn = {layer.name: isinstance(layer, keras.layers.BatchNormalization)
             for layer in backbone.layers}
    unfreeze_top(backbone, 3, "small_cnn")
    assert trainable_names() == [backbone.layers[-3].name]  # conv; its BN stays frozen
    name = backbone.layers[5].name
    unfreeze_top(backbone, name, "small_cnn")
    assert all(not is_bn[n] for n in trainable_names())
    assert trainable_names()[0] == next(l.name for l in backbone.layers[5:] if l.weights
                                        and not is_bn[l.name])
    count = unfreeze_top(backbone, "all", "small_cnn", batchnorm="train")
    assert count == sum(bool(layer.weights) for layer in backbone.layers)
    assert any(is_bn[n] for n in trainable_names())
    # (not a numbered name like conv2d_99: Keras numbers layers per process, and a worker
    # that built a hundred convolutions before this test has one)
    with pytest.raises(TrainError, match="no layer 'conv2d_none'"):
        unfreeze_top(backbone, "conv2d_none", "small_cnn")


def test_plateau_halves_a_stalled_learning_rate(base_model, tmp_path):
    recipe = transfer_recipe(tmp_path, base_model, fe_epochs=6, fe_lr=1e-9,
                             fe_extra='schedule = "plateau"')
    _, history, _ = train(recipe)
    rates = [row["learning_rate"] for row in history["phases"][0]["epochs"]]
    assert rates[0] == pytest.approx(1e-9) and rates[-1] < rates[0]


def test_class_weights_and_jit_compile_train(base_model, tmp_path):
    recipe = transfer_recipe(tmp_path, base_model, fe_epochs=1, ft_epochs=1,
                             train_extra='class_weight = "balanced"\njit_compile = true')
    _, history, _ = train(recipe)
    assert len(history["phases"][1]["epochs"]) == 1


MULTI_WORKER = """
import json, os, socket, sys
with socket.socket() as probe:
    probe.bind(("localhost", 0))
    port = probe.getsockname()[1]
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{port}"]},
                                      "task": {"type": "worker", "index": 0}})
from tledge.data import load_splits
from tledge.recipe.load import load_recipe
from tledge.train.stage import train_model
recipe = load_recipe(sys.argv[1])
model, history = train_model(recipe, load_splits(recipe.data, seed=0), verbose=0)
print("STRATEGY", history["distribute"], "DEVICES", history["devices"])
"""


def test_multi_worker_strategy_runs_as_a_one_worker_cluster(tmp_path):
    text = SMALL_RECIPE.format(name="multi", epochs=1, threads=1).replace(
        "[export]", '[train]\ndistribute = "multi_worker"\n\n[export]').replace(
        "samples_per_class = 60", "samples_per_class = 8")
    path = write_recipe(tmp_path, text)
    result = subprocess.run([sys.executable, "-c", MULTI_WORKER, str(path)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert "STRATEGY multi_worker DEVICES 1" in result.stdout, result.stderr[-2000:]
