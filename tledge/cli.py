"""The `tledge` command. Each command parses, calls one library function, prints the result."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import warnings
import zipfile
from pathlib import Path

import click

from tledge.backbones import BACKBONES
from tledge.bench.bundle import IMAGE_CAP, import_device_result, write_bundle
from tledge.core.device import parse_counts
from tledge.bench.emulate import ARCHES, emulate
from tledge.bench.stage import bench_run, load_pick, pick_folder, pick_name
from tledge.data import load_splits
from tledge.data.cache import cache_root, clear_entries, list_entries
from tledge.data.corruptions import CORRUPTIONS, corrupt_folder
from tledge.domains import evaluate_run
from tledge.errors import RecipeError, TledgeError
from tledge.explain import explain_images, explain_run
from tledge.export.stage import export_model_file, export_run, read_labels
from tledge.flops import backbone_cost
from tledge.formats import FORMATS
from tledge.inspection import describe_file, family_of, format_description
from tledge.pipeline import check_sub_runs, require_current, run_status, STAGES
from tledge.parity import not_exported
from tledge.predict import describe_pick, open_artifact, pick_artifact, predict_files
from tledge.quiet import quiet_tensorflow
from tledge.recipe.dump import dump_toml
from tledge.recipe.load import load_recipe
from tledge.report.document import report_run
from tledge.rundir import (check_run_dir, find_artifact, read_manifest, RECIPE as RECIPE_FILE,
                           run_lock)
from tledge.runners import RUNTIMES
from tledge.stages import adapt_run, build as build_recipe, default_run_dir, train_run
from tledge.tune.study import Interrupted, tune as run_study
from tledge.validate import validate_run


INTERRUPTED = 130  # 128 + SIGINT, as shells report it; not 1, which means failed parity


class UsageFailure(click.ClickException):
    """A problem with the user's input: one message, exit code 2, no traceback."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


@contextlib.contextmanager
def _usage_errors_as_one_line():
    """Click's own usage errors (bad option value, missing argument, unknown command) in the
    same one-line form as tledge's errors, pointing at --help instead of printing usage."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # `tledge` alone prints the help, as it should
    except click.UsageError as error:
        message = error.format_message().rstrip(".")
        if error.ctx is not None:
            message += f"; see `{error.ctx.command_path} --help`"
        raise UsageFailure(message) from None


class _Group(click.Group):
    """The tledge group: every failure it reports is one `error:` line with exit code 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _usage_errors_as_one_line():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _usage_errors_as_one_line():
            return super().invoke(ctx)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.secho(f"warning: {message}", fg="yellow", err=True)


def _progress() -> int:
    """Keras progress bars on a terminal, one line per epoch in a log file."""
    return 1 if sys.stdout.isatty() else 2


def command(needs_tensorflow=True, group=None, lock=None, **settings):
    """A tledge CLI command (of `group`, else of tledge itself): TledgeErrors become one-line
    messages with exit code 2, Ctrl-C a message and exit code 130. `lock` names the argument
    holding a run directory the command writes: it holds the run's lock meanwhile."""
    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            warnings.showwarning = _show_warning
            try:
                if needs_tensorflow:
                    quiet_tensorflow()
                if lock and Path(kwargs[lock]).is_dir():
                    with run_lock(kwargs[lock]):
                        return function(*args, **kwargs)
                return function(*args, **kwargs)
            except TledgeError as error:
                raise UsageFailure(str(error)) from None
            except KeyboardInterrupt:
                click.echo("\ninterrupted: nothing half-written is kept (files are renamed into "
                           "place when complete); run the same command again to go on, a build "
                           "resumes training from its last finished epoch", err=True)
                sys.exit(INTERRUPTED)
        return (group or main).command(**settings)(wrapper)
    return decorate


