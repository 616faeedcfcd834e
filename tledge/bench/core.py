"""Benchmark a tledge bundle on the device itself: `python3 bench_device.py`.

This file is two things at once. Inside tledge it is the one home of the benchmark's
statistics, timing loop, input preparation and memory probe, which `tledge bench` uses too.
Copied into a bundle (`tledge bundle`) as `bench_device.py`, it runs on a Raspberry Pi, a
Jetson or any machine with Python 3.9+, numpy and one runtime: `ai-edge-litert` or
`tflite-runtime` for .tflite files, `onnxruntime` or `openvino` for .onnx files. It needs
nothing else, so it imports only the standard library and numpy at the top.

On the device it reads `bundle.json` beside it, times every artifact it has a runtime for
(each combination in a process of its own, as `tledge bench` does), checks each artifact's
accuracy on the bundled images, and writes one JSON file with the statistics and the
device's facts. `tledge bench RUN_DIR --import result.json` stores that file in the run (devices.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULT_FORMAT = "tledge-device-bench"
BUNDLE_FORMAT = "tledge-bundle"
VERSION = 2  # 2: the build machine's raw outputs travel, so differences are measured

# -- shared with tledge bench ----------------------------------------------------------------


def summarize(samples_ns, batch: int) -> dict:
    """Latency statistics in milliseconds from per-call samples in nanoseconds."""
    samples = np.asarray(samples_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(samples, [50, 90, 99])
    return {"runs": int(samples.size), "p50_ms": float(p50), "p90_ms": float(p90),
            "p99_ms": float(p99), "mean_ms": float(samples.mean()),
            "std_ms": float(samples.std()), "min_ms": float(samples.min()),
            "max_ms": float(samples.max()), "throughput_ips": float(batch * 1000.0 / p50)}


def time_runner(runner, prepared, *, warmup: int, min_runs: int, min_seconds: float,
                max_runs: int = 100_000):
    """(first-inference ms, steady-state samples in ns) of `runner.run(prepared)`.

    The clock is `perf_counter_ns` around the call alone: input is prepared before and output
    decoded after, as TFLite's benchmark_model and onnxruntime_perf_test do. Timed runs go on
    until both `min_runs` and `min_seconds` are reached.
    """
    clock = time.perf_counter_ns
    start = clock()
    runner.run(prepared)
    first_ms = (clock() - start) / 1e6
    for _ in range(warmup):
        runner.run(prepared)
    samples = []
    deadline = clock() + int(min_seconds * 1e9)
    while len(samples) < max_runs and (len(samples) < min_runs or clock() < deadline):
        start = clock()
        runner.run(prepared)
        samples.append(clock() - start)
    return first_ms, samples


def prepare_pixels(images, input_spec: dict):
    """uint8 pixels [batch, H, W, 3] to what an artifact's input tensor takes.

    The input contract: every artifact takes raw 0-255 RGB pixels. A float input gets them as
    float32; a uint8/int8 input gets them as they are when its quantization is exactly
    (scale 1, zero point 0), else quantized with the input's own parameters.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [batch, H, W, 3], got {images.dtype} "
                         f"{list(images.shape)}")
    dtype = input_spec["dtype"]
    if dtype in ("uint8", "int8"):
        quantization = input_spec.get("quantization")
        if quantization and quantization != {"scale": 1.0, "zero_point": 0}:
            low, high = (0, 255) if dtype == "uint8" else (-128, 127)
            scaled = images / quantization["scale"] + quantization["zero_point"]
            return np.clip(np.round(scaled), low, high).astype(dtype)
        return images
    return images.astype(np.float32)


