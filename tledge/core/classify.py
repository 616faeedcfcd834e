"""classify.py in a bundle: classify images (files, folders, a camera frame) with one of the
bundle's artifacts, on the device, with nothing but its requirements.txt installed.

Pixels are prepared as tledge's loader prepares them (EXIF orientation applied, RGB, Pillow's
bilinear resize to the input size: stretched, not cropped) and fed through the same engines
bench_device.py times (`tledge_core.engines`), so an answer here is the answer
`tledge predict` gives on the build machine, up to the runtime's own arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from .engines import (dequantize, ONNX_MODULES, open_model, output_names, prepare_pixels,
                      runtime_for, TFLITE_MODULES, Unavailable)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def image_paths(inputs) -> list:
    """Each input file as named; a folder's image files below it (hidden ones skipped), sorted."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(found for found in path.rglob("*")
                            if found.is_file() and found.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".")
                                        for part in found.relative_to(path).parts))
        else:
            paths.append(path)
    return paths


def read_image(path, size):
    """uint8 [height, width, 3] pixels of an image file, as tledge's loader reads it."""
    from PIL import Image, ImageOps
    with Image.open(path) as image:
        image.seek(0)
        image.load()
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    return resize(rgb, size)


def resize(image, size):
    """A PIL image (or uint8 RGB array) stretched to (height, width) with Pillow's bilinear
    filter, as tledge's loader resizes."""
    from PIL import Image
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def camera_frame(index: int, size):
    """One frame of camera `index` through OpenCV, as RGB pixels at `size`."""
    try:
        import cv2
    except ImportError:
        raise SystemExit("--camera needs OpenCV: pip install opencv-python-headless") from None
    capture = cv2.VideoCapture(index)
    try:
        ok, frame = capture.read()
    finally:
        capture.release()
    if not ok:
        raise SystemExit(f"camera {index} gave no frame (is it connected and free?)")
    return resize(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), size)


def top_classes(probabilities, labels, top_k) -> list:
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    return [{"index": int(index), "label": str(labels[index]),
             "probability": float(probabilities[index])} for index in order]


def answer(probabilities, bundle, top_k) -> dict:
    """{"top": [...]} for one output, {"tasks": {task: [...]}} for a multi-task artifact."""
    tasks = bundle.get("tasks")
    if not tasks:
        return {"top": top_classes(probabilities, bundle["labels"], top_k)}
    result, start = {}, 0
    for task in tasks:
        width = len(task["labels"])
        result[task["name"]] = top_classes(probabilities[start:start + width], task["labels"],
                                           top_k)
        start += width
    return {"tasks": result}


def choose(bundle, name):
    """The artifact to run: `name`, else the run's pick when the bundle holds it, else the
    first."""
    listed = {entry["name"]: entry for entry in bundle["artifacts"]}
    if name:
        if name not in listed:
            raise SystemExit(f"no artifact {name!r} in this bundle (it has: "
                             f"{', '.join(listed)})")
        return listed[name]
    return listed.get(bundle.get("pick")) or bundle["artifacts"][0]


def main(argv=None, folder=None) -> int:
    """classify.py's command line; `folder`: the bundle's."""
    folder = Path(folder or Path.cwd())
    bundle = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
    parser = argparse.ArgumentParser(
        prog="classify.py",
        description="Classify images with this bundle's artifact (default: the run's pick). "
                    "Needs numpy, pillow and the artifact's runtime (requirements.txt).")
    parser.add_argument("images", nargs="*", help="image files or folders")
    parser.add_argument("--camera", type=int, metavar="INDEX",
                        help="classify one frame of this camera (needs OpenCV)")
    parser.add_argument("--artifact", help="artifact name (" +
                        ", ".join(entry["name"] for entry in bundle["artifacts"]) + ")")
    parser.add_argument("--runtime", default="auto",
                        choices=("auto",) + TFLITE_MODULES + ONNX_MODULES,
                        help="runtime (auto: whichever is installed)")
    parser.add_argument("--top-k", type=int, default=3, help="classes to show (3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="runtime threads (default: every core)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    if not args.images and args.camera is None:
        parser.error("name image files or folders, or --camera INDEX")
    entry = choose(bundle, args.artifact)
    try:
        module = runtime_for(entry["file"], args.runtime)
        model = open_model(folder / entry["file"], args.threads, module,
                           precision=entry.get("precision"),
                           outputs=output_names(entry["output"]))
    except Unavailable as error:
        raise SystemExit(f"{entry['file']}: {error}") from None
    size = tuple(int(side) for side in entry["input"]["shape"][1:3])
    model.run(prepare_pixels(np.zeros((1, *size, 3), np.uint8), entry["input"]))  # warm-up
    inputs = [(str(path), path) for path in image_paths(args.images)]
    if args.camera is not None:
        inputs.append((f"camera {args.camera}", None))
    results, failed = [], 0
    for name, path in inputs:
        row = {"image": name, "artifact": entry["name"], "runtime": module}
        try:
            pixels = camera_frame(args.camera, size) if path is None else read_image(path, size)
        except (OSError, ValueError, SyntaxError) as error:
            results.append({**row, "error": f"not a readable image ({error})"})
            failed += 1
            continue
        prepared = prepare_pixels(pixels[None], entry["input"])
        started = time.perf_counter()
        raw = model.run(prepared)
        milliseconds = (time.perf_counter() - started) * 1000
        probabilities = dequantize(raw, entry["output"])[0]
        results.append({**row, **answer(probabilities, bundle, args.top_k),
                        "ms": round(milliseconds, 3)})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{entry['file']} ({entry['name']}) on {module}, {args.threads} thread(s); "
              f"images stretched to {size[1]}x{size[0]}")
        for result in results:
            if "error" in result:
                print(f"{result['image']}: error: {result['error']}")
                continue
            print(f"{result['image']}  {result['ms']:.2f} ms")
            for task, top in (result.get("tasks") or {None: result.get("top")}).items():
                if task:
                    print(f"  {task}:")
                for rank, item in enumerate(top, 1):
                    print(f"{'  ' if task else ''}  {rank}. {item['label']:<20} "
                          f"{item['probability']:.4f}")
    return 1 if failed else 0


LAUNCHER = '''"""Classify images with this tledge bundle: python3 classify.py --help"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, FOLDER)
from tledge_core.classify import main  # noqa: E402 - the bundle's own copy of tledge.core

sys.exit(main(folder=FOLDER))
'''  # classify.py in a bundle, beside tledge_core/