@click.group(name="tledge", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tledge")
def main():
    """tledge: from a one-file recipe to a verified edge deployment.

    \b
    Examples, to start:
      tledge check recipes/quickstart.toml     validate a recipe, print it resolved
      tledge build recipes/quickstart.toml     train, export, validate, bench, explain, report

    \b
    Each stage also runs alone on an existing run directory:
      tledge export models/quickstart --format tflite
      tledge validate models/quickstart
      tledge bench models/quickstart
      tledge report models/quickstart
      tledge bundle models/quickstart --out pi.zip   benchmark on a device

    \b
    Which model to train for a budget (recipe keys searched, every trial a build):
      tledge tune recipes/tune_quickstart.toml

    \b
    Another domain (another camera, light or line):
      tledge evaluate models/quickstart --data recipes/adapt_quickstart.toml   the shift
      tledge adapt models/quickstart --data recipes/adapt_quickstart.toml      AdaBN
      tledge corrupt PHOTOS/ photos_dim/ --corruption contrast   (your class folders)
    """


# Existence is load_recipe's to check: its message says where recipes live.
RECIPE = click.Path(dir_okay=False, path_type=Path)
RUN_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


_JSON = click.option("--json", "as_json", is_flag=True,
                     help="Print the result as JSON only (progress lines go to stderr).")


def _json(data) -> str:
    return json.dumps(data, indent=2,
                      default=lambda value: value.item() if hasattr(value, "item") else str(value))


def _log(as_json):
    """Where progress lines go: stdout, or stderr when stdout carries JSON."""
    return (lambda line: click.echo(line, err=True)) if as_json else click.echo


@command(needs_tensorflow=False, name="check")
@click.argument("recipe", type=RECIPE)
@_JSON
def check(recipe, as_json):
    """Check RECIPE and print it with every default filled in.

    Every problem is listed at once, with its key path; the recipes a build derives from it
    (its [baseline]'s, its single-task models') are checked too. Exit code 0 when the recipe
    is valid, 2 when it is not.

    Example: tledge check recipes/quickstart.toml
    """
    resolved = load_recipe(recipe)
    problems = check_sub_runs(resolved)  # what a build derives from it must hold too
    if problems:
        raise RecipeError(recipe, problems)
    if as_json:
        click.echo(_json(resolved.to_dict()))
        return
    click.echo(f"# {recipe}: valid\n" + dump_toml(resolved.to_dict()))


@command(name="backbones")
@click.option("--size", type=click.IntRange(min=8), default=None,
              help="Input size (square) to count at, instead of each backbone's default.")
def backbones(size):
    """List the registered backbones: input sizes, layers, parameters and GFLOPs per image.

    Parameters and FLOPs are for the backbone without its head, built without weights
    (nothing is downloaded); FLOPs count 2 per multiply-add of the convolutions.

    Example: tledge backbones
    """
    click.echo(f"{'name':<19} {'size':>7} {'min':>4} {'layers':>6} {'params':>11} "
               f"{'GFLOPs':>7}  description")
    for backbone in BACKBONES.values():
        image_size = (size, size) if size else backbone.default_size
        shown = "x".join(map(str, image_size))
        try:
            cost = backbone_cost(backbone, image_size)
            figures = f"{cost.total_params:>11,} {cost.flops / 1e9:>7.3f}"
        except ValueError:  # below this backbone's minimum: say so in the row, keep going
            figures = f"{'-':>11} {'-':>7}"
        click.echo(f"{backbone.name:<19} {shown:>7} {backbone.min_size:>4} "
                   f"{backbone.layers:>6} {figures}  {backbone.description}")


_OUT = click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                    help="Run directory to write (default: models/<recipe name>).")


@command(needs_tensorflow=False, name="build")
@click.argument("recipe", type=RECIPE)
@_OUT
@click.option("--force", is_flag=True,
              help="Redo every stage, even those whose outputs are up to date.")
def build(recipe, out, force):
    """Run every stage for RECIPE: train, export, validate, bench, explain, report.

    A stage whose outputs exist and match the recipe is skipped (--force redoes it); a
    training run that was killed resumes from its last finished epoch. Exit code 1 when an
    artifact fails parity (everything is still written and reported).

    Example: tledge build recipes/quickstart.toml --out models/quickstart
    """
    load_recipe(recipe)  # a bad recipe fails in a blink, not after TensorFlow's import
    quiet_tensorflow()
    run_dir, parity = build_recipe(recipe, out=out, log=click.echo, verbose=_progress(),
                                   force=force)
    _exit_on_parity(parity)


@command(needs_tensorflow=False, name="train")
@click.argument("source", type=click.Path(path_type=Path))
@_OUT
def train(source, out):
    """Train from a recipe file or retrain an existing run directory.

    Examples: tledge train recipes/quickstart.toml
              tledge train models/quickstart
    """
    recipe_file = check_run_dir(source) / RECIPE_FILE if source.is_dir() else source
    recipe = load_recipe(recipe_file)
    run_dir = out or (source if source.is_dir() else default_run_dir(recipe))
    quiet_tensorflow()
    train_run(recipe, run_dir, log=click.echo, verbose=_progress())


@command(needs_tensorflow=False, name="tune")
@click.argument("recipe", type=RECIPE)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Study folder (default: models/<recipe name>.tune).")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Trials in the study, all workers together ([tune] trials); more than "
                   "it has extends a finished study.")
@click.option("--minutes", type=click.FloatRange(min=0), default=None,
              help="This worker starts no trial that would end past this ([tune] minutes; "
                   "0: no limit).")
@click.option("--storage", default=None, metavar="URL",
              help="An Optuna database URL several workers share (sqlite:///path/study.db, "
                   "postgresql://...); default: [tune] storage, else study.db in the study "
                   "folder.")