def dequantize(raw, output_spec):
    """An artifact's raw output to float32 probabilities.

    A multi-task artifact's `output_spec` is a list, one spec per output in task order, and
    its raw output the outputs side by side (`concatenated`): each is dequantized with its
    own parameters."""
    if isinstance(output_spec, list):
        edges = np.cumsum([0, *(int(spec["shape"][-1]) for spec in output_spec)])
        return np.concatenate([dequantize(raw[:, start:end], spec) for spec, start, end
                               in zip(output_spec, edges[:-1], edges[1:])], axis=1)
    quantization = output_spec.get("quantization")
    if quantization:
        return (raw.astype(np.float32) - quantization["zero_point"]) * quantization["scale"]
    return np.asarray(raw, dtype=np.float32)


def output_names(output_spec):
    """A multi-output artifact's output tensor names in task order; None for one output."""
    return [spec["name"] for spec in output_spec] if isinstance(output_spec, list) else None


def predicted_classes(probabilities, output_spec):
    """Top-1 classes: [N] for one output, [N, tasks] for a multi-task artifact."""
    if not isinstance(output_spec, list):
        return probabilities.argmax(axis=1)
    edges = np.cumsum([0, *(int(spec["shape"][-1]) for spec in output_spec)])
    return np.stack([probabilities[:, start:end].argmax(axis=1)
                     for start, end in zip(edges[:-1], edges[1:])], axis=1)


def concatenated(outputs):
    """Several outputs side by side along the class axis (one output: itself)."""
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=-1)


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    On Linux the kernel's own high-water mark of this process image (VmHWM): getrusage's
    ru_maxrss survives exec, so it would report the parent's peak when that was larger.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def machine_facts() -> dict:
    """CPU model, its vector ISA, cores, OS and Python of this machine; the board's model
    where it says; and whether it is emulated. The ISA matters: int8 kernels differ between
    AVX2, AVX-512 (VNNI) and ARM's dot-product extensions, and so do their speed and, at
    times, their results."""
    try:
        with open("/proc/cpuinfo") as handle:
            cpuinfo = handle.read()
    except OSError:
        cpuinfo = ""
    facts = cpu_facts(cpuinfo, platform.machine(), platform.processor())
    facts.update({"cores": os.cpu_count(), "system": platform.platform(),
                  "arch": platform.machine(), "python": platform.python_version()})
    try:  # a Raspberry Pi or a Jetson names itself here
        with open("/proc/device-tree/model", "rb") as handle:
            facts["model"] = handle.read().decode("utf-8", "replace").strip("\x00 \n")
    except OSError:
        pass
    return facts


# ARM's CPU part numbers (implementer 0x41) as people name them
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55",
             "0xd07": "Cortex-A57", "0xd08": "Cortex-A72", "0xd09": "Cortex-A73",
             "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1",
             "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
             "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710",
             "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2"}
ARM_ARCHES = ("aarch64", "arm64", "armv7l", "armv8l", "armv6l")


def cpu_facts(cpuinfo: str, arch: str, processor: str = "") -> dict:
    """{cpu, isa, emulated?} from /proc/cpuinfo as this machine shows it. An ARM userland under
    qemu-user sees the x86 host's /proc/cpuinfo: that is detected and said (`emulated`), the
    CPU named as the emulated one, so no figure passes as a device's."""
    lines = [line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line]
    fields = {}
    for key, value in lines:
        fields.setdefault(key.strip(), value.strip())
    flags = {flag for key, value in lines if key.strip() in ("flags", "Features")
             for flag in value.split()}
    x86_host = "vendor_id" in fields or "sse2" in flags
    if arch in ARM_ARCHES and x86_host:
        host = fields.get("model name", "an x86 CPU")
        return {"cpu": f"{arch} emulated by qemu-user on {host}",
                "isa": f"{arch} (emulated; the host has {cpu_isa(flags, 'x86_64')})",
                "emulated": "qemu-user"}
    if fields.get("CPU implementer") == "0x41" and fields.get("CPU part") in ARM_PARTS:
        cpu = f"ARM {ARM_PARTS[fields['CPU part']]}"
    else:
        cpu = fields.get("model name") or fields.get("Model") or fields.get("Hardware") \
            or processor or arch
    return {"cpu": cpu, "isa": cpu_isa(flags, arch)}


