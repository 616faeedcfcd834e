"""Classify image files with an artifact, in its real runtime: `tledge predict`.

Images go through THE loader (`tledge.data.load_image`) at the artifact's input size, so a
prediction sees pixels prepared exactly as in training, calibration and validation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tledge.data import load_images
from tledge.errors import ArtifactError, RunDirError
from tledge.inspection import describe_file
from tledge.rundir import MANIFEST, read_manifest, verified_artifact
from tledge.runners import load, runtimes_for
from tledge.tasks import blocks, widths


def predict_files(images, artifact_path, *, top_k: int = 5, runtime: str | None = None,
                  threads: int | None = None) -> list[dict]:
    """Top-k classes of each image file under the artifact at `artifact_path`.

    Labels come from the artifact's embedded metadata, else from the `manifest.json` next to
    it (the entry for this very file), else they are the class indices as strings. A file
    that a run's manifest lists is checked against it first.

    Returns:
        One dict per image, in order: "image", "artifact", "runtime" and "top", a list of
        {"index", "label", "probability"}, most probable first; a multi-task model's has
        "tasks" instead: {task name: its "top" list}, in output order.

    Raises:
        ArtifactError: the artifact is missing, unreadable or refused, or its input size is
            not fixed.
        RunDirError: the artifact sits in a run directory that records another sha256.
        DataError: an image file is missing or cannot be decoded.
        RuntimeUnavailable: the runtime cannot run the artifact here.
    """
    if top_k < 1:
        raise ArtifactError(f"top_k must be at least 1, got {top_k}")
    artifact_path = Path(artifact_path)
    entry = run_entry(artifact_path) if artifact_path.is_file() else None
    info = describe_file(artifact_path)
    shape = info["input"]["shape"]
    if len(shape) != 4 or shape[3] != 3 or min(shape[1:3]) < 1:
        raise ArtifactError(f"{artifact_path}: input shape {shape} is not [batch, H, W, 3] with "
                            "a fixed H and W; tledge predict feeds raw RGB images")
    dtype = info["input"].get("dtype")
    if dtype not in FED_DTYPES:
        raise ArtifactError(f"{artifact_path}: its input is {dtype}; tledge predict feeds raw "
                            "RGB pixels as float32 (or as uint8/int8 to a quantized input), the "
                            "input contract of every artifact tledge exports")
    pixels = load_images(images, (shape[1], shape[2]))  # every image read before any model
    runtime = runtime or runtimes_for(info["family"])[0]
    runner = load(info, artifact_path.parent, runtime, threads=threads)
    try:
        probabilities = np.concatenate([runner.predict(pixels[index:index + 1])
                                        for index in range(len(pixels))]) \
            if len(pixels) else np.zeros((0, 0), dtype=np.float32)
    finally:
        runner.close()
    tasks = info.get("tasks") or (entry or {}).get("tasks")
    if not tasks and isinstance(info["output"], list):  # several outputs, no labels known
        tasks = [{"name": spec["name"], "labels": [str(index) for index in
                                                   range(int(spec["shape"][-1]))]}
                 for spec in info["output"]]
    results = []
    if tasks and len(pixels) and sum(widths(tasks)) != probabilities.shape[1]:
        raise ArtifactError(f"{artifact_path}: its tasks name {sum(widths(tasks))} classes but "
                            f"its outputs give {probabilities.shape[1]}")
    if tasks:  # a multi-task model: the top classes of every task's output
        parts = blocks(probabilities, tasks) if len(pixels) else [np.zeros((0, 0))] * len(tasks)
        for index, image in enumerate(images):
            results.append({"image": str(image), "artifact": str(artifact_path),
                            "runtime": runtime, "tasks": {
                                task["name"]: _top(part[index], task["labels"], top_k)
                                for task, part in zip(tasks, parts)}})
        return results
    classes = probabilities.shape[1] if probabilities.ndim == 2 else 0
    labels = _labels(info, entry, classes)
    for image, row in zip(images, probabilities):
        results.append({"image": str(image), "artifact": str(artifact_path),
                        "runtime": runtime, "top": _top(row, labels, top_k)})
    return results


FED_DTYPES = ("float32", "uint8", "int8")  # what `tledge.core.engines.prepare_pixels` gives


def _top(row, labels, top_k) -> list[dict]:
    order = np.argsort(-row, kind="stable")[:min(top_k, len(row))]
    return [{"index": int(index), "label": str(labels[index]), "probability": float(row[index])}
            for index in order]


def _labels(info: dict, entry: dict | None, classes: int) -> list[str]:
    """Embedded labels, else the run's manifest's for this file, else indices."""
    candidates = [info.get("labels"), entry.get("labels") if entry else None]
    for labels in candidates:
        if labels and len(labels) == classes:
            return [str(label) for label in labels]
    return [str(index) for index in range(classes)]


def run_entry(artifact_path: Path) -> dict | None:
    """The manifest entry of an artifact that sits in a run directory, after checking the
    file is the one that manifest records; None for a file that travelled alone (no readable
    manifest beside it, or one that does not list it).

    Raises:
        RunDirError: the run lists this file and its sha256 is not the one recorded.
    """
    if not (artifact_path.parent / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(artifact_path.parent)
    except RunDirError:
        return None  # not a manifest tledge wrote: it vouches for nothing
    for entry in manifest["artifacts"]:
        if entry.get("status", "ok") == "ok" and entry["path"] == artifact_path.name:
            verified_artifact(artifact_path.parent, entry)
            return entry
    return None