def tune(recipe, out, trials, minutes, storage):
    """Search RECIPE's own keys ([tune.space]) for the model to train, within a budget.

    Every trial builds the recipe with the trial's values into a run directory of the study
    (trials/<hash>/): trained, exported, its artifacts judged by parity and timed on [tune]'s
    runtime. The first trial is the recipe as written; the next, the changes the training
    doctor names on its curves; then Optuna's sampler (TPE). Trials whose validation
    accuracy trails the median at an epoch are pruned.

    \b
    The study folder gets:
      report.md, report.html   the Tuning report: Pareto front, best recipe, doctor
      best.toml                the best trial's recipe: `tledge build` it
      tuning.json              every trial's values and figures
      study.db                 the Optuna study (unless --storage names another)

    \b
    Ctrl-C keeps every finished trial; the same command resumes (the interrupted trial
    first). Several workers share one study: run the same command with the same --storage
    on each (a shared SQLite file on one host, or a database server).

    Exit code 1 when no trial of the study finished within the constraints.

    Example: tledge tune recipes/tune_quickstart.toml --minutes 10
    """
    load_recipe(recipe)  # a bad recipe fails in a blink, not after TensorFlow's import
    quiet_tensorflow()
    try:
        result = run_study(recipe, out=out, trials=trials, minutes=minutes, storage=storage,
                           log=click.echo)
    except Interrupted as error:
        click.echo(f"\n{error}", err=True)
        sys.exit(INTERRUPTED)
    click.echo(f"tune: this worker ran {result.ran} trial(s) and stopped: {result.stopped}")
    if result.best:
        click.echo(f"best recipe: {result.best}  (tledge build {result.best})")
    else:
        click.echo(f"no trial finished within the constraints: see {result.report}")
        sys.exit(1)


@main.group(name="cache", cls=_Group)
def cache():
    """The prepared-data cache: every image decoded and resized once, then read by every stage.

    \b
    Where it lives: data.cache_dir in a recipe, else $TLEDGE_CACHE_DIR, else
    ~/.cache/tledge/data ($XDG_CACHE_HOME/tledge/data).

    \b
    Examples:
      tledge cache list
      tledge cache prepare recipes/mobilenet_cifar.toml
      tledge cache clear KEY     (a key `tledge cache list` prints)
    """


_CACHE_DIR = click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                          default=None, help="The cache folder (default: $TLEDGE_CACHE_DIR, "
                                             "else ~/.cache/tledge/data).")


@command(needs_tensorflow=False, group=cache, name="list")
@_CACHE_DIR
def cache_list(cache_dir):
    """List the prepared data sets: key, source, size, images, bad images, disk use.

    Example: tledge cache list
    """
    root = cache_root(cache_dir)
    rows = list_entries(root)
    click.echo(f"{root}: {len(rows)} entr{'y' if len(rows) == 1 else 'ies'}, "
               f"{sum(row['bytes'] for row in rows) / 2**20:,.1f} MiB")
    for row in rows:
        size = "x".join(map(str, row["image_size"])) if row["image_size"] else "-"
        bad = f"  {row['bad_images']} bad" if row["bad_images"] else ""
        click.echo(f"  {row['key']}  {row['source'] or '?':<9} {size:>9} "
                   f"{row['images']:>9,} images {row['bytes'] / 2**20:>10,.1f} MiB  "
                   f"{row['created'] or ''}  {row['where']}{bad}")