def cpu_isa(flags, arch: str) -> str:
    """The widest vector ISA in a CPU's /proc/cpuinfo flags, as people name it, with the int8
    extensions that change which int8 kernels run: VNNI and AMX beside AVX-512, AVX-VNNI
    beside AVX2 (Alder Lake and later, without AVX-512), dotprod and i8mm beside NEON."""
    if "avx512f" in flags:
        extras = [name for flag, name in (("avx512_vnni", "VNNI"), ("amx_int8", "AMX"))
                  if flag in flags]
        return " ".join(["AVX-512", *extras])
    if "avx2" in flags and "avx_vnni" in flags:
        return "AVX2 AVX-VNNI"
    for flag, name in (("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2")):
        if flag in flags:
            return name
    if "asimd" in flags or "neon" in flags:
        extras = [name for flag, name in (("asimddp", "dotprod"), ("i8mm", "i8mm"),
                                          ("sve", "SVE")) if flag in flags]
        return " ".join(["NEON", *extras])
    return arch or "unknown"


# -- the device's runtimes -------------------------------------------------------------------

TFLITE_MODULES = ("ai_edge_litert", "tflite_runtime")


class Unavailable(Exception):
    """No runtime on this device runs the artifact."""


class TFLiteModel:
    """A .tflite file in ai-edge-litert's or tflite-runtime's interpreter: with its default
    delegate (XNNPACK), or LiteRT's builtin kernels alone (`builtin_only`)."""

    def __init__(self, path, threads, module="ai_edge_litert", builtin_only=False,
                 outputs=None):
        if module == "ai_edge_litert":
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        else:
            from tflite_runtime.interpreter import Interpreter, OpResolverType
        resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if builtin_only \
            else OpResolverType.AUTO
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads,
                                       experimental_op_resolver_type=resolver)
        self._input = self.interpreter.get_input_details()[0]["index"]
        details = {detail["name"]: detail["index"]
                   for detail in self.interpreter.get_output_details()}
        missing = [name for name in outputs or () if name not in details]
        if missing:
            raise ValueError(f"{path} has no output {', '.join(missing)}")
        self._outputs = [details[name] for name in outputs] if outputs \
            else [self.interpreter.get_output_details()[0]["index"]]
        self.batch = None

    def resize(self, batch: int) -> None:
        """Re-plan the graph for a batch size: once per size, never per call."""
        shape = list(self.interpreter.get_input_details()[0]["shape"])
        self.interpreter.resize_tensor_input(self._input, [batch, *shape[1:]], strict=False)
        self.interpreter.allocate_tensors()
        self.batch = batch

    def run(self, prepared):
        if prepared.shape[0] != self.batch:
            self.resize(prepared.shape[0])
        self.interpreter.set_tensor(self._input, prepared)
        self.interpreter.invoke()
        return concatenated([self.interpreter.get_tensor(index) for index in self._outputs])


class OnnxModel:
    """An .onnx file in ONNX Runtime, on one execution provider (the CPU's by default).
    `threads` None leaves ONNX Runtime's own default."""

    def __init__(self, path, threads, module="onnxruntime", provider="CPUExecutionProvider",
                 settings=None, outputs=None):
        import onnxruntime
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(path), options,
                                                    providers=[(provider, settings or {})])
        self._input = self.session.get_inputs()[0].name
        self._outputs = list(outputs) if outputs else [self.session.get_outputs()[0].name]

    def run(self, prepared):
        return concatenated(self.session.run(self._outputs, {self._input: prepared}))


class OpenVinoModel:
    """An .onnx file in OpenVINO on the CPU (Intel edge boxes). OpenVINO may run a float graph
    in bf16: an fp32 artifact is compiled at f32, what parity judges; `executed` says what
    OpenVINO chose."""

    def __init__(self, path, threads, module="openvino", precision=None, outputs=None):
        import openvino
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if precision != "int8":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        core = openvino.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        chosen = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.executed = f"inference precision {getattr(chosen, 'get_type_name', str)()}"
        self._outputs = [self.compiled.output(name) for name in outputs] if outputs \
            else [self.compiled.output(0)]

    def run(self, prepared):
        self.request.infer({0: prepared})
        return concatenated([self.request.get_tensor(output).data.copy()
                             for output in self._outputs])


