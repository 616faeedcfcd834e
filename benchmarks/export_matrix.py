"""Every export precision of one model, side by side: size, latency, agreement with Keras.

By default: MobileNetV2 1.0 at 224x224, trained for a moment from scratch on generated
shapes (there is no network here for ImageNet weights). Size and latency do not depend on
the weights, but agreement does: a model that has learned nothing predicts one class and
agrees with anything, so the script says so. With `--run RUN_DIR` it uses that run's trained
model and test split instead, where agreement means something.

    python benchmarks/export_matrix.py [--threads 2] [--size 224] [--epochs 2]
    python benchmarks/export_matrix.py --run models/quickstart
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

RECIPE = """
name = "export_matrix"
[data]
source = "synthetic"
image_size = [{size}, {size}]
test_fraction = 0.25
synthetic = {{ samples_per_class = {samples} }}
[model]
backbone = "mobilenet_v2"
alpha = 1.0
weights = "none"
[train.feature_extraction]
epochs = {epochs}
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=24, help="images per class (8 classes)")
    parser.add_argument("--run", default=None, help="use this run directory's model and data")
    args = parser.parse_args()

    import numpy as np
    from tledge.core.timing import summarize, time_runner
    from tledge.data import calibration_images, load_splits
    from tledge.export.stage import _exporter
    from tledge.formats import FORMATS
    from tledge.quiet import quiet
    from tledge.recipe.load import load_recipe
    from tledge.rundir import artifact_entry
    from tledge.runners import load
    from tledge.train.stage import train_model

    folder = Path(tempfile.mkdtemp(prefix="tledge-matrix-"))
    if args.run:
        from tledge.model import load_model
        from tledge.run_inputs import run_recipe, run_splits
        recipe = run_recipe(args.run)
        splits = run_splits(args.run, recipe)
        model = load_model(Path(args.run) / "model.keras")
        title = f"{recipe.name} ({recipe.model.backbone} {'x'.join(map(str, recipe.image_size))})"
    else:
        path = folder / "recipe.toml"
        path.write_text(RECIPE.format(size=args.size, samples=args.samples, epochs=args.epochs))
        recipe = load_recipe(path)
        splits = load_splits(recipe.data, seed=0)
        model, _ = train_model(recipe, splits, verbose=0, log=lambda line: None)
        title = f"MobileNetV2 1.0 {args.size}x{args.size}"
    calibration = calibration_images(splits, 100, seed=0)
    images = splits.x_test
    reference = model(images.astype(np.float32), training=False).numpy()
    rows = []
    for fmt in FORMATS.values():
        if fmt.family == "keras":
            continue
        target = folder / fmt.file_name
        with quiet():
            spec = _exporter(fmt.family)(model, target, precision=fmt.precision,
                                         calibration=calibration)
        entry = artifact_entry(folder, target, fmt, recipe_hash="", labels=[],
                               input_spec=spec["input"], output_spec=spec["output"])
        runner = load(entry, folder, threads=args.threads)
        probabilities = np.concatenate([runner.predict(images[i:i + 16])
                                        for i in range(0, len(images), 16)])
        agreement = float(np.mean(probabilities.argmax(1) == reference.argmax(1)))
        _, samples = time_runner(runner, runner.prepare(images[:1]), warmup=5, min_runs=50,
                                 min_seconds=2.0)
        rows.append((fmt.name, entry["size_bytes"], summarize(samples, 1)["p50_ms"], agreement))

    by_name = {name: (size, p50) for name, size, p50, _ in rows}
    accuracy = float(np.mean(reference.argmax(1) == splits.y_test))
    chance = float(np.bincount(splits.y_test).max() / len(splits.y_test))
    print(f"{title}, batch 1, {args.threads} threads, {len(images)} test images, "
          f"{time.strftime('%Y-%m-%d')}; keras test accuracy {accuracy:.3f}")
    if accuracy <= chance + 0.05:
        print("  (the model is at chance: its agreement figures mean nothing; use --run)")
    print(f"{'artifact':<18} {'size KiB':>9} {'p50 ms':>8} {'agreement':>10}")
    for name, size, p50, agreement in rows:
        print(f"{name:<18} {size / 1024:9,.0f} {p50:8.2f} {agreement:10.3f}")
    int8, fp32 = by_name["tflite_int8"], by_name["tflite_fp32"]
    print(f"tflite int8 / fp32: latency {int8[1] / fp32[1]:.2f}x, size {int8[0] / fp32[0]:.2f}x")
    onnx8, onnx32 = by_name["onnx_int8"], by_name["onnx_fp32"]
    print(f"onnx int8 / fp32: latency {onnx8[1] / onnx32[1]:.2f}x, size {onnx8[0] / onnx32[0]:.2f}x")


if __name__ == "__main__":
    main()
