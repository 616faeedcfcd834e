"""`tledge tune`: search a recipe's own keys for the model to train, on Optuna.

    recipe + [tune] ─▶ study (Optuna, SQLite or a database URL)
                          └─▶ trial n: the recipe with the trial's values ─▶ tledge build
                                       (trials/<key>/: train, export, validate, bench, ...)
                          └─▶ tuning.json, best.toml, figures/, report.md and report.html

Every trial is a run directory built by the same stages as `tledge build`, so its latency is
measured on its exported artifacts in the runtime named by [tune] and its int8 files are
judged by parity. A trial's folder is named by its recipe's hash: the same values run again
(an interrupted trial, or one two workers drew alike) reuse what was built. Trials share the
prepared-data cache, the weights recipe's trained model and the cached bottlenecks.

The first trial is the recipe as written; then, when the training doctor finds something on
its curves, the change each of its first two findings names; then Optuna's sampler. A trial that crashes is a failed
trial; Ctrl-C fails the running trial, queues it again and stops: the next `tledge tune`
resumes it first (its training resumes from its last finished epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from pathlib import Path

from tledge.doctor import diagnose
from tledge.errors import RecipeError, RunDirError, TledgeError, first_line
from tledge.recipe.load import load_recipe, parse_recipe
from tledge.recipe.spec import Recipe
from tledge.records import read_history
from tledge.rundir import holder_alive, lock_holder_alive, write_json
from tledge.stages import build, MODELS_DIR, prepare_run_dir, STUDY, TRIALS
from tledge.train.loop import watching_epochs
from tledge.tune.results import trial_summary, write_results
from tledge.tune.space import (dimensions, get_key, source_document, tune_threads,
                                 with_values)

SEED_AS_WRITTEN = "as written"
FAILURES_IN_A_ROW = 3  # a worker stops: the same cause would fail every trial
LOCK_ATTEMPTS = 5  # a worker that lost the race for a trial's folder waits again
STORAGE_ATTEMPTS = 5  # opening a storage another worker is creating right now
TRANSIENT_STORAGE_ERRORS = ("already exists", "UNIQUE constraint failed", "database is locked")
DOCTOR_SEEDS = 2  # trials queued from the doctor's findings on the recipe as written


class Interrupted(TledgeError):
    """Ctrl-C during a study: what is done is kept."""


def study_dir_for(recipe, out=None) -> Path:
    return Path(out) if out else MODELS_DIR / f"{recipe.name}.tune"


def base_key(recipe) -> str:
    """What makes trials of a study comparable: the recipe as written (its seed, data, model,
    training, export and validation) and [tune]'s objective, runtime and threads."""
    tune = recipe.tune
    return recipe.hash("seed", "data", "model", "train", "export", "validate") + ":" + \
        f"{tune.objective}:{tune.runtime}:{tune.threads}"


def trial_recipe(recipe, document, values) -> Recipe:
    """The recipe a trial builds: the recipe file's document with the trial's values, without
    [tune] and [baseline] (the trials are compared with each other), benchmarked on [tune]'s
    runtime and threads alone.

    Raises:
        RecipeError: the values together make an invalid recipe (each alone was checked).
    """
    tune = recipe.tune
    changed = with_values(document, values)
    changed.pop("baseline", None)
    changed.setdefault("train", {})["compare_single_task"] = False
    bench = changed.setdefault("bench", {})
    bench.update(runtimes=[tune.runtime], threads=[tune_threads(recipe)], batch_sizes=[1])
    changed["name"] = f"{recipe.name}.trial"
    return parse_recipe(changed, recipe.path)


def trial_folder(study_dir, trial) -> Path:
    return Path(study_dir) / TRIALS / trial.hash()


