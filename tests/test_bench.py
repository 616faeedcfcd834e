"""Latency statistics, the pick, and rows for what cannot run."""

from __future__ import annotations

import numpy as np
import pytest

from tledge.core.timing import summarize, time_runner
from tledge.bench.stage import BenchRow, bench_artifact, choose
from tledge.parity import ParityRow
from tledge.records import Parity


def test_summarize_against_known_samples():
    samples_ns = [i * 1_000_000 for i in range(1, 101)]  # 1 .. 100 ms
    stats = summarize(samples_ns, batch=4)
    assert stats["runs"] == 100
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["mean_ms"] == pytest.approx(50.5)
    assert stats["min_ms"] == 1.0 and stats["max_ms"] == 100.0
    assert stats["std_ms"] == pytest.approx(np.std(np.arange(1, 101)))
    assert stats["throughput_ips"] == pytest.approx(4 * 1000 / 50.5)


OWN = {"keras": "keras", "tflite": "litert", "onnx": "onnxruntime"}


def own(artifact):
    return OWN[artifact.split("_")[0]]


def row(artifact, p50, status="ok", threads=1, batch=1, runtime=None):
    return BenchRow(artifact, runtime or own(artifact), threads, batch, status, p50_ms=p50,
                    size_bytes=10)


def parity(*passed, failed=(), pairs=()):
    rows = [ParityRow("keras", "keras", "reference")]
    rows += [ParityRow(name, own(name), "passed") for name in passed]
    rows += [ParityRow(name, own(name), "failed") for name in failed]
    rows += [ParityRow(name, runtime, status) for name, runtime, status in pairs]
    return Parity("test", 300, rows)


def test_pick_is_the_fastest_that_passed_parity():
    rows = [row("keras", 5.0), row("tflite_fp32", 1.0), row("tflite_int8", 0.4),
            row("onnx_fp32", 0.8)]
    pick = choose(rows, parity("tflite_fp32", "onnx_fp32", failed=["tflite_int8"]),
                  threads=1, batch=1)
    assert pick["artifact"] == "onnx_fp32" and pick["p50_ms"] == 0.8


def test_the_pick_takes_only_artifact_runtime_pairs_that_passed():
    rows = [row("keras", 5.0), row("tflite_int8", 1.0),
            row("tflite_int8", 0.3, runtime="litert_no_xnnpack"),
            row("onnx_fp32", 0.5, runtime="onnxruntime_cuda")]
    # int8 passed in LiteRT with XNNPACK; nobody validated it without, nor ONNX on CUDA
    pick = choose(rows, parity("tflite_int8", "onnx_fp32"), threads=1, batch=1)
    assert (pick["artifact"], pick["runtime"]) == ("tflite_int8", "litert")
    validated = parity("tflite_int8", "onnx_fp32",
                       pairs=[("tflite_int8", "litert_no_xnnpack", "passed"),
                              ("onnx_fp32", "onnxruntime_cuda", "failed")])
    pick = choose(rows, validated, threads=1, batch=1)
    assert (pick["artifact"], pick["runtime"]) == ("tflite_int8", "litert_no_xnnpack")


def test_pick_ignores_other_settings_and_rows_that_did_not_run():
    rows = [row("keras", 5.0), row("tflite_fp32", 0.1, threads=4),
            row("onnx_fp32", 0.2, status="failed"), row("tflite_int8", 3.0)]
    pick = choose(rows, parity("tflite_fp32", "onnx_fp32", "tflite_int8"), threads=1, batch=1)
    assert pick["artifact"] == "tflite_int8"


def _judged(*rows):
    """Parity rows with accuracies: (artifact, runtime, accuracy), the reference first."""
    return Parity("test", 300, [
        ParityRow(artifact, runtime, "reference" if artifact == "keras" else "passed",
                  accuracy=accuracy) for artifact, runtime, accuracy in rows])


