"""The pipeline as a table: every stage of a run, what it reads, what it writes, and how its
currency is decided. `tledge build` iterates `STAGES`; `tledge status` prints their states;
every hand-run command that consumes an artifact asks `require_current` first. Nothing else
decides whether a stage is current.

    train ─▶ export ─▶ validate ─▶ bench ─▶ report
      └────────────────▶ explain ─────────────┘

A stage is *current* when it ran with the hash of what it reads now and its records are
intact; *stale* when something it read changed since (the reason names it), or a stage it
reads is not current; *missing* when it never ran; *failed* when it ran and recorded a
failure (an export that failed, an artifact that failed parity). A run's sub-runs (its
`[baseline]`, a multi-task run's single-task models, an ensemble's inline members) are run
directories of their own with the same stages up to bench.

Reading states writes nothing, and needs nothing but the run directory: a run copied alone
(no checkout, no recipes, no data cache) has states like the original.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from pathlib import Path

from tledge.core.machine import machine_facts
from tledge.errors import RecipeError, RunDirError
from tledge.formats import FAMILIES
from tledge.parity import row_is_current
from tledge.backbones import BACKBONES
from tledge.recipe.dump import stored_recipe_text
from tledge.recipe.load import load_recipe, parse_recipe
from tledge.recipe.spec import PhaseRecipe
from tledge.records import check_record, read_history, read_parity
from tledge.rundir import (artifacts, BENCH, checked_sha256, DEVICES, DOMAINS, EXPLAIN,
                           HISTORY, INNER_RUNS, MANIFEST, PARITY, portable, read_manifest,
                           read_record, RECIPE, REPORT, SINGLE_TASK, SPLIT)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    after: str | None  # the stage whose output this one reads
    sections: tuple  # the recipe sections its hash covers
    reads: str  # what it reads, in words (`tledge status --help`, docs)
    writes: tuple  # the records it writes (a missing or damaged one makes it not current)
    command: str  # how a user makes it current; {run} is the run directory
    sub_runs: bool  # whether a run's sub-runs (baseline, single-task, members) have it
    retry_failed: bool = False  # a failure is redone by the next build (a full disk?)


STAGES = (
    Stage("train", None, ("seed", "data", "model", "train", "baseline", "ensemble"),
          "the recipe, its prepared data and the weights it starts from",
          (SPLIT, HISTORY), "tledge train {run}", True),
    Stage("export", "train", ("export",), "model.keras",
          (), "tledge export {run}", True, retry_failed=True),
    Stage("validate", "export", ("validate", "bench.runtimes"),
          "every exported artifact and the evaluation split", (PARITY,),
          "tledge validate {run}", True),
    Stage("bench", "validate", ("bench", "pick"),
          "the validated artifacts, on this machine (CPU, ISA, cores)", (BENCH,),
          "tledge bench {run}", True),
    Stage("explain", "train", (), "model.keras (each member's in an ensemble) and the "
          "evaluation split", (EXPLAIN,), "tledge explain {run}", False),
    Stage("report", "bench", (), "every record of the run (and its sub-runs' bench)",
          (), "tledge report {run}", False),
)
STAGE = {stage.name: stage for stage in STAGES}


@dataclasses.dataclass
class StageState:
    stage: str
    status: str  # "current" | "stale" | "missing" | "failed"
    reason: str | None = None  # why it is not current (the file or recipe section)
    command: str = ""  # what makes it current

    @property
    def redo(self) -> bool:
        """Whether a build runs the stage again."""
        return self.status in ("stale", "missing") or \
            (self.status == "failed" and STAGE[self.stage].retry_failed)


# -- sub-runs: the other models a run trains, each with a recipe derived from the run's ----


def baseline_recipe(recipe):
    """The recipe a run's `[baseline]` model is exported, validated and benchmarked under:
    the same data, split, export, validation and bench, its own model and training (one
    phase from scratch; its fine-tuning settings are its own backbone's defaults)."""
    settings = recipe.baseline
    return dataclasses.replace(
        recipe, name=f"{recipe.name}.baseline", baseline=None, ensemble=None,
        model=dataclasses.replace(recipe.model, backbone=settings.backbone, weights="none",
                                  alpha=None),
        train=dataclasses.replace(recipe.train, feature_extraction=PhaseRecipe(
            epochs=settings.epochs, learning_rate=settings.learning_rate,
            optimizer=settings.optimizer, early_stopping=settings.early_stopping),
            fine_tune=dataclasses.replace(
                recipe.train.fine_tune, epochs=0,
                unfreeze=BACKBONES[settings.backbone].default_unfreeze)))


def single_task_recipe(recipe, task: str):
    """The recipe of a multi-task run's single-task model for `task`: the same data, split,
    backbone, training, export and bench, one output."""
    return dataclasses.replace(
        recipe, name=f"{recipe.name}.{task}",
        model=dataclasses.replace(recipe.model, tasks=(task,)),
        train=dataclasses.replace(recipe.train, best_by="mean", compare_single_task=False))


def sub_run_recipes(recipe) -> list:
    """[(folder inside the run, derived recipe)] of every sub-run a build of `recipe` makes."""
    derived = []
    if recipe.baseline is not None:
        derived.append((INNER_RUNS[0], baseline_recipe(recipe)))
    if recipe.train.compare_single_task and recipe.data.tasks:
        derived += [(f"{SINGLE_TASK}/{task.name}", single_task_recipe(recipe, task.name))
                    for task in recipe.data.tasks
                    if not recipe.model.tasks or task.name in recipe.model.tasks]
    return derived


def check_sub_runs(recipe) -> list[str]:
    """Every problem a sub-run's recipe would have as its run directory keeps and reads it
    (written out, read back as later stages do), so that nothing a build derives fails after
    training. One `folder/recipe.toml: problem` line each."""
    problems = []
    for folder, derived in sub_run_recipes(recipe):
        where = Path(recipe.path).parent / folder  # as if beside the recipe: paths resolve
        try:
            parse_recipe(tomllib.loads(stored_recipe_text(derived, where)), where / RECIPE,
                         stored=True)
        except RecipeError as error:
            problems += [f"{folder}/{RECIPE} (derived from [{folder.split('/')[0]}]): {problem}"
                         for problem in error.problems]
    return problems


# -- hashes: what each stage depends on ----------------------------------------------------


def stage_hash(manifest: dict, recipe, stage: str) -> str | None:
    """The hash a stage's record carries: the previous stage's hash, its recipe sections, and
    the files it reads: export the trained model, validate every artifact (and the runtimes
    of [bench]), bench the machine it measures on (a bench from another machine is not
    current here). None when the previous stage has not run."""
    before = manifest["stages"].get(STAGE[stage].after, {}).get("hash")
    if before is None:
        return None
    return hashlib.sha256(":".join(_hash_parts(manifest, recipe, stage, before).values())
                          .encode()).hexdigest()[:16]


def _hash_parts(manifest, recipe, stage, before) -> dict:
    """The named parts of a stage's hash, in order (kept in its record, so that a stale stage
    says which part changed)."""
    section = STAGE[stage].sections[0]
    parts = {STAGE[stage].after: before, f"recipe [{section}]": recipe.hash(section)}
    reads = {"export": [entry for entry in artifacts(manifest) if entry["name"] == "keras"],
             "validate": artifacts(manifest)}.get(stage, [])
    parts["files"] = ",".join(sorted(f"{entry['name']}={entry.get('sha256')}"
                                     for entry in reads))
    if stage == "validate":  # a runtime added to [bench] is validated (and benchmarked)
        parts["files"] += ":" + ",".join(recipe.bench.runtimes)
    if stage == "bench":  # the pick is made there too
        parts["files"] += ":" + machine_key()
        parts["recipe [pick]"] = recipe.hash("pick")
    return parts


def hash_parts(manifest: dict, recipe, stage: str) -> dict | None:
    """What `record_stage` keeps of a stage's hash, part by part (None before its previous
    stage ran)."""
    before = manifest["stages"].get(STAGE[stage].after, {}).get("hash")
    return None if before is None else _hash_parts(manifest, recipe, stage, before)


def stage_record(manifest: dict, recipe, stage: str) -> dict:
    """The hash facts a stage enters with `record_stage`: its hash and that hash's parts."""
    return {"hash": stage_hash(manifest, recipe, stage),
            "parts": hash_parts(manifest, recipe, stage)}


def machine_key() -> str:
    """What makes a latency figure this machine's: the CPU, its vector ISA and core count."""
    facts = machine_facts()
    return "|".join(str(facts.get(key)) for key in ("cpu", "isa", "cores", "arch"))


# -- states ---------------------------------------------------------------------------------


def stage_state(run_dir, manifest: dict, stage: str, recipe=None, *,
                expected: str | None = None, before: StageState | None = None) -> StageState:
    """The state of one stage of one run directory. `expected` is the train stage's hash as
    a build computes it from the recipe and its data (without it, train is judged by its
    files alone); `before` the state of the stage it reads."""
    run_dir = Path(run_dir)
    row = STAGE[stage]
    command = row.command.format(run=run_dir)
    state = lambda status, reason=None: StageState(stage, status, reason, command)  # noqa
    record = manifest["stages"].get(stage)
    if stage == "explain":
        return _explain_state(run_dir, manifest, state)
    if stage == "report":
        return _report_state(run_dir, manifest, state, before)
    if not record:
        return state("missing", None if before is None or before.status == "current"
                     else f"{before.stage} is {before.status}")
    if before is not None and before.status not in ("current", "failed"):
        return state("stale", f"{before.stage} is {before.status}")
    if before is not None and before.stage == "export" and before.status == "failed":
        return state("stale", f"export is failed ({before.reason})")
    if stage == "train":
        if expected is not None and record.get("hash") != expected:
            return state("stale", "the recipe, its data or its starting weights changed "
                                  "since it was trained")
    else:
        if recipe is None:
            return state("stale", f"{run_dir / RECIPE} cannot be read")
        wanted = stage_hash(manifest, recipe, stage)
        if wanted is None or record.get("hash") != wanted:
            return state("stale", _changed_part(manifest, recipe, stage, record))
    for name in row.writes:
        try:
            check_record(run_dir / name)
        except RunDirError as error:  # its first clause says what is wrong, path and all
            return state("stale", str(error).split("; ")[0].replace(str(run_dir / name), name))
    for name, digest in (record.get("outputs") or {}).items():
        if checked_sha256(run_dir / str(name)) != digest:
            return state("stale", f"{name} was rewritten since")
    for name, digest in (record.get("reads") or {}).items():
        if checked_sha256(run_dir / str(name)) != digest:
            return state("stale", f"{name} changed since")
    if stage in ("train", "export"):
        family = {"train": ("keras",), "export": FAMILIES}[stage]
        for entry in artifacts(manifest):
            digest = checked_sha256(run_dir / entry["path"]) if entry["family"] in family \
                else entry["sha256"]
            if digest is None:
                return state("stale", f"{entry['path']} is missing")
            if digest != entry["sha256"]:
                return state("stale", f"{entry['path']} is not the file the manifest records "
                                      "(sha256 differs)")
    if stage == "export":
        failed = [entry["name"] for entry in manifest["artifacts"]
                  if entry.get("status") == "failed"]
        if failed:
            return state("failed", "export failed for " + ", ".join(failed))
    if stage == "validate":
        failed = list(record.get("failed") or [])
        if failed:
            return state("failed", "parity failed for " + ", ".join(failed))
    return state("current")


def _changed_part(manifest, recipe, stage, record) -> str:
    """In words, which part of a stage's hash differs from what it recorded."""
    if record.get("hash") is None:
        return "it was run for part of the run only (a `--format`, `--runtime` or " \
               "`--threads` choice); run it whole"
    now = hash_parts(manifest, recipe, stage)
    if now is None:
        return f"{STAGE[stage].after} has not run"
    then = record.get("parts")
    if not isinstance(then, dict):  # a record from before the parts were kept
        return f"its inputs changed (recipe {', '.join(STAGE[stage].sections)}, or the files " \
               "it reads)"
    for name, value in now.items():
        if then.get(name) != value:
            if name == STAGE[stage].after:
                return f"{name} ran again since"
            if name == "files":
                return _changed_files(stage, then.get(name) or "", value)
            return f"{name} changed since"
    return "its inputs changed"


def _changed_files(stage, then: str, now: str) -> str:
    """Which of the files (or runtimes, or machine) a stage read differ, in words."""
    if stage == "export":
        return "model.keras changed since"
    if stage == "bench":
        return "it was measured on another machine (or the artifacts changed)"
    files = lambda text: dict(item.split("=", 1) for item in text.split(":")[0].split(",")  # noqa
                              if "=" in item)
    before, after = files(then), files(now)
    changed = sorted(name for name in after if before.get(name) != after[name])
    gone = sorted(set(before) - set(after))
    words = []
    if changed:
        words.append(f"{', '.join(changed)} {'was' if len(changed) == 1 else 'were'} exported "
                     "since")
    if gone:
        words.append(f"{', '.join(gone)} {'is' if len(gone) == 1 else 'are'} gone")
    if not words:
        words.append("the [bench] runtimes changed since")
    return "; ".join(words)


def _explain_state(run_dir, manifest, state) -> StageState:
    if not (run_dir / EXPLAIN).is_file():
        return state("missing")
    try:
        record = read_record(run_dir / EXPLAIN)
    except RunDirError:
        return state("stale", f"{EXPLAIN} is damaged")
    models = explained_models(run_dir, manifest)
    recorded = record.get("models")
    if not isinstance(recorded, dict) or sorted(recorded) != sorted(models):
        return state("stale", "the run's models are not the ones explained")
    for key, path in models.items():
        if not Path(path).is_file() or checked_sha256(path) != recorded[key]:
            return state("stale", f"{key} changed since it was explained")
    for figure in record["figures"]:
        if not (isinstance(figure, dict) and isinstance(figure.get("file"), str)
                and (run_dir / figure["file"]).is_file()):
            return state("stale", "a figure it drew is missing")
    return state("current")


def explained_models(run_dir, manifest) -> dict:
    """{portable path: path} of the models explain draws: the run's model, or each member of
    an ensemble."""
    run_dir = Path(run_dir)
    try:
        history = read_history(run_dir) or {}
    except RunDirError:  # its own stage (train) reports it
        history = {}
    members = (history.get("ensemble") or {}).get("members")
    if members:
        paths = [run_dir / member["model"] for member in members]
    else:
        paths = [run_dir / entry["path"] for entry in artifacts(manifest)
                 if entry["name"] == "keras"]
    return {portable(Path(path).resolve(), run_dir): path for path in paths}


REPORT_INPUTS = (SPLIT, HISTORY, PARITY, BENCH, EXPLAIN, DEVICES, DOMAINS)


def report_inputs(run_dir, manifest=None) -> str:
    """A digest of everything the report reads: the run's records, its manifest (less the
    report's own entry) and its sub-runs' manifests and records. The report records it; a
    report whose digest differs is stale."""
    run_dir = Path(run_dir)
    manifest = manifest or read_manifest(run_dir)
    stages = {name: record for name, record in manifest["stages"].items() if name != "report"}
    text = json.dumps({**manifest, "stages": stages}, sort_keys=True, default=str)
    for label, folder in [(".", run_dir)] + sub_runs(run_dir, manifest):
        for name in REPORT_INPUTS + ((MANIFEST,) if folder != run_dir else ()):
            text += f":{label}/{name}={checked_sha256(folder / name)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _report_state(run_dir, manifest, state, before) -> StageState:
    if not (run_dir / REPORT).is_file():
        return state("missing")
    record = manifest["stages"].get("report") or {}
    if record.get("inputs") != report_inputs(run_dir, manifest):
        changed = before.stage if before is not None and before.status != "current" else None
        return state("stale", "the run's records changed since it was written"
                     + (f" ({changed} is {before.status})" if changed else ""))
    return state("current")


def sub_runs(run_dir, manifest=None) -> list[tuple[str, Path]]:
    """[(label, folder)] of the run directories inside a run: its baseline, its single-task
    models, its inline ensemble members."""
    run_dir = Path(run_dir)
    found = [(name, run_dir / name) for name in INNER_RUNS]
    manifest = manifest if manifest is not None else read_manifest(run_dir)
    found += [(f"{SINGLE_TASK}/{task['name']}", run_dir / SINGLE_TASK / task["name"])
              for task in manifest.get("tasks") or []]
    members = run_dir / "members"
    if members.is_dir():
        found += [(f"members/{folder.name}", folder) for folder in sorted(members.iterdir())]
    return [(label, folder) for label, folder in found if (folder / MANIFEST).is_file()]


def run_states(run_dir, *, recipe=None, expected_train: str | None = None, sub_run=False) \
        -> list[StageState]:
    """The state of every stage of a run directory, in table order (a sub-run's stages end
    at bench). `recipe` is the run's recipe when the caller has it (a build), else the copy
    the run keeps is read."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if recipe is None:
        try:
            recipe = load_recipe(run_dir / RECIPE, stored=True)
        except RecipeError:
            recipe = None
    states, by_name = [], {}
    for row in STAGES:
        if sub_run and not row.sub_runs:
            continue
        before = by_name.get(row.after) if row.after else None
        state = stage_state(run_dir, manifest, row.name, recipe, before=before,
                            expected=expected_train if row.name == "train" else None)
        if row.name == "report":  # reads explain too
            explain = by_name.get("explain")
            if state.status == "current" and explain is not None and \
                    explain.status != "current":
                state = dataclasses.replace(state, status="stale",
                                            reason=f"explain is {explain.status}")
        states.append(state)
        by_name[row.name] = state
    return states


def plan(run_dir, *, recipe, expected_train: str | None, force=False) -> list[str]:
    """The stages of the run itself that `tledge build` of `recipe` runs now, in table order
    (the report, rewritten by every build, aside): those not current, and every stage after
    them (`run_states` carries staleness down the table). With `force`, a run with no
    manifest, or one that cannot be read (it is trained again): every stage."""
    everything = [row.name for row in STAGES if row.name != "report"]
    run_dir = Path(run_dir)
    if force or not (run_dir / MANIFEST).is_file():
        return everything
    try:
        states = run_states(run_dir, recipe=recipe, expected_train=expected_train)
    except RunDirError:
        return everything
    redo = {state.stage for state in states if state.redo}
    for row in STAGES:  # a stage after one that is redone reads what it writes anew
        if row.after in redo:
            redo.add(row.name)
    return [name for name in everything if name in redo]


def run_status(run_dir) -> dict:
    """Every stage of a run and of its sub-runs, as `tledge status --json` prints it. Reads,
    never writes."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    runs = [(".", run_dir, False)] + [(label, folder, True)
                                      for label, folder in sub_runs(run_dir, manifest)]
    result = {"run": str(run_dir), "recipe": manifest["recipe"].get("name"), "runs": []}
    for label, folder, inner in runs:
        try:
            states = run_states(folder, sub_run=inner)
        except RunDirError as error:
            result["runs"].append({"run": label, "error": str(error), "stages": []})
            continue
        result["runs"].append({"run": label, "stages": [dataclasses.asdict(state)
                                                        for state in states]})
    pick = manifest.get("pick")
    result["pick"] = None if not pick else {
        "artifact": pick.get("artifact"), "model": pick.get("model", "model"),
        "runtime": pick.get("runtime")}
    result["current"] = all(stage["status"] in ("current", "failed")
                            for run in result["runs"] for stage in run["stages"]) and \
        not any("error" in run for run in result["runs"])
    return result