@command(needs_tensorflow=False, group=cache, name="clear")
@click.argument("keys", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Delete every entry.")
@_CACHE_DIR
def cache_clear(keys, everything, cache_dir):
    """Delete the entries KEYS (see `tledge cache list`), or every entry with --all.

    A run whose entry is gone prepares it again from its source when it next needs it. An
    entry a running tledge process reads is not deleted (it says which process holds it).

    Example: tledge cache clear KEY   (a key from `tledge cache list`)
    """
    if not keys and not everything:
        raise UsageFailure("name the entries to delete (see `tledge cache list`), or --all")
    if keys and everything:
        raise UsageFailure("give either entry keys or --all, not both")
    root = cache_root(cache_dir)
    deleted, held = clear_entries(root, keys)
    click.echo(f"deleted {len(deleted)} entr{'y' if len(deleted) == 1 else 'ies'} from {root}")
    for key, pids in held.items():
        click.echo(f"kept {key}: in use by a running tledge process (pid "
                   f"{', '.join(map(str, pids))}); clear it when that process has ended")


@command(needs_tensorflow=False, group=cache, name="prepare")
@click.argument("recipe", type=RECIPE)
def cache_prepare(recipe):
    """Prepare RECIPE's data now (decode, resize, check for bad images and duplicates).

    Useful before a multi-worker launch or on a machine that trains later. Exit code 2 when
    the data has unreadable images and data.on_bad_image is "error".

    Example: tledge cache prepare recipes/quickstart.toml
    """
    resolved = load_recipe(recipe)
    splits = load_splits(resolved.data, seed=resolved.seed, log=click.echo)
    counts = ", ".join(f"{name} {len(labels)}" for name, labels in
                       (("train", splits.y_train), ("val", splits.y_val),
                        ("test", splits.y_test)))
    click.echo(f"data: {resolved.data.source}, {splits.num_classes} classes, {counts}; "
               f"cache entry {splits.record['cache']['key']} in {splits.record['cache']['root']}")


# Everything the export table can write, by family or by name; the Keras model is trained,
# not exported.
_EXPORT_CHOICES = ["all"] + sorted(({row.family for row in FORMATS.values()} | set(FORMATS))
                                   - {"keras"})
_PRECISIONS = list(dict.fromkeys(row.precision for row in FORMATS.values()))


def _table_epilog(title: str, rows) -> str:
    """A help section listing a registry's rows (click keeps lines after \\b as they are)."""
    width = max(len(name) for name, _ in rows)
    return "\b\n" + title + "\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in rows)


_MARKS = {"current": "ok", "stale": "STALE", "missing": "missing", "failed": "FAILED"}


@command(needs_tensorflow=False, name="status", epilog=_table_epilog(
    "Stages (tledge.pipeline.STAGES), in order:",
    [(row.name, f"reads {row.reads}; made current by `{row.command.format(run='RUN')}`")
     for row in STAGES]))
@click.argument("run_dir", type=RUN_DIR)
@click.option("--json", "as_json", is_flag=True, help="Print the states as JSON only.")
def status(run_dir, as_json):
    """Show each stage of RUN_DIR and of its sub-runs: current, stale (and why), missing or
    failed, with the command that makes it current.

    Reads the run, never writes it, and needs nothing else: a run copied alone shows the same
    states. Exit code 0 when every stage is current (a failed artifact is a known result),
    1 otherwise.

    \b
    Examples: tledge status models/quickstart
              tledge status models/quickstart --json
    """
    result = run_status(run_dir)
    if as_json:
        click.echo(_json(result))
    else:
        for run in result["runs"]:
            where = run_dir if run["run"] == "." else run_dir / run["run"]
            click.echo(f"{where}" + (f": {run['error']}" if "error" in run else ""))
            for stage in run["stages"]:
                line = f"  {stage['stage']:<9} {_MARKS[stage['status']]:<8}"
                if stage["reason"]:
                    line += f" {stage['reason']}"
                if stage["status"] not in ("current", "failed") or \
                        (stage["status"] == "failed" and stage["stage"] == "export"):
                    line += f"  -> `{stage['command']}`"
                click.echo(line.rstrip())
        pick = result["pick"]
        bench = next(stage for stage in result["runs"][0]["stages"] if stage["stage"] == "bench")
        if pick:
            click.echo(f"pick: {pick_name(pick)} on {pick['runtime']}"
                       + ("" if bench["status"] == "current" else
                          f" (not current: bench is {bench['status']})"))
    if not result["current"]:
        sys.exit(1)


@command(name="export", lock="source", epilog=_table_epilog(
    "Formats (tledge.formats.FORMATS):",
    [(row.name, row.description) for row in FORMATS.values() if row.family != "keras"]))
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "formats", multiple=True, type=click.Choice(_EXPORT_CHOICES),
              help="A family (tflite, onnx, openvino, savedmodel), a format (tflite_int8, ...) "
                   "or all. Repeatable. Default: every format the recipe lists.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(_PRECISIONS),
              help="Only these precisions; named here, they are exported even if the recipe "
                   "does not list them. Repeatable.")
@click.option("--calibration-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="For a .keras file: images to calibrate int8 with.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="For a .keras file: where to write (default: <model>_export/ beside it).")
@click.option("--labels", "labels_path", type=click.Path(exists=True, path_type=Path),
              help="For a .keras file: its class names, in output order: a text file of one "
                   "per line, or a folder of class folders (sorted by name). Default: the "
                   "output indices 0, 1, ...")
def export(source, formats, precisions, calibration_dir, out, labels_path):
    """Export a trained run (or any tledge-style .keras model): TFLite, ONNX, OpenVINO, SavedModel.

    SOURCE is a run directory, or a .keras file whose model takes raw 0-255 RGB pixels and
    returns probabilities. Each export prints its file, size and time; a format that fails
    is reported (exit 1) and the others still export.

    \b
    Examples: tledge export models/quickstart --format tflite
              tledge export models/quickstart --format onnx --precision int8
              tledge export model.keras --calibration-dir PHOTOS/ --labels labels.txt
    """
    if source.is_file():
        if source.suffix != ".keras":
            raise UsageFailure(f"{source}: expected a run directory or a .keras file")
        if "int8" in precisions or any("int8" in name for name in formats):
            if calibration_dir is None:
                raise UsageFailure("int8 needs images to calibrate with: add --calibration-dir "
                                   "FOLDER (any images of the kind the model will see)")
        labels = read_labels(labels_path) if labels_path else None
        out_dir, entries = export_model_file(source, out, only=formats or None,
                                             precisions=precisions or None,
                                             calibration_dir=calibration_dir, labels=labels,
                                             log=click.echo)
        click.echo(f"wrote {out_dir / 'manifest.json'}")
    else:
        for option, value in (("--out", out), ("--calibration-dir", calibration_dir),
                              ("--labels", labels_path)):
            if value is not None:
                raise UsageFailure(f"{option} is for a .keras file; a run directory is exported "
                                   "into itself, calibrated on its own training images, "
                                   "labelled with its own classes")
        entries = export_run(source, only=formats or None, precisions=precisions or None,
                             log=click.echo)
        click.echo(f"the run's validation no longer covers these files: run `tledge validate "
                   f"{source}` (then `tledge bench {source}`), or `tledge status {source}`")
    if any(entry["status"] == "failed" for entry in entries):
        sys.exit(1)


