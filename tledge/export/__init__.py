"""The export stage: every format the recipe lists, each recorded in the manifest.

One exporter module per family (`tflite`, `onnx`), one `export_<family>` function each; the
table in `tledge.formats` says which rows exist. A format that fails is recorded as failed
with its reason, and the others still export.
"""

from __future__ import annotations

import time
from pathlib import Path

from tledge.errors import ExportError, RunDirError, first_line
from tledge.formats import FORMATS, format_for
from tledge.quiet import quiet
from tledge.rundir import (artifact_entry, atomic_path, failed_entry, find_artifact,
                           read_manifest, record_stage, set_artifact, stage_hash,
                           write_manifest)


def _exporter(family):
    if family == "tflite":
        from tledge.export.tflite import export_tflite
        return export_tflite
    if family == "onnx":
        from tledge.export.onnx import export_onnx
        return lambda model, path, *, precision, calibration: export_onnx(
            model, path, precision=precision)
    raise ExportError(f"no exporter for {family!r}")


def requested_formats(recipe, only=None) -> list:
    """Format rows the recipe asks for, optionally narrowed to names or families in `only`."""
    rows = [format_for("tflite", p) for p in recipe.export.tflite] + \
           [format_for("onnx", p) for p in recipe.export.onnx]
    if only:
        unknown = [name for name in only
                   if name not in FORMATS and name not in {row.family for row in FORMATS.values()}]
        if unknown:
            raise ExportError(f"unknown format {unknown[0]!r}; choose from "
                              f"{', '.join(sorted(set(FORMATS) | {'tflite', 'onnx'}))}")
        rows = [row for row in rows if row.name in only or row.family in only]
    return rows


def export_run(run_dir, *, only=None, log=print) -> list[dict]:
    """Export the run's trained model to every requested format; returns manifest entries."""
    from tledge.data import calibration_images
    from tledge.model import load_model
    from tledge.rundata import run_recipe, run_splits
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    recipe = run_recipe(run_dir)
    rows = requested_formats(recipe, only)
    if only and not rows:
        raise ExportError(f"the recipe of {run_dir} lists none of {', '.join(only)}; add it "
                          f"under [export] in {run_dir / 'recipe.toml'}")
    reference = find_artifact(manifest, "keras")
    if reference.get("status") != "ok":
        raise RunDirError(f"{run_dir} has no trained model; run `tledge train` first")
    model = load_model(run_dir / reference["path"])
    calibration = None
    if any(row.precision == "int8" for row in rows):
        splits = run_splits(run_dir, recipe)
        calibration = calibration_images(splits, recipe.export.calibration_samples,
                                         seed=recipe.seed)
    entries = []
    for row in rows:
        path = run_dir / row.file_name
        start = time.perf_counter()
        try:
            with atomic_path(path) as temporary, quiet():
                spec = _exporter(row.family)(model, temporary, precision=row.precision,
                                             calibration=calibration)
            extra = {"calibration_samples": len(calibration)} if row.precision == "int8" else {}
            entry = artifact_entry(run_dir, path, row, recipe_hash=manifest["recipe"]["hash"],
                                   labels=manifest["labels"], input_spec=spec["input"],
                                   output_spec=spec["output"],
                                   export_seconds=round(time.perf_counter() - start, 2), **extra)
            log(f"  {row.name:<12} {entry['path']}  {entry['size_bytes'] / 1024:,.0f} KiB  "
                f"{entry['export_seconds']:.1f} s")
        except Exception as error:  # one failed format must not stop the others
            reason = str(error) if isinstance(error, ExportError) else \
                f"{type(error).__name__}: {first_line(error)}"
            entry = failed_entry(row, reason)
            log(f"  {row.name:<12} FAILED: {reason}")
        set_artifact(manifest, entry)
        entries.append(entry)
    record_stage(manifest, "export", formats=[row.name for row in rows],
                 hash=stage_hash(manifest, recipe, "export") if not only else None)
    write_manifest(run_dir, manifest)
    return entries
