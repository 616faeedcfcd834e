"""The bench stage: latency of every artifact in every runtime it runs on.

For each artifact x runtime x threads x batch size: load time, first inference, warm-up,
then timed runs until both a minimum count and a minimum time are reached. The clock is
`perf_counter_ns` around `runner.run` alone: input is prepared before timing and output
decoded after, as TFLite's benchmark_model and onnxruntime_perf_test do. A combination that
cannot run here is a "skipped" row with its reason; one that crashes is a "failed" row.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

from tledge.core.machine import machine_facts
from tledge.core.timing import (BenchRow, beyond_noise, format_line, gflops_per_second, measure,
                                run_child)
from tledge.bench.single_task import side_by_side, single_task_runs
from tledge.errors import RunDirError, RuntimeUnavailable
from tledge.flops import model_flops
from tledge.parity import evidence_text, ParityRow, row_is_current
from tledge.recipe.spec import PickRecipe
from tledge.pipeline import stage_record
from tledge.records import read_bench, read_parity
from tledge.run_inputs import evaluation_split, run_recipe, run_splits
from tledge.rundir import (artifacts, BENCH, find_artifact, INNER_RUNS, MANIFEST, PARITY,
                           read_manifest, record_stage, verified_artifact,
                           write_json, write_manifest)
from tledge.runners import load, RUNTIMES
from tledge.validate import validate_run


def bench_artifact(entry, run_dir, runtime, *, threads, batch, images, warmup, min_runs,
                   min_seconds) -> BenchRow:
    """One row, in this process: load, first inference, steady-state latency and memory, or
    why it could not run (`tledge.core.timing.measure` through tledge's runners)."""
    row = measure(dataclasses.asdict(_first_row(entry, runtime, threads, batch)),
                  lambda: load(entry, run_dir, runtime, threads=threads),
                  lambda runner, chosen: runner.prepare(chosen), images, warmup=warmup,
                  min_runs=min_runs, min_seconds=min_seconds, skip=(RuntimeUnavailable,))
    return BenchRow(**row)


def bench_isolated(entry, run_dir, runtime, *, threads, batch, images, warmup, min_runs,
                   min_seconds, timeout=900) -> BenchRow:
    """`bench_artifact` in a fresh process (`python -m tledge.bench.worker`)."""
    with tempfile.TemporaryDirectory(prefix="tledge-bench-") as folder:
        images_path = Path(folder) / "images.npy"
        np.save(images_path, images)
        job = {"entry": entry, "run_dir": str(Path(run_dir).resolve()), "runtime": runtime,
               "threads": threads, "batch": batch, "images": str(images_path),
               "warmup": warmup, "min_runs": min_runs, "min_seconds": min_seconds}
        row = run_child([sys.executable, "-m", "tledge.bench.worker"], job,
                        dataclasses.asdict(_first_row(entry, runtime, threads, batch)), timeout)
    return BenchRow(**row)


def _first_row(entry, runtime, threads, batch) -> BenchRow:
    return BenchRow(entry["name"], runtime, threads, batch, "ok",
                    size_bytes=entry.get("size_bytes"))


def bench_run(run_dir, *, runtimes=None, threads=None, batch_sizes=None, log=print) -> dict:
    """Benchmark every artifact of the run; write bench.json and the pick to the manifest."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    recipe = run_recipe(run_dir)
    settings = recipe.bench
    custom_runtimes = bool(runtimes)
    runtimes = tuple(runtimes or settings.runtimes)
    threads = tuple(threads or settings.threads)
    batch_sizes = tuple(batch_sizes or settings.batch_sizes)
    images = evaluation_split(run_splits(run_dir, recipe))[0][:64]
    unjudged = _unjudged(run_dir, manifest, runtimes, settings.runtimes) if custom_runtimes \
        else ()
    if unjudged:  # a runtime no recipe lists (a browser): judged first, as validate judges
        log(f"  parity in {', '.join(unjudged)} first (tledge validate {run_dir} "
            + " ".join(f"--runtime {name}" for name in unjudged) + ")")
        validate_run(run_dir, runtimes=unjudged, log=log)
        manifest = read_manifest(run_dir)
    if not artifacts(manifest):
        raise RunDirError(f"{run_dir} has no artifacts to benchmark; train and export first "
                          "(`tledge build RECIPE`, or `tledge export RUN_DIR`)")
    for entry in artifacts(manifest):  # time only the files that were written and validated
        verified_artifact(run_dir, entry)
    rows, unavailable = [], {}
    for entry in artifacts(manifest):
        for runtime in runtimes:
            if entry["family"] not in RUNTIMES[runtime].families:
                continue
            for thread_count in threads:
                for batch in batch_sizes:
                    reason = RUNTIMES[runtime].unavailable()
                    if reason:  # no process to start for what cannot run here; said once
                        rows.append(BenchRow(entry["name"], runtime, thread_count, batch,
                                             "skipped", reason=reason,
                                             size_bytes=entry.get("size_bytes")))
                        unavailable.setdefault(runtime, reason)
                        continue
                    measure = bench_isolated if settings.isolate else bench_artifact
                    row = measure(entry, run_dir, runtime, threads=thread_count,
                                         batch=batch, images=images, warmup=settings.warmup,
                                         min_runs=settings.min_runs,
                                         min_seconds=settings.min_seconds)
                    rows.append(row)
                    log(format_row(row))
    if unavailable:
        log("  " + unavailable_line(unavailable))
    flops = model_flops(run_dir, manifest)
    for row in rows:
        if row.status == "ok" and flops:
            row.gflops_per_second = gflops_per_second(flops, row.batch, row.p50_ms)
    parity = read_parity(run_dir)
    if parity is None:
        log(f"note: {run_dir / PARITY} is missing (not validated): nothing can be picked until "
            f"`tledge validate {run_dir}` has run; a build does both")
    others, read = other_candidates(run_dir, threads=threads[0], batch=batch_sizes[0],
                                    members=recipe.pick.members, log=log)
    pick = choose(rows, parity, threads=threads[0], batch=batch_sizes[0],
                  checksums={entry["name"]: entry["sha256"] for entry in artifacts(manifest)},
                  settings=recipe.pick, others=others)
    if pick is None and parity and choose(rows, parity, threads=threads[0], batch=batch_sizes[0],
                                          others=others) is not None:
        log("note: no candidate meets the recipe's [pick] constraints (max_latency_ms, "
            "max_size_kb): nothing is picked")
    if pick is not None and pick.get("parity") == "insufficient":
        log(f"note: the pick {pick_name(pick)} on {pick['runtime']} is UNPROVEN: no artifact "
            "passed parity, and its " + evidence_text(pick["evidence"]))
    singles = single_task_runs(run_dir)  # a multi-task run's single-task models: timed with
    compared = side_by_side(run_dir, images, threads=threads[0], log=log) if singles else []
    result = {"rows": [dataclasses.asdict(row) for row in rows], "pick": pick,
              **({"single_task": compared} if compared else {}),
              "settings": {"threads": list(threads), "batch_sizes": list(batch_sizes),
                           "warmup": settings.warmup, "min_runs": settings.min_runs,
                           "min_seconds": settings.min_seconds, "isolate": settings.isolate},
              "flops_per_image": flops, "machine": machine_facts()}
    written = write_json(run_dir / BENCH, result)
    manifest["pick"] = pick
    custom = bool(custom_runtimes or threads != settings.threads or batch_sizes != settings.batch_sizes)
    record_stage(manifest, "bench", outputs=[written],
                 reads=[run_dir / PARITY, *read, *(folder / MANIFEST for folder in
                                                    singles.values())],
                 run_dir=run_dir,
                 rows=len(rows),
                 **({"hash": None} if custom else stage_record(manifest, recipe, "bench")))
    write_manifest(run_dir, manifest)
    return result


def _unjudged(run_dir, manifest, runtimes, listed) -> tuple[str, ...]:
    """The runtimes asked for that the recipe does not list, can run here, run one of the
    run's artifacts and have no parity row for it."""
    parity = read_parity(run_dir)
    judged = {(row.artifact, row.runtime) for row in parity.rows} if parity else set()
    return tuple(runtime for runtime in runtimes if runtime not in listed
                 and RUNTIMES[runtime].unavailable() is None
                 and any(entry["family"] in RUNTIMES[runtime].families
                         and (entry["name"], runtime) not in judged
                         for entry in artifacts(manifest)))


def other_candidates(run_dir, *, threads: int, batch: int, members=False, log=print):
    """([candidates of each other model the run trained], the files read): the baseline's
    benchmarked, validated artifacts, when its stages have run, and (`members`) those of an
    ensemble's inline members; their files are verified."""
    pools, read = [], []
    names = list(INNER_RUNS)
    if members:
        names += sorted(f"members/{folder.name}" for folder in
                        (Path(run_dir) / "members").glob("*") if (folder / MANIFEST).is_file())
    for name in names:
        folder = Path(run_dir) / name
        if not (folder / MANIFEST).is_file():
            continue
        read += [folder / BENCH, folder / PARITY]
        if not (folder / BENCH).is_file() or not (folder / PARITY).is_file():
            log(f"note: {folder} is not validated and benchmarked yet: the pick does not "
                "weigh it (a build does both)")
            continue
        manifest = read_manifest(folder)
        checksums = {}
        for entry in artifacts(manifest):
            verified_artifact(folder, entry)
            checksums[entry["name"]] = entry["sha256"]
        pools.append(candidates(read_bench(folder).rows,
                                read_parity(folder), threads=threads, batch=batch,
                                checksums=checksums, model=name))
    return pools, read


def pick_name(pick) -> str:
    """How a pick is named: its artifact, behind its model's folder when that is not the
    run's own model (`baseline/tflite_int8`)."""
    model = pick.get("model", "model")
    return pick["artifact"] if model == "model" else f"{model}/{pick['artifact']}"


def pick_folder(run_dir, pick) -> Path:
    """The run directory that holds the pick's file."""
    model = pick.get("model", "model")
    return Path(run_dir) if model == "model" else Path(run_dir) / model


def load_pick(run_dir) -> dict | None:
    """The pick the last bench of a run wrote (None when nothing qualified), after checking
    that its file is still the one that was benchmarked."""
    bench = read_bench(run_dir)
    if bench is None:
        raise RunDirError(f"{Path(run_dir) / BENCH} is missing; run `tledge bench {run_dir}` "
                          "first (or `tledge build RECIPE`)")
    pick = bench.pick
    if pick is not None:
        folder = pick_folder(run_dir, pick)
        verified_artifact(folder, find_artifact(read_manifest(folder), pick["artifact"]))
    return pick


def candidates(rows, parity, *, threads: int, batch: int, checksums=None,
               model: str = "model") -> list[dict]:
    """Every combination at `threads` and `batch` that ran and whose (artifact, runtime) pair
    passed parity, or met its thresholds on too few images to show them ("insufficient"),
    with its accuracy and its model's: what the pick chooses from. Each says which in
    `parity` ("reference", "passed" or "insufficient", the latter with its `evidence`).
    `parity`: the model's `tledge.records.Parity` (None before validate ran).

    The Keras model in Keras is the reference: it always qualifies. Without a parity report no
    exported artifact qualifies, since nothing says it still classifies correctly; nor does
    one whose file changed since it was validated (`checksums`: artifact name -> sha256;
    `tledge.parity.row_is_current`).
    `rows`: `BenchRow`s (this bench's, or another model's `tledge.records.Bench`).
    """
    reference_row = parity.reference if parity else None
    reference = reference_row.accuracy if reference_row else None
    judged = {("keras", "keras"): ParityRow("keras", "keras", "reference", accuracy=reference)}
    judged.update({(row.artifact, row.runtime): row for row in (parity.rows if parity else [])
                   if row.status in ("passed", "insufficient")
                   and (checksums is None or row_is_current(
                       row, {"sha256": checksums.get(row.artifact)}))})
    found = []
    for row in rows:
        check = judged.get((row.artifact, row.runtime))
        if row.status != "ok" or row.threads != threads or row.batch != batch or check is None:
            continue
        found.append({"model": model, "artifact": row.artifact, "runtime": row.runtime,
                      "threads": row.threads, "batch": row.batch,
                      "p50_ms": row.p50_ms, "p90_ms": row.p90_ms,
                      "size_bytes": row.size_bytes,
                      "accuracy": check.accuracy, "model_accuracy": reference,
                      "parity": check.status,
                      **({"evidence": check.evidence} if check.status == "insufficient"
                         else {})})
    return found


OBJECTIVES = {  # the candidate each objective prefers: smallest key
    "fastest": lambda c: (c["p50_ms"], -(c["accuracy"] or 0.0)),
    "most_accurate": lambda c: (-(c["accuracy"] or 0.0), c["p50_ms"]),
}


def choose(rows, parity, *, threads: int, batch: int, checksums=None, settings=None,
           others=()) -> dict | None:
    """The pick: among `candidates` of this run and of the other trained models (`others`,
    their `candidates` lists: the from-scratch baseline), the best by `settings.objective`
    ("fastest" by default) that meets the recipe's [pick] constraints:

    - its model's accuracy is at most `max_accuracy_drop` below the most accurate model's
      (default 0: the most accurate model ships, in its fastest artifact that passed
      parity; parity already bounds how far each artifact is from its own model);
    - `max_latency_ms` and `max_size_kb`, when set.

    "fastest" means beyond the measured noise (`tledge.core.timing.beyond_noise`): among the
    candidates as fast as the fastest within it, the most accurate artifact ships (then the
    smallest), and the pick names the strictly fastest in `within_noise_of`.

    The pick names `alternatives`: the most accurate and the fastest of all qualified
    candidates, where they are not the pick, so the report can state the trade.

    Artifacts with too few images to show their parity ("insufficient") are picked only
    when no artifact of any model passed: then the pick may be one of them, and it is
    unproven: its `parity` says "insufficient" and its `evidence` how many images would do.
    Nothing ships as if it had passed. They may be `alternatives` (their `parity` says so).
    """
    settings = settings or PickRecipe()
    pool = candidates(rows, parity, threads=threads, batch=batch, checksums=checksums)
    pool += [candidate for other in others for candidate in other]
    if not pool:
        return None
    weighed = pool  # the trade names the unproven too (marked), but what passed ships first
    if any(c.get("parity") == "passed" for c in pool):
        pool = [c for c in pool if c.get("parity") != "insufficient"]
    models = [c["model_accuracy"] for c in pool if c["model_accuracy"] is not None]
    best_model = max(models) if models else None
    eligible = [c for c in pool
                if (best_model is None or c["model_accuracy"] is None
                    or c["model_accuracy"] >= best_model - settings.max_accuracy_drop - 1e-12)
                and (settings.max_latency_ms is None or c["p50_ms"] <= settings.max_latency_ms)
                and (settings.max_size_kb is None or c["size_bytes"] is None
                     or c["size_bytes"] / 1024 <= settings.max_size_kb)]
    if not eligible:
        return None
    pick = dict(min(eligible, key=OBJECTIVES[settings.objective]))
    if settings.objective == "fastest":  # a speed inside the noise is no reason to lose accuracy
        tied = [c for c in eligible if not beyond_noise(_timing(c), _timing(pick))]
        chosen = dict(min(tied, key=lambda c: (-(c["accuracy"] or 0.0), c["size_bytes"] or 0,
                                                c["p50_ms"])))
        if _which(chosen) != _which(pick):
            chosen["within_noise_of"] = {key: pick[key] for key in
                                         ("model", "artifact", "runtime", "p50_ms")}
            pick = chosen
    alternatives = []
    for objective in ("most_accurate", "fastest"):
        best = min(weighed, key=OBJECTIVES[objective])
        if all(_which(best) != _which(shown) for shown in [pick, *alternatives]):
            alternatives.append({**best, "why": objective})
    return {**pick, "objective": settings.objective, "alternatives": alternatives,
            "best_model_accuracy": best_model,
            "models": list(dict.fromkeys(c["model"] for c in weighed)),
            "constraints": {"max_accuracy_drop": settings.max_accuracy_drop,
                            "max_latency_ms": settings.max_latency_ms,
                            "max_size_kb": settings.max_size_kb}}


def _timing(candidate) -> tuple:
    return candidate["p50_ms"], candidate.get("p90_ms")


def _which(candidate) -> tuple:
    return candidate["model"], candidate["artifact"], candidate["runtime"]


def unavailable_line(reasons: dict) -> str:
    """One line for the runtimes this machine cannot have ({runtime: why}), instead of a
    skipped row per artifact in every table."""
    return "not on this machine: " + "; ".join(f"{runtime} ({reason})"
                                                for runtime, reason in reasons.items())


def format_row(row: BenchRow) -> str:
    return format_line(dataclasses.asdict(row))