def test_the_pick_weighs_every_model_by_the_recipes_objective_and_constraints():
    from tledge.bench.stage import candidates
    from tledge.recipe.spec import PickRecipe
    rows = [row("keras", 5.0), row("tflite_int8", 0.4), row("onnx_fp32", 0.8)]
    parity = _judged(("keras", "keras", 0.60), ("tflite_int8", "litert", 0.59),
                     ("onnx_fp32", "onnxruntime", 0.60))
    baseline = candidates([row("keras", 2.0), row("tflite_fp32", 0.2)],
                          _judged(("keras", "keras", 0.70), ("tflite_fp32", "litert", 0.70)),
                          threads=1, batch=1, model="baseline")
    # by default only the most accurate model ships: the baseline, in its fastest artifact
    pick = choose(rows, parity, threads=1, batch=1, others=[baseline])
    assert (pick["model"], pick["artifact"]) == ("baseline", "tflite_fp32")
    # a model 10 points less accurate may ship only when the recipe allows it
    loose = PickRecipe(max_accuracy_drop=0.1)
    pick = choose(rows, parity, threads=1, batch=1, others=[baseline], settings=loose)
    assert (pick["model"], pick["artifact"]) == ("baseline", "tflite_fp32")  # still faster
    slow_baseline = [dict(c, p50_ms=c["p50_ms"] * 10) for c in baseline]
    pick = choose(rows, parity, threads=1, batch=1, others=[slow_baseline], settings=loose)
    assert (pick["model"], pick["artifact"]) == ("model", "tflite_int8")
    assert [(c["why"], c["model"], c["artifact"]) for c in pick["alternatives"]] == [
        ("most_accurate", "baseline", "tflite_fp32")]
    # the most accurate objective, and latency and size limits
    pick = choose(rows, parity, threads=1, batch=1,
                  settings=PickRecipe(objective="most_accurate"))
    assert pick["artifact"] == "onnx_fp32"  # as accurate as Keras, and faster
    assert choose(rows, parity, threads=1, batch=1,
                  settings=PickRecipe(max_latency_ms=0.5))["artifact"] == "tflite_int8"
    assert choose(rows, parity, threads=1, batch=1,
                  settings=PickRecipe(max_latency_ms=0.1)) is None
    assert choose(rows, parity, threads=1, batch=1,
                  settings=PickRecipe(max_size_kb=0.001)) is None


def test_the_fastest_is_fastest_beyond_the_noise_and_a_tie_ships_the_most_accurate():
    """0.226 against 0.232 ms, runs that spread by 0.06 ms: one speed, so the more accurate
    file ships, and the report says why; twice as fast is a speed, and it wins."""
    from tledge.report.document import _pick_reason

    def timed(artifact, p50, p90):
        return BenchRow(artifact, own(artifact), 1, 1, "ok", p50_ms=p50, p90_ms=p90,
                        size_bytes=10)
    parity = _judged(("keras", "keras", 0.94), ("tflite_fp32", "litert", 0.939),
                     ("onnx_int8", "onnxruntime", 0.932))
    rows = [timed("keras", 3.0, 3.5), timed("tflite_fp32", 0.232, 0.29),
            timed("onnx_int8", 0.226, 0.288)]
    pick = choose(rows, parity, threads=1, batch=1)
    assert pick["artifact"] == "tflite_fp32"
    assert pick["within_noise_of"] == {"model": "model", "artifact": "onnx_int8",
                                       "runtime": "onnxruntime", "p50_ms": 0.226}
    reason = _pick_reason(pick, {})
    assert reason.startswith("the most accurate of the artifacts that passed parity that are "
                             "as fast as the fastest within the measured noise (onnx_int8 on "
                             "onnxruntime, p50 0.226 ms)"), reason
    rows[2] = timed("onnx_int8", 0.110, 0.120)
    pick = choose(rows, parity, threads=1, batch=1)
    assert pick["artifact"] == "onnx_int8" and "within_noise_of" not in pick
    assert _pick_reason(pick, {}) == "the fastest artifact that passed parity"