def open_study(recipe, study_dir, storage: str | None, found=(), *, log=print):
    """(study, storage URL, whether this call created it) of `recipe` in `storage` (default:
    study.db in the study folder). Refuses a study whose recipe changed outside the searched
    keys.

    Raises:
        RunDirError: the study belongs to another recipe, or the storage cannot be opened.
    """
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune = recipe.tune
    url = storage or tune.storage or f"sqlite:///{(Path(study_dir) / 'study.db').resolve()}"
    directions = ["maximize"] if tune.objective == "accuracy" else ["maximize", "minimize"]
    settings = dict(study_name=recipe.name, pruner=_pruner(tune))
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            # SQLite: a worker waits for another's write instead of failing at once
            storage_object = optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 60}}
                if url.startswith("sqlite:") else {})
            try:  # the one worker that creates the study queues its first trials
                study = optuna.create_study(storage=storage_object, directions=directions,
                                            **settings)
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(storage=storage_object, **settings)
                created = False
            break
        except Exception as error:  # SQLAlchemy's and Optuna's errors: a bad URL or database
            # two workers making a new database's tables at once: one loses, then finds them
            if attempt + 1 < STORAGE_ATTEMPTS and any(
                    sign in str(error) for sign in TRANSIENT_STORAGE_ERRORS):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise RunDirError(f"cannot open the study's storage {url}: {first_line(error)}; "
                              "give a database URL tledge can reach (--storage), or none for "
                              "the study folder's own") from None
    key = study.user_attrs.get("base")
    if key is None:
        study.set_user_attr("base", base_key(recipe))
        study.set_user_attr("recipe", recipe.name)
    elif key != base_key(recipe):
        raise RunDirError(f"the study {recipe.name} in {url} was made for another version of "
                          "this recipe (its seed, data, model, training, export or validation, "
                          "or [tune]'s objective, runtime or threads changed since; [tune.space]"
                          " and the budget may change); its trials would not compare: tune "
                          f"into another folder (--out) or delete {study_dir}")
    if [direction.name.lower() for direction in study.directions] != directions:
        raise RunDirError(f"the study in {url} has other objectives; tune into another folder")
    changed = _changed_dimensions(study, found)
    if changed:
        raise RunDirError(f"[tune.space] {', '.join(changed)} changed since the study drew it "
                          "(a range may move, but a list of values, or a list against a range, "
                          "or log against linear, may not within one study): put it back, or "
                          "tune into another folder (--out)")
    study.sampler = _sampler(recipe, created, len(study.get_trials(deepcopy=False)))
    return study, url, created


def _changed_dimensions(study, found) -> list[str]:
    """The keys whose distribution the study recorded otherwise than the space says now."""
    recorded = {}
    for trial in study.get_trials(deepcopy=False):
        recorded.update(trial.distributions)
    return [dimension.key for dimension in found if dimension.key in recorded
            and not dimension.same_as(recorded[dimension.key])]


def _sampler(recipe, created: bool, trials: int):
    """TPE, seeded by the recipe in the worker that creates the study (a study in a folder of
    its own is repeatable); any other worker, or a resumed study, draws apart from the
    trials already drawn (its seed also takes the study's size and the process). With
    several workers, a running trial counts as a poor result while it runs (constant liar),
    so that they do not all draw near one point."""
    import optuna
    seed = recipe.seed if created else \
        (recipe.seed * 1_000_003 + trials * 7_919 + os.getpid()) % 2**31
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=recipe.tune.startup_trials,
                                      constant_liar=True)


def _pruner(tune):
    import optuna
    if not tune.pruning or tune.objective != "accuracy":  # Optuna prunes one objective only
        return optuna.pruners.NopPruner()
    # the warm-up is each trial's own (`_Pruning`): its phase's length is its own
    return optuna.pruners.MedianPruner(n_startup_trials=tune.prune_after_trials)


def _finished(study) -> list:
    import optuna
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
            optuna.trial.TrialState.FAIL)
    return [trial for trial in study.get_trials(deepcopy=False) if trial.state in done]


def _counted(study) -> int:
    """Trials done or running (any worker's): what the [tune] trials budget counts. A trial
    stopped by Ctrl-C or a killed worker does not count: it is queued again."""
    import optuna
    trials = study.get_trials(deepcopy=False)
    requeued = {trial.user_attrs.get("again_of") for trial in trials}
    return len([trial for trial in trials if trial.state != optuna.trial.TrialState.WAITING
                and trial.number not in requeued])


def fail_dead_trials(study, *, log=print) -> None:
    """Trials left running by a worker on this host that is gone (killed): failed, and
    queued again, so that the study does not wait on them."""
    import optuna
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        host, _, pid = worker.rpartition(" ")
        if host != socket.gethostname() or not pid.isdigit() or holder_alive(worker):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError):  # another worker failed it first, and requeues it
            continue
        _queue_again(study, trial, "its worker was killed")
        log(f"trial {trial.number}: its worker ({worker}) is gone; failed, and queued again")


def _queue_again(study, trial, why: str) -> None:
    study.enqueue_trial(dict(trial.params), user_attrs={
        "seed": trial.user_attrs.get("seed", "sampled"), "again_of": trial.number,
        "again": f"trial {trial.number} again: it was {why}"}, skip_if_exists=False)


