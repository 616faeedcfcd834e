"""How tledge times an artifact, in every process that times one: the build machine's
`tledge bench` (through tledge's runners) and a device's bench_device.py (through
`tledge.core.engines`). The statistics, the timing loop, the memory probe, one combination's
row and the protocol of a child process that measures one.

Standard library and numpy only, and nothing of tledge outside `tledge.core`: this package is
copied whole into every device bundle.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import time

import numpy as np


@dataclasses.dataclass
class BenchRow:
    """One timed combination (artifact, runtime, threads, batch): the row `measure` fills,
    as bench.json and a device's result.json keep it."""
    artifact: str
    runtime: str
    threads: int
    batch: int
    status: str  # "ok" | "skipped" | "failed"
    reason: str = ""
    size_bytes: int | None = None
    load_ms: float | None = None
    first_ms: float | None = None
    runs: int | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    std_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    throughput_ips: float | None = None
    gflops_per_second: float | None = None  # achieved: the model's FLOPs x images / p50
    peak_rss_mb: float | None = None  # the benchmark process's peak resident memory
    runtime_rss_mb: float | None = None  # of which added by loading and running the runtime
    executed: str | None = None  # how the runtime ran it, where it says (OpenVINO's precision)


NOISE_FLOOR = 0.05  # two p50s within 5 % are one speed on a shared machine, whatever the spread


def compare_p50(row: BenchRow, other: BenchRow) -> tuple[float, bool]:
    """(other's p50 over row's: above 1 when `row` is faster; whether the difference is
    beyond the noise). A difference is beyond the noise when it exceeds both rows' own spread
    (p90 - p50 of their timed runs) and 5 % of the faster p50: "1.03x faster" between two
    runs of one file is a busy machine, not a speed."""
    return other.p50_ms / row.p50_ms, beyond_noise((row.p50_ms, row.p90_ms),
                                                   (other.p50_ms, other.p90_ms))


def beyond_noise(one, other) -> bool:
    """Whether two timings, each (p50_ms, p90_ms or None), are two speeds: their p50s differ
    by more than either's spread (p90 - p50) and by more than NOISE_FLOOR of the faster."""
    spreads = [max(0.0, p90 - p50) for p50, p90 in (one, other) if p90 is not None]
    margin = max([NOISE_FLOOR * min(one[0], other[0]), *spreads])
    return abs(other[0] - one[0]) > margin


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
    in_place = getattr(runner, "time_in_place", None)
    if in_place is not None:  # a runtime in another process (a browser) times itself there
        return in_place(prepared, warmup=warmup, min_runs=min_runs, min_seconds=min_seconds,
                        max_runs=max_runs)
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
    if not getattr(model, "out_of_process", False):  # a browser's memory is not measured here
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
