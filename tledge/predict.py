"""Classify images with an artifact, in its real runtime: `tledge predict` and `Run.predict`.

Images go through THE loader (`tledge.data.load_image`) at the artifact's input size, so a
prediction sees pixels prepared exactly as in training, calibration and validation: stretched
to the input size (not cropped, the aspect ratio not kept), raw RGB 0-255.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from pathlib import Path

import numpy as np

from tledge.bench.stage import load_pick, pick_folder, pick_name
from tledge.data.images import image_files, IMAGE_SUFFIXES, load_image_sized, resize_images
from tledge.errors import ArtifactError, DataError, RunDirError
from tledge.inspection import describe_file
from tledge.pipeline import require_current
from tledge.rundir import check_run_dir, find_artifact, MANIFEST, read_manifest, \
    verified_artifact
from tledge.runners import load, runtimes_for
from tledge.tasks import blocks, widths

GLOB_CHARACTERS = "*?["


def expand_images(inputs) -> list[tuple[str, str | None]]:
    """The images that `inputs` name, each as (path, None), or (input, error) for an input
    that names none: a file is taken as named (whatever its suffix); a folder gives the image
    files below it (IMAGE_SUFFIXES, hidden ones skipped, sorted); a pattern with * ? or [ that
    is not itself a file gives the image files it matches (** for any depth), sorted."""
    found = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            files = [str(file) for file in image_files(path)]
            missing = f"a folder with no image files ({' '.join(IMAGE_SUFFIXES)}) in it"
        elif not path.exists() and any(char in text for char in GLOB_CHARACTERS):
            files = sorted(match for match in glob.glob(text, recursive=True)
                           if os.path.isfile(match) and match.lower().endswith(IMAGE_SUFFIXES))
            missing = "a pattern that matches no image file"
        else:
            found.append((text, None))
            continue
        found.extend((file, None) for file in files)
        if not files:
            found.append((text, missing))
    return found


@dataclasses.dataclass
class Opened:
    """An artifact checked for the input contract, ready to load in a runtime."""
    path: Path
    info: dict  # describe_file's description
    entry: dict | None  # its run's manifest entry, when it sits in a run that lists it

    @property
    def size(self) -> tuple[int, int]:
        shape = self.info["input"]["shape"]
        return int(shape[1]), int(shape[2])


def open_artifact(artifact_path) -> Opened:
    """Describe an artifact file and check that tledge can feed it raw RGB pixels.

    Raises:
        ArtifactError: the artifact is missing, unreadable or refused, or its input is not
            [batch, H, W, 3] with a fixed size and a dtype tledge feeds.
        RunDirError: the artifact sits in a run directory that records another sha256.
    """
    artifact_path = Path(artifact_path)
    entry = run_entry(artifact_path) if artifact_path.exists() else None
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
    return Opened(artifact_path, info, entry)


def runtime_for(opened: Opened, runtime: str | None) -> str:
    """The runtime to run an artifact in: the one asked for, if it runs this format, else
    the format's first (its reference runtime).

    Raises:
        ArtifactError: `runtime` does not run this artifact's format.
    """
    names = runtimes_for(opened.info["family"])
    if runtime is None:
        return names[0]
    if runtime not in names:
        raise ArtifactError(f"{opened.path}: runtime {runtime!r} does not run "
                            f"{opened.info['family']} files; use one of {', '.join(names)}")
    return runtime


def predict_files(images, artifact_path, *, top_k: int = 5, runtime: str | None = None,
                  threads: int | None = None) -> list[dict]:
    """Top-k classes of each image that `images` name (files, folders, glob patterns: see
    `expand_images`) under the artifact at `artifact_path` (a path, or `open_artifact`'s).

    Labels come from the artifact's embedded metadata, else from the `manifest.json` next to
    it (the entry for this very file), else they are the class indices as strings. A file
    that a run's manifest lists is checked against it first.

    Returns:
        One dict per image, in order: "image", "artifact", "runtime" and "top", a list of
        {"index", "label", "probability"}, most probable first; a multi-task model's has
        "tasks" instead: {task name: its "top" list}, in output order. An image that cannot
        be read (or an input that names none) is a dict with "error" instead, and the others
        are still classified.

    Raises:
        ArtifactError: the artifact is missing, unreadable or refused, its input size is not
            fixed, or `runtime` does not run it.
        RunDirError: the artifact sits in a run directory that records another sha256.
        RuntimeUnavailable: the runtime cannot run the artifact here.
    """
    opened = artifact_path if isinstance(artifact_path, Opened) else open_artifact(artifact_path)
    runtime = runtime_for(opened, runtime)
    read, pixels = [], []
    for image, error in expand_images(images):
        if error is None:
            try:
                loaded, original = load_image_sized(image, opened.size)
                pixels.append(loaded)
            except DataError as failure:
                error = str(failure).removeprefix(f"{image}: ")  # the row names the file
        read.append((image, error, None if error else original))
    batch = np.stack(pixels) if pixels else np.zeros((0, *opened.size, 3), np.uint8)
    rows = iter(classify(opened, batch, top_k=top_k, runtime=runtime, threads=threads))
    results = []
    for image, error, original in read:
        head = {"image": image, "artifact": str(opened.path), "runtime": runtime}
        if error:
            results.append({**head, "error": error})
        else:
            results.append({**head, **next(rows), "original_size": list(original)})
    return results


def predict_pixels(pixels, artifact_path, *, top_k: int = 5, runtime: str | None = None,
                   threads: int | None = None) -> list[dict]:
    """`predict_files` for images already in memory: uint8 RGB [N, h, w, 3] (or one [h, w, 3]
    image), resized to the artifact's input as `load_image` resizes a file. Each dict has
    "image": its index in `pixels`.

    Raises:
        DataError: `pixels` is not uint8 RGB.
        ArtifactError, RunDirError, RuntimeUnavailable: as `predict_files`.
    """
    opened = open_artifact(artifact_path)
    runtime = runtime_for(opened, runtime)
    pixels = np.asarray(pixels)
    if pixels.ndim == 3:
        pixels = pixels[None]
    originals = [list(image.shape[:2]) for image in pixels] if pixels.ndim == 4 else []
    batch = resize_images(pixels, opened.size)
    return [{"image": index, "artifact": str(opened.path), "runtime": runtime, **row,
             "original_size": originals[index]}
            for index, row in enumerate(classify(opened, batch, top_k=top_k, runtime=runtime,
                                                 threads=threads))]


def classify(opened: Opened, pixels: np.ndarray, *, top_k: int, runtime: str,
             threads: int | None = None) -> list[dict]:
    """Run uint8 [N, H, W, 3] pixels at the artifact's input size through it, one image at a
    time (the batch of 1 it was validated at); each row's "top" (or "tasks")."""
    if top_k < 1:
        raise ArtifactError(f"top_k must be at least 1, got {top_k}")
    if not len(pixels):
        return []
    info, entry = opened.info, opened.entry
    runner = load(info, opened.path.parent, runtime, threads=threads)
    try:
        probabilities = np.concatenate([runner.predict(pixels[index:index + 1])
                                        for index in range(len(pixels))])
    finally:
        runner.close()
    tasks = info.get("tasks") or (entry or {}).get("tasks")
    if not tasks and isinstance(info["output"], list):  # several outputs, no labels known
        tasks = [{"name": spec["name"], "labels": [str(index) for index in
                                                   range(int(spec["shape"][-1]))]}
                 for spec in info["output"]]
    if tasks:  # a multi-task model: the top classes of every task's output
        if sum(widths(tasks)) != probabilities.shape[1]:
            raise ArtifactError(f"{opened.path}: its tasks name {sum(widths(tasks))} classes "
                                f"but its outputs give {probabilities.shape[1]}")
        parts = blocks(probabilities, tasks)
        return [{"tasks": {task["name"]: _top(part[index], task["labels"], top_k)
                           for task, part in zip(tasks, parts)}}
                for index in range(len(pixels))]
    labels = _labels(info, entry, probabilities.shape[1])
    return [{"top": _top(row, labels, top_k)} for row in probabilities]


def pick_artifact(run_dir, *, unvalidated: bool = False, using: str = "predict") -> Path:
    """The file of a run's pick, after checking that the run's bench (and what it read) is
    current, unless `unvalidated`.

    Raises:
        RunDirError: not a run, its bench is not current (with the command that makes it
            so), or it has no pick.
    """
    check_run_dir(run_dir)
    if not unvalidated:
        require_current(run_dir, "bench", using=using)
    pick = load_pick(run_dir)
    if pick is None:
        raise RunDirError(f"{run_dir} has no pick (no artifact passed parity and ran); name "
                          "one of its files instead")
    folder = pick_folder(run_dir, pick)
    return folder / find_artifact(read_manifest(folder), pick["artifact"])["path"]


def describe_pick(run_dir) -> str:
    """`tflite_int8, the pick of models/quickstart`."""
    pick = load_pick(run_dir)
    return f"{pick_name(pick)}, the pick of {run_dir}"


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
