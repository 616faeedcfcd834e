"""`build`: carry a recipe through every stage, and the train stage that starts a run.

    recipe ─▶ data ─▶ train ─▶ export ─▶ validate ─▶ bench ─▶ explain ─▶ report

Each stage is a plain function over the run directory; `build` calls them in order. A recipe
whose weights name another recipe gets that recipe trained first, into a sibling run
directory, unless a trained model is already there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from pathlib import Path

from tledge.bench.single_task import single_task_folders
from tledge.bench.stage import bench_run, pick_name
from tledge.data import load_splits
from tledge.data.sources import BAD_IMAGES, prepared_entry
from tledge.domains import target_data, target_splits
from tledge.errors import DataError, RecipeError, RunDirError, TledgeError, TrainError
from tledge.explain import explain_run
from tledge.export.stage import export_run
from tledge.formats import FORMATS
from tledge.model import load_model, written_size
from tledge.pipeline import (baseline_recipe, plan, run_states, single_task_recipe, STAGE,
                             STAGES)
from tledge.quiet import quiet
from tledge.recipe.dump import stored_recipe_text
from tledge.recipe.load import load_recipe, member_recipes
from tledge.recipe.rules import name_problem
from tledge.recipe.spec import Recipe
from tledge.records import read_bench, read_history, read_parity
from tledge.report.document import baseline_warning, report_run
from tledge.run_inputs import carry_inputs, evaluation_split, run_recipe, run_splits
from tledge.rundir import (artifact_entry, atomic_path, BENCH, DOMAINS, find_artifact, HISTORY,
                           INNER_RUNS, LOCK, MANIFEST, new_manifest, PARITY, portable,
                           read_manifest, RECIPE, record_stage, REPORT, run_lock,
                           set_artifact, sha256, SINGLE_TASK, SPLIT, verified_artifact,
                           write_json, write_manifest,
                           write_text)
from tledge.train.adabn import adapt_batchnorm
from tledge.train.distribute import worker_role
from tledge.train.ensemble import train_ensemble
from tledge.tasks import model_tasks
from tledge.train.stage import evaluate, train_baseline, train_model
from tledge.validate import validate_run

MODELS_DIR = Path("models")
STUDY, TRIALS = "study.json", "trials"  # a study of `tledge tune`: its marker, its runs


def default_run_dir(recipe) -> Path:
    return MODELS_DIR / recipe.name


def models_root(run_dir) -> Path:
    """The folder that holds a run directory and its siblings (an inline ensemble member,
    in `<ensemble>/members/<name>`, shares its ensemble's; a trial of `tledge tune`, in
    `<study>/trials/<trial>`, its study's)."""
    run_dir = Path(run_dir)
    if run_dir.parent.name == "members" or study_of(run_dir) is not None:
        return run_dir.parent.parent.parent
    return run_dir.parent


def study_of(run_dir) -> Path | None:
    """The study folder of a trial run directory of `tledge tune`, else None."""
    study = Path(run_dir).parent.parent
    return study if Path(run_dir).parent.name == TRIALS and (study / STUDY).is_file() else None


def bottleneck_dir(run_dir) -> Path:
    """Where a run caches its backbone's features: the trials of a study share their study's
    (the cache is keyed by backbone, weights, input size and data)."""
    study = study_of(run_dir)
    return (study if study is not None else Path(run_dir)) / "bottlenecks"


def trained_model(run_dir) -> Path | None:
    """The trained .keras file of a run directory, when it has one and it is the file its
    manifest records."""
    manifest_path = Path(run_dir) / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        entries = read_manifest(run_dir)["artifacts"]
    except RunDirError:  # damaged: that run is trained again
        return None
    for entry in entries:
        if entry["name"] == "keras" and entry.get("status") == "ok":
            try:
                return verified_artifact(run_dir, entry)
            except RunDirError:  # gone or changed since it was trained: trained again
                return None
    return None


def resolve_weights(recipe, run_dir, *, log=print, verbose="auto") -> Path | None:
    """When the recipe's weights name another recipe, the trained model file it supplies.

    The other recipe is trained first, into `<models root>/<its name>`, unless that
    directory already holds a model trained from the same recipe and starting weights.
    Loading a recipe refuses recipes that refer to each other in a cycle
    (`tledge.recipe.rules.recipe_cycle`), so this recursion ends.
    """
    weights = recipe.model.weights
    if not weights.endswith(".toml"):
        return None
    source = load_recipe(weights)
    source_dir = models_root(run_dir) / source.name
    source_weights = resolve_weights(source, source_dir, log=log, verbose=verbose)
    model_path = trained_model(source_dir)
    if model_path is not None:
        recorded = read_manifest(source_dir)["stages"].get("train", {}).get("hash")
        if recorded == train_hash(source, [source_weights] if source_weights else [], log=log):
            log(f"weights: reusing the trained model of {source.name} ({model_path})")
            return model_path
        log(f"weights: {source.name} changed since {source_dir} was trained; retraining it")
    else:
        log(f"weights: {source.name} is not trained yet; training it first into {source_dir}")
    train_run(source, source_dir, log=log, verbose=verbose)
    return trained_model(source_dir)


def prepare_run_dir(run_dir) -> Path:
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".tledge-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RunDirError(f"cannot write to {run_dir}: {error.strerror}; choose another "
                          "directory with --out") from None
    return run_dir