@command(name="validate", lock="run_dir")
@click.argument("run_dir", type=RUN_DIR)
@click.option("--runtime", "runtimes", multiple=True, type=click.Choice(list(RUNTIMES)),
              help="Judge the artifacts in this runtime too, beside the recipe's "
                   "bench.runtimes (e.g. onnxruntime_web, in headless Chromium). Repeatable.")
@_JSON
def validate(run_dir, runtimes, as_json):
    """Check every artifact's accuracy against the Keras model, in its real runtime.

    Exit code 1 when any artifact fails its thresholds. A row that meets them on fewer images
    than can show its agreement threshold is "not enough evidence" (a warning names how many
    images would do; exit code 0): it is not called passed, and ships only when nothing
    passed, marked unproven.

    \b
    Examples: tledge validate models/quickstart
              tledge validate models/quickstart --runtime onnxruntime_web
    """
    parity = validate_run(run_dir, runtimes=runtimes, log=_log(as_json))
    if as_json:
        click.echo(_json(parity.to_json()))
    _exit_on_parity(parity)


def _parse_counts(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(parse_counts(value))
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@command(name="bench", lock="run_dir", epilog=_table_epilog(
    "Runtimes (tledge.runners.RUNTIMES):",
    [(name, row.description) for name, row in RUNTIMES.items()]))
@click.argument("run_dir", type=RUN_DIR)
@click.option("--runtime", "runtimes", multiple=True, type=click.Choice(list(RUNTIMES)),
              help="Runtime to use. Repeatable. Default: the recipe's bench.runtimes. A "
                   "runtime the recipe does not list (a browser: onnxruntime_web, "
                   "litert_web) is judged for parity first.")
@click.option("--threads", callback=_parse_counts, metavar="N[,N...]",
              help="Thread counts, e.g. 1,2,4. Default: the recipe's bench.threads.")
@click.option("--pick", "pick_only", is_flag=True,
              help="Print only the pick of the last bench (runs nothing).")
@click.option("--batch", callback=_parse_counts, metavar="N[,N...]",
              help="Batch sizes, e.g. 1,8. Default: the recipe's bench.batch_sizes.")
@click.option("--import", "device_result", type=click.Path(dir_okay=False, path_type=Path),
              metavar="RESULT.json",
              help="Store a device's result (from a bundle's bench_device.py) in the run's "
                   "devices.json and report, under the device's name (runs nothing).")
@_JSON
def bench(run_dir, runtimes, threads, batch, pick_only, device_result, as_json):
    """Time every artifact in every runtime it runs on, and name the pick.

    Each combination runs in its own process; a row gives load time, first inference,
    p50/p90/p99, throughput, GFLOP/s and peak memory. The pick is the fastest combination,
    at the recipe's first thread count and batch size, whose artifact passed parity.

    \b
    Examples: tledge bench models/quickstart --threads 1,2
              tledge bench models/quickstart --pick
              tledge bench models/quickstart --import result.json
    """
    if device_result:
        stored = import_device_result(run_dir, device_result)
        ran = sum(row["status"] == "ok" for row in stored["rows"])
        click.echo(f"imported {stored['device']['name']}: {ran} of {len(stored['rows'])} "
                   f"combinations ran; wrote {report_run(run_dir)}")
        return
    if pick_only:
        require_current(run_dir, "bench", using=f"bench {run_dir} --pick", escape=False)
        pick = load_pick(run_dir)
        if as_json:
            click.echo(_json(pick))
            return
        click.echo(f"{pick_name(pick)} {pick['runtime']} threads={pick['threads']} "
                   f"batch={pick['batch']} p50_ms={pick['p50_ms']:.3f} "
                   f"path={_artifact_path(pick_folder(run_dir, pick), pick['artifact'])}"
                   + _unproven(pick) if pick else "none")
        return
    result = bench_run(run_dir, runtimes=runtimes or None, threads=threads, batch_sizes=batch,
                       log=_log(as_json))
    if as_json:
        click.echo(_json(result))
        return
    pick = result["pick"]
    click.echo(f"pick: {pick_name(pick)} on {pick['runtime']}{_unproven(pick)}" if pick else
               "pick: none (no artifact passed parity and ran)")


def _unproven(pick) -> str:
    """What a pick that only lacked evidence says of itself."""
    if pick.get("parity") != "insufficient":
        return ""
    needed = (pick.get("evidence") or {}).get("images_needed")
    return " (UNPROVEN: not enough evidence" + (f", {needed} images would do)" if needed
                                                 else ")")


def _artifact_path(run_dir, name) -> str:
    return str(Path(run_dir) / find_artifact(read_manifest(run_dir), name)["path"])


_UNVALIDATED = click.option(
    "--unvalidated", is_flag=True,
    help="Use the run's artifacts even when they are not validated as they are now (exported "
         "again, or never validated): each is marked unvalidated. Without it, such a run is "
         "refused with the command that validates it.")


@command(name="bundle")
@click.argument("run_dir", type=RUN_DIR)
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The zip file to write, e.g. bundle.zip.")
@click.option("--artifacts", "names", multiple=True, metavar="NAME[,NAME...]",
              help="Artifacts to include (repeatable or comma-separated). Default: every "
                   ".tflite and .onnx artifact of the run.")
@click.option("--images", "image_count", type=click.IntRange(min=0), default=0,
              help=f"Evaluation images to bundle for the device check, the classes taken "
                   f"in turns. Default 0: all of them, up to {IMAGE_CAP}.")
@_UNVALIDATED
def bundle(run_dir, out, names, image_count, unvalidated):
    """Pack artifacts into a zip to use and benchmark on a device (a Raspberry Pi, a Jetson).

    The zip holds the artifacts, labels, classify.py (classifies images, a folder or a camera
    frame with the run's pick or any artifact) with a pinned requirements.txt, evaluation
    images (every class, taken in turns) with
    their expected classes and the build machine's raw outputs for them, and bench_device.py,
    which needs only Python 3.9+, numpy and ai-edge-litert, tflite-runtime or onnxruntime. On
    the device: `python3 bench_device.py --name pi5` writes result.json (the same statistics as
    `tledge bench`, device facts, and per artifact its accuracy, agreement with the build
    machine, largest output difference and the images that changed class); bring it back with
    `tledge bench RUN_DIR --import result.json`. Its web/ folder holds a page that
    classifies a picture (or a camera frame) in the browser with the pick (LiteRT.js or ONNX
    Runtime Web): `cd web && python3 -m http.server`.

    Example: tledge bundle models/quickstart --artifacts tflite_int8 --out pi.zip
    """
    wanted = [name.strip() for group in names for name in group.split(",") if name.strip()]
    path = write_bundle(run_dir, out, names=wanted or None, image_count=image_count,
                        unvalidated=unvalidated, log=click.echo)
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); on the device: unzip it, "
               "`pip install -r requirements.txt` (in a venv), then `python3 classify.py "
               "IMAGE` to classify and `python3 bench_device.py --name DEVICE` to check and "
               f"time; bring result.json back with `tledge bench {run_dir} --import "
               "result.json`" + ("; in a browser, `cd web && python3 -m http.server`"
                                 if "web/index.html" in zipfile.ZipFile(path).namelist()
                                 else "") + " (README.txt inside says more)")


