"""Benchmark a tledge bundle on the device itself: `python3 bench_device.py`.

A bundle (`tledge bundle`) carries this package whole, as `tledge_core/`, and a small
`bench_device.py` that runs `main` here. It runs on a Raspberry Pi, a Jetson or any machine
with Python 3.9+, numpy and one runtime: `ai-edge-litert` or `tflite-runtime` for .tflite
files, `onnxruntime` or `openvino` for .onnx files. It needs nothing else.

It reads `bundle.json` in the bundle's folder, times every artifact it has a runtime for
(each combination in a process of its own, as `tledge bench` does), checks each artifact's
accuracy on the bundled images against the build machine's outputs (the figures of
`tledge.core.metrics`, the ones the build machine's validation computes), and writes one JSON
file with the statistics and the device's facts. `tledge bench RUN_DIR --import result.json`
stores that file in the run (devices.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .engines import (dequantize, ONNX_MODULES, open_model, output_names, predicted_classes,
                      prepare_pixels, runtime_for, TFLITE_MODULES, Unavailable)
from .machine import machine_facts, runtime_versions
from .metrics import accuracy as accuracy_of, agreement
from .timing import emit_row, format_line, gflops_per_second, measure, run_child

RESULT_FORMAT = "tledge-device-bench"
BUNDLE_FORMAT = "tledge-bundle"
VERSION = 2  # 2: the build machine's raw outputs travel, so differences are measured


def _first_row(job: dict) -> dict:
    return {"artifact": job["artifact"], "runtime": job["runtime"], "threads": job["threads"],
            "batch": job["batch"], "status": "ok", "reason": "", "size_bytes": job["size_bytes"]}


def bench_one(job: dict) -> dict:
    """One bundle combination, in this process."""
    return measure(_first_row(job),
                   lambda: open_model(job["path"], job["threads"], job["runtime"],
                                      job.get("precision"), job.get("outputs")),
                   lambda model, images: prepare_pixels(images, job["input"]),
                   np.load(job["images"]), warmup=job["warmup"], min_runs=job["min_runs"],
                   min_seconds=job["min_seconds"])


# A child process imports this module from the folder above this package: `tledge.core`
# in an installed tledge, `tledge_core` in a bundle (wherever python3 was started from)
_CHILD = ("import importlib, sys; sys.path.insert(0, sys.argv[1]); "
          "sys.exit(importlib.import_module(sys.argv[2]).main(['--job']))")


def child_command() -> list:
    """The command of a process that measures one combination (its job on stdin)."""
    package = Path(os.path.abspath(__file__)).parent
    name = __spec__.name if __name__ == "__main__" else __name__  # python -m tledge.core.device
    root = package.parents[name.count(".") - 1]
    flags = ["-I"] if sys.flags.isolated else []
    return [sys.executable, *flags, "-c", _CHILD, str(root), name]


def bench_in_process(job: dict, isolate: bool, timeout: float = 900) -> dict:
    if not isolate:
        return bench_one(job)
    return run_child(child_command(), job, _first_row(job), timeout)


# -- the whole bundle ------------------------------------------------------------------------


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


HOST_OUTPUTS = "host_outputs.npz"  # in a bundle: each artifact's raw outputs on the build machine
FLIPS_KEPT = 50  # images that changed class, listed per artifact


def check_accuracy(entry: dict, path, module: str, images, expected, host) -> dict:
    """Accuracy on the bundled images, and how the outputs compare with the build machine's
    (`host`: its raw outputs, image by image): `compare_outputs` of this device's outputs."""
    model = open_model(path, 1, module, entry.get("precision"), output_names(entry["output"]))
    raw = np.concatenate([model.run(prepare_pixels(images[start:start + 1], entry["input"]))
                          for start in range(len(images))])  # batch 1: every artifact takes it
    return {"artifact": entry["name"], "runtime": module, "images": int(len(images)),
            **compare_outputs(raw, host, expected, entry["output"])}