ONNX_MODULES = ("onnxruntime", "openvino")


def installed(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def runtime_for(file_name: str, wanted: str = "auto") -> str:
    """The runtime module this device runs `file_name` with, or raise Unavailable."""
    candidates = TFLITE_MODULES if file_name.endswith(".tflite") else ONNX_MODULES
    if wanted != "auto":
        if wanted not in candidates:
            raise Unavailable(f"{wanted} does not run {Path(file_name).suffix} files")
        candidates = (wanted,)
    for module in candidates:
        if installed(module):
            return module
    hint = " or ".join(name.replace("_", "-") for name in candidates)
    raise Unavailable(f"no runtime for {Path(file_name).suffix} here (pip install {hint})")


def open_model(path, threads: int, module: str, precision=None, outputs=None):
    if module == "openvino":
        return OpenVinoModel(path, threads, module, precision, outputs=outputs)
    return (OnnxModel if module == "onnxruntime" else TFLiteModel)(path, threads, module,
                                                                   outputs=outputs)


def runtime_versions() -> dict:
    """The version of each runtime module this Python would import, read from the metadata
    of the distribution installed beside that module (onnxruntime-gpu installs the module
    `onnxruntime` under another name, and two distributions can hold it at once). Nothing
    is imported: in a foreign userland importing a runtime has crashed the process."""
    import importlib.metadata
    import importlib.util
    versions = {"numpy": np.__version__}
    for module in TFLITE_MODULES + ONNX_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None:
            continue
        versions[module] = "unknown"  # built from source, without metadata
        folder = Path(spec.origin or next(iter(spec.submodule_search_locations))).parent.parent
        for dist in importlib.metadata.distributions(path=[str(folder)]):
            top = (dist.read_text("top_level.txt") or "").split()
            files = [str(name) for name in (dist.files or [])]
            if module in top or any(name.startswith(module + "/") for name in files):
                versions[module] = dist.version
                break
    return versions


# -- one combination, in a process of its own ------------------------------------------------


ROW_MARKER = "TLEDGE-ROW "


def measure(row: dict, load, prepare, images, *, warmup: int, min_runs: int,
            min_seconds: float, skip=()) -> dict:
    """Fill in one combination's `row`: load time, first inference, steady-state latency and
    the process's memory, or why it could not run. The one measurement of tledge, used by
    `tledge bench` (with tledge's runners) and by bench_device.py (with the models above).

    `load()` opens the artifact (an exception of `skip` makes a "skipped" row, any other a
    "failed" one); `prepare(model, images)` turns uint8 images into its input, outside the
    clock.
    """
    baseline = peak_rss_bytes()
    start = time.perf_counter_ns()
    try:
        model = load()
    except skip as error:
        return {**row, "status": "skipped", "reason": str(error)}
    except Exception as error:  # an artifact its runtime rejects is a row, not a crash
        return {**row, "status": "failed", "reason": f"{type(error).__name__}: {error}"}
    row = {**row, "load_ms": (time.perf_counter_ns() - start) / 1e6,
           "executed": getattr(model, "executed", None)}
    try:
        batch = row["batch"]
        reps = -(-batch // len(images))
        prepared = prepare(model, np.concatenate([images] * reps)[:batch])
        row["first_ms"], samples = time_runner(model, prepared, warmup=warmup,
                                               min_runs=min_runs, min_seconds=min_seconds)
    except Exception as error:  # a runtime crash is a row, the other combinations go on
        return {**row, "status": "failed", "reason": f"{type(error).__name__}: {error}"}
    finally:
        getattr(model, "close", lambda: None)()
    row.update(summarize(samples, batch))
    row["peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
    row["runtime_rss_mb"] = round((peak_rss_bytes() - baseline) / 2**20, 1)
    return row


def emit_row(row: dict) -> None:
    """A child process's answer: one marked line on stdout (libraries print there too)."""
    sys.stdout.write("\n" + ROW_MARKER + json.dumps(row) + "\n")
    sys.stdout.flush()


def run_child(command, job: dict, row: dict, timeout: float = 900) -> dict:
    """Run one combination in a fresh process: `command` reads the JSON `job` on stdin and
    emits its row. A process per combination keeps one runtime's memory and threads out of
    another's figures. A child that dies or hangs is a "failed" `row` saying so."""
    try:
        done = subprocess.run(command, input=json.dumps(job), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": "failed", "reason": f"no result within {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(ROW_MARKER)]
    if lines:
        return json.loads(lines[-1][len(ROW_MARKER):])
    why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return {**row, "status": "failed", "reason": f"the benchmark process died: {why}"}


def gflops_per_second(flops, batch: int, p50_ms: float) -> float:
    """Achieved GFLOP/s: the model's FLOPs per image x images per call / p50."""
    return flops * batch / (p50_ms / 1000.0) / 1e9


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


def bench_in_process(job: dict, isolate: bool, timeout: float = 900) -> dict:
    if not isolate:
        return bench_one(job)
    flags = ["-I"] if sys.flags.isolated else []
    return run_child([sys.executable, *flags, os.path.abspath(__file__), "--job"], job,
                     _first_row(job), timeout)


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
    (`host`: its raw outputs, image by image): top-1 agreement, the largest difference (in
    quantization steps for an integer output, absolute for a float one) and the images
    whose class changed."""
    model = open_model(path, 1, module, entry.get("precision"), output_names(entry["output"]))
    raw = np.concatenate([model.run(prepare_pixels(images[start:start + 1], entry["input"]))
                          for start in range(len(images))])  # batch 1: every artifact takes it
    predicted = predicted_classes(dequantize(raw, entry["output"]), entry["output"])
    host = np.asarray(host)
    host_predicted = predicted_classes(dequantize(host, entry["output"]), entry["output"])
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
    return {"artifact": entry["name"], "runtime": module, "images": int(len(images)),
            "accuracy": float(np.mean(predicted == expected)),
            "host_accuracy": float(np.mean(host_predicted == expected)),
            "agreement_with_host": float(np.mean(predicted == host_predicted)),
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
        flags = ["-I"] if sys.flags.isolated else []
        row = run_child([sys.executable, *flags, os.path.abspath(__file__), "--job"], job,
                        {"artifact": job["entry"]["name"], "runtime": job["runtime"]},
                        timeout)
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


def format_line(row: dict) -> str:
    """One benchmark row as `tledge bench` and bench_device.py print it."""
    head = (f"  {row['artifact']:<16} {row['runtime']:<18} threads {row['threads']:<2} "
            f"batch {row['batch']:<3}")
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['reason']}"
    memory = f"  peak {row['peak_rss_mb']:.0f} MiB" if row.get("peak_rss_mb") is not None else ""
    return (f"{head} p50 {row['p50_ms']:8.3f} ms  p90 {row['p90_ms']:8.3f}  "
            f"p99 {row['p99_ms']:8.3f}  {row['throughput_ips']:8.1f} img/s  "
            f"load {row['load_ms']:.0f} ms{memory}"
            + (f"  ({row['executed']})" if row.get("executed") else ""))


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


def main(argv=None) -> int:
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

    result = bench_bundle(Path(os.path.abspath(__file__)).parent, threads=args.threads,
                          batch_sizes=args.batch, wanted=args.runtime, names=names,
                          min_runs=args.min_runs, min_seconds=args.min_seconds,
                          isolate=not args.no_isolate, device_name=args.name, save=save)
    save(result)
    print(f"wrote {args.out}: {sum(row['status'] == 'ok' for row in result['rows'])} of "
          f"{len(result['rows'])} combinations ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