@command(name="emulate", lock="run_dir")
@click.argument("run_dir", type=RUN_DIR)
@click.option("--arch", type=click.Choice(list(ARCHES)), default="arm64", show_default=True,
              help="The device architecture to emulate.")
@click.option("--name", help="The device name in devices.json and the report "
                             "(default: '<arch> (emulated)').")
@click.option("--images", "image_count", type=click.IntRange(min=0), default=0,
              help="Evaluation images for the check (default 0: all, up to the bundle's cap).")
@_UNVALIDATED
def emulate_device(run_dir, arch, name, image_count, unvalidated):
    """Run the device check on an emulated ARM userland: does the artifact classify there
    like here?

    Bundles the run, prepares once a Debian arm64 userland with qemu-user (cached, with the
    runtimes' aarch64 wheels pinned to this machine's versions), runs bench_device.py inside
    it and imports the result as an emulated device: per artifact, agreement with this
    machine, the largest output difference and the images that changed class. int8 kernels
    differ between x86 and ARM; latencies under emulation are the emulator's, marked so.
    Needs qemu-user-static and debootstrap (apt-get install qemu-user-static debootstrap),
    root, and binfmt_misc.

    Example: sudo tledge emulate models/quickstart --arch arm64
    """
    outcome = emulate(run_dir, arch=arch, name=name, images=image_count,
                      unvalidated=unvalidated, log=click.echo)
    for check in outcome["result"].get("accuracy") or []:
        if "error" in check:
            click.echo(f"  {check['artifact']:<16} check failed: {check['error']}")
            continue
        click.echo(f"  {check['artifact']:<16} agreement with this machine "
                   f"{check['agreement_with_host']:.3f}, largest output difference "
                   f"{check['max_difference']:g} ({check['difference_unit']})")
    click.echo(f"imported {outcome['device']!r}; wrote {report_run(run_dir)}")


