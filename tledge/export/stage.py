"""The export stage: every format the recipe lists, each recorded in the manifest.

One exporter module per family (`tflite`, `onnx`), one `export_<family>` function each; the
table in `tledge.formats` says which rows exist. A format that fails is recorded as failed
with its reason, and the others still export.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from tledge.core.machine import machine_facts
from tledge.data import calibration_images, IMAGE_SUFFIXES, load_images
from tledge.errors import (ArtifactError, DataError, ExportError, first_line, RunDirError,
                           TledgeError)
from tledge.export.int8 import diagnose_onnx, diagnose_tflite, Judge, quantize_with_repair
from tledge.export.metadata import artifact_metadata, embed_onnx, embed_tflite
from tledge.export.onnx import export_onnx
from tledge.export.openvino import AccuracyControl, embed_openvino, export_openvino
from tledge.export.qat import IMAGES as QAT_IMAGES, LEARNING_RATE, quantization_aware_copy
from tledge.export.savedmodel import export_savedmodel
from tledge.export.tflite import export_tflite, tflite_spec
from tledge.formats import FAMILIES, format_for, FORMATS
from tledge.model import load_model
from tledge.parity import predict_all
from tledge.quiet import quiet
from tledge.pipeline import stage_record, stage_state
from tledge.core.metrics import CONFIDENCE, images_needed
from tledge.run_inputs import int8_order, run_recipe, run_splits
from tledge.rundir import (artifact_entry, artifacts, atomic_path, empty_manifest, failed_entry,
                           find_artifact, read_manifest, record_stage, set_artifact, sha256,
                           verified_artifact, write_manifest)
from tledge.runners import load
from tledge.tasks import targets, task_names


def _exporter(family):
    """`export_<family>(model, path, *, precision, calibration, tasks, **options) -> specs`."""
    if family == "tflite":
        return export_tflite
    if family == "onnx":
        return lambda model, path, *, precision, calibration, settings=None, tasks=None, **_: \
            export_onnx(model, path, precision=precision, calibration=calibration,
                        settings=settings, tasks=tasks)
    if family == "savedmodel":
        return lambda model, path, *, precision, calibration, tasks=None, **_: \
            export_savedmodel(model, path, precision=precision, tasks=tasks)
    if family == "openvino":
        return lambda model, path, *, precision, calibration, tasks=None, accuracy=None, **_: \
            export_openvino(model, path, precision=precision, calibration=calibration,
                            tasks=tasks, accuracy=accuracy)
    raise ExportError(f"no exporter for {family!r}")


def requested_formats(recipe, only=None, precisions=None) -> list:
    """The format rows to export.

    Args:
        only: families ("tflite", "onnx", "savedmodel", "all") or format names
            ("tflite_int8"); None means every family.
        precisions: narrow to these precisions, and add them even where the recipe does not
            list them (an explicit request); None means what the recipe lists.
    """
    only = tuple(only or ("all",))
    names = set(FORMATS) | set(FAMILIES) | {"all"}
    unknown = [name for name in only if name not in names]
    if unknown:
        raise ExportError(f"unknown format {unknown[0]!r}; choose from "
                          f"{', '.join(sorted(names - {'keras'}))}")
    wanted = lambda row: "all" in only or row.name in only or row.family in only  # noqa: E731
    if precisions:
        known = {row.precision for row in FORMATS.values()}
        bad = [p for p in precisions if p not in known]
        if bad:
            raise ExportError(f"unknown precision {bad[0]!r}; choose from "
                              f"{', '.join(sorted(known))}")
        return [row for row in FORMATS.values() if row.family != "keras" and wanted(row)
                and row.precision in precisions]
    listed = [format_for("tflite", p) for p in recipe.export.tflite] + \
             [format_for("onnx", p) for p in recipe.export.onnx] + \
             [format_for("openvino", p) for p in recipe.export.openvino] + \
             ([format_for("savedmodel", "fp32")] if recipe.export.savedmodel else [])
    return [row for row in listed if wanted(row)]


def read_labels(path) -> list[str]:
    """Class names for a foreign model: a text file of one name per line (blank lines skipped),
    or a folder whose sub-folders are the classes (sorted by name, as the folder source reads
    them)."""
    path = Path(path)
    if path.is_dir():
        names = sorted(child.name for child in path.iterdir()
                       if child.is_dir() and not child.name.startswith("."))
    else:
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                     if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: cannot read labels ({first_line(error)}); give a text file "
                            "of one class name per line, or a folder of class folders") from None
    if not names:
        raise DataError(f"{path}: no class names in it (one per line, or class folders)")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: a class name is listed twice")
    return names


def _embed(path, row, spec, manifest, about) -> dict:
    """Labels, input contract, recipe hash and version inside the artifact itself (and, in a
    .tflite, the standard metadata clients read); returns the specs read back from the file
    as written (a .tflite's tensors are renamed `image` and `probabilities`)."""
    if row.family not in ("tflite", "onnx", "openvino"):  # a SavedModel: the manifest says
        return spec
    tasks = manifest.get("tasks")
    foreign = manifest["recipe"].get("model_sha256")  # a .keras file tledge did not train
    facts = artifact_metadata(labels=manifest["labels"], input_spec=spec["input"],
                              recipe_hash=None if foreign else manifest["recipe"]["hash"],
                              precision=row.precision, fmt_name=row.name, tasks=tasks,
                              model_sha256=foreign)
    if row.family == "onnx":
        embed_onnx(path, facts)
        return spec
    if row.family == "openvino":
        embed_openvino(path, facts)
        return spec
    embed_tflite(path, facts, about)
    return tflite_spec(path, tasks=task_names(tasks) if tasks else None)


def about_model(recipe) -> dict:
    """What a .tflite's standard metadata says of the model, from the recipe."""
    return {"name": recipe.name, "description": recipe.description,
            "author": recipe.export.author, "license": recipe.export.license}


def export_run(run_dir, *, only=None, precisions=None, log=print) -> list[dict]:
    """Export the run's trained model to every requested format; returns manifest entries."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    recipe = run_recipe(run_dir)
    rows = requested_formats(recipe, only, precisions)
    if not rows:
        asked = ", ".join((only or ()) + tuple(precisions or ())) or "anything"
        raise ExportError(f"the recipe of {run_dir} lists none of {asked}; add it under "
                          f"[export] in {run_dir / 'recipe.toml'}, or name the precision "
                          "with --precision")
    reference = find_artifact(manifest, "keras")
    if reference.get("status") != "ok":
        raise RunDirError(f"{run_dir} has no trained model; run `tledge train` first")
    was_current = stage_state(run_dir, manifest, "export", recipe).status == "current"
    model = load_model(verified_artifact(run_dir, reference))
    calibration, plan = None, None
    if any(row.precision == "int8" for row in rows):
        splits = run_splits(run_dir, recipe)
        calibration = calibration_images(splits, recipe.export.calibration_samples,
                                         seed=recipe.seed)
        plan = int8_plan(run_dir, manifest, recipe, splits, reference, log=log)
    entries = export_artifacts(model, run_dir, manifest, rows, calibration=calibration,
                               int8_io=recipe.export.int8_io, about=about_model(recipe),
                               int8=plan, log=log)
    earlier = manifest["stages"].get("export", {}).get("formats", [])
    # an export of some formats completes the stage when every format the recipe lists is
    # now of this model (the others exported by a current export before); else the stage is
    # left without a hash, and the next build redoes it. Either way, what depends on a
    # rewritten file is stale: its parity rows no longer match its sha256
    complete = not only and not precisions or (was_current and {
        row.name for row in requested_formats(recipe)} <= set(earlier) | {
        entry["name"] for entry in entries if entry["status"] == "ok"})
    record_stage(manifest, "export",
                 formats=list(dict.fromkeys(earlier + [row.name for row in rows])),
                 **(stage_record(manifest, recipe, "export") if complete else {"hash": None}))
    write_manifest(run_dir, manifest)
    return entries


@dataclasses.dataclass
class Int8Plan:
    """What an int8 export of a run needs to judge and repair itself (`tledge.export.int8`)."""
    calibration_for: Callable  # count -> training images, the first `count` of one order
    calibration_samples: int
    train_images: int  # the training images calibration may take (the repair split's apart)
    judge: object  # an int8.Judge on the repair split; None with export.int8_repair off
    thresholds: Callable  # format name -> parity thresholds
    recorded: dict  # format name -> what its last export of this model kept
    isa: str
    max_attempts: int
    max_seconds: float
    float_steps: int = 4
    qat_steps: int = 0
    seed: int = 0


JUDGE_IMAGES = 2000  # at most this many images judge each int8 candidate


def int8_plan(run_dir, manifest, recipe, splits, reference, *, log=print) -> Int8Plan:
    """The int8 plan of a run: candidates are judged against the Keras model, in the runtime
    each format runs in, on the repair split: training images held apart from calibration
    (`tledge.run_inputs.int8_order`), never the test split the validate stage judges. Where
    the training split cannot spare any (or `export.int8_repair_images = 0`), on the
    validation split (test if there is none), as the log says."""
    judge = None
    calibration_order, repair = int8_order(splits, recipe)
    if recipe.export.int8_repair == "auto":
        thresholds = [recipe.validate.tolerance(name)["min_agreement"]
                      for name in ("tflite_int8", "onnx_int8")]
        needed = images_needed(max(thresholds))
        if len(repair):
            # the training images calibration never takes, and the validation split: images
            # the model never fitted, so the evidence is of data like the deployment's too
            split = "repair"
            images = np.concatenate([np.asarray(splits.x_train[repair]),
                                     np.asarray(splits.x_val)])
            labels = np.concatenate([np.asarray(splits.y_train)[repair],
                                     np.asarray(splits.y_val)])
            log(f"  int8: repair candidates judged on {len(labels)} images: {len(repair)} "
                f"training images held apart from calibration (export.int8_repair_images = "
                f"{recipe.export.int8_repair_images}) and the {len(splits.y_val)} of the "
                "validation split"
                + ("" if needed is not None and len(labels) >= needed else
                   f"; fewer than the {needed} a perfect agreement needs to show "
                   f"{max(thresholds)} at {CONFIDENCE:.0%}: no margin can be shown"))
        else:
            split = "val" if len(splits.y_val) else "test"
            images, labels = (splits.x_val, splits.y_val) if split == "val" \
                else (splits.x_test, splits.y_test)
            log(f"  int8: the training split cannot spare images for a repair split "
                f"({len(splits.y_train)} training images, {recipe.export.calibration_samples} "
                f"for calibration, export.int8_repair_images = "
                f"{recipe.export.int8_repair_images}); repair candidates judged on the "
                f"{split} split")
        chosen = np.arange(len(labels))
        if len(chosen) > JUDGE_IMAGES:  # a seeded sample, every class in its proportion
            chosen = np.sort(np.random.default_rng(recipe.seed).choice(
                len(chosen), JUDGE_IMAGES, replace=False))
        images, labels = np.asarray(images[chosen]), np.asarray(labels)[chosen]
        if len(labels):
            runner = load(reference, run_dir)
            judge = Judge(images, targets(labels, manifest.get("tasks"), manifest["labels"]),
                          predict_all(runner, images), split, threads=recipe.bench.threads[0],
                          tasks=manifest.get("tasks"))
            runner.close()
        else:
            log("  int8: no images to judge int8 candidates on; exported once, without repair")
    recorded = {entry["name"]: {"settings": entry["quantization"]["settings"],
                                "remedy": entry["quantization"]["remedy"],
                                "narrow": entry["quantization"].get("narrow", False),
                                "diagnosis": entry["quantization"].get("diagnosis")}
                for entry in artifacts(manifest) if isinstance(entry.get("quantization"), dict)
                and entry["quantization"].get("model_sha256") == reference["sha256"]
                and entry["quantization"].get("passed")
                and isinstance(entry["quantization"].get("settings"), dict)}

    def calibration_for(count):
        count = count or recipe.export.calibration_samples
        if count > len(calibration_order):
            warnings.warn(f"asked for {count} calibration images but the training split "
                          f"spares only {len(calibration_order)} beside the repair split; "
                          f"calibrating with {len(calibration_order)}", stacklevel=2)
        return splits.x_train[calibration_order[:count]]
    return Int8Plan(
        calibration_for=calibration_for,
        calibration_samples=recipe.export.calibration_samples,
        train_images=len(calibration_order), judge=judge,
        thresholds=recipe.validate.tolerance, recorded=recorded, isa=machine_facts()["isa"],
        max_attempts=recipe.export.int8_repair_attempts,
        max_seconds=recipe.export.int8_repair_seconds,
        float_steps=recipe.export.int8_float_steps, qat_steps=recipe.export.int8_qat_steps,
        seed=recipe.seed)


def _export_int8(row, model, path, plan, *, int8_io, model_sha256, log, tasks=None):
    """The int8 artifact of `row` at `path` (judged and repaired when the plan has a judge);
    returns (specs, the entry's `quantization` record)."""
    exporter = _exporter(row.family)

    def export(settings, candidate):
        source = model
        if settings.get("qat"):
            source = _quantization_aware(row, model, settings, plan, log)
        with quiet():
            return exporter(source, candidate, precision="int8", int8_io=int8_io,
                            calibration=plan.calibration_for(settings.get("calibration_samples")),
                            settings={key: value for key, value in settings.items()
                                      if key != "qat"}, tasks=tasks)

    def diagnose(settings):
        log(f"    int8 {row.name}: measuring the error layer by layer")
        calibration = plan.calibration_for(settings.get("calibration_samples"))
        if row.family == "onnx":
            return diagnose_onnx(model, calibration, settings=settings, tasks=tasks)
        return diagnose_tflite(model, calibration, int8_io=int8_io, settings=settings)

    record = quantize_with_repair(
        row, export, path, judge=plan.judge, thresholds=plan.thresholds(row.name),
        calibration_samples=plan.calibration_samples, train_images=plan.train_images,
        isa=plan.isa, diagnose=diagnose, recorded=plan.recorded.get(row.name),
        max_attempts=plan.max_attempts, max_seconds=plan.max_seconds,
        float_steps=plan.float_steps, qat_steps=plan.qat_steps, log=log)
    record["model_sha256"] = model_sha256
    return record.pop("spec"), record


def _export_nncf(row, model, path, calibration, plan, tasks, log) -> dict:
    """The OpenVINO int8 IR through NNCF. With a run's plan and a single-task model:
    accuracy-controlled on the plan's repair images (never the test split), at most the
    recipe's `max_accuracy_drop` below the float IR, on the same calibration images as the
    other int8 files; else NNCF's plain post-training quantization. The spec's "nncf" says
    which, and what NNCF kept in float."""
    accuracy = None
    judge = plan.judge if plan is not None else None
    if judge is not None and not tasks:
        accuracy = AccuracyControl(judge.images, judge.labels,
                                   plan.thresholds(row.name)["max_accuracy_drop"], judge.split)
    if plan is not None:
        calibration = plan.calibration_for(None)
    start = time.perf_counter()
    with quiet():
        spec = export_openvino(model, path, precision="int8", calibration=calibration,
                               tasks=tasks, accuracy=accuracy)
    record = spec["nncf"]
    if accuracy is not None:
        log(f"    int8 {row.name}: NNCF with accuracy control (at most {accuracy.max_drop:g} "
            f"below the float IR on {len(accuracy.labels)} {accuracy.split} images): "
            f"{record['reverted']} of {record['reverted'] + record['quantizers']} quantizers "
            f"returned to float, {time.perf_counter() - start:.0f} s")
    return spec


def _quantization_aware(row, model, settings, plan, log):
    """The model fine-tuned with int8 simulated (`tledge.export.qat`) for `settings`: on the
    training images calibration may take (never the repair split; at most `QAT_IMAGES`, the
    first of the calibration order, which is stratified), with the weights' bits
    and grid the exporter will use. Records in `settings["qat"]` the steps that ran, so that
    a rebuild repeats exactly them."""
    asked = settings["qat"]
    onnx = row.family == "onnx"
    images = min(plan.train_images, QAT_IMAGES)  # the calibration order: every class
    copy, facts = quantization_aware_copy(
        model, plan.calibration_for(images),
        bits=7 if onnx and settings.get("reduce_range") else 8,
        per_channel=settings.get("per_channel", True) if onnx else True,
        steps=int(asked["steps"]), seed=plan.seed, max_seconds=asked.get("seconds"),
        learning_rate=float(asked.get("learning_rate", LEARNING_RATE)))
    settings["qat"] = {"steps": facts["steps"], "learning_rate": facts["learning_rate"]}
    before, best = facts["simulated_agreement"]
    log(f"    int8 {row.name}: quantization-aware fine-tune: {facts['steps']} steps in "
        f"{facts['seconds']:.0f} s on {images} training images; agreement with "
        f"the Keras model under simulated int8 {before:.4f}, at best {best:.4f} (step "
        f"{facts['best_step']}) on those images")
    if not facts["best_step"]:
        raise ExportError(f"the quantization-aware fine-tune did not raise the agreement "
                          f"under simulated int8 ({before:.4f}) in {facts['steps']} steps; "
                          "nothing new to export")
    return copy


def export_artifacts(model, run_dir, manifest, rows, *, calibration=None, int8_io="uint8",
                     about=None, int8=None, log=print) -> list[dict]:
    """Write each format of `rows` into `run_dir` and enter it in `manifest` (not saved).
    `about` is what a .tflite's standard metadata says of the model (`about_model`); `int8`
    an `Int8Plan` (a run's export: int8 judged, repaired and explained), else int8 is
    exported once with the default settings on `calibration`."""
    entries = []
    model_sha256 = find_artifact(manifest, "keras").get("sha256") if int8 else None
    tasks = task_names(manifest["tasks"]) if manifest.get("tasks") else None
    for row in rows:
        path = Path(run_dir) / row.file_name
        start = time.perf_counter()
        try:
            if row.precision == "int8" and calibration is None:
                raise ExportError("int8 needs calibration images (--calibration-dir)")
            extra = {}
            with atomic_path(path) as temporary:
                if row.family == "openvino" and row.precision == "int8":
                    spec = _export_nncf(row, model, temporary, calibration, int8, tasks, log)
                    extra["nncf"] = spec.pop("nncf")
                    extra["calibration_samples"] = extra["nncf"]["calibration_samples"]
                    if model_sha256:
                        extra["nncf"]["model_sha256"] = model_sha256
                elif row.precision == "int8" and int8 is not None:
                    spec, extra["quantization"] = _export_int8(
                        row, model, temporary, int8, int8_io=int8_io,
                        model_sha256=model_sha256, log=log, tasks=tasks)
                    asked = extra["quantization"]["settings"].get("calibration_samples")
                    # the images calibration had: the count asked, at most the training split
                    extra["calibration_samples"] = min(asked or len(calibration),
                                                       int8.train_images)
                else:
                    with quiet():
                        spec = _exporter(row.family)(model, temporary, precision=row.precision,
                                                     calibration=calibration, int8_io=int8_io,
                                                     tasks=tasks)
                    if row.precision == "int8":
                        extra["calibration_samples"] = len(calibration)
                with quiet():
                    spec = _embed(temporary, row, spec, manifest, about)
            entry = artifact_entry(run_dir, path, row, recipe_hash=manifest["recipe"]["hash"],
                                   labels=manifest["labels"], input_spec=spec["input"],
                                   output_spec=spec["output"],
                                   export_seconds=round(time.perf_counter() - start, 2),
                                   **({"tasks": manifest["tasks"]} if manifest.get("tasks")
                                      else {}), **extra)
            log(f"  {row.name:<16} {entry['path']}  {entry['size_bytes'] / 1024:,.0f} KiB  "
                f"{entry['export_seconds']:.1f} s")
            kept = entry.get("quantization") or {}
            if kept.get("remedy", "plain") != "plain" or kept.get("passed") is False:
                log(f"  {'':<16} kept: {kept['remedy']}" + (
                    "" if kept["passed"] else " (the closest candidate; it still fails "
                    f"parity on the {kept['split']} split)"))
        except Exception as error:  # one failed format must not stop the others
            reason = first_line(error) if isinstance(error, TledgeError) else \
                f"{type(error).__name__}: {first_line(error)}"
            entry = failed_entry(row, reason)
            log(f"  {row.name:<16} FAILED: {reason}")
        set_artifact(manifest, entry)
        entries.append(entry)
    return entries


def export_model_file(model_path, out_dir=None, *, only=None, precisions=None,
                      calibration_dir=None, calibration_samples=200, int8_io="uint8",
                      labels=None, log=print):
    """Export a Keras model tledge did not train; returns (out_dir, manifest entries).

    The model must follow tledge's input contract: raw 0-255 RGB pixels in (its own
    preprocessing inside), probabilities out. Calibration images for int8 come from
    `calibration_dir` (any images, in sub-folders or not), read by tledge's loader.
    `labels`: the class names in output order (`read_labels`); without them the artifacts'
    labels are the output indices "0", "1", ...
    """
    model_path = Path(model_path)
    model = load_model(model_path)
    classes = int(model.output_shape[-1]) if len(model.outputs) == 1 else None
    if labels is not None and classes is not None and len(labels) != classes:
        raise DataError(f"{len(labels)} labels given for a model with {classes} outputs; "
                        "give one class name per output, in output order")
    out_dir = Path(out_dir) if out_dir else model_path.with_name(f"{model_path.stem}_export")
    rows = [row for row in FORMATS.values() if row.family != "keras"]
    if only or precisions:
        rows = requested_formats(None, only, precisions or
                                 tuple(dict.fromkeys(row.precision for row in rows)))
    if not only and importlib.util.find_spec("openvino") is None:  # an optional extra
        log("  OpenVINO IR needs openvino (pip install 'tledge[openvino]'): left out")
        rows = [row for row in rows if row.family != "openvino"]
    if calibration_dir is None and any(row.precision == "int8" for row in rows):
        log("  int8 needs images to calibrate with (--calibration-dir): left out")
        rows = [row for row in rows if row.precision != "int8"]
    calibration = None
    if any(row.precision == "int8" for row in rows) and calibration_dir:
        files = sorted(p for p in Path(calibration_dir).rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES)[:calibration_samples]
        if not files:
            raise DataError(f"{calibration_dir}: no images to calibrate int8 with")
        calibration = load_images(files, tuple(model.input_shape[1:3]))
        if len(files) < calibration_samples:
            warnings.warn(f"calibrating with {len(files)} images from {calibration_dir} "
                          f"(asked for {calibration_samples})")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirError(f"cannot write to {out_dir}: {error.strerror}; choose another "
                          "folder with --out") from None
    if len(model.outputs) > 1:
        raise ArtifactError(f"{model_path}: a model with {len(model.outputs)} outputs; tledge "
                            "exports a multi-task model from its run (`tledge export RUN_DIR`), "
                            "where the manifest names its tasks")
    digest = sha256(model_path)
    manifest = empty_manifest({"name": model_path.stem, "source": str(model_path.resolve()),
                               "hash": digest[:16], "model_sha256": digest},
                              list(labels) if labels else [str(index) for index in range(classes)],
                              tuple(model.input_shape[1:3]))
    entries = export_artifacts(model, out_dir, manifest, rows, calibration=calibration,
                               int8_io=int8_io, about={"name": model_path.stem}, log=log)
    write_manifest(out_dir, manifest)
    return out_dir, entries