def train_hash(recipe, starting_files, *, log=None) -> str:
    """What the train stage depends on: its recipe sections, what its data holds (the
    prepared cache entry's pixel digests and labels, prepared now if the cache has none) and
    the files it starts from (a weights file, the model of a weights recipe, or an
    ensemble's member models). Content only: a moved or copied checkout hashes the same."""
    text = recipe.hash("seed", "data", "model", "train", "baseline", "ensemble")
    text += ":" + prepared_entry(recipe.data, recipe.seed, log=log).content_digest()
    weights = recipe.model.weights
    files = list(starting_files)
    if recipe.ensemble is None and Path(weights).is_absolute() and Path(weights).is_file() \
            and not weights.endswith(".toml"):
        files.append(weights)
    for path in files:
        text += ":" + sha256(path)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- ensemble members: each built as a run of its own --------------------------------------


def member_run_dir(recipe, member_recipe, run_dir) -> Path:
    """Where a member is built: beside the ensemble for a recipe file, inside it when inline."""
    if member_recipe.path and Path(member_recipe.path).resolve() != Path(recipe.path).resolve():
        return models_root(run_dir) / member_recipe.name
    return Path(run_dir) / "members" / member_recipe.name.split(".", 1)[1]


def build_members(recipe, run_dir, *, log=print, verbose="auto") -> list[dict]:
    """Build every member (stages that are current are skipped); describe each one."""
    members = []
    for member in member_recipes(recipe):
        member_dir = member_run_dir(recipe, member, run_dir)
        log(f"== member {member.name} -> {member_dir}")
        build(member, out=member_dir, log=lambda line: log(f"   {line}"), verbose=verbose)
        members.append(_describe_member(member, member_dir))
    return members


def _describe_member(member, member_dir) -> dict:
    """What the ensemble report shows of a member, read from its own run's records (each
    checked, its model file verified against its manifest)."""
    history = read_history(member_dir) or {}
    bench, parity = read_bench(member_dir), read_parity(member_dir)
    manifest = read_manifest(member_dir)
    own = parity.own_rows() if parity else {}
    accuracy = {name: row.accuracy for name, row in own.items()}
    status = {name: row.status for name, row in own.items()}
    latency = [{key: getattr(row, key) for key in ("artifact", "runtime", "threads", "batch",
                                                    "p50_ms", "p90_ms", "size_bytes")}
               for row in (bench.timed() if bench else [])]
    model = find_artifact(manifest, "keras")
    return {"name": member.name, "run_dir": str(member_dir.resolve()),
            "recipe": member.path, "backbone": member.model.backbone,
            "image_size": list(member.data.image_size), "labels": manifest["labels"],
            "model": str(verified_artifact(member_dir, model).resolve()),
            "sha256": model["sha256"], "test_accuracy": history.get("test_accuracy"),
            "accuracy": accuracy, "parity": status, "latency": latency}


def portable_members(members, run_dir) -> list[dict]:
    """Members as the ensemble's history.json keeps them: their paths relative to the
    ensemble's run directory (see `rundir.portable`)."""
    return [{**member, **{key: portable(member[key], run_dir)
                          for key in ("run_dir", "recipe", "model") if member.get(key)}}
            for member in members]