@command(name="explain")
@click.argument("arguments", nargs=-1, type=click.Path(path_type=Path),
                metavar="RUN_DIR [IMAGE]...")
@click.option("--run", "run_option", type=RUN_DIR, hidden=True,
              help="The run directory (the first argument now; kept for older scripts).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the overlays of IMAGE files (default: beside each image).")
def explain(arguments, run_option, out):
    """Grad-CAM: where the run's model looks for the class it predicts.

    With IMAGE files, writes IMAGE.gradcam.png for each (the image and its heat map side by
    side; two images of one name from two folders are told apart by their folders). Without,
    redraws the run's Grad-CAM grids and feature maps and rebuilds the report.

    \b
    Examples: tledge explain models/quickstart PHOTO.jpg
              tledge explain models/quickstart
    """
    arguments = list(arguments)
    if run_option is None:
        if not arguments:
            raise UsageFailure("name the run directory: `tledge explain RUN_DIR [IMAGE]...`")
        run_option = arguments.pop(0)
    run_dir = check_run_dir(run_option)
    if arguments:
        for path in explain_images(arguments, run_dir, out=out):
            click.echo(f"wrote {path}")
        return
    if out is not None:
        raise UsageFailure("--out is where IMAGE overlays go; a run's own figures are written "
                           "into the run")
    with run_lock(run_dir):
        explain_run(run_dir, log=click.echo)
        click.echo(f"wrote {report_run(run_dir)}")


@command(needs_tensorflow=False, name="report", lock="run_dir")
@click.argument("run_dir", type=RUN_DIR)
def report(run_dir):
    """Rebuild report.md, report.html and figures/ from the run's JSON files.

    Example: tledge report models/quickstart
    """
    click.echo(f"wrote {report_run(run_dir)}")


@command(name="evaluate", lock="run_dir")
@click.argument("run_dir", type=RUN_DIR)
@click.option("--data", "data", required=True, metavar="DATA",
              help="Other data with the run's classes: a folder of class sub-folders, a .csv or "
                   ".npz file (every image is judged), or a recipe .toml (its [data] table: its "
                   "test split is judged).")
@click.option("--name", help="The domain's name in domains.json and the report (default: the "
                             "folder's, file's or recipe's name).")
@_JSON
def evaluate(run_dir, data, name, as_json):
    """How much worse is the model on other data? The domain shift, in one number.

    Runs the Keras model and every artifact that met its parity thresholds (passed, or on too
    few images to show it) on DATA, in their real runtimes: accuracy, per-class accuracy,
    confusion and agreement with the Keras model,
    beside the accuracy on the run's own test split. Stored in domains.json under the domain's
    name and shown in the report's Domains section.

    \b
    Examples: tledge evaluate models/quickstart --data recipes/adapt_quickstart.toml
              tledge evaluate models/quickstart --data PHOTOS/   (your class folders)
    """
    result = evaluate_run(run_dir, data, name=name, log=_log(as_json))
    if as_json:
        report_run(run_dir)
        click.echo(_json(result))
        return
    keras_row = result["rows"][0]
    if keras_row.get("source_accuracy") is not None:
        click.echo(f"shift: {keras_row['source_accuracy']:.1%} on the source "
                   f"{keras_row['source_split']} split, {keras_row['accuracy']:.1%} on "
                   f"{name or Path(data).stem} "
                   f"({100 * (keras_row['accuracy'] - keras_row['source_accuracy']):+.1f} points)")
    click.echo(f"wrote {report_run(run_dir)}")


@command(name="adapt")
@click.argument("run_dir", type=RUN_DIR)
@click.option("--data", "data", required=True, metavar="TARGET",
              help="The target domain: a recipe .toml (its training split adapts, its test "
                   "split judges), or a folder, .csv or .npz of images with the run's classes "
                   "(split like the run's data).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="The new run directory (default: <run>_adabn_<target> beside the run).")
@click.option("--name", help="The target domain's name (default: the recipe's or folder's).")
def adapt(run_dir, data, out, name):
    """Adapt a trained run to another domain without labels (AdaBN).

    Every BatchNorm layer's statistics are re-estimated on the target's training images
    (their labels, if any, are never used to adapt); the weights are untouched. The adapted
    model becomes a new run directory that records its parent, and is exported (int8
    calibrated on target images), validated and benchmarked like any run. Its report shows
    source and target accuracy before and after. A backbone without BatchNorm (VGG) cannot be
    adapted this way: fine-tune it on a few labelled target images instead (model.head =
    "keep").

    \b
    Example: tledge adapt models/quickstart --data recipes/adapt_quickstart.toml
    """
    run, parity = adapt_run(run_dir, data, out=out, name=name, log=click.echo)
    _exit_on_parity(parity)


@command(needs_tensorflow=False, name="corrupt")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--corruption", required=True, type=click.Choice(list(CORRUPTIONS)),
              help="What the other camera or light does to the images.")
