"""The library API: build a recipe and use the run it makes from Python.

    import tledge
    run = tledge.build("recipes/quickstart.toml")       # quiet; a Run
    run = tledge.Run("models/quickstart")               # or open one that exists
    run.pick                                            # {"artifact": "tflite_fp32", ...}
    run.predict("photo.jpg")[0]["top"][0]["label"]      # the pick, in its runtime

Every read goes through the checks the CLI's commands use: a run directory is verified before
it is trusted, a file before it is run, and the pick is used only when the run's bench is
current (`unvalidated=True` to use it anyway, as `tledge predict --unvalidated`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from tledge.bench.stage import load_pick
from tledge.errors import RunDirError
from tledge.pipeline import run_status
from tledge.predict import pick_artifact, predict_files, predict_pixels
from tledge.quiet import quiet_tensorflow
from tledge.records import read_parity
from tledge.rundir import check_run_dir, find_artifact, read_manifest, verified_artifact
from tledge.stages import build as build_stages


def build(recipe, out=None, *, force: bool = False, log=None) -> "Run":
    """Build a recipe (a TOML file or a `Recipe`) as `tledge build` does, quietly.

    Args:
        recipe: the recipe file, or a loaded `tledge.load_recipe(...)`.
        out: the run directory (default: models/<name>, as the CLI's).
        force: redo every stage, current or not.
        log: a callable given each line the CLI would print (e.g. `print`); None prints
            nothing, and neither do TensorFlow's start-up logs and Keras' progress bars.

    Returns:
        The built `Run`.

    Raises:
        TledgeError: what the CLI reports as a one-line error (a bad recipe, a damaged
            run, a full disk): its message says what to do.
    """
    quiet_tensorflow()
    run_dir, _ = build_stages(recipe, out=out, log=log or (lambda line: None),
                              verbose=2 if log else 0, force=force)
    return Run(run_dir)


class Run:
    """A run directory that tledge built: its stages, artifacts, parity, pick and report,
    and predictions with any of its artifacts.

    Raises (on opening):
        RunDirError: `path` is not a tledge run directory, or its manifest is damaged.
    """

    def __init__(self, path):
        self.path = Path(path)
        check_run_dir(self.path)

    def __repr__(self):
        return f"Run({os.fspath(self.path)!r})"

    @property
    def manifest(self) -> dict:
        """manifest.json, read and checked."""
        return read_manifest(self.path)

    @property
    def status(self) -> dict:
        """Every stage of the run and of its sub-runs, as `tledge status --json` prints it;
        `status["current"]` is True when nothing is stale or missing."""
        return run_status(self.path)

    @property
    def artifacts(self) -> list[dict]:
        """The manifest's artifact entries (name, path, format, precision, sha256, input and
        output specs, status), failed exports included with their error."""
        return list(self.manifest["artifacts"])

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def pick(self) -> dict | None:
        """The artifact to ship (artifact, runtime, threads, p50_ms, ...), as the last bench
        chose it; None when no artifact passed parity and ran."""
        return load_pick(self.path)

    @property
    def parity(self) -> list[dict]:
        """One dict per (artifact, runtime) that validate judged: status, accuracy, drop,
        agreement, max_abs_diff, ...; empty before validate ran."""
        parity = read_parity(self.path)
        return [dataclasses.asdict(row) for row in parity.rows] if parity else []

    @property
    def report(self) -> Path | None:
        """report.html (else report.md) of the run, None before the report was written."""
        for name in ("report.html", "report.md"):
            if (self.path / name).is_file():
                return self.path / name
        return None

    def artifact_path(self, artifact: str | None = None, *, unvalidated: bool = False) -> Path:
        """The verified file of an artifact by its manifest name (`tflite_int8`), or of the
        pick when `artifact` is None."""
        if artifact is None:
            return pick_artifact(self.path, unvalidated=unvalidated,
                                 using=f"Run({os.fspath(self.path)!r}).predict")
        entry = find_artifact(self.manifest, artifact)
        if entry.get("status", "ok") != "ok":
            raise RunDirError(f"{self.path}: {artifact} failed to export "
                              f"({entry.get('error', 'no file')}); use another artifact")
        return verified_artifact(self.path, entry)

    def predict(self, images, artifact: str | None = None, runtime: str | None = None, *,
                top_k: int = 5, threads: int | None = None,
                unvalidated: bool = False) -> list[dict]:
        """Classify images with an artifact of this run (default: its pick) in its real
        runtime (default: the artifact's own), as `tledge predict` does.

        Args:
            images: an image file, a folder, a glob pattern, or a list of them; or pixels,
                a uint8 RGB numpy array [N, h, w, 3] or [h, w, 3] (stretched to the input
                size as a file is).
            artifact: a manifest name (`tflite_int8`, `onnx_fp32`, `keras`), None for the
                pick.
            runtime: litert, onnxruntime, openvino, keras, ...; None for the artifact's own.

        Returns:
            One dict per image: "image", "artifact", "runtime", "original_size" and "top"
            ([{"index", "label", "probability"}], best first; "tasks" for a multi-task
            model), or "error" for a file that could not be read.
        """
        path = self.artifact_path(artifact, unvalidated=unvalidated)
        if path.suffix == ".keras":  # the only artifact TensorFlow runs: its logs silenced
            quiet_tensorflow()
        if hasattr(images, "dtype") and hasattr(images, "shape"):
            return predict_pixels(images, path, top_k=top_k, runtime=runtime, threads=threads)
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        return predict_files(list(images), path, top_k=top_k, runtime=runtime, threads=threads)