def _seed_as_written(study, recipe, found, *, log) -> None:
    """Queue the recipe as written as the study's first trial (its values within the space)."""
    if any(trial.user_attrs.get("seed") == SEED_AS_WRITTEN
           for trial in study.get_trials(deepcopy=False)):
        return
    written = recipe.to_dict()
    values = {dimension.key: dimension.stored(get_key(written, dimension.key))
              for dimension in found if dimension.contains(get_key(written, dimension.key))}
    outside = [dimension.key for dimension in found if dimension.key not in values]
    study.enqueue_trial(values, user_attrs={"seed": SEED_AS_WRITTEN})
    if outside:
        log(f"tune: the recipe's own {', '.join(outside)} "
            f"{'is' if len(outside) == 1 else 'are'} outside the space; its first trial "
            f"samples {'it' if len(outside) == 1 else 'them'}")


def _seed_from_doctor(study, recipe, found, trial, history, *, log) -> None:
    """Queue the changes the training doctor names on the recipe as written: for each of its
    first DOCTOR_SEEDS findings, the first change whose key the space holds."""
    if not recipe.tune.seed_from_doctor or any(
            str(other.user_attrs.get("seed", "")).startswith("doctor")
            for other in study.get_trials(deepcopy=False)):
        return
    by_key = {dimension.key: dimension for dimension in found}
    current = dict(trial.user_attrs.get("values") or {})
    queued = []
    for finding in diagnose(history):
        for key, how, amount in finding.moves:
            dimension = by_key.get(key)
            if dimension is None or key not in current:
                continue
            now = current[key]
            target = amount if how == "set" else (now * amount if isinstance(now, (int, float))
                                                  and not isinstance(now, bool) else None)
            value = dimension.nearest(target, now) if target is not None else None
            if value is None or (key, value) in queued:
                continue
            study.enqueue_trial({**{k: by_key[k].stored(v) for k, v in current.items()
                                    if k in by_key}, key: dimension.stored(value)},
                                user_attrs={"seed": f"doctor: {finding.kind}",
                                            "doctor": finding.change})
            queued.append((key, value))
            log(f"tune: the training doctor finds the recipe as written "
                f"{finding.kind.replace('_', ' ')}; queued: {key} = {value!r} ({finding.change})")
            break
        if len(queued) == DOCTOR_SEEDS:
            return
    if not queued:
        log("tune: the training doctor names no change the space can make; the sampler goes on")


class _Pruning:
    """Reports each epoch of a trial's deciding phase (fine-tuning, else the first) to Optuna
    (its best validation accuracy so far), and prunes the trial where Optuna's pruner says so."""

    def __init__(self, trial, recipe, after_epochs=None):
        self.trial = trial
        fine_tuned = recipe.train.fine_tune.epochs > 0 and recipe.model.weights != "none"
        self.phase = "fine_tune" if fine_tuned else None
        self.offset = recipe.train.feature_extraction.epochs if fine_tuned else 0
        epochs = (recipe.train.fine_tune if fine_tuned else recipe.train.feature_extraction).epochs
        self.after = after_epochs if after_epochs is not None else epochs // 2
        self.best = float("-inf")

    def __call__(self, name, row):
        import optuna
        deciding = name == self.phase if self.phase else name in ("from_scratch",
                                                                  "feature_extraction")
        value = row.get("val_accuracy", row.get("accuracy"))
        if not deciding or value is None:
            return
        step = int(row["epoch"]) - self.offset
        # the best so far: the weights training keeps are its best epoch's
        self.best = max(self.best, float(value))
        self.trial.report(self.best, step)
        if step > self.after and self.trial.should_prune():
            raise optuna.TrialPruned(f"best validation accuracy {self.best:.3f} by epoch {step}"
                                     ": below the median of the trials before it there")


@dataclasses.dataclass
class TuneResult:
    study_dir: Path
    report: Path
    best: Path | None  # best.toml, None while no trial finished
    ran: int  # trials this worker ran
    stopped: str  # why this worker stopped


