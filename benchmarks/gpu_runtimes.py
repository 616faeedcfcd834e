"""Each artifact of built runs on the GPU beside the CPU: agreement, accuracy, latency, placement.

For every ONNX artifact (ONNX Runtime: CPU execution provider against CUDA and TensorRT) and
the Keras model (TensorFlow on the CPU against its first GPU), through tledge's own runners:
  - accuracy on the run's evaluation split (a multi-task run's: the mean of its tasks'), top-1
    agreement with the same file on the CPU (per task, averaged) and the largest probability
    difference (a GPU kernel is another code path: int8 and float kernels round differently
    there);
  - p50 latency at each batch size, CPU and GPU measured in turns in one process, and the
    ratio CPU p50 / GPU p50;
  - for ONNX Runtime on CUDA, how many graph nodes ran on the GPU and how many fell back to
    the CPU (from ONNX Runtime's profile): a QDQ int8 graph is largely not a CUDA graph.
A runtime that is absent or whose execution provider does not load is a "skipped" line with
the reason, never a silent fall-back to the CPU. Build the runs first, then

    python benchmarks/gpu_runtimes.py models/quickstart [OTHER_RUN ...] [--batch 1,32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PAIRS = {"onnx": ("onnxruntime", ("onnxruntime_cuda", "onnxruntime_tensorrt")),
         "keras": ("keras", ("keras_gpu",))}


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out.splitlines()[0] if out else "no NVIDIA GPU (nvidia-smi absent or silent)"


def cuda_placement(path) -> str:
    """'N of M nodes on CUDA' for one run of an ONNX file, read from ONNX Runtime's profile."""
    import numpy as np
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = os.path.join(folder, "profile")
        session = onnxruntime.InferenceSession(str(path), options,
                                               providers=["CUDAExecutionProvider"])
        feed = session.get_inputs()[0]
        shape = [1 if not isinstance(d, int) else d for d in feed.shape]
        dtype = np.uint8 if "uint8" in feed.type else np.float32
        session.run(None, {feed.name: np.zeros(shape, dtype)})
        with open(session.end_profiling()) as handle:
            events = json.load(handle)
    providers = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            provider = event.get("args", {}).get("provider", "?")
            providers.setdefault(provider, set()).add(event["name"])
    counts = {name: len(nodes) for name, nodes in providers.items()}
    total = sum(counts.values())
    return (f"{counts.get('CUDAExecutionProvider', 0)} of {total} nodes on CUDA"
            + ("" if total == counts.get("CUDAExecutionProvider", 0) else
               f" ({', '.join(f'{n} {p}' for p, n in counts.items() if 'CUDA' not in p)})"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", default=["models/quickstart"])
    parser.add_argument("--batch", default="1,32", help="batch sizes, e.g. 1,32")
    parser.add_argument("--runs-min", type=int, default=50, help="timed calls at least")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds at least")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the runtime's)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]

    import numpy as np
    from tledge.core.engines import predicted_classes
    from tledge.core.machine import machine_facts, runtime_versions
    from tledge.core.timing import summarize, time_runner
    from tledge.errors import RunDirError, RuntimeUnavailable, first_line
    from tledge.parity import predict_all
    from tledge.run_inputs import run_splits, evaluation_split
    from tledge.rundir import artifacts, read_manifest, verified_artifact
    from tledge.runners import load
    from tledge.tasks import targets

    facts = machine_facts()
    print(f"CPU: {facts['cpu']} ({facts['isa']}), {facts['cores']} cores; GPU: {gpu_name()}")
    print("runtimes: " + ", ".join(f"{k} {v}" for k, v in runtime_versions().items()))
    print("| run | artifact | runtime | accuracy | agreement with CPU | max abs diff | "
          + " | ".join(f"p50 ms b{b} (CPU/GPU)" for b in batches) + " | ran as |")
    print("|---|---|---|---:|---:|---:|" + "---:|" * len(batches) + "---|")
    for run in args.runs:
        images, labels, split = evaluation_split(run_splits(run))
        manifest = read_manifest(run)  # a multi-task run: a class per task, [N, tasks]
        labels = targets(labels, manifest.get("tasks"), manifest["labels"])
        for entry in artifacts(manifest):
            if entry["family"] not in PAIRS:
                continue
            cpu_name, gpu_names = PAIRS[entry["family"]]
            try:
                cpu = load(entry, run, cpu_name, threads=args.threads)
            except (RuntimeUnavailable, RunDirError) as error:
                print(f"| {run} | {entry['name']} | {cpu_name} | skipped: {first_line(error)} |")
                continue
            reference = predict_all(cpu, images)
            cpu_times = {}
            for name in gpu_names:
                try:
                    runner = load(entry, run, name)
                except RuntimeUnavailable as error:
                    print(f"| {run} | {entry['name']} | {name} | skipped: "
                          f"{first_line(error)} |")
                    continue
                probabilities = predict_all(runner, images)
                cells = []
                for batch in batches:
                    chosen = np.resize(np.arange(len(images)), batch)
                    timed = []
                    for each in (cpu, runner):  # in turns: a slow spell hits both alike
                        if each is cpu and batch in cpu_times:
                            timed.append(cpu_times[batch])
                            continue
                        _, samples = time_runner(each, each.prepare(images[chosen]), warmup=10,
                                                 min_runs=args.runs_min,
                                                 min_seconds=args.seconds)
                        timed.append(summarize(samples, batch)["p50_ms"])
                    cpu_times[batch] = timed[0]
                    cells.append(f"{timed[0]:.3f} / {timed[1]:.3f} = "
                                 f"{timed[0] / timed[1]:.2f}x")
                placement = "; ".join(filter(None, (
                    runner.executed, cuda_placement(verified_artifact(run, entry))
                    if name == "onnxruntime_cuda" else "")))
                top = predicted_classes(probabilities, entry["output"])  # per task, if tasks
                expected = predicted_classes(reference, entry["output"])
                accuracy = float(np.mean(top == labels))  # several tasks: their mean
                agreement = float(np.mean(top == expected))
                print(f"| {run} | {entry['name']} | {name} | {accuracy:.4f} "
                      f"(CPU {np.mean(expected == labels):.4f}) | {agreement:.4f} | "
                      f"{np.abs(probabilities - reference).max():.2e} | "
                      + " | ".join(cells) + f" | {placement} |")
                runner.close()
            cpu.close()
        print(f"({run}: {len(images)} {split} images)")


if __name__ == "__main__":
    main()
