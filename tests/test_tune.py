"""`tledge tune`: the [tune] section, the study on Optuna (SQLite), trials that are tledge runs,
pruning, failed and interrupted trials, two workers on one study, the doctor's seed, the
Pareto front, best.toml and the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_usage_error, invoke, write_recipe

# small_cnn from scratch on three clear shapes: it learns within six epochs of 8 steps
TINY = """
name = "tiny"
seed = 0

[data]
source = "synthetic"
image_size = [16, 16]
val_fraction = 0.25
test_fraction = 0.25
batch_size = 8
synthetic = {{ classes = ["circle", "square", "hbars"], samples_per_class = 40, noise = 0.02 }}

[model]
backbone = "small_cnn"
weights = "none"

[train.feature_extraction]
epochs = {epochs}
learning_rate = 3e-3

[export]
tflite = ["fp32"]
onnx = []

[bench]
runtimes = ["litert"]
threads = [1]
warmup = 1
min_runs = 3
min_seconds = 0.0
isolate = false

[tune]
trials = {trials}
startup_trials = 1
prune_after_trials = 1
prune_after_epochs = 5
seed_from_doctor = false

[tune.space]
{space}
"""
SPACE = """train.feature_extraction.learning_rate = [3e-3, 0.0]
data.image_size = [[16, 16], [32, 32]]
model.backbone = ["small_cnn", "mobilenet_v2"]"""


def tiny(folder, *, trials=2, epochs=6, space=SPACE, extra=""):
    return write_recipe(folder, TINY.format(trials=trials, epochs=epochs, space=space) + extra,
                        "tiny.toml")


def load_study(study_dir, name="tiny"):
    import optuna
    return optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'study.db'}")


# -- the [tune] section ---------------------------------------------------------------------


def test_a_tune_section_is_checked_key_by_key(tmp_path):
    path = tiny(tmp_path, space="""train.distribute = ["none", "mirrored"]