@click.option("--severity", type=click.IntRange(1, 5), default=3, show_default=True,
              help="1 (mild) to 5 (severe), as in the standard corruption benchmark.")
@click.option("--seed", type=int, default=0, show_default=True, help="For the noise.")
def corrupt(source, out, corruption, severity, seed):
    """Write a shifted copy of a folder of class sub-folders, to measure robustness.

    Every image is read, corrupted and written as PNG under OUT with the same sub-folders
    (JPEG for the jpeg corruption, at its quality), so `tledge evaluate RUN --data OUT` says
    how the model holds up before it meets such images for real.

    \b
    Example: tledge corrupt PHOTOS/ photos_dim/ --corruption contrast --severity 3
    (PHOTOS/: your folder of class sub-folders)
    """
    count = corrupt_folder(source, out, corruption, severity, seed=seed, log=click.echo)
    click.echo(f"wrote {count} images to {out} ({corruption}, severity {severity})")


def _exit_on_parity(parity) -> None:
    if parity.failed:
        judged = [row.artifact for row in parity.failed if not not_exported(row)]
        unwritten = [row.artifact for row in parity.failed if not_exported(row)]
        if judged:
            click.secho(f"parity FAILED for: {', '.join(judged)}", fg="red", err=True)
        if unwritten:
            click.secho(f"not exported (the export failed, see above; run `tledge export` "
                        f"again once its cause is fixed): {', '.join(unwritten)}", fg="red",
                        err=True)
        sys.exit(1)


ARTIFACT = click.Path(path_type=Path)  # existence and kind: describe_file says them


@command(name="inspect")
@click.argument("artifact", type=ARTIFACT)
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON only.")
def inspect_artifact(artifact, as_json):
    """Describe ARTIFACT (.tflite, .onnx, .keras, or an OpenVINO IR folder or .xml): format,
    precision, tensors, operators, size, embedded metadata and, for TFLite, the operators
    XNNPACK will not run.

    Example: tledge inspect models/quickstart/model_int8.tflite
    """
    info = describe_file(artifact)
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@command(name="predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "artifact", required=True, type=click.Path(path_type=Path),
              help="The artifact to run: a .tflite, .onnx or .keras file, an OpenVINO IR "
                   "folder, or a run directory (its pick, which must be validated and "
                   "benchmarked as it is).")
@click.option("--runtime", type=click.Choice(sorted(RUNTIMES)), default=None,
              help="The runtime to run it in (default: the format's reference runtime: "
                   "litert for .tflite, onnxruntime for .onnx, openvino for an IR, keras for "
                   ".keras).")
@_UNVALIDATED
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many classes to show per image.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON only: a list with one object per image (an image that could "
                   "not be read has \"error\" instead of \"top\").")
def predict(images, artifact, runtime, top_k, as_json, unvalidated):
    """Classify IMAGES (files, folders, glob patterns such as 'photos/**/*.jpg') with an
    artifact, in its real runtime and through the same image loader as training: each image
    is stretched to the model's input size (not cropped), raw RGB 0-255.

    An image that cannot be read is reported on its own line and the others are still
    classified; the exit code is then 1.

    \b
    Examples: tledge predict PHOTO.jpg --model models/quickstart/model_int8.tflite --top-k 3
              tledge predict photos/ --model models/quickstart   (the run's pick)
              tledge predict 'photos/*.png' --model model_fp32.onnx --runtime openvino
    """
    which = ""
    if artifact.is_dir() and family_of(artifact) is None:  # a run, not an IR folder
        run_dir = artifact
        artifact = pick_artifact(run_dir, unvalidated=unvalidated,
                                 using=f"predict --model {run_dir}")
        which = f" ({describe_pick(run_dir)})"
    opened = open_artifact(artifact)
    results = predict_files(list(images), opened, top_k=top_k, runtime=runtime)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        runtime = results[0]["runtime"] if results else runtime
        height, width = opened.size
        click.echo(f"model {artifact}{which}, runtime {runtime}; each image stretched to "
                   f"{width}x{height} (width x height), raw RGB 0-255")
        for result in results:
            _print_prediction(result, opened.size)
    failed = [result["image"] for result in results if "error" in result]
    if failed:
        click.echo(f"{len(failed)} of {len(results)} image(s) could not be classified: "
                   f"{', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}", err=True)
        sys.exit(1)


def _print_prediction(result, size) -> None:
    if "error" in result:
        click.echo(f"{result['image']}: error: {result['error']}")
        return
    height, width = result["original_size"]
    stretched = "" if (height, width) == tuple(size) else f" ({width}x{height}, stretched)"
    click.echo(f"{result['image']}{stretched}")
    for task, top in (result.get("tasks") or {None: result.get("top", [])}).items():
        if task is not None:
            click.echo(f"  {task}:")
        for rank, row in enumerate(top, 1):
            click.echo(f"{'  ' if task else ''}  {rank}. {row['label']:<20} "
                       f"{row['probability']:.4f}")
