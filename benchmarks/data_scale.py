"""The data path at scale: prepare once, stream everywhere, side by side in one run.

Generates two JPEG class-folder data sets (default 5,000 and 20,000 images of generated
shapes, stored at 256 px, trained at 224) and prints:

1. preparation throughput into the data cache: parallel workers against a single-process
   loop over the same files (goal on 2 cores: at least 1.7x);
2. input-pipeline throughput from the cache at 224x224, without and with augmentation
   (goal: at least 1,000 images/s without augmentation on 2 cores);
3. peak resident memory of `tledge train` (a tiny network, one epoch) at both sizes, each in
   its own process (goal: the larger, 4x the images, at most 15 % above the smaller);
4. time from the start of a later stage (validate) to its first batch of images on an
   already prepared run, against decoding the source again, as every stage did before.

Disk: about 0.2 GB of JPEGs and 0.75 GB of cache per 5,000 images (at 224), in --work
(deleted at the end unless --keep). Run: python benchmarks/data_scale.py
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from PIL import Image  # noqa: E402

CLASSES = ("circle", "square", "triangle", "cross", "ring", "star", "hbars", "checker",
           "diamond", "plus")


def cpu_name() -> str:
    from tledge.core.machine import machine_facts
    facts = machine_facts()
    return f"{facts['cpu']} ({facts['isa']})"


def make_folder(root: Path, count: int, stored: int, seed: int) -> float:
    """`count` JPEGs of generated shapes at stored x stored px in class folders; seconds."""
    from tledge.data.synthetic import generate
    start = time.perf_counter()
    per_class = count // len(CLASSES)
    chunk = 100
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for first in range(0, per_class, chunk):
            take = min(chunk, per_class - first)
            images, _ = generate([name], take, (stored, stored), 0.05,
                                 seed * 100_000 + label * 1000 + first)
            for offset, image in enumerate(images):
                Image.fromarray(image).save(root / name / f"{first + offset:06d}.jpg",
                                            quality=90)
    return time.perf_counter() - start


def recipe_text(name, folder, size, backbone, alpha, augment) -> str:
    alpha_line = f"alpha = {alpha}\n" if alpha else ""
    augment_line = 'augment = { flip = "horizontal", rotation = 0.05, zoom = 0.1 }\n' \
        if augment else ""
    return (f'name = "{name}"\nseed = 0\n\n[data]\nsource = "folder"\npath = "{folder}"\n'
            f"image_size = [{size}, {size}]\nbatch_size = 64\n{augment_line}\n"
            f'[model]\nbackbone = "{backbone}"\n{alpha_line}weights = "none"\n\n'
            "[train.feature_extraction]\nepochs = 1\n\n[export]\ntflite = []\nonnx = []\n")


def prepare(recipe_path, workers) -> tuple[float, object]:
    from tledge.data import load_splits
    from tledge.data.cache import clear_entries
    from tledge.recipe.load import load_recipe
    import dataclasses
    from tledge.data.sources import source_key
    recipe = load_recipe(recipe_path)
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, workers=workers))
    try:
        clear_entries(os.environ["TLEDGE_CACHE_DIR"], [source_key(recipe.data, recipe.seed)])
    except Exception:  # not prepared yet
        pass
    start = time.perf_counter()
    splits = load_splits(recipe.data, seed=recipe.seed, progress=False)
    return time.perf_counter() - start, splits


def pipeline_rate(splits, augment: bool, images: int) -> float:
    from tledge.data.feed import augmentation, make_dataset
    from tledge.recipe.spec import AugmentRecipe
    layers = augmentation(AugmentRecipe(flip="horizontal", rotation=0.05, zoom=0.1), 0) \
        if augment else None
    data = make_dataset(splits.x_train, splits.y_train, len(splits.class_names),
                        batch_size=64, seed=0, shuffle=True, augment=layers)
    seen, start = 0, None
    for x, _ in data.repeat():
        if start is None:  # the first batch pays for tracing; time the steady state
            start = time.perf_counter()
            continue
        seen += int(x.shape[0])
        if seen >= images:
            break
    return seen / (time.perf_counter() - start)


def train_peak_rss(recipe_path, run_dir) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of `tledge train` in a process of its own."""
    code = ("import resource, sys, time\n"
            "from tledge.cli import main\n"
            "start = time.perf_counter()\n"
            "try:\n    main(['train', sys.argv[1], '--out', sys.argv[2]])\n"
            "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,"
            " time.perf_counter() - start)\n")
    result = subprocess.run([sys.executable, "-c", code, str(recipe_path), str(run_dir)],
                            capture_output=True, text=True)
    line = [row for row in result.stdout.splitlines() if row.startswith("PEAK")]
    if result.returncode or not line:
        raise SystemExit(f"tledge train failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    _, peak, seconds = line[-1].split()
    return float(peak), float(seconds)


def first_batch_seconds(run_dir) -> float:
    """A later stage's start to its first batch of evaluation images, from the cache."""
    from tledge.run_inputs import evaluation_split, run_recipe, run_splits
    start = time.perf_counter()
    recipe = run_recipe(run_dir)
    images = evaluation_split(run_splits(run_dir, recipe))[0]
    images[:64]
    return time.perf_counter() - start


def reload_seconds(folder: Path, size: int) -> float:
    """What every later stage did before the cache: decode every file, one process."""
    from tledge.data.images import load_images
    files = sorted(folder.rglob("*.jpg"))
    start = time.perf_counter()
    images = load_images(files, (size, size))
    del images
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000,20000", help="two image counts, small,large")
    parser.add_argument("--stored", type=int, default=256, help="JPEG side in pixels")
    parser.add_argument("--size", type=int, default=224, help="training side in pixels")
    parser.add_argument("--workers", type=int, default=0, help="0: one per core")
    parser.add_argument("--backbone", default="mobilenet_v3_small")
    parser.add_argument("--alpha", type=float, default=0.75)
    parser.add_argument("--pipeline-images", type=int, default=4000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tledge-data-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the folders and cache")
    args = parser.parse_args()
    small, large = (int(part) for part in args.sizes.split(","))
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["TLEDGE_CACHE_DIR"] = str(work / "cache")
    from tledge.data.prepare import resolve_workers
    from tledge.quiet import quiet
    with quiet():  # TensorFlow's start-up log wall
        import tensorflow  # noqa: F401
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")
    print(f"data: generated shapes, {len(CLASSES)} classes, JPEG quality 90 at "
          f"{args.stored} px, prepared at {args.size} px")
    recipes = {}
    for count in (small, large):
        folder = work / f"photos_{count}"
        seconds = make_folder(folder, count, args.stored, seed=count)
        jpeg_bytes = sum(path.stat().st_size for path in folder.rglob("*.jpg"))
        print(f"  wrote {count:,} JPEGs ({jpeg_bytes / 2**20:,.0f} MiB) in {seconds:.0f} s")
        for augment in (False, True):
            name = f"scale_{count}" + ("_aug" if augment else "")
            path = work / f"{name}.toml"
            path.write_text(recipe_text(name, folder, args.size, args.backbone, args.alpha,
                                        augment))
            recipes[count, augment] = path

    print("\n1. preparation (decode + resize + digest + write), "
          f"{small:,} images at {args.size} px")
    single, _ = prepare(recipes[small, False], 1)
    parallel, splits = prepare(recipes[small, False], args.workers)
    workers = resolve_workers(args.workers)
    print(f"  single process        {small / single:8,.0f} images/s  ({single:.1f} s)")
    print(f"  {workers} processes           {small / parallel:8,.0f} images/s  "
          f"({parallel:.1f} s)   speed-up {single / parallel:.2f}x (goal 1.7x)")

    print(f"\n2. input pipeline from the cache at {args.size}x{args.size}, batch 64, shuffled")
    plain = pipeline_rate(splits, False, args.pipeline_images)
    augmented = pipeline_rate(splits, True, args.pipeline_images)
    print(f"  without augmentation  {plain:8,.0f} images/s (goal 1,000)")
    print(f"  with flip/rotation/zoom {augmented:6,.0f} images/s")

    print(f"\n3. peak resident memory of `tledge train` ({args.backbone} alpha {args.alpha} "
          "from scratch, one epoch, its own process)")
    prepare(recipes[large, False], args.workers)
    peaks = {}
    for count in (small, large):
        peak, seconds = train_peak_rss(recipes[count, False], work / f"run_{count}")
        peaks[count] = peak
        print(f"  {count:>7,} images     peak {peak:8,.0f} MiB   ({seconds:.0f} s)")
    cache_bytes = sum(path.stat().st_size for path in (work / "cache").rglob("*")
                      if path.is_file())
    growth = peaks[large] / peaks[small] - 1
    print(f"  {large / small:.0f}x the images: {growth:+.1%} peak memory (goal at most +15 %); "
          f"the cache holds {cache_bytes / 2**30:.2f} GiB")

    print(f"\n4. a later stage's start to its first batch of images ({large:,}-image run)")
    cached = first_batch_seconds(work / f"run_{large}")
    reload = reload_seconds(work / f"photos_{large}", args.size)
    print(f"  from the cache         {cached:8.2f} s")
    print(f"  decoding the source    {reload:8.2f} s (one process, as before the cache)   "
          f"{reload / cached:,.0f}x")
    print(f"\nthis process's peak: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f}"
          " MiB")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