train.fine_tune.learnig_rate = [1e-4, 1e-3]
model.dropout = [0.2]
train.fine_tune.learning_rate = { low = 1e-3, high = 1e-4 }
train.fine_tune.epochs = { low = 1.5, high = 4 }
train.fine_tune.optimizer = { low = 1, high = 2 }
train.feature_extraction.epochs = { low = 2, high = 12, step = 0.5 }""")
    result = invoke("check", path)
    assert result.exit_code == 2
    for fragment in ("tune.space.train.distribute: not searchable",
                     "tune.space.train.fine_tune.learnig_rate: not a recipe key",
                     "tune.space.model.dropout: expected at least two values",
                     "tune.space.train.fine_tune.learning_rate: low must be below high",
                     "tune.space.train.fine_tune.epochs: train.fine_tune.epochs takes whole",
                     "tune.space.train.fine_tune.optimizer: a range needs a numeric key",
                     "tune.space.train.feature_extraction.epochs.step: "
                     "train.feature_extraction.epochs takes whole numbers"):
        assert fragment in result.output, (fragment, result.output)


def test_each_searched_value_must_make_a_valid_recipe(tmp_path):
    path = tiny(tmp_path, space='model.alpha = [0.35, 0.5]\nmodel.backbone = ["small_cnn", '
                                '"nope"]')
    result = invoke("check", path)
    assert result.exit_code == 2
    assert "tune.space.model.backbone[1]: nope makes the recipe invalid" in result.output
    assert "tune.space.model.alpha[0]: 0.35 makes the recipe invalid" in result.output
    # a MobileNet among the backbones searched makes its width multiplier searchable
    path = tiny(tmp_path, space='model.alpha = [0.35, 0.5]\nmodel.backbone = ["small_cnn", '
                                '"mobilenet_v2"]\ndata.image_size = [[32, 32], [48, 48]]')
    assert invoke("check", path).exit_code == 0


def test_a_checked_recipe_with_tune_reads_back_and_builds_unchanged(tmp_path):
    """[tune] is no stage's input: it leaves every hash as it was, and `check` prints a
    [tune.space] that loads again as the same space."""
    from tledge.recipe.dump import dump_toml
    from tledge.recipe.load import load_recipe, parse_recipe
    import tomllib
    with_tune = load_recipe(tiny(tmp_path))
    text = (tmp_path / "tiny.toml").read_text()
    (tmp_path / "plain.toml").write_text(text[:text.index("[tune]")])
    plain = load_recipe(tmp_path / "plain.toml")
    assert with_tune.hash() == plain.hash()
    again = parse_recipe(tomllib.loads(dump_toml(with_tune.to_dict())), tmp_path / "x.toml")
    assert dict(again.tune.space) == dict(with_tune.tune.space)


def test_tune_times_on_a_runtime_the_exports_feed(tmp_path):
    path = tiny(tmp_path)
    text = path.read_text().replace("[tune]\n", '[tune]\nruntime = "onnxruntime"\n'
                                    "max_memory_mb = 50\n")
    path.write_text(text)
    result = invoke("check", path)
    assert result.exit_code == 2
    assert "tune.runtime: onnxruntime runs onnx files, and [export] makes none" in result.output
    assert "tune.max_memory_mb: " in result.output and "bench.isolate = true" in result.output


def test_tune_without_a_tune_section_says_what_to_add(tmp_path):
    text = TINY.format(trials=1, epochs=1, space="")
    path = write_recipe(tmp_path, text[:text.index("[tune]")], "plain.toml")
    assert_usage_error(invoke("tune", path), "needs a [tune] section")


def test_a_storage_that_cannot_be_opened_is_one_line(tmp_path):
    result = invoke("tune", tiny(tmp_path), "--out", tmp_path / "study", "--storage",
                    "nosuchdb://nowhere/x")
    assert_usage_error(result, "cannot open the study's storage nosuchdb://nowhere/x")


# -- the doctor's moves and the space -------------------------------------------------------


def test_a_dimension_moves_towards_the_doctors_target():
    from tledge.tune.space import Dimension
    rate = Dimension("train.fine_tune.learning_rate", low=1e-4, high=1e-3, log=True)
    assert rate.nearest(5e-4 / 3, 5e-4) == pytest.approx(5e-4 / 3)
    assert rate.nearest(1e-5, 1e-4) is None  # at its end already
    epochs = Dimension("train.fine_tune.epochs", choices=(6, 12, 18))
    assert epochs.nearest(18.0, 12) == 18
    assert epochs.nearest(13.0, 12) == 18  # the nearest choice that way
    assert epochs.nearest(4.0, 6) is None
    schedule = Dimension("train.fine_tune.schedule", choices=("constant", "cosine"))
    assert schedule.nearest("cosine", "constant") == "cosine"
    assert schedule.nearest("cosine", "cosine") is None


def test_the_front_and_the_best_trial():
    from tledge.tune.results import best_trial, front, weakest_choice

    def trial(number, value, p50, size, feasible=True, values=None):
        return {"number": number, "state": "complete", "value": value, "feasible": feasible,
                "deployable": {"p50_ms": p50, "size_kb": size} if feasible else None,
                "values": values or {}}
    trials = [trial(0, 0.90, 1.0, 600, values={"a": 1, "b": "x"}),
              trial(1, 0.95, 2.0, 600, values={"a": 1, "b": "y"}),
              trial(2, 0.89, 1.5, 700), trial(3, 0.97, 0.5, 900, feasible=False),
              trial(4, 0.85, 0.8, 600)]
    assert sorted(front(trials)) == [0, 1, 4]  # 2 is beaten by 0; 3 breaks a constraint
    assert best_trial(trials)["number"] == 1
    weakest = weakest_choice(trials[0], trials[1], {"a": 0.2, "b": 0.8})
    assert weakest == {"key": "b", "as_written": "x", "best": "y", "importance": 0.8}


# -- studies --------------------------------------------------------------------------------


def test_a_study_prunes_fails_and_extends(tmp_path):
    """Trial 0 is the recipe as written. Extended to 3 trials, with two queued by hand: one that
    cannot learn (learning rate 0) is pruned from its epochs' validation accuracy; one whose
    values make no valid recipe together (a MobileNet at 16x16) fails, and the study goes on.
    The report, best.toml and tuning.json say all of it; best.toml builds."""
    from tledge.tune.study import tune
    path = tiny(tmp_path, trials=1)
    study_dir = tmp_path / "study"
    first = tune(path, out=study_dir, log=lambda line: None)
    assert first.ran == 1 and first.best == study_dir / "best.toml"
    study = load_study(study_dir)
    assert study.trials[0].user_attrs["seed"] == "as written"
    run = study_dir / study.trials[0].user_attrs["run"]
    assert (run / "manifest.json").is_file() and (run / "bench.json").is_file()
    study.enqueue_trial({"train.feature_extraction.learning_rate": 0.0,
                         "data.image_size": "[16, 16]", "model.backbone": "small_cnn"})
    study.enqueue_trial({"train.feature_extraction.learning_rate": 3e-3,
                         "data.image_size": "[16, 16]", "model.backbone": "mobilenet_v2"})
    lines = []
    second = tune(path, out=study_dir, trials=3, log=lines.append)
    assert second.ran == 2, lines
    states = [trial.state.name for trial in load_study(study_dir).trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL"], lines
    summary = json.loads((study_dir / "tuning.json").read_text())
    failed = summary["trials"][2]
    assert "no valid recipe" in failed["error"] and "mobilenet_v2" in failed["error"]
    assert "below the median" in summary["trials"][1]["pruned"]
    assert summary["best"] == 0 and summary["front"] == [0]
    report = (study_dir / "report.md").read_text()
    assert "## Tuning" in report and "| 1 | sampled" in report and "pruned" in report
    assert (study_dir / "figures" / "tuning.png").is_file()
    assert "tuning.png" in (study_dir / "report.html").read_text() or \
        "data:image/png;base64" in (study_dir / "report.html").read_text()
    # the study has its trials: another call only writes the report again
    again = tune(path, out=study_dir, trials=3, log=lambda line: None)
    assert again.ran == 0 and "has its 3 trials" in again.stopped
    # a cause that fails every trial stops the worker after three, saying which
    for _ in range(3):
        load_study(study_dir).enqueue_trial({"train.feature_extraction.learning_rate": 3e-3,
                                             "data.image_size": "[16, 16]",
                                             "model.backbone": "mobilenet_v2"})
    stopped = tune(path, out=study_dir, trials=9, log=lambda line: None)
    assert stopped.ran == 3 and "3 trials in a row failed" in stopped.stopped
    assert "mobilenet_v2" in stopped.stopped
    best = (study_dir / "best.toml").read_text()
    assert 'name = "tiny_tuned"' in best and "[tune" not in best
    result = invoke("build", study_dir / "best.toml", "--out", tmp_path / "best")
    assert result.exit_code == 0, result.output
    built = json.loads((tmp_path / "best" / "history.json").read_text())
    assert built["test_accuracy"] == summary["trials"][0]["test_accuracy"]  # trains the same
    # a list of values edited: Optuna cannot go on drawing it in this study
    from tledge.errors import RunDirError
    path.write_text(path.read_text().replace('model.backbone = ["small_cnn", "mobilenet_v2"]',
                                             'model.backbone = ["small_cnn", "resnet50"]'))
    with pytest.raises(RunDirError, match=r"\[tune.space\] model.backbone changed since"):
        tune(path, out=study_dir, log=lambda line: None)
    path.write_text(path.read_text().replace('"resnet50"]', '"mobilenet_v2"]'))
    # the recipe edited outside [tune]: its trials would not compare with the study's
    path.write_text(path.read_text().replace("epochs = 6", "epochs = 7"))
    with pytest.raises(RunDirError, match="another version of this recipe"):
        tune(path, out=study_dir, log=lambda line: None)


def _tune_process(recipe, out, *options):
    return subprocess.Popen([sys.executable, "-m", "tledge", "tune", str(recipe), "--out",
                             str(out), *map(str, options)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ})


def test_two_workers_share_one_study(tmp_path):
    """Two worker processes, each with a folder of its own (as on two hosts), share one
    SQLite study file: the trials are numbered once across both, both ran some, and each
    worker's report lists all of them. The study optimises accuracy and latency both."""
    path = tiny(tmp_path, trials=6, epochs=2,
                space="train.feature_extraction.learning_rate = { low = 1e-3, high = 1e-2, "
                      "log = true }")
    # both objectives: Optuna's multi-objective study (no pruning there), and a size no file
    # meets: every trial finishes outside the constraints
    path.write_text(path.read_text().replace(
        "[tune]\n", '[tune]\nobjective = "accuracy_and_latency"\nmax_size_kb = 1\n'))
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    workers = [_tune_process(path, tmp_path / f"worker{n}", "--storage", storage)
               for n in (1, 2)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):  # exit 1: none within the constraints
        assert worker.returncode == 1, (out, err)
        assert "no trial finished within the constraints" in out and "Traceback" not in err
    import optuna
    study = optuna.load_study(study_name="tiny", storage=storage)
    trials = study.get_trials()
    assert [trial.number for trial in trials] == list(range(6))
    assert all(trial.state.name == "COMPLETE" for trial in trials)  # finished, outside
    assert all(trial.constraints["size"] > 0 for trial in trials)
    assert all(trial.values[1] == trial.user_attrs["closest"]["p50_ms"] for trial in trials)
    # the workers drew apart: six trials, six learning rates
    assert len({trial.params["train.feature_extraction.learning_rate"] for trial in trials}) == 6
    pids = {trial.user_attrs["worker"].split()[-1] for trial in trials}
    assert pids == {str(worker.pid) for worker in workers}, outputs
    assert sum(trial.user_attrs["seed"] == "as written" for trial in trials) == 1
    for n in (1, 2):
        summary = json.loads((tmp_path / f"worker{n}" / "tuning.json").read_text())
        assert [trial["number"] for trial in summary["trials"]] == list(range(6))