def test_without_parity_only_the_reference_qualifies():
    rows = [row("keras", 5.0), row("tflite_fp32", 1.0)]
    assert choose(rows, None, threads=1, batch=1)["artifact"] == "keras"
    assert choose([row("tflite_fp32", 1.0)], None, threads=1, batch=1) is None


class CountingRunner:
    def __init__(self):
        self.calls = 0

    def run(self, prepared):
        self.calls += 1


def test_timing_reaches_both_the_minimum_count_and_time():
    runner = CountingRunner()
    first, samples = time_runner(runner, None, warmup=3, min_runs=7, min_seconds=0.0)
    assert len(samples) == 7 and runner.calls == 1 + 3 + 7 and first >= 0
    runner = CountingRunner()
    _, samples = time_runner(runner, None, warmup=0, min_runs=1, min_seconds=0.05)
    assert len(samples) > 1 and sum(samples) > 0


def test_a_runtime_that_cannot_run_is_a_skipped_row(built_run):
    from tledge.rundir import find_artifact, read_manifest
    run_dir, _, _ = built_run
    entry = find_artifact(read_manifest(run_dir), "tflite_fp32")
    images = np.zeros((2, 32, 32, 3), np.uint8)
    result = bench_artifact(entry, run_dir, "onnxruntime", threads=1, batch=1, images=images,
                            warmup=0, min_runs=1, min_seconds=0)
    assert result.status == "skipped" and "does not run tflite" in result.reason


def test_an_artifact_that_crashes_is_a_failed_row(built_run, tmp_path):
    from tledge.rundir import find_artifact, read_manifest
    run_dir, _, _ = built_run
    entry = dict(find_artifact(read_manifest(run_dir), "onnx_fp32"))
    (tmp_path / "broken.onnx").write_bytes(b"not an onnx model")
    entry["path"] = "broken.onnx"
    images = np.zeros((2, 32, 32, 3), np.uint8)
    result = bench_artifact(entry, tmp_path, "onnxruntime", threads=1, batch=2, images=images,
                            warmup=0, min_runs=1, min_seconds=0)
    assert result.status == "failed" and result.reason


def test_batches_larger_than_the_images_are_filled_by_repeating(built_run):
    from tledge.rundir import find_artifact, read_manifest
    run_dir, _, _ = built_run
    entry = find_artifact(read_manifest(run_dir), "tflite_int8")
    images = np.zeros((3, 32, 32, 3), np.uint8)
    result = bench_artifact(entry, run_dir, "litert", threads=1, batch=8, images=images,
                            warmup=1, min_runs=3, min_seconds=0)
    assert result.status == "ok" and result.batch == 8 and result.runs >= 3


def test_rows_carry_achieved_gflops_and_the_pick_prints_alone(built_run):
    import json
    from click.testing import CliRunner
    from tledge.cli import main
    run_dir, _, _ = built_run
    bench = json.loads((run_dir / "bench.json").read_text())
    assert bench["flops_per_image"] > 1e6
    for row in [row for row in bench["rows"] if row["status"] == "ok"]:
        expected = bench["flops_per_image"] * row["batch"] / (row["p50_ms"] / 1000) / 1e9
        assert row["gflops_per_second"] == pytest.approx(expected)
    result = CliRunner().invoke(main, ["bench", str(run_dir), "--pick"])
    assert result.exit_code == 0, result.output
    pick = bench["pick"]
    assert result.output.startswith(f"{pick['artifact']} {pick['runtime']} ")
    assert len(result.output.strip().splitlines()) == 1
    report = (run_dir / "report.md").read_text()
    assert "| artifact | runtime | threads | batch | status | parity | accuracy |" in report


def test_pick_on_a_run_never_benchmarked_is_a_one_line_error(tmp_path, built_run):
    import shutil
    from click.testing import CliRunner
    from tledge.cli import main
    run_dir = tmp_path / "run"
    shutil.copytree(built_run[0], run_dir)
    (run_dir / "bench.json").unlink()
    result = CliRunner().invoke(main, ["bench", str(run_dir), "--pick"])
    assert result.exit_code == 2 and "bench.json is missing" in result.output