def compare_outputs(raw, host, expected, output_spec) -> dict:
    """An artifact's raw outputs here against the build machine's (`host`) for the same
    images: accuracy of each, top-1 agreement (`tledge.core.metrics`: the build machine's
    parity figures, so a multi-task artifact's agreement is its lowest task's there and here),
    the largest difference (in quantization steps for an integer output, absolute for a float
    one) and the images whose class changed."""
    raw, host = np.asarray(raw), np.asarray(host)
    predicted = predicted_classes(dequantize(raw, output_spec), output_spec)
    host_predicted = predicted_classes(dequantize(host, output_spec), output_spec)
    expected = np.asarray(expected)  # [N], or [N, tasks] for a multi-task artifact
    if np.issubdtype(host.dtype, np.integer):
        difference = float(np.abs(raw.astype(np.int64) - host.astype(np.int64)).max())
        unit = "quantization steps"
    else:
        difference = float(np.abs(raw.astype(np.float64) - host.astype(np.float64)).max())
        unit = "absolute"
    changed = predicted != host_predicted
    changed = changed.any(axis=1) if changed.ndim == 2 else changed
    flipped = [{"image": int(i), "expected": expected[i].tolist(),
                "build": host_predicted[i].tolist(), "device": predicted[i].tolist()}
               for i in np.flatnonzero(changed)]
    return {"accuracy": accuracy_of(predicted, expected),
            "host_accuracy": accuracy_of(host_predicted, expected),
            "agreement_with_host": agreement(predicted, host_predicted),
            "max_difference": difference, "difference_unit": unit,
            "flipped": flipped[:FLIPS_KEPT], "flipped_count": len(flipped)}


def check_one(job: dict) -> dict:
    """One artifact's accuracy check, in this process (`check_accuracy` from a job)."""
    images = np.load(job["images"])
    with np.load(job["host"]) as outputs:
        host = outputs[job["entry"]["name"]]
    return check_accuracy(job["entry"], job["path"], job["runtime"], images, job["expected"],
                          host)


def check_in_process(job: dict, isolate: bool, timeout: float = 900) -> dict:
    """The accuracy check, in a child process when `isolate`: a runtime that crashes (a
    segfault in a foreign userland) costs its own row, not the whole result."""
    try:
        if not isolate:
            return check_one(job)
        row = run_child(child_command(), job,
                        {"artifact": job["entry"]["name"], "runtime": job["runtime"]}, timeout)
    except Exception as error:  # in this process: a row, the other artifacts go on
        return {"artifact": job["entry"]["name"], "runtime": job["runtime"],
                "error": f"{type(error).__name__}: {error}"}
    if row.get("status") == "failed":
        return {"artifact": row["artifact"], "runtime": row["runtime"], "error": row["reason"]}
    return row


def check_line(entry, line) -> str:
    if "error" in line:
        return f"  {entry['name']:<16} accuracy check failed: {line['error']}"
    return (f"  {entry['name']:<16} accuracy {line['accuracy']:.3f} on {line['images']} images "
            f"(build machine {line['host_accuracy']:.3f}), agreement with the build machine "
            f"{line['agreement_with_host']:.3f}, largest output difference "
            f"{line['max_difference']:g} ({line['difference_unit']})"
            + (f", {line['flipped_count']} image(s) changed class"
               if line["flipped_count"] else ""))


