"""Classify image files with an artifact, in its real runtime: `tledge predict`.

Images go through THE loader (`tledge.data.load_image`) at the artifact's input size, so a
prediction sees pixels prepared exactly as in training, calibration and validation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tledge.errors import ArtifactError


def predict_files(images, artifact_path, *, top_k: int = 5, runtime: str | None = None,
                  threads: int | None = None) -> list[dict]:
    """Top-k classes of each image file under the artifact at `artifact_path`.

    Labels come from the artifact's embedded metadata, else from the `manifest.json` next to
    it (the entry for this very file), else they are the class indices as strings.

    Returns:
        One dict per image, in order: "image", "artifact", "runtime" and "top", a list of
        {"index", "label", "probability"}, most probable first.

    Raises:
        ArtifactError: the artifact is missing, unreadable or refused, or its input size is
            not fixed.
        DataError: an image file is missing or cannot be decoded.
        RuntimeUnavailable: the runtime cannot run the artifact here.
    """
    from tledge.data import load_images
    from tledge.inspect import describe_file
    from tledge.runners import load, runtimes_for
    if top_k < 1:
        raise ArtifactError(f"top_k must be at least 1, got {top_k}")
    artifact_path = Path(artifact_path)
    info = describe_file(artifact_path)
    shape = info["input"]["shape"]
    if len(shape) != 4 or shape[3] != 3 or min(shape[1:3]) < 1:
        raise ArtifactError(f"{artifact_path}: input shape {shape} is not [batch, H, W, 3] with "
                            "a fixed H and W; tledge predict feeds raw RGB images")
    pixels = load_images(images, (shape[1], shape[2]))  # every image read before any model
    runtime = runtime or runtimes_for(info["format"])[0]
    runner = load(info, artifact_path.parent, runtime, threads=threads)
    try:
        probabilities = np.concatenate([runner.predict(pixels[index:index + 1])
                                        for index in range(len(pixels))]) \
            if len(pixels) else np.zeros((0, 0), dtype=np.float32)
    finally:
        runner.close()
    classes = probabilities.shape[1] if probabilities.ndim == 2 else 0
    labels = _labels(info, artifact_path, classes)
    results = []
    for image, row in zip(images, probabilities):
        order = np.argsort(-row, kind="stable")[:min(top_k, classes)]
        results.append({"image": str(image), "artifact": str(artifact_path),
                        "runtime": runtime,
                        "top": [{"index": int(index), "label": labels[index],
                                 "probability": float(row[index])} for index in order]})
    return results


def _labels(info: dict, artifact_path: Path, classes: int) -> list[str]:
    """Embedded labels, else the sibling manifest's for this file, else indices."""
    candidates = [info.get("labels"), _manifest_labels(artifact_path)]
    for labels in candidates:
        if labels and len(labels) == classes:
            return [str(label) for label in labels]
    return [str(index) for index in range(classes)]


def _manifest_labels(artifact_path: Path) -> list | None:
    from tledge.rundir import MANIFEST, sha256
    manifest_path = artifact_path.parent / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # no manifest beside it is normal for a file that travelled alone
    digest = None
    for entry in manifest.get("artifacts", []) if isinstance(manifest, dict) else []:
        if entry.get("path") != artifact_path.name or entry.get("status", "ok") != "ok":
            continue
        if entry.get("sha256"):
            digest = digest or sha256(artifact_path)
            if digest != entry["sha256"]:
                continue  # same name, another file: its labels may not be this model's
        return entry.get("labels") or manifest.get("labels")
    return None