# -- what consumers ask ---------------------------------------------------------------------


def require_current(run_dir, stage: str = "validate", *, using: str, names=None,
                    escape: bool = True) -> None:
    """Refuse, in one line, a run whose `stage` (and what it reads) is not current: `using` is
    what the caller was about to do ("bundle models/quickstart"), `names` the artifacts it
    would use (for the message). A stage that ran and recorded a failure is current: its
    results are known (a failed artifact is marked so by the caller)."""
    states = run_states(run_dir, sub_run=not _is_top(run_dir))
    by_name = {state.stage: state for state in states}
    chain = []
    row = STAGE[stage]
    while row is not None:
        chain.insert(0, row.name)
        row = STAGE.get(row.after) if row.after else None
    for name in chain:
        state = by_name[name]
        if state.status in ("current", "failed") and not (
                name == "export" and state.status == "failed" and name != stage):
            continue
        what = f" ({', '.join(names)})" if names else ""
        why = f": {state.reason}" if state.reason else ""
        raise RunDirError(f"{run_dir}: {name} is {state.status}{why}; the artifacts{what} are "
                          f"not {'validated' if stage == 'validate' else 'validated and timed'}"
                          f" as they are now: run `{state.command}` "
                          f"{'first' if state.status == 'missing' else 'again'} (or `tledge "
                          f"build`) before `tledge {using}`" + (", or pass --unvalidated to use them as they "
                                                 "are, marked unvalidated" if escape else ""))
    return None


def _is_top(run_dir) -> bool:
    """Whether a run directory is a run of its own (not a baseline, single-task model or
    inline member inside another)."""
    run_dir = Path(run_dir).resolve()
    parent = run_dir.parent
    if run_dir.name in INNER_RUNS or parent.name in (SINGLE_TASK, "members"):
        return not ((parent / MANIFEST).is_file() or (parent.parent / MANIFEST).is_file())
    return True


def validated_rows(run_dir, manifest=None) -> dict:
    """{(artifact, runtime): parity row} of the rows that judged the files the manifest
    records now (a row whose sha256 is not its artifact's is left out: stale)."""
    run_dir = Path(run_dir)
    manifest = manifest or read_manifest(run_dir)
    try:
        parity = read_parity(run_dir)
    except RunDirError:  # a damaged record validates nothing
        parity = None
    entries = {entry["name"]: entry for entry in artifacts(manifest)}
    return {(row.artifact, row.runtime): row for row in (parity.rows if parity else [])
            if row_is_current(row, entries.get(row.artifact))}