def bench_bundle(folder, *, threads=None, batch_sizes=None, wanted="auto", names=None,
                 min_runs=None, min_seconds=None, isolate=True, device_name=None,
                 log=print, save=None) -> dict:
    """Time and check every artifact of the bundle in `folder`; the result document.
    `save(result)` is called after each artifact, so a run cut short still leaves what it
    measured."""
    folder = Path(folder)
    bundle = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
    if bundle.get("format") != BUNDLE_FORMAT:
        raise SystemExit(f"{folder / 'bundle.json'} is not a tledge bundle")
    settings = dict(bundle["settings"])
    settings["threads"] = threads or settings["threads"]
    settings["batch_sizes"] = batch_sizes or settings["batch_sizes"]
    settings["min_runs"] = min_runs or settings["min_runs"]
    settings["min_seconds"] = settings["min_seconds"] if min_seconds is None else min_seconds
    expected = bundle["images"]["expected"]
    entries = [entry for entry in bundle["artifacts"] if not names or entry["name"] in names]
    rows, accuracy, checksums = [], [], {}
    device = machine_facts()
    device["name"] = device_name or platform.node() or "device"
    device["runtimes"] = runtime_versions()
    if device.get("emulated"):
        log(f"note: this is an emulated {device['arch']} ({device['emulated']}): accuracy and "
            "outputs are the emulated CPU's, latencies the emulator's, not a device's")
    result = {"format": RESULT_FORMAT, "version": VERSION, "device": device,
              "bundle": {key: bundle[key] for key in ("run", "recipe_hash", "created")},
              "artifacts": checksums, "settings": settings, "rows": rows,
              "accuracy": accuracy, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for entry in entries:
        path = folder / entry["file"]
        checksums[entry["name"]] = file_sha256(path)
        try:
            module = runtime_for(entry["file"], wanted)
        except Unavailable as error:
            for count in settings["threads"]:
                for batch in settings["batch_sizes"]:
                    rows.append({"artifact": entry["name"], "runtime": wanted,
                                 "threads": count, "batch": batch, "status": "skipped",
                                 "reason": str(error), "size_bytes": entry["size_bytes"]})
                    log(format_line(rows[-1]))
            continue
        if checksums[entry["name"]] != entry["sha256"]:
            log(f"warning: {entry['file']} is not the file that was bundled (sha256 differs)")
        for count in settings["threads"]:
            for batch in settings["batch_sizes"]:
                job = {"artifact": entry["name"], "path": str(path), "runtime": module,
                       "threads": count, "batch": batch, "size_bytes": entry["size_bytes"],
                       "input": entry["input"], "precision": entry.get("precision"),
                       "outputs": output_names(entry["output"]),
                       "images": str(folder / bundle["images"]["file"]),
                       "warmup": settings["warmup"], "min_runs": settings["min_runs"],
                       "min_seconds": settings["min_seconds"]}
                row = bench_in_process(job, isolate)
                flops = bundle.get("flops_per_image")
                if row["status"] == "ok" and flops:
                    row["gflops_per_second"] = gflops_per_second(flops, batch, row["p50_ms"])
                rows.append(row)
                log(format_line(row))
        job = {"check": True, "entry": entry, "path": str(path), "runtime": module,
               "images": str(folder / bundle["images"]["file"]), "expected": expected,
               "host": str(folder / bundle.get("host_outputs", HOST_OUTPUTS))}
        accuracy.append(check_in_process(job, isolate))
        log(check_line(entry, accuracy[-1]))
        if save:
            save(result)
    return result


def parse_counts(text: str) -> list:
    """"1,2,4" -> [1, 2, 4]: thread counts or batch sizes, each at least 1 (ValueError)."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"every value must be at least 1, got {text!r}")
    return counts


def _counts(text: str):
    try:
        return parse_counts(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv=None, folder=None) -> int:
    """bench_device.py's command line; `folder`: the bundle's (bench_device.py's own)."""
    parser = argparse.ArgumentParser(
        prog="bench_device.py",
        description="Benchmark this tledge bundle's artifacts on this device and check their "
                    "accuracy on the bundled images. Needs numpy and ai-edge-litert or "
                    "tflite-runtime (.tflite) or onnxruntime or openvino (.onnx). Bring the "
                    "JSON it "
                    "writes back with: tledge bench RUN_DIR --import result.json")
    parser.add_argument("--out", default="result.json", help="where to write (result.json)")
    parser.add_argument("--name", help="the device's name in reports (default: hostname)")
    parser.add_argument("--threads", type=_counts, help="thread counts, e.g. 1,4 "
                        "(default: the recipe's)")
    parser.add_argument("--batch", type=_counts, help="batch sizes, e.g. 1,8")
    parser.add_argument("--runtime", default="auto",
                        choices=("auto",) + TFLITE_MODULES + ONNX_MODULES,
                        help="runtime to use (auto: whichever is installed; .onnx files "
                             "run in onnxruntime, else openvino)")
    parser.add_argument("--artifacts", help="comma-separated artifact names (default: all)")
    parser.add_argument("--min-runs", type=int, help="minimum timed runs per combination")
    parser.add_argument("--min-seconds", type=float, help="minimum timed seconds")
    parser.add_argument("--no-isolate", action="store_true",
                        help="run every combination in this process (no memory figures "
                             "per combination)")
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:  # a child process: one combination or one check, its job on stdin
        job = json.loads(sys.stdin.read())
        emit_row(check_one(job) if job.get("check") else bench_one(job))
        return 0
    names = [name.strip() for name in args.artifacts.split(",")] if args.artifacts else None
    def save(result):  # after every artifact: a crash or Ctrl-C keeps what was measured
        temporary = args.out + ".partial"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
        os.replace(temporary, args.out)

    result = bench_bundle(folder or Path.cwd(), threads=args.threads,
                          batch_sizes=args.batch, wanted=args.runtime, names=names,
                          min_runs=args.min_runs, min_seconds=args.min_seconds,
                          isolate=not args.no_isolate, device_name=args.name, save=save)
    save(result)
    print(f"wrote {args.out}: {sum(row['status'] == 'ok' for row in result['rows'])} of "
          f"{len(result['rows'])} combinations ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())


LAUNCHER = '''"""Benchmark this tledge bundle on this device: python3 bench_device.py --help"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, FOLDER)
from tledge_core.device import main  # noqa: E402 - the bundle's own copy of tledge.core

sys.exit(main(folder=FOLDER))
'''  # bench_device.py in a bundle, beside tledge_core/
