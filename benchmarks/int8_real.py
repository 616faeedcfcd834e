"""int8 on real photos: a class split of cifar10-mini, plain against repaired, with bounds.

A MobileNetV2 α0.35 is pretrained by tledge from scratch on five classes of
`/work/shared/data/cifar10-mini` (or `--data`) at 64×64, then transferred to the other five
(`model.weights` = the pretraining recipe); the transferred run's int8 files (TFLite and ONNX)
are exported with the repair search (judged on the repair split, training images held apart
from calibration) and validated on the test photos. Recipes and runs live in a temp folder
(`--work` to keep them). Printed per int8 format: the plain and the kept candidate on the
repair split (agreement and its 95 % lower bound), the kept file on the test split (the
verdict), every remedy tried (the quantization-aware fine-tune last, with the steps that ran),
the layers kept in float and their cost, the search's time, and this CPU's ISA.

    python benchmarks/int8_real.py [--data DIR] [--work DIR] [--seconds 600]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

FIRST = ("airplane", "automobile", "ship", "truck", "frog")   # pretraining
SECOND = ("bird", "cat", "deer", "dog", "horse")               # transfer

# the data and backbone of both recipes: the same photos' loader, the same network
COMMON = """[data]
source = "folder"
path = "{data}"
image_size = [64, 64]
val_fraction = 0.1
batch_size = 32
augment = {{ flip = "horizontal" }}
[model]
backbone = "mobilenet_v2"
alpha = 0.35
"""

PRETRAIN = """
name = "cifar_pretrain"
seed = 1
""" + COMMON + """weights = "none"
dropout = 0.1
[train.feature_extraction]
epochs = {epochs}
learning_rate = 2e-3
[export]
tflite = ["fp32"]
onnx = []
[bench]
runtimes = ["keras"]
threads = [2]
min_runs = 5
min_seconds = 0.0
warmup = 1
"""

TRANSFER = """
name = "cifar_transfer"
seed = 2
""" + COMMON + """weights = "pretrain.toml"
dropout = 0.2
[train.feature_extraction]
epochs = {epochs}
learning_rate = 2e-3
[train.fine_tune]
epochs = {epochs}
learning_rate = 2e-4
[export]
tflite = ["fp32", "int8"]
onnx = ["fp32", "int8"]
calibration_samples = 200
int8_repair_images = 500
int8_repair_seconds = {seconds}
[bench]
runtimes = ["keras", "litert", "onnxruntime"]
threads = [2]
batch_sizes = [1]
min_runs = 50
min_seconds = 1.0
warmup = 10
"""


def class_folder(source: Path, target: Path, classes) -> Path:
    """`target` with train/ and test/ holding links to `classes` of `source`."""
    for split in ("train", "test"):
        (target / split).mkdir(parents=True, exist_ok=True)
        for name in classes:
            link = target / split / name
            if not link.exists():
                link.symlink_to((source / split / name).resolve(), target_is_directory=True)
    return target


def build(recipe: Path, out: Path, log_file: Path) -> list[str]:
    from tledge.stages import build as build_run
    lines: list[str] = []
    with open(log_file, "a") as handle:
        def log(line):
            lines.append(line)
            handle.write(line + "\n")
            handle.flush()
        build_run(recipe, out=out, log=log, verbose=0)
    return lines


def report(run: Path, seconds_by_format: dict) -> None:
    from tledge.core.machine import machine_facts
    from tledge.export.int8 import int8_needs
    from tledge.core.metrics import wilson_lower_bound
    from tledge.report.int8 import int8_records
    from tledge.rundir import PARITY, read_manifest, read_record
    facts = machine_facts()
    manifest = read_manifest(run)
    parity = read_record(run / PARITY) if (run / PARITY).is_file() else {"rows": []}
    bench = read_record(run / "bench.json") if (run / "bench.json").is_file() else {"rows": []}
    judged = {}
    for row in parity["rows"]:
        judged.setdefault(row["artifact"], row)
    p50 = {}
    for row in bench.get("rows", []):
        if row.get("status") == "ok" and row.get("batch") == 1:
            p50.setdefault(row["artifact"], (row["runtime"], row["p50_ms"]))
    print(f"machine: {facts['cpu']} ({facts['isa']}), {facts['cores']} cores; int8 needs here: "
          f"{int8_needs(facts['isa'])}")
    test_images = parity.get("images")
    print(f"test split: {test_images} photos; keras accuracy "
          f"{(judged.get('keras') or {}).get('accuracy')}")
    for entry, record in int8_records(manifest):
        attempts = record.get("attempts") or []
        plain = attempts[0]
        kept = next((row for row in reversed(attempts) if row["remedy"] == record["remedy"]
                     and row["settings"] == record["settings"]), plain)
        test = judged.get(entry["name"], {})
        name = entry["name"]
        print(f"\n{name}: searched on {record.get('images')} {record.get('split')} images in "
              f"{record.get('seconds')} s ({len(attempts)} attempts); "
              f"{record.get('stopped') or 'stopped at a pass with margin'}")
        for label, row in (("plain", plain), ("kept", kept)):
            print(f"  {label:<6} {row['remedy'][:90]}: accuracy {row['accuracy']:.4f}, agreement "
                  f"{row['agreement']:.4f} (95% lower bound {row.get('agreement_low')}), "
                  f"{row['size_bytes'] / 1024:,.0f} KiB, p50 {row['p50_ms']:.3f} ms, "
                  f"{'passed' if row['passed'] else 'failed'}")
        for row in attempts[1:]:  # each remedy by its own name (the path is in the log)
            tuned = (row.get("settings") or {}).get("qat")
            print(f"    tried {row['remedy'].split(' + ')[-1][:100]}"
                  + (f" ({tuned['steps']} steps ran, {row['seconds']:.0f} s)" if tuned else "")
                  + f": agreement {row.get('agreement')} (lower {row.get('agreement_low')}), "
                  f"gain {row.get('gain')} / noise {row.get('noise')}"
                  + (f", {row['size_bytes'] / 1024:,.0f} KiB, p50 {row['p50_ms']:.3f} ms"
                     if row.get("size_bytes") and row.get("p50_ms") else
                     f": {'; '.join(row.get('problems') or [])}")
                  + f"{' KEPT' if row.get('kept') else ''}")
        if test:
            low = wilson_lower_bound(test["agreement"], test_images or 1)
            print(f"  test   accuracy {test['accuracy']:.4f} (drop {test['accuracy_drop']:+.4f}), "
                  f"agreement {test['agreement']:.4f} (95% lower bound {low:.4f}): "
                  f"{test['status']}")
        floats = record.get("float") or []
        if floats:
            print(f"  kept in float: {len(floats)} layers ({', '.join(floats[:4])}"
                  f"{', …' if len(floats) > 4 else ''}); size {plain['size_bytes'] / 1024:,.0f} → "
                  f"{kept['size_bytes'] / 1024:,.0f} KiB, p50 {plain['p50_ms']:.3f} → "
                  f"{kept['p50_ms']:.3f} ms")
        elif record.get("passed") is False or test.get("status") == "failed":
            worst = sorted((layer for layer in (record.get("diagnosis") or {}).get("layers", [])
                            if layer.get("error") is not None), key=lambda l: -l["error"])[:3]
            print("  to blame (diagnosis): " + ", ".join(
                f"{layer['name'].split(';')[0]} ({layer['error']:.3g})" for layer in worst))
        fp32 = name.replace("int8", "fp32")
        if fp32 in p50 and name in p50:
            print(f"  bench p50 batch 1: {fp32} {p50[fp32][1]:.3f} ms, {name} "
                  f"{p50[name][1]:.3f} ms ({p50[name][1] / p50[fp32][1]:.2f}x, "
                  f"{p50[name][0]})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/cifar10-mini")
    parser.add_argument("--work", default=None, help="keep recipes and runs here")
    parser.add_argument("--epochs", type=int, default=20, help="pretraining epochs")
    parser.add_argument("--transfer-epochs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=900.0,
                        help="export.int8_repair_seconds of the transferred run")
    args = parser.parse_args()
    data = Path(args.data)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tledge-int8-real-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "pretrain.toml").write_text(PRETRAIN.format(
        data=class_folder(data, work / "first", FIRST), epochs=args.epochs))
    (work / "transfer.toml").write_text(TRANSFER.format(
        data=class_folder(data, work / "second", SECOND), epochs=args.transfer_epochs,
        seconds=args.seconds))
    began = time.perf_counter()
    build(work / "pretrain.toml", work / "models" / "cifar_pretrain", work / "build.log")
    build(work / "transfer.toml", work / "models" / "cifar_transfer", work / "build.log")
    print(f"built in {time.perf_counter() - began:.0f} s (log: {work / 'build.log'})")
    report(work / "models" / "cifar_transfer", {})


if __name__ == "__main__":
    main()