def starting_points(recipe, run_dir, *, log=print, verbose="auto"):
    """(files the model starts from, ensemble members or None), building what they need:
    the recipe named as weights, or every member of an ensemble."""
    if recipe.ensemble is not None:
        members = build_members(recipe, run_dir, log=log, verbose=verbose)
        return [Path(member["model"]) for member in members], members
    weights_file = resolve_weights(recipe, run_dir, log=log, verbose=verbose)
    return ([weights_file] if weights_file else []), None


def train_run(recipe, run_dir, *, log=print, verbose="auto", restart=False,
              starting=None) -> Path:
    """The train stage: data split, two-phase training (and the baseline), a fresh manifest.

    Every epoch is checkpointed under `checkpoints/<train hash>/`: a run killed mid-training
    resumes from its last finished epoch when the same recipe is trained again (unless
    `restart`). `starting` is what `starting_points` returned, when the caller has it.
    """
    role = worker_role(recipe.train)
    if not role.chief:
        return _train_as_worker(recipe, run_dir, role, log=log, verbose=verbose)
    # Nothing there but (at most) the lock this process is about to take: a run that never
    # gets a model leaves nothing behind
    created = not Path(run_dir).exists() or not set(os.listdir(run_dir)) - {LOCK}
    with run_lock(run_dir):
        return _train_locked(recipe, run_dir, created, log=log, verbose=verbose,
                             restart=restart, starting=starting)


def _train_locked(recipe, run_dir, created, *, log, verbose, restart, starting):
    run_dir = prepare_run_dir(run_dir)
    try:
        files, members = starting or starting_points(recipe, run_dir, log=log, verbose=verbose)
        weights_file = files[0] if files and members is None else None
        splits = load_splits(recipe.data, seed=recipe.seed, log=log, report_dir=run_dir)
        counts = ", ".join(f"{name} {len(labels)}" for name, labels in
                           (("train", splits.y_train), ("val", splits.y_val),
                            ("test", splits.y_test)))
        log(f"data: {recipe.data.source}, {splits.num_classes} classes, {counts}")
        start = time.perf_counter()
        train_key = train_hash(recipe, files)
        checkpoints = run_dir / "checkpoints" / train_key
        if restart:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        elif checkpoints.is_dir():
            log(f"train: resuming from the checkpoints in {checkpoints}")
        if members is not None:
            model, history = train_ensemble(recipe, splits, members, verbose=verbose, log=log)
        else:
            model, history = train_model(recipe, splits, weights_file=weights_file,
                                         verbose=verbose, checkpoint_dir=checkpoints,
                                         cache_dir=bottleneck_dir(run_dir), log=log)
    except TledgeError:
        if created:  # leave nothing behind for a run that never got a model...
            for path in run_dir.iterdir():
                if path.name in (LOCK, BAD_IMAGES):  # ...but the list the error points to
                    continue
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
        raise
    for line in filter(None, [history["verdict"]["message"]]):
        log("!" * 78 + f"\n{line}\n" + "!" * 78)
    baseline_model = None
    if recipe.baseline is not None:
        history["baseline"], baseline_model = train_baseline(recipe, splits, verbose=verbose,
                                                             log=log)
        for line in filter(None, [baseline_warning(history)]):
            log("!" * 78 + f"\n{line}\n" + "!" * 78)
    write_text(run_dir / RECIPE, stored_recipe_text(recipe, run_dir))
    write_json(run_dir / SPLIT, splits.record)
    if members is not None:
        history["ensemble"]["members"] = portable_members(history["ensemble"]["members"],
                                                          run_dir)
    write_json(run_dir / HISTORY, history)
    _remove_stale_outputs(run_dir)
    manifest = _trained_manifest(run_dir, recipe, model, splits)
    record_stage(manifest, "train", hash=train_key,
                 wall_seconds=round(time.perf_counter() - start, 1),
                 weights_from=[portable(path, run_dir) for path in files] if members
                 else portable(weights_file or recipe.model.weights, run_dir))
    write_manifest(run_dir, manifest)
    if baseline_model is not None:
        _write_baseline_run(run_dir, recipe, baseline_model, splits, train_key,
                            history["baseline"])
    if recipe.train.compare_single_task:
        _train_single_task(recipe, run_dir, splits, weights_file, train_key,
                           [task["name"] for task in model_tasks(recipe, splits.class_names)],
                           log=log, verbose=verbose)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    model_path = run_dir / FORMATS["keras"].file_name
    accuracy = history["test_accuracy"]
    log(f"train: wrote {model_path} ({time.perf_counter() - start:.0f} s"
        + (f", test accuracy {accuracy:.1%})" if accuracy is not None else ")"))
    return run_dir