def tune(recipe_path, *, out=None, trials=None, minutes=None, storage=None, log=print,
         verbose=0) -> TuneResult:
    """Run (or resume, or extend) the study of a recipe with a [tune] section.

    Raises:
        RecipeError: the recipe is invalid, or has no [tune] section.
        Interrupted: Ctrl-C; the running trial is failed and queued again, the results so
            far written.
    """
    import optuna
    recipe = load_recipe(recipe_path)
    if recipe.tune is None:
        raise RecipeError(recipe_path, ["tune: `tledge tune` needs a [tune] section naming the "
                                        "keys to search: a [tune.space] table such as "
                                        "train.fine_tune.learning_rate = { low = 1e-5, high = "
                                        "1e-3, log = true } (see recipes/tune_quickstart.toml)"])
    tune_settings = recipe.tune
    if trials is not None or minutes is not None:
        tune_settings = dataclasses.replace(
            tune_settings, trials=trials if trials is not None else tune_settings.trials,
            minutes=minutes if minutes is not None else tune_settings.minutes)
        recipe = dataclasses.replace(recipe, tune=tune_settings)
    document = source_document(recipe.path)
    found, _ = dimensions(recipe.tune.space)
    study_dir = study_dir_for(recipe, out)
    for folder in (study_dir, study_dir / TRIALS, study_dir / "logs"):
        prepare_run_dir(folder)  # one line for a folder that cannot be written
    write_json(study_dir / STUDY, {"recipe": recipe.name, "recipe_path": str(recipe.path),
                                   "storage": storage or tune_settings.storage or "study.db"})
    study, url, created = open_study(recipe, study_dir, storage, found, log=log)
    fail_dead_trials(study, log=log)
    if created:  # only the creator: a worker that loads it may come before the queueing
        _seed_as_written(study, recipe, found, log=log)
    started, durations, ran, stopped, failures = time.monotonic(), [], 0, "", 0
    log(f"tune: {recipe.name}: {len(_finished(study))} of {tune_settings.trials} trials done "
        f"({url}); {', '.join(d.key for d in found)} searched; latency on "
        f"{tune_settings.runtime} at {tune_threads(recipe)} threads")
    try:
        while True:
            if _counted(study) >= tune_settings.trials:
                stopped = f"the study has its {tune_settings.trials} trials"
                break
            elapsed = time.monotonic() - started
            mean = sum(durations) / len(durations) if durations else 0.0
            if tune_settings.minutes and elapsed + mean > tune_settings.minutes * 60:
                stopped = (f"{tune_settings.minutes:g} minutes: another trial (about "
                           f"{mean:.0f} s) would end past them")
                break
            trial_started = time.monotonic()
            trial = study.ask()
            state = _run_trial(study, trial, recipe, document, found, study_dir, log=log,
                               verbose=verbose)
            ran += 1
            failures = failures + 1 if state == optuna.trial.TrialState.FAIL else 0
            if failures == FAILURES_IN_A_ROW:
                stopped = (f"{FAILURES_IN_A_ROW} trials in a row failed (the last: "
                           f"{study.trials[trial.number].user_attrs.get('error')}); fix that "
                           "and run it again")
                break
            durations.append(time.monotonic() - trial_started)
            if state == optuna.trial.TrialState.COMPLETE and \
                    trial.user_attrs.get("seed") == SEED_AS_WRITTEN:
                history = _history(study_dir, trial)
                if history:
                    _seed_from_doctor(study, recipe, found, study.trials[trial.number],
                                      history, log=log)
    except KeyboardInterrupt:
        report = write_results(study, recipe, document, found, study_dir, log=log)
        raise Interrupted(f"interrupted: the running trial is failed and queued again; "
                          f"{len(_finished(study))} trials are kept in {url} and reported in "
                          f"{report}. Run `tledge tune {recipe_path}` again to resume (the "
                          "interrupted trial first, from its last finished epoch)") from None
    report = write_results(study, recipe, document, found, study_dir, log=log)
    best = study_dir / "best.toml"
    return TuneResult(study_dir, report, best if best.is_file() else None, ran, stopped)


def _history(study_dir, trial) -> dict | None:
    run = trial.user_attrs.get("run")
    try:
        return read_history(Path(study_dir) / run) if run else None
    except RunDirError:
        return None


def _run_trial(study, trial, recipe, document, found, study_dir, *, log, verbose):
    """Build one trial and tell Optuna how it went; returns its state. Ctrl-C anywhere in it
    fails the trial and queues its values again."""
    import optuna
    try:
        return _trial(study, trial, recipe, document, found, study_dir, log=log,
                      verbose=verbose)
    except KeyboardInterrupt:
        if study.trials[trial.number].state == optuna.trial.TrialState.RUNNING:
            trial.set_user_attr("error", "interrupted (Ctrl-C)")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            _queue_again(study, study.trials[trial.number], "interrupted")
        raise