def test_litert_with_xnnpack_off_is_its_own_runtime_with_the_same_answers(built_run):
    from tledge.rundir import find_artifact, read_manifest
    from tledge.runners import load
    run_dir, _, _ = built_run
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for name in ("tflite_fp32", "tflite_int8"):
        entry = find_artifact(read_manifest(run_dir), name)
        fast, plain = load(entry, run_dir, "litert"), load(entry, run_dir, "litert_no_xnnpack")
        assert plain.runtime == "litert_no_xnnpack"
        np.testing.assert_allclose(plain.predict(images), fast.predict(images), atol=0.02)
        row = bench_artifact(entry, run_dir, "litert_no_xnnpack", threads=1, batch=1,
                             images=images, warmup=0, min_runs=2, min_seconds=0)
        assert row.status == "ok" and row.runtime == "litert_no_xnnpack"


def test_each_combination_runs_in_its_own_process_with_its_memory(built_run, tmp_path):
    import json
    from tledge.bench.stage import bench_isolated
    from tledge.rundir import find_artifact, read_manifest
    run_dir, _, _ = built_run
    bench = json.loads((run_dir / "bench.json").read_text())
    ran = [row for row in bench["rows"] if row["status"] == "ok"]
    # keras, two .tflite files in LiteRT, the .onnx in ONNX Runtime and in OpenVINO
    assert len(ran) == 5, [(row["artifact"], row["runtime"]) for row in ran]
    for row in ran:  # the shared run benchmarked isolated (the recipe default)
        assert row["peak_rss_mb"] > row["runtime_rss_mb"] >= 0
    entry = find_artifact(read_manifest(run_dir), "tflite_int8")
    images = np.zeros((2, 32, 32, 3), np.uint8)
    row = bench_isolated(entry, run_dir, "litert", threads=1, batch=1, images=images,
                         warmup=0, min_runs=3, min_seconds=0)
    assert row.status == "ok" and row.runs >= 3 and 0 < row.peak_rss_mb < 400
    broken = dict(entry, path="missing.tflite")
    row = bench_isolated(broken, tmp_path, "litert", threads=1, batch=1, images=images,
                         warmup=0, min_runs=1, min_seconds=0)
    assert row.status == "failed" and row.reason


def test_validate_checks_every_pair_that_bench_may_time(run_copy):
    import json
    import re
    from conftest import invoke
    recipe = run_copy / "recipe.toml"
    text = recipe.read_text()
    recipe.write_text(re.sub(r"(?m)^runtimes = \[.*\]$",
                             'runtimes = ["keras", "litert", "litert_no_xnnpack", "onnxruntime",'
                             ' "onnxruntime_cuda"]', text, count=1))
    result = invoke("validate", run_copy)
    assert result.exit_code == 0, result.output
    assert "tflite_fp32 on litert_no_xnnpack" in result.output
    rows = json.loads((run_copy / "parity.json").read_text())["rows"]
    pairs = {(row["artifact"], row["runtime"]): row["status"] for row in rows}
    # every pair judged: int8 passes; fp32's agreement 0.99 needs 268 images, the run has 120
    for runtime in ("litert", "litert_no_xnnpack"):
        assert pairs["tflite_int8", runtime] == "passed"
        assert pairs["tflite_fp32", runtime] == "insufficient"
    assert pairs["onnx_fp32", "onnxruntime"] == "insufficient"
    from tledge.runners import RUNTIMES
    if RUNTIMES["onnxruntime_cuda"].unavailable():  # not on this machine: never timed either
        assert ("onnx_fp32", "onnxruntime_cuda") not in pairs
    else:
        assert ("onnx_fp32", "onnxruntime_cuda") in pairs
    result = invoke("bench", run_copy, "--runtime", "litert_no_xnnpack", "--threads", "1")
    assert result.exit_code == 0, result.output
    pick = json.loads((run_copy / "bench.json").read_text())["pick"]
    assert pick and pairs[pick["artifact"], pick["runtime"]] == "passed"