def _trained_manifest(folder, recipe, model, splits) -> dict:
    """Save a trained model as `model.keras` in `folder` and return a new manifest listing it
    (not saved; the caller records the train stage)."""
    model_path = Path(folder) / FORMATS["keras"].file_name
    with atomic_path(model_path, needs=written_size(model)) as temporary, \
            quiet():
        model.save(temporary)
    manifest = new_manifest(recipe, folder, splits.class_names, recipe.data.image_size)
    spec = {"shape": [-1, *recipe.data.image_size, 3], "dtype": "float32", "range": [0, 255]}
    tasks = model_tasks(recipe, splits.class_names)
    output_spec = [{"name": task["name"], "shape": [-1, len(task["labels"])],
                    "dtype": "float32"} for task in tasks] if tasks else \
        {"name": "probabilities", "shape": [-1, splits.num_classes], "dtype": "float32"}
    if tasks:
        manifest["tasks"] = tasks
    entry = artifact_entry(folder, model_path, FORMATS["keras"],
                           recipe_hash=manifest["recipe"]["hash"], labels=splits.class_names,
                           input_spec={"name": model.inputs[0].name, **spec},
                           output_spec=output_spec, **({"tasks": tasks} if tasks else {}))
    set_artifact(manifest, entry)
    manifest["data"] = {"cache_key": splits.record["cache"]["key"],
                        "cache_root": splits.record["cache"]["root"],
                        "fingerprint": splits.record["fingerprint"],
                        "inputs": carry_inputs(folder, splits, recipe)}
    return manifest


BASELINE_DIR = INNER_RUNS[0]  # a run's [baseline] model: a run directory of its own inside it


def _write_baseline_run(run_dir, recipe, model, splits, train_key, summary) -> None:
    """The baseline model as `<run>/baseline/`, a run directory that the later stages export,
    validate and benchmark like the run itself, so the pick can ship it when it is better."""
    _write_inner_run(Path(run_dir) / BASELINE_DIR, baseline_recipe(recipe), model, splits,
                     f"{train_key}-baseline",
                     {"phases": [summary["phase"]], "backbone": summary["backbone"],
                      "pretrained": False, "test_accuracy": summary["test_accuracy"],
                      "baseline_of": ".."})


