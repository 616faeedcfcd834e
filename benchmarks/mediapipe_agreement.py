"""MediaPipe Tasks' ImageClassifier against `tledge predict`, on a run's .tflite files.

At the model's own size both feed the same pixels, so they agree to the last bit (fp32) or
quantization step (int8). At other sizes MediaPipe resizes the image itself, with its own
interpolation, while tledge's loader resizes with Pillow's; this measures how often the top
class still agrees, and how far the scores move.

Images are drawn fresh by tledge's synthetic generator (the run's own classes, a seed the run
never saw), at the native size and at larger and odd sizes.

    python benchmarks/mediapipe_agreement.py [RUN_DIR] [--images 160]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="models/quickstart")
    parser.add_argument("--images", type=int, default=160)
    args = parser.parse_args()

    import mediapipe
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions
    from PIL import Image
    from tledge.data.synthetic import generate
    from tledge.core.machine import machine_facts
    from tledge.predict import predict_files

    run_dir = Path(args.run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    labels, (height, width) = manifest["labels"], manifest["image_size"]
    per_class = max(1, args.images // len(labels))
    facts = machine_facts()
    print(f"{run_dir}: {len(labels)} classes, native {height}x{width}, {per_class * len(labels)} "
          f"images per size, {time.strftime('%Y-%m-%d')}, {facts['cpu']} ({facts['isa']})")
    print(f"{'artifact':<12} {'image size':>10} {'top-1 agrees':>13} {'max |score diff|':>17}")
    for name in ("model_fp32.tflite", "model_int8.tflite"):
        for size in ((height, width), (2 * height, 2 * width), (height + 13, width + 29)):
            images, _ = generate(labels, per_class, size, noise=0.05, seed=12345)
            folder = Path(tempfile.mkdtemp(prefix="tledge-mp-"))
            paths = []
            for index, image in enumerate(images):
                paths.append(folder / f"{index:04d}.png")
                Image.fromarray(image).save(paths[-1])
            ours = predict_files(paths, run_dir / name, top_k=len(labels))
            options = vision.ImageClassifierOptions(
                base_options=BaseOptions(model_asset_path=str(run_dir / name)),
                max_results=len(labels))
            agree, worst = 0, 0.0
            with vision.ImageClassifier.create_from_options(options) as classifier:
                for path, mine in zip(paths, ours):
                    found = classifier.classify(mediapipe.Image.create_from_file(str(path)))
                    theirs = {c.category_name: c.score for c in found.classifications[0].categories}
                    expected = {row["label"]: row["probability"] for row in mine["top"]}
                    # tledge's top class is MediaPipe's top too (an exact tie counts)
                    agree += theirs[mine["top"][0]["label"]] >= max(theirs.values()) - 1e-6
                    worst = max(worst, max(abs(theirs[k] - v) for k, v in expected.items()))
            print(f"{name:<12} {size[0]:>4}x{size[1]:<5} {agree / len(paths):12.1%} "
                  f"{worst:17.4f}")


if __name__ == "__main__":
    main()