def test_ctrl_c_keeps_what_is_done_and_tune_resumes(tmp_path):
    """SIGINT during the first trial's training: exit 130 and one message; the next `tledge
    tune` runs that trial again first, in the same run directory, its training resumed from
    its last finished epoch, and the interrupted trial does not count against the budget."""
    path = tiny(tmp_path, trials=2, epochs=12,
                space="train.feature_extraction.learning_rate = [3e-3, 1e-3]")
    study_dir = tmp_path / "study"
    process = _tune_process(path, study_dir)
    deadline, rows = time.time() + 300, 0
    while time.time() < deadline and process.poll() is None and rows < 3:
        for state in (study_dir / "trials").glob("*/checkpoints/*/from_scratch.state.json"):
            try:
                rows = len(json.loads(state.read_text())["rows"])
            except (OSError, ValueError):  # being replaced right now
                pass
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (out, err)
    assert "interrupted" in err and "tledge tune" in err and "Traceback" not in err
    study = load_study(study_dir)
    assert [trial.state.name for trial in study.trials] == ["FAIL", "WAITING"]  # queued again
    interrupted = study.trials[0]
    result = invoke("tune", path, "--out", study_dir)
    assert result.exit_code == 0, result.output
    assert "trial 0 again" in result.output
    study = load_study(study_dir)
    assert [trial.state.name for trial in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    again = study.trials[1]
    assert again.params == interrupted.params and again.user_attrs["seed"] == "as written"
    assert again.user_attrs["run"] == interrupted.user_attrs["run"]
    history = json.loads((study_dir / again.user_attrs["run"] / "history.json").read_text())
    assert history["phases"][0]["resumed_from_epoch"] >= 3


def test_an_imported_device_result_ranks_the_trials_it_timed(tmp_path):
    """[tune] device names a device whose result was imported into a trial's run (`tledge
    bench RUN --import`): the study's figures for that trial are the device's p50, marked so;
    a trial the device did not run keeps the host's."""
    import zipfile
    from tledge.tune.study import tune
    path = tiny(tmp_path, trials=1, epochs=1,
                space="train.feature_extraction.learning_rate = [3e-3, 1e-3]")
    study_dir = tmp_path / "study"
    tune(path, out=study_dir, log=lambda line: None)
    trial = json.loads((study_dir / "tuning.json").read_text())["trials"][0]
    assert trial["deployable"]["timed_on"] == "host"
    run = study_dir / trial["run"]
    assert invoke("bundle", run, "--out", tmp_path / "b.zip", "--images", "8").exit_code == 0
    with zipfile.ZipFile(tmp_path / "b.zip") as archive:
        archive.extractall(tmp_path / "device")
    done = subprocess.run([sys.executable, "-I", "bench_device.py", "--min-runs", "3",
                           "--min-seconds", "0", "--threads", "1", "--name", "pi"],
                          cwd=tmp_path / "device", capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    device = json.loads((tmp_path / "device" / "result.json").read_text())
    # the device names its runtime by module (ai_edge_litert, tflite_runtime)
    row = next(r for r in device["rows"] if r["artifact"] == "tflite_fp32" and r["status"] == "ok")
    assert invoke("bench", run, "--import", tmp_path / "device" / "result.json").exit_code == 0
    text = path.read_text().replace("[tune]\n", '[tune]\ndevice = "pi"\n')
    path.write_text(text)
    tune(path, out=study_dir, log=lambda line: None)  # no trial left: the report again
    trial = json.loads((study_dir / "tuning.json").read_text())["trials"][0]
    assert trial["deployable"]["timed_on"] == "pi"
    assert trial["deployable"]["p50_ms"] == pytest.approx(row["p50_ms"])
    assert "(pi)" in (study_dir / "report.md").read_text()


def test_trials_share_the_studys_cached_bottlenecks(tmp_path):
    """A pretrained backbone without augmentation trains feature extraction on cached
    features: the study keeps one cache, computed by the first trial, read by the next."""
    from tests_support import small_classifier
    from tledge.tune.study import tune
    small_classifier(tmp_path, classes=3, size=(16, 16)).save(tmp_path / "pre.keras")
    text = TINY.format(trials=1, epochs=2, space="train.fine_tune.learning_rate = [1e-3, 3e-4]")
    text = text.replace('weights = "none"', 'weights = "pre.keras"').replace(
        "[export]", "[train.fine_tune]\nepochs = 1\nlearning_rate = 1e-3\n\n[export]")
    path = write_recipe(tmp_path, text, "tiny.toml")
    study_dir = tmp_path / "study"
    tune(path, out=study_dir, log=lambda line: None)
    load_study(study_dir).enqueue_trial({"train.fine_tune.learning_rate": 3e-4})
    tune(path, out=study_dir, trials=2, log=lambda line: None)
    assert len(list((study_dir / "bottlenecks").glob("*.npz"))) == 1
    logs = sorted((study_dir / "logs").glob("trial-*.log"))
    assert "bottleneck features computed" in logs[0].read_text()
    assert "bottleneck features cached" in logs[1].read_text()
    assert not any((study_dir / "trials").glob("*/bottlenecks"))


def test_the_doctors_changes_on_the_recipe_as_written_are_queued_next():
    """Unstable fine-tuning and a head settled early (the quickstart's curves): the next two
    trials are the recipe as written with the cosine schedule, and with 3 feature-extraction
    epochs, each the nearest value the space holds."""
    import optuna
    from test_doctor import CASES, history, phase
    from tledge.tune.space import Dimension
    from tledge.tune.study import _seed_from_doctor
    from tledge.recipe.load import load_recipe
    found = [Dimension("train.fine_tune.schedule", choices=("constant", "cosine")),
             Dimension("train.feature_extraction.epochs", choices=(3, 8)),
             Dimension("train.fine_tune.learning_rate", low=1e-4, high=1e-3, log=True)]
    written = {"train.fine_tune.schedule": "constant", "train.feature_extraction.epochs": 8,
               "train.fine_tune.learning_rate": 5e-4}
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.set_user_attr("values", written)
    study.tell(trial, 0.9)
    curves = history(CASES["settled_early"]["phases"][0],
                     phase("fine_tune", [0.8, 0.85, 0.9, 0.92, 0.94, 0.95],
                           [0.86, 0.83, 0.9, 0.92, 0.87, 0.9], start=9, unfrozen_layers=52))
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "tune_quickstart.toml")
    lines = []
    _seed_from_doctor(study, recipe, found, study.trials[0], curves, log=lines.append)
    _seed_from_doctor(study, recipe, found, study.trials[0], curves, log=lines.append)
    assert len(study.get_trials()) == 3, lines  # once per study
    asked = [study.ask(), study.ask()]  # the queued trials come first, with their values
    assert [t.user_attrs["seed"] for t in asked] == ["doctor: unstable", "doctor: settled_early"]
    values = [{d.key: d.suggest(t) for d in found} for t in asked]
    assert values[0] == {**written, "train.fine_tune.schedule": "cosine"}
    assert values[1] == {**written, "train.feature_extraction.epochs": 3}


def test_a_gain_within_the_validation_splits_noise_is_called_so():
    """192 validation images cannot tell 0.927 from 0.938 (about ±4.4 points at 95 %); 2,000
    can tell 0.90 from 0.93."""
    from tledge.recipe.load import load_recipe
    from tledge.tune.results import report_text, validation_noise
    assert validation_noise(0.9375, 192) == pytest.approx(0.0436, abs=0.001)
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "tune_quickstart.toml")

    def trial(number, value, images):
        return {"number": number, "state": "complete", "seed": "sampled", "value": value,
                "values": {"model.dropout": 0.2}, "feasible": True, "test_accuracy": 0.92,
                "val_images": images, "error": None, "pruned": None, "seconds": 60,
                "points": [], "deployable": {"artifact": "tflite_int8", "runtime": "litert",
                                             "p50_ms": 0.07, "size_kb": 644,
                                             "test_accuracy": 0.92, "timed_on": "host"}}
    for images, value, called in ((192, 0.9375, True), (2000, 0.9527, False)):
        trials = [trial(0, 0.9271 if images == 192 else 0.90, images), trial(1, value, images)]
        summary = {"trials": trials, "best": 1, "as_written": 0, "front": [1], "threads": 2,
                   "space": {"model.dropout": "0.1 | 0.2"}, "weakest": None, "importances": {}}
        text = "\n".join(report_text(summary, recipe, None, None, "study"))
        assert ("Within the noise of the validation split" in text) is called, images
