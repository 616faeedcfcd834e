"""Feature extraction with and without cached bottlenecks, on the same data, in one run.

The backbone is frozen during feature extraction, so tledge computes its pooled features
once and trains the head on them. This script trains the same recipe both ways and prints
the time per epoch, the one-time cost of computing the features, and the accuracy of each.

    python benchmarks/bottleneck_cache.py [--backbone mobilenet_v2] [--size 96] [--epochs 3]
    python benchmarks/bottleneck_cache.py --alpha 0.35 --weights models/quickstart_pretrain/model.keras

Without --weights the backbone starts from random weights (no network here for ImageNet's):
the timing is the same, but both paths then sit at chance accuracy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", category=UserWarning)

RECIPE = """
name = "bottleneck_{mode}"
seed = 0
[data]
source = "synthetic"
image_size = [{size}, {size}]
synthetic = {{ samples_per_class = {samples} }}
[model]
backbone = "{backbone}"
weights = "{weights}"
{alpha}
[train]
cache_bottlenecks = "{mode}"
[train.feature_extraction]
epochs = {epochs}
[train.fine_tune]
epochs = 0
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=100, help="images per class (8 classes)")
    parser.add_argument("--alpha", type=float, default=None, help="mobilenet width")
    parser.add_argument("--weights", default=None, help="a .keras/.h5 file for the backbone")
    args = parser.parse_args()

    from tledge.backbones import BACKBONES
    from tledge.data import load_splits
    from tledge.recipe.load import load_recipe
    from tledge.train.stage import train_model

    folder = Path(tempfile.mkdtemp(prefix="tledge-bottleneck-"))
    # Stand-in "pretrained" weights: the timing does not depend on their values, and there
    # is no network here to fetch ImageNet's.
    weights = Path(args.weights).resolve() if args.weights else folder / "start.weights.h5"
    if not args.weights:
        BACKBONES[args.backbone].create((args.size, args.size), weights=None,
                                        alpha=args.alpha).save_weights(weights)
    results = {}
    for mode in ("never", "always"):
        path = folder / f"{mode}.toml"
        path.write_text(RECIPE.format(mode=mode, size=args.size, samples=args.samples,
                                      backbone=args.backbone, weights=weights,
                                      alpha=f"alpha = {args.alpha}" if args.alpha else "",
                                      epochs=args.epochs))
        recipe = load_recipe(path)
        splits = load_splits(recipe.data, seed=0)
        start = time.perf_counter()
        _, history = train_model(recipe, splits, verbose=0, cache_dir=folder / "cache",
                                 log=lambda line: None)
        total = time.perf_counter() - start
        phase = history["phases"][0]
        results[mode] = (phase, total, history["test_accuracy"])

    never, always = results["never"][0], results["always"][0]
    per_epoch_plain = never["wall_seconds"] / len(never["epochs"])
    # the cached phase's wall time includes computing the features once: report both
    feature_seconds = always["feature_seconds"]
    per_epoch_cached = (always["wall_seconds"] - feature_seconds) / len(always["epochs"])
    print(f"{args.backbone} {args.size}x{args.size}, {len(splits.y_train)} training images, "
          f"{args.epochs} epochs, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print(f"{'path':<24} {'s/epoch':>9} {'one-time s':>11} {'val acc':>8} {'test acc':>9}")
    print(f"{'backbone every epoch':<24} {per_epoch_plain:9.3f} {0:11.2f} "
          f"{never['best_val_accuracy']:8.3f} {results['never'][2]:9.3f}")
    print(f"{'cached bottlenecks':<24} {per_epoch_cached:9.3f} {feature_seconds:11.2f} "
          f"{always['best_val_accuracy']:8.3f} {results['always'][2]:9.3f}")
    print(f"per-epoch ratio: {per_epoch_plain / per_epoch_cached:.1f}x faster with the cache")


if __name__ == "__main__":
    main()
