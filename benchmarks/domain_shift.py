"""Domain shift and what adapting to it recovers, measured side by side in one run.

For each case: the source model's accuracy on its own test split, then on the target domain's
test images before adaptation, after AdaBN (no label used) and after fine-tuning with a few
labels per class (`model.head = "keep"`); every figure is the Keras model's, on the same
target test images.

  (a) synthetic: recipes/quickstart.toml (source) and recipes/adapt_quickstart.toml (the same
      shapes through a dimmer, flatter camera); few labels: recipes/adapt_fewlabel.toml.
  (b) real photos: a small CNN trained on ../shared/data/cifar10-mini, and the same folder
      through `tledge corrupt` (--corruption, default contrast at severity 3: a dim, flat
      camera), train/ and test/ alike; AdaBN adapts on the corrupted train/ images without
      their labels, the few-label model fine-tunes on 20 of them per class; all are judged
      on the corrupted test/ images.

Runs are built under --models (default models/); a run already built is reused.

    python benchmarks/domain_shift.py [--cifar ../shared/data/cifar10-mini] [--corruption contrast]
"""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]

CIFAR_OUTPUTS = """
[export]
tflite = ["fp32", "int8"]
onnx = []
calibration_samples = 160
[bench]
runtimes = ["litert"]
threads = [2]
"""

CIFAR_SOURCE = """
name = "cifar_mini"
seed = 0
[data]
source = "folder"
path = "{path}"
image_size = [32, 32]
val_fraction = 0.1
batch_size = 32
augment = {{ flip = "horizontal" }}
[model]
backbone = "small_cnn"
weights = "none"
dropout = 0.3
[train.feature_extraction]
epochs = 30
learning_rate = 2e-3
early_stopping = 6
"""

# the same data table on the corrupted copy, 20 labels per class; the source's model and head
CIFAR_FEW = CIFAR_SOURCE.replace('"cifar_mini"', '"cifar_mini_fewlabel"').replace(
    "batch_size = 32", "batch_size = 16\ntrain_per_class = 20").replace(
    'weights = "none"', 'weights = "{source}"\nhead = "keep"').replace(
    "epochs = 30\nlearning_rate = 2e-3\nearly_stopping = 6",
    "epochs = 0\n[train.fine_tune]\nepochs = 15\nlearning_rate = 3e-4\nunfreeze = \"all\"")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--cifar", type=Path, default=ROOT.parent / "shared/data/cifar10-mini")
    parser.add_argument("--corruption", default="contrast")
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--skip", choices=("synthetic", "cifar"), help="leave one case out")
    args = parser.parse_args()

    from tledge.core.machine import machine_facts
    from tledge.data.corruptions import corrupt_folder
    from tledge.domains import evaluate_run
    from tledge.rundir import read_record
    from tledge.stages import adapt_run, build

    def quiet(line):
        if line.startswith(("adapt:", "evaluate:", "== adapt", "weights:", "train: wrote")):
            print("   ", line, flush=True)

    def measure(label, source_recipe, target, few_recipe, models):
        source_dir, _ = build(source_recipe, out=models / Path(source_recipe).stem
                              if Path(source_recipe).suffix == ".toml" else None, log=quiet)
        evaluation = evaluate_run(source_dir, target, log=quiet)
        keras = evaluation["rows"][0]
        adapted, _ = adapt_run(source_dir, target, log=quiet)
        adaptation = read_record(adapted / "history.json")["adaptation"]
        few_dir, _ = build(few_recipe, out=models / Path(few_recipe).stem, log=quiet)
        few = read_record(few_dir / "history.json")["test_accuracy"]
        lost = keras["source_accuracy"] - keras["accuracy"]
        rows.append((label, keras["source_accuracy"], keras["accuracy"],
                     adaptation["after"]["target"], few, evaluation["images"],
                     (adaptation["after"]["target"] - keras["accuracy"]) / lost if lost else None,
                     adaptation["after"]["source"]))

    rows = []
    facts = machine_facts()
    args.models.mkdir(parents=True, exist_ok=True)
    if args.skip != "synthetic":
        print("(a) synthetic: quickstart -> adapt_quickstart", flush=True)
        measure("synthetic shapes, dimmer and flatter camera (brightness -0.2, contrast 0.5)",
                ROOT / "recipes/quickstart.toml", str(ROOT / "recipes/adapt_quickstart.toml"),
                ROOT / "recipes/adapt_fewlabel.toml", args.models)
    if args.skip != "cifar":
        print(f"(b) cifar10-mini -> {args.corruption} severity {args.severity}", flush=True)
        shifted = args.models / f"cifar10-mini_{args.corruption}{args.severity}"
        if not shifted.is_dir():
            corrupt_folder(args.cifar, shifted, args.corruption, args.severity)
        recipes = args.models / "recipes"
        recipes.mkdir(exist_ok=True)
        source = recipes / "cifar_mini.toml"
        source.write_text(textwrap.dedent(CIFAR_SOURCE.format(path=args.cifar.resolve()))
                          + CIFAR_OUTPUTS)
        few = recipes / "cifar_mini_fewlabel.toml"
        few.write_text(textwrap.dedent(CIFAR_FEW.format(path=shifted.resolve(),
                                                        source=source.resolve()))
                       + CIFAR_OUTPUTS)
        measure(f"cifar10-mini photos, {args.corruption} severity {args.severity} "
                "(train/ and test/)", source, str(shifted), few, args.models)

    print(f"\nmachine: {facts['cpu']} ({facts['isa']}), {facts['cores']} cores")
    print("| case | source test | target, before | after AdaBN (no labels) | after 20 labels "
          "per class | target test images | AdaBN recovered | source after AdaBN |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, source, before, adabn, few, images, recovered, source_after in rows:
        print(f"| {label} | {source:.1%} | {before:.1%} | {adabn:.1%} | {few:.1%} | {images} | "
              f"{recovered:.0%} of the loss | {source_after:.1%} |")


if __name__ == "__main__":
    main()