def _write_inner_run(folder, derived, model, splits, train_key, history) -> None:
    """Another model the build trained, as a run directory of its own inside the run."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_text(folder / RECIPE, stored_recipe_text(derived, folder))
    write_json(folder / SPLIT, splits.record)
    write_json(folder / HISTORY, history)
    manifest = _trained_manifest(folder, derived, model, splits)
    record_stage(manifest, "train", hash=train_key)
    write_manifest(folder, manifest)


def _train_single_task(recipe, run_dir, splits, weights_file, train_key, tasks, *, log,
                       verbose) -> None:
    """Train and write the single-task model of each of `tasks` on the run's split
    (`train.compare_single_task`), each a run directory in `single_task/<task>/`."""
    for name in tasks:
        derived = single_task_recipe(recipe, name)
        log(f"train: single-task model for '{name}' on the same split "
            "(train.compare_single_task)")
        model, history = train_model(derived, splits, weights_file=weights_file,
                                     verbose=verbose, cache_dir=bottleneck_dir(run_dir), log=log)
        _write_inner_run(run_dir / SINGLE_TASK / name, derived, model, splits,
                         f"{train_key}-{name}", {**history, "single_task_of": "../.."})
        log(f"train: wrote {SINGLE_TASK}/{name}/model.keras (test accuracy "
            f"{_percent(history['test_accuracy'])})")


def _complete_single_task(recipe, run_dir, starting, *, log, verbose) -> None:
    """A current multi-task run whose single-task models are missing, damaged or of another
    training (a build killed after the run's own model was written, a deleted folder, the
    comparison just switched on): train those, and only those; switched off, remove them."""
    if not recipe.train.compare_single_task:
        if (run_dir / SINGLE_TASK).is_dir():
            log(f"train: train.compare_single_task is off: removing {SINGLE_TASK}/")
            shutil.rmtree(run_dir / SINGLE_TASK, ignore_errors=True)
        return
    manifest = read_manifest(run_dir)
    train_key = manifest["stages"].get("train", {}).get("hash")
    missing = [task["name"] for task in manifest.get("tasks") or []
               if not _single_task_current(run_dir / SINGLE_TASK / task["name"],
                                           f"{train_key}-{task['name']}")]
    if not missing:
        return
    log(f"== train: the single-task model(s) of {', '.join(missing)} are missing or not of "
        "this training; training them again")
    splits = load_splits(recipe.data, seed=recipe.seed, log=log)
    files, _ = starting
    _train_single_task(recipe, run_dir, splits, files[0] if files else None, train_key, missing,
                       log=log, verbose=verbose)


def _single_task_current(folder, train_key) -> bool:
    try:
        manifest = read_manifest(folder)
        verified_artifact(folder, find_artifact(manifest, "keras"))
    except (RunDirError, KeyError, StopIteration):
        return False
    return manifest["stages"].get("train", {}).get("hash") == train_key


def candidate_runs(run_dir) -> list[Path]:
    """The run directory and those of the other models it trained (its baseline)."""
    baseline = Path(run_dir) / BASELINE_DIR
    return [Path(run_dir)] + ([baseline] if (baseline / MANIFEST).is_file() else []) + \
        list(single_task_folders(run_dir).values())


def _train_as_worker(recipe, run_dir, role, *, log, verbose):
    """A multi-worker run's non-chief task: train its shard in step with the others and
    write nothing; the chief writes the run directory. Returns None."""
    if recipe.ensemble is not None or recipe.model.weights.endswith(".toml"):
        raise RecipeError(recipe.path, ["train.distribute = \"multi_worker\": build the "
                                        "ensemble members or the weights recipe first, on one "
                                        "machine; workers train a single model"])
    splits = load_splits(recipe.data, seed=recipe.seed, log=log)
    log(f"train: worker {role.index} of {role.count}; the chief writes {run_dir}")
    train_model(recipe, splits, verbose=verbose, log=log)
    log(f"train: worker {role.index} done")
    return None


def _remove_stale_outputs(run_dir) -> None:
    """A new model makes every export, parity and bench result of the old one a lie: the
    files the manifest lists, or (when it is gone or damaged) every name tledge writes."""
    try:
        paths = [entry["path"] for entry in read_manifest(run_dir)["artifacts"]
                 if entry["name"] != "keras" and entry.get("path")]
    except RunDirError:
        paths = [row.file_name for row in FORMATS.values() if row.family != "keras"]
    for path in paths:
        stale = run_dir / path
        if stale.is_dir():  # a SavedModel folder
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    for name in (PARITY, BENCH, REPORT, DOMAINS):  # domains: the old model's evaluations
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / BASELINE_DIR, ignore_errors=True)  # trained again, if still asked
    shutil.rmtree(run_dir / SINGLE_TASK, ignore_errors=True)
    (run_dir / "baseline.keras").unlink(missing_ok=True)  # where earlier versions kept it


def set_aside_damaged_manifest(run_dir, log) -> None:
    """A manifest that is not what tledge wrote cannot vouch for any file of the run: keep it
    as `manifest.json.damaged` (evidence, not trusted) and say the run is trained again."""
    path = Path(run_dir) / MANIFEST
    if not path.exists() and not path.is_symlink():
        return
    try:
        read_manifest(run_dir)
        return
    except RunDirError as error:
        problem = str(error)
    aside = path.with_name(MANIFEST + ".damaged")
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside)
    else:
        aside.unlink(missing_ok=True)
    os.replace(path, aside)
    log(f"warning: {problem.split('; ')[0]}: nothing in the run can be trusted without it; "
        f"training again (the damaged file is kept as {aside.name})")


def build(recipe_path, *, out=None, log=print, verbose="auto", force=False):
    """Run every stage for a recipe (a file or a `Recipe`); returns (run_dir, parity report).

    A stage whose outputs exist with the hash of what it depends on is skipped, unless
    `force`; so a second build of an unchanged recipe only rewrites the report. One build
    at a time per run directory (`run_lock`).
    """
    recipe = recipe_path if isinstance(recipe_path, Recipe) else load_recipe(recipe_path)
    run_dir = Path(out) if out else default_run_dir(recipe)
    created = not run_dir.exists()
    try:
        with run_lock(run_dir):
            return _build_locked(recipe, run_dir, log=log, verbose=verbose, force=force)
    finally:
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # the lock's folder, for a build that wrote nothing


def _build_locked(recipe, run_dir, *, log, verbose, force):
    started = time.perf_counter()
    set_aside_damaged_manifest(run_dir, log)
    starting = starting_points(recipe, run_dir, log=log, verbose=verbose)
    expected = train_hash(recipe, starting[0], log=log)
    planned = plan(run_dir, recipe=recipe, expected_train=expected, force=force)
    log(f"plan: {', '.join(planned) or 'every stage is current'}; then the report"
        + (" (--force)" if force else ""))
    if _redo(run_dir, "train", recipe, run_dir, log=log, force=force, expected=expected,
             planned=planned):
        log(f"== train  {recipe.name} -> {run_dir}")
        train_run(recipe, run_dir, log=log, verbose=verbose, restart=force, starting=starting)
    else:  # the sections after train may have changed, and the stored copy may be damaged:
        write_text(run_dir / RECIPE, stored_recipe_text(recipe, run_dir))  # later stages read it
        _complete_single_task(recipe, run_dir, starting, log=log, verbose=verbose)
    parity = _after_training(run_dir, recipe, log=log, force=force, planned=planned)
    log(f"built {recipe.name} in {time.perf_counter() - started:.0f} s")
    return run_dir, parity


def _redo(folder, stage, recipe, run_dir, *, log, force, expected=None, planned=()) -> bool:
    """Whether a build runs `stage` of `folder` (the run or one of its sub-runs): the
    pipeline's table decides (`tledge.pipeline`), and a stage of the run's plan is run even
    when what it reads came out of an earlier stage unchanged (a build does what it said it
    would). The build says what it skips and why it redoes."""
    label = "" if folder == run_dir else f" ({folder.relative_to(run_dir)})"
    if force or not (folder / MANIFEST).is_file():
        return True
    states = run_states(folder, recipe=recipe if folder == run_dir else None,
                        expected_train=expected, sub_run=folder != run_dir)
    state = next(state for state in states if state.stage == stage)
    if not state.redo and stage not in planned:
        log(f"== {stage}{label}: up to date, skipped; --force redoes it")
        return False
    if state.status == "stale" and state.reason:
        log(f"   ({stage}{label} is stale: {state.reason})")
    elif not state.redo:
        log(f"   ({stage}{label}: planned after {STAGE[stage].after}, which was redone)")
    return True


_RUN = {"export": export_run, "validate": validate_run, "bench": bench_run,
        "explain": explain_run}


def _after_training(run_dir, recipe, *, log, force, planned=()):
    """The stages after training, in the pipeline's table order (each skipped when current):
    export, validate and bench of the run and of its sub-runs (the sub-runs benchmarked
    before the run itself, whose pick weighs them all), explain, report. Returns the run's
    parity report."""
    runs = candidate_runs(run_dir)
    for row in STAGES[1:]:
        if row.name == "report":
            continue
        folders = (list(reversed(runs)) if row.name == "bench" else runs) if row.sub_runs \
            else [run_dir]
        for folder in folders:
            if _redo(folder, row.name, recipe, run_dir, log=log, force=force,
                     planned=planned if folder == run_dir else ()):
                log(f"== {row.name}" + ("" if folder == run_dir
                                        else f" ({folder.relative_to(run_dir)})"))
                _RUN[row.name](folder, log=log)
    parity = read_parity(run_dir)
    path = report_run(run_dir)
    pick = read_manifest(run_dir).get("pick")
    log(f"== report {path}")
    if pick:
        log(f"pick: {pick_name(pick)} on {pick['runtime']} (p50 {pick['p50_ms']:.3f} ms)")
    return parity


# -- unsupervised adaptation to another domain (AdaBN) ------------------------------------


def adapt_run(parent_dir, data_arg, *, out=None, name=None, log=print):
    """A new run directory whose model is the run's model with every BatchNorm layer's
    statistics re-estimated on the target domain's training images, unlabeled (AdaBN); then
    exported (int8 calibrated on target images), validated and benchmarked like any run.
    The target's labels, when it has them, only measure: source and target accuracy, before
    and after. Returns (run_dir, parity report).

    Raises:
        TrainError: the model has no BatchNorm layer (the message says what to do instead).
    """
    parent_dir = Path(parent_dir)
    parent_manifest = read_manifest(parent_dir)
    parent = run_recipe(parent_dir)
    if parent.ensemble is not None:
        raise TrainError(f"{parent_dir} is a fused ensemble; adapt each member's run instead")
    if parent_manifest.get("tasks"):
        raise TrainError(f"{parent_dir} is a multi-task model; `tledge adapt` adapts "
                         "single-task models only")
    target = target_data(data_arg, parent, name)
    if target.judged == "all":  # a folder or file: carved like the source run's data
        target = dataclasses.replace(target, data=dataclasses.replace(
            target.data, val_fraction=parent.data.val_fraction,
            test_fraction=parent.data.test_fraction))
    data = dataclasses.replace(target.data, batch_size=parent.data.batch_size,
                               augment=parent.data.augment)
    recipe = dataclasses.replace(
        parent, name=f"{parent.name}_adabn_{target.name}".replace(" ", "_"), seed=target.seed,
        description=f"{parent.name} adapted to {target.name} by AdaBN", data=data,
        baseline=None)
    problem = name_problem(target.name)
    if problem:  # it names the adapted run's folder: checked before anything is written
        raise DataError(f"the target domain's name (--name, or the data's): {problem}; give "
                          "--name NAME")
    run_dir = Path(out) if out else parent_dir.parent / recipe.name
    if run_dir.resolve() == parent_dir.resolve():
        raise RunDirError(f"--out {out} is the run being adapted; the adapted model is a run "
                          "of its own: give another folder")
    started = time.perf_counter()
    with run_lock(run_dir):
        run_dir = prepare_run_dir(run_dir)
        log(f"== adapt  {parent_dir} -> {run_dir} (AdaBN on {target.where})")
        splits = target_splits(dataclasses.replace(target, data=data),
                               parent_manifest["labels"], log=log)
        reference = find_artifact(parent_manifest, "keras")
        model = load_model(verified_artifact(parent_dir, reference))
        source_x, source_y, source_split = evaluation_split(run_splits(parent_dir, parent))
        target_x, target_y = (splits.x_test, splits.y_test) if len(splits.y_test) \
            else (splits.x_train, splits.y_train)

        def accuracies():
            return {"source": evaluate(model, source_x, source_y),
                    "target": evaluate(model, target_x, target_y)}
        before = accuracies()
        stats = adapt_batchnorm(model, splits.x_train, log=log)
        after = accuracies()
        log(f"adapt: target {_percent(before['target'])} -> {_percent(after['target'])}, "
            f"source {source_split} {_percent(before['source'])} -> "
            f"{_percent(after['source'])}")
        adaptation = {**stats, "parent": portable(parent_dir.resolve(), run_dir.resolve()),
                      "parent_model_sha256": reference["sha256"], "target": target.name,
                      "target_data": target.where, "source_split": source_split,
                      "target_split": "test" if len(splits.y_test) else "train",
                      "before": before, "after": after}
        write_text(run_dir / RECIPE, stored_recipe_text(recipe, run_dir))
        write_json(run_dir / SPLIT, splits.record)
        write_json(run_dir / HISTORY, {
            "phases": [], "adaptation": adaptation, "backbone": parent.model.backbone,
            "pretrained": True, "verdict": {"regressed": False, "message": None},
            "test_accuracy": evaluate(model, splits.x_test, splits.y_test)})
        _remove_stale_outputs(run_dir)
        manifest = _trained_manifest(run_dir, recipe, model, splits)
        record_stage(manifest, "train", hash=_adapt_hash(reference["sha256"], recipe),
                     adapted_from=adaptation["parent"], method="adabn")
        write_manifest(run_dir, manifest)
        parity = _after_training(run_dir, recipe, log=log, force=True)
    log(f"adapted {parent.name} to {target.name} in {time.perf_counter() - started:.0f} s")
    return run_dir, parity


def _adapt_hash(parent_sha256: str, recipe) -> str:
    text = f"adabn:{parent_sha256}:{recipe.hash('seed', 'data')}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"
