"""The tuned recipe against the shipped one, on the same data: `tledge tune`, then both built.

Runs `tledge tune recipes/tune_quickstart.toml` into a fresh study folder (timed: the budget
is [tune] minutes), builds the study's best.toml and the shipped recipes/quickstart.toml
(the same data, split and pretrained backbone) into fresh folders, and prints side by side:
the Keras model's validation and test accuracy, and the fastest .tflite that passed parity,
timed on LiteRT at the [bench] threads (p50, size). Then whether the best recipe, built again,
reproduces the best trial's test accuracy within 2 points. Names the CPU and its ISA.

    python benchmarks/tune.py
    python benchmarks/tune.py --study models/tune_quickstart.tune   # reuse a study: no search
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def fastest_tflite(run_dir, threads):
    """(artifact, p50 ms, KiB, test accuracy) of the fastest .tflite that passed parity and ran
    on LiteRT at `threads`, batch 1."""
    from tledge.bench.stage import candidates
    from tledge.records import read_bench, read_parity
    bench, parity = read_bench(run_dir), read_parity(run_dir)
    rows = [c for c in candidates(bench.rows, parity, threads=threads, batch=1)
            if c["runtime"] == "litert" and c["artifact"].startswith("tflite")]
    best = min(rows, key=lambda c: c["p50_ms"])
    return best["artifact"], best["p50_ms"], best["size_bytes"] / 1024, best["accuracy"]


def figures(run_dir, threads):
    from tledge.records import read_history
    from tledge.tune.results import kept_val_accuracy
    history = read_history(run_dir)
    return (kept_val_accuracy(history), history["test_accuracy"],
            *fastest_tflite(run_dir, threads))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tune_quickstart.toml")
    parser.add_argument("--shipped", default="recipes/quickstart.toml")
    parser.add_argument("--study", type=Path, default=None,
                        help="A study folder tuned before: its best.toml is built, no search.")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    folder = Path(tempfile.mkdtemp(prefix="tledge-tune-"))
    models = folder / "models"
    models.mkdir()
    shutil.copytree("models/quickstart_pretrain", models / "quickstart_pretrain")

    from tledge.core.machine import machine_facts
    from tledge.quiet import quiet_tensorflow
    from tledge.stages import build
    from tledge.tune.study import tune
    quiet_tensorflow()
    study = args.study
    if study is None:
        study = models / "tune_quickstart.tune"
        started = time.perf_counter()
        result = tune(args.recipe, out=study, log=print)
        print(f"tune: {time.perf_counter() - started:.0f} s, {result.ran} trials; stopped: "
              f"{result.stopped}")
    summary = json.loads((study / "tuning.json").read_text())
    best_trial = next(t for t in summary["trials"] if t["number"] == summary["best"])
    threads = summary["threads"]
    runs = {}
    for name, recipe in (("shipped", args.shipped), ("tuned", study / "best.toml")):
        started = time.perf_counter()
        run_dir, _ = build(recipe, out=models / name, log=lambda line: None, verbose=0)
        print(f"built {name} ({recipe}) in {time.perf_counter() - started:.0f} s")
        runs[name] = figures(run_dir, threads)
    facts = machine_facts()
    print(f"\nmachine: {facts.get('cpu')} ({facts.get('isa')}, {facts.get('cores')} cores); "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'recipe':<8} {'val. acc.':>9} {'test acc.':>9}  {'fastest .tflite':<14} "
          f"{'p50 ms':>7} {'KiB':>6} {'its test acc.':>13}")
    for name, (val, test, artifact, p50, size, accuracy) in runs.items():
        print(f"{name:<8} {val:>9.4f} {test:>9.4f}  {artifact:<14} {p50:>7.3f} {size:>6.0f} "
              f"{accuracy:>13.4f}")
    shipped, tuned = runs["shipped"], runs["tuned"]
    print(f"tuned - shipped: validation {tuned[0] - shipped[0]:+.4f}, test {tuned[1] - shipped[1]:+.4f}"
          f", p50 x{tuned[3] / shipped[3]:.2f}")
    gap = abs(tuned[1] - best_trial["test_accuracy"])
    print(f"best.toml built again: test accuracy {tuned[1]:.4f} against the best trial's "
          f"{best_trial['test_accuracy']:.4f} (trial {best_trial['number']}): "
          f"{'within' if gap <= 0.02 else 'NOT within'} 2 points ({gap * 100:.2f})")
    print(f"(runs kept in {folder})")


if __name__ == "__main__":
    main()