def _trial(study, trial, recipe, document, found, study_dir, *, log, verbose):
    import optuna
    trial.set_user_attr("worker", f"{socket.gethostname()} {os.getpid()}")
    if "seed" not in trial.user_attrs:
        trial.set_user_attr("seed", "sampled")
    try:
        values = {dimension.key: dimension.suggest(trial) for dimension in found}
    except ValueError as error:  # a queued value the space no longer holds
        return _fail(study, trial, f"its values are not in [tune.space] now: "
                     f"{first_line(error)}", log=log)
    trial.set_user_attr("values", {key: list(value) if isinstance(value, tuple) else value
                                   for key, value in values.items()})
    shown = ", ".join(f"{key} = {value!r}" for key, value in values.items())
    again = f"; {trial.user_attrs['again']}" if trial.user_attrs.get("again") else ""
    log(f"-- trial {trial.number} ({trial.user_attrs.get('seed')}{again}): {shown}")
    log_path = Path(study_dir) / "logs" / f"trial-{trial.number:04d}.log"
    try:
        built = trial_recipe(recipe, document, values)
    except RecipeError as error:  # the values together make no valid recipe
        return _fail(study, trial, f"these values make no valid recipe: {error.problems[0]}",
                     log=log)
    run_dir = trial_folder(study_dir, built)
    trial.set_user_attr("run", str(run_dir.relative_to(study_dir)))
    # Optuna prunes single-objective studies only
    prunes = recipe.tune.pruning and recipe.tune.objective == "accuracy"
    watching = watching_epochs(_Pruning(trial, built, recipe.tune.prune_after_epochs)) \
        if prunes else contextlib.nullcontext()
    started = time.perf_counter()
    try:
        with open(log_path, "w", encoding="utf-8") as handle, watching:
            def trial_log(line):
                handle.write(f"{line}\n")
                handle.flush()
            _build_when_free(built, run_dir, trial_log, verbose=verbose, log=log)
    except optuna.TrialPruned as pruned:
        trial.set_user_attr("pruned", str(pruned))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        log(f"   pruned: {pruned} ({time.perf_counter() - started:.0f} s)")
        return optuna.trial.TrialState.PRUNED
    except Exception as error:  # any crash of a trial fails that trial, not the study
        return _fail(study, trial, f"{type(error).__name__}: {first_line(error)} (its log: "
                     f"{log_path})", log=log)
    try:
        summary = trial_summary(run_dir, recipe.tune, tune_threads(recipe))
    except RunDirError as error:  # its records changed under it (another hand, a full disk)
        return _fail(study, trial, f"its records cannot be read: {first_line(error)}", log=log)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    for key, value in summary.items():
        trial.set_user_attr(key, value)
    timed = summary.get("deployable") or summary.get("closest")
    if summary.get("value") is None or timed is None:
        return _fail(study, trial, summary.get("problem") or "no validation accuracy", log=log)
    # a trial outside the constraints is a finished trial that breaks them: the sampler
    # learns where they lie
    values = [summary["value"]] if recipe.tune.objective == "accuracy" else \
        [summary["value"], timed["p50_ms"]]
    for name, over in zip(("latency", "size", "memory"), summary["constraints"]):
        trial.set_constraint(name, over)  # above 0: outside
    study.tell(trial, values)
    log("   " + summary["line"] + f" ({summary['seconds']:.0f} s)")
    return optuna.trial.TrialState.COMPLETE


def _build_when_free(built, run_dir, trial_log, *, verbose, log) -> None:
    """Build a trial's run directory; two workers that drew the same values build one folder:
    the second waits for the first, then finds every stage current."""
    for attempt in range(LOCK_ATTEMPTS):
        _wait_for(run_dir, log=log)
        try:
            build(built, out=run_dir, log=trial_log, verbose=verbose)
            return
        except RunDirError as error:
            if "is in use by another tledge" not in str(error) or attempt + 1 == LOCK_ATTEMPTS:
                raise


def _fail(study, trial, why: str, *, log):
    import optuna
    trial.set_user_attr("error", why)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    log(f"   failed: {why}")
    return optuna.trial.TrialState.FAIL


def _wait_for(run_dir, *, log) -> None:
    """Wait while another live process holds the run directory."""
    said = False
    while lock_holder_alive(run_dir):
        if not said:
            log(f"   {run_dir} is being built by another worker; waiting for it")
            said = True
        time.sleep(2)
