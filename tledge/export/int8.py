"""int8 that explains and repairs itself.

Diagnosis: where a full-integer artifact's error comes from, layer by layer, measured on
calibration images (TFLite's quantization debugger; for ONNX, the float and QDQ graphs'
intermediate tensors compared). Repair: when a plain int8 export fails parity (or passes only
narrowly), a path of remedies is tried, each a real export judged in the format's real
runtime on the repair split (training images held apart from calibration; never the test
split the validate stage judges). A remedy whose gain in agreement over the file kept so far
exceeds the noise of that paired comparison is kept, and the next remedy is tried on top of
it; the search stops at the first candidate that passes with margin (its agreement's 95 %
lower bound clears the threshold), or when its budget is spent:

    ONNX:   reduce_range (x86 CPU without VNNI, `int8_needs`; then carried by every later
            candidate), 2x and 4x the calibration images, percentile and entropy calibration,
            per-tensor weights, signed activations, then the worst layers of the diagnosis
            (made on the kept settings) kept in float, 1, 2, 4, 8 of them
    TFLite: 2x and 4x the calibration images, then the worst layers kept in float
    both:   last, where the time left allows, a quantization-aware fine-tune of the model
            (`tledge.export.qat`) quantized with the kept settings

The settings of the kept artifact go into its manifest entry; a later export of the same
model starts from them, so a rebuild reproduces the artifact without searching again.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tledge.core.machine import machine_facts
from tledge.core.timing import summarize, time_runner
from tledge.data import calibration_images
from tledge.errors import ExportError, first_line, TledgeError
from tledge.export.onnx import (_Images, float_proto, INT8_DEFAULTS, prepare_for_quantization,
                                quantize)
from tledge.export.tflite import _representative, int8_converter
from tledge.core.metrics import CONFIDENCE, wilson_lower_bound as agreement_lower_bound
from tledge.model import load_model
from tledge.parity import accuracy_of, compare, predict_all
from tledge.quiet import quiet
from tledge.run_inputs import run_splits
from tledge.rundir import find_artifact, move_file, read_manifest, verified_artifact
from tledge.runners import RUNTIMES, runtimes_for

# TensorFlow, onnx and ONNX Runtime are imported inside the functions that use them: the CLI imports this
# module at start-up, and they take seconds to load.

DIAGNOSIS_IMAGES = 64       # calibration images the per-layer comparison runs on
FLOAT_LAYER_STEPS = (1, 2, 4, 8, 16)  # how many of the worst layers to keep in float
NEEDED_PREFIX = "reduce_range"  # the remedy a CPU without VNNI needs (`int8_needs`)
QAT_MIN_SECONDS = 30.0  # the least time worth a quantization-aware fine-tune


def defaults(family: str) -> dict:
    """The settings of a plain int8 export of a family."""
    if family == "onnx":
        return {"calibration_samples": None, **INT8_DEFAULTS}
    return {"calibration_samples": None, "float_layers": []}


# -- what the CPU needs ----------------------------------------------------------------------
#
# ONNX Runtime's int8 kernels (MLAS) by CPU, for the QDQ files tledge writes (int8 weights;
# uint8 activations, or int8 ones, which MLAS shifts to uint8 on x86):
#   x86 with AVX2, or AVX-512 without VNNI: uint8 x int8 products are summed in pairs into
#     int16 (vpmaddubsw), which saturates when both operands are large: the documented remedy
#     (ONNX Runtime's quantize_static guidance for x86 without VNNI) is reduce_range, 7-bit
#     weights. Older x86 CPUs (SSE4, AVX) and an x86 CPU whose ISA is not known are treated
#     the same: reduce_range costs one bit of the weights, saturation can cost the top class.
#   x86 with AVX-512 VNNI, AVX-VNNI (AVX2 CPUs since Alder Lake) or AMX (every AMX CPU has
#     AVX-512 VNNI too; MLAS uses AMX where the OS enables its tiles, AVX-512 VNNI where not):
#     vpdpbusd / tdpbusd sum into int32, no saturation: nothing needed. (Beside AVX-512 it is
#     AVX-512 VNNI that counts, as MLAS prefers its AVX-512 kernels; `cpu_isa` names AVX-VNNI
#     only beside AVX2.)
#   ARM (NEON, with or without the dot-product extension): widening multiplies or sdot/udot
#     into int32, no saturation: nothing needed. Under qemu-user the ARM kernels run
#     (emulated instruction by instruction), whatever the host's ISA.
# TFLite (LiteRT with XNNPACK or its builtin kernels) has no such setting: nothing needed.
X86_NAMES = ("sse", "avx", "amx", "x86", "amd64", "i386", "i686")


def kernel_isa(isa: str | None) -> str:
    """The ISA whose kernels run, in lower case: under emulation the emulated CPU's, not the
    host's that `machine_facts` names in brackets ("aarch64 (emulated; the host has AVX2)")."""
    isa = (isa or "").lower()
    return isa.split("(emulated", 1)[0].strip()


def has_vnni(isa: str | None) -> bool:
    """Whether ONNX Runtime's int8 kernels multiply uint8 by int8 on this CPU without
    saturating: an x86 CPU with AVX-512 VNNI or AVX-VNNI (an AMX CPU has AVX-512 VNNI: it is
    its VNNI that counts), or not an x86 CPU at all. An x86 CPU whose ISA is not known
    (`x86_64` where there is no /proc/cpuinfo) counts as one without VNNI."""
    isa = kernel_isa(isa)
    return "vnni" in isa or not any(name in isa for name in X86_NAMES)


def int8_needs(isa: str | None = None) -> dict[str, dict]:
    """{family: the int8 settings a CPU with this ISA needs}: the one rule for it, read by the
    repair (`remedies`: every candidate after the plain export carries them) and by the tests.

    `isa` is `tledge.core.machine.machine_facts()["isa"]` (this machine's when None). ONNX
    needs `reduce_range` on x86 without VNNI (see the table above); TFLite needs nothing."""
    if isa is None:
        isa = machine_facts()["isa"]
    return {"onnx": {} if has_vnni(isa) else {"reduce_range": True}, "tflite": {}}


def remedies(family: str, *, isa: str, calibration_samples: int, train_images: int):
    """[(what is tried, settings change)] before any layer is kept in float, cheapest first:
    calibration size, then method, then per-tensor weights and signed activations (which can
    cost latency in ONNX Runtime on x86: last). The search applies each on top of the
    settings kept so far. What this CPU needs (`int8_needs`) comes first, and every later
    step carries it too: a candidate judged without it would be judged saturating."""
    steps, count = [], calibration_samples
    needed = int8_needs(isa).get(family, {})
    if needed.get("reduce_range"):
        steps.append((NEEDED_PREFIX + " (7-bit weights: this CPU has no VNNI, its "
                      "uint8 x int8 kernels can saturate)", {"reduce_range": True}))
    for factor in (2, 4):
        more = min(calibration_samples * factor, train_images)
        if more > count:
            steps.append((f"{more} calibration images instead of {calibration_samples}",
                          {"calibration_samples": more}))
            count = more
    if family == "onnx":
        steps += [("percentile calibration (clips the rare extreme activations)",
                   {"method": "percentile"}),
                  ("entropy calibration", {"method": "entropy"}),
                  ("per-tensor weights", {"per_channel": False}),
                  ("signed int8 activations", {"activations": "int8"})]
    carried = ", ".join(needed)
    return [(remedy if set(change) >= set(needed) else f"{remedy}, with {carried}",
             {**needed, **change}) for remedy, change in steps]


@dataclasses.dataclass
class Judge:
    """Runs a candidate artifact in its format's runtime on held-apart images and compares it
    with the Keras model's probabilities on the same images."""
    images: np.ndarray
    labels: np.ndarray
    reference: np.ndarray  # Keras probabilities on `images`
    split: str
    threads: int | None = None
    tasks: list | None = None  # a multi-task model's tasks (labels are then [N, tasks])

    def __call__(self, path, fmt, spec, thresholds) -> dict:
        runner = self._load(path, fmt, spec)
        try:
            probabilities = predict_all(runner, self.images)
            p50 = self._p50(runner)
        finally:
            runner.close()
        accuracy = accuracy_of(self.reference, self.labels, self.tasks)
        row = compare(probabilities, self.reference, self.labels, accuracy, thresholds,
                      self.tasks)
        return {"accuracy": row.accuracy, "accuracy_drop": row.accuracy_drop,
                "agreement": row.agreement, "max_abs_diff": row.max_abs_diff,
                "agreement_low": round(agreement_lower_bound(row.agreement, len(self.labels)),
                                       4) if row.agreement is not None else None,
                "passed": row.status == "passed", "problems": row.problems,
                "p50_ms": p50, "size_bytes": Path(path).stat().st_size,
                AGREES: agrees_with(probabilities, self.reference, self.tasks)}

    def side_by_side(self, candidates, fmt, rounds: int = 3) -> list[float]:
        """p50 of each (path, spec), timed in turns (the median of `rounds` turns each), so
        that a machine busy at one moment does not make one file look slower than another."""
        turns = [[self._timed(path, fmt, spec) for path, spec in candidates]
                 for _ in range(rounds)]
        return [float(np.median(column)) for column in zip(*turns)]

    def _timed(self, path, fmt, spec) -> float:
        """One file's p50, loaded alone (a second loaded runtime's idle threads would
        compete with it on a small CPU)."""
        runner = self._load(path, fmt, spec)
        try:
            return self._p50(runner, seconds=0.2)
        finally:
            runner.close()

    def _load(self, path, fmt, spec):
        return RUNTIMES[runtimes_for(fmt.family)[0]].load(
            path, {**spec, "precision": fmt.precision}, self.threads, "cpu")

    def _p50(self, runner, seconds=0.5) -> float:
        _, samples = time_runner(runner, runner.prepare(self.images[:1]), warmup=30,
                                 min_runs=100, min_seconds=seconds)
        return summarize(samples, 1)["p50_ms"]


AGREES = "_agrees"  # per-image agreement of an attempt: compared in the search, never stored


def agrees_with(probabilities, reference, tasks=None) -> np.ndarray:
    """Per image, whether a candidate's top class is the Keras model's (every task's, for a
    multi-task model)."""
    probabilities, reference = np.asarray(probabilities), np.asarray(reference)
    if not tasks:
        return probabilities.argmax(-1) == reference.argmax(-1)
    same, start = np.ones(len(reference), bool), 0
    for task in tasks:
        width = len(task["labels"])
        same &= probabilities[:, start:start + width].argmax(-1) == \
            reference[:, start:start + width].argmax(-1)
        start += width
    return same


Z = statistics.NormalDist().inv_cdf(CONFIDENCE)


def paired_gain(candidate, kept) -> tuple[float, float]:
    """(gain, noise) of a candidate's agreement over the kept one's on the same images: the
    gain is the difference of the two agreements; the noise is the one-sided 95 % margin of
    that difference under a sign test on the images where the two files differ (z √(b + c) / n,
    b images gained, c lost). A gain not above its noise could be luck of the images."""
    new, old = candidate.get(AGREES), kept.get(AGREES)
    if new is None or old is None or len(new) != len(old) or not len(new):
        return 0.0, float("inf")
    gained, lost = int(np.sum(new & ~old)), int(np.sum(~new & old))
    return (gained - lost) / len(new), Z * float(np.sqrt(gained + lost)) / len(new)


def better(candidate, kept) -> bool:
    """Whether `candidate` replaces `kept`: it passes every threshold where `kept` fails one
    (a file that fails is not one to keep while one that passes exists, however close the
    two); else its agreement's gain exceeds the comparison's noise, and it fails no threshold
    that `kept` passes."""
    if candidate.get("agreement") is None:
        return False
    if candidate.get("passed") and not kept.get("passed"):
        return True
    gain, noise = paired_gain(candidate, kept)
    return gain > noise and (bool(candidate.get("passed")) or not kept.get("passed"))


def quantize_with_repair(fmt, export, out_path, *, judge, thresholds, calibration_samples,
                         train_images, isa, diagnose, recorded=None, max_attempts=8,
                         float_steps=len(FLOAT_LAYER_STEPS), max_seconds=300.0,
                         qat_steps=0, log=print) -> dict:
    """Write the int8 artifact of `fmt` at `out_path`, repairing it when it fails parity.

    Args:
        export: `export(settings, path) -> spec`: one int8 export with these settings.
            With `settings["qat"]` (`{"steps", "seconds"}`) it exports a quantization-aware
            fine-tuned copy of the model (`tledge.export.qat`) and records in that table
            what ran (the steps the time allowed), so that a rebuild repeats it.
        judge: a `Judge` (on the repair split); None exports once with `recorded` or the
            default settings.
        diagnose: `diagnose(settings) -> diagnosis`, called when the plain export fails.
        recorded: what a previous export of this model kept (`{"settings", "remedy",
            "diagnosis"}`): tried first, so a rebuild reproduces a repaired artifact without
            searching (and keeps the diagnosis that explained it).
        max_attempts: exports of quantization settings (the first included); the float-layer
            steps (`float_steps` at most) come on top, within `max_seconds` in all.
        qat_steps: the last remedy, where a candidate still fails and the time left allows:
            a quantization-aware fine-tune of at most this many steps (0: never).

    Returns:
        The record kept in the manifest entry: settings, remedy, attempts, diagnosis, spec.
    """
    base = {**defaults(fmt.family), "calibration_samples": calibration_samples}
    start = time.perf_counter()
    attempts: list[dict] = []
    diagnosis, diagnosed, stopped = None, False, None
    files = []  # (path, spec) of each attempt
    images = len(judge.labels) if judge is not None else 0

    def attempt(remedy, settings, folder, kept=None):
        path = Path(folder) / f"candidate{len(attempts)}{fmt.suffix}"
        began = time.perf_counter()
        try:
            spec = export(settings, path)
            verdict = judge(path, fmt, spec, thresholds) if judge else {"passed": None}
        except Exception as error:  # a candidate that cannot be made or run (LiteRT refusing
            # a graph with some layers in float) is a failed candidate, not a failed export
            reason = first_line(error) if isinstance(error, TledgeError) else \
                f"{type(error).__name__}: {first_line(error)}"
            spec, verdict = None, {"passed": False, "problems": [reason]}
        row = {"remedy": remedy, "settings": settings, **verdict,
               "seconds": round(time.perf_counter() - began, 1)}
        if kept is not None:
            gain, noise = paired_gain(row, kept)
            row.update(gain=round(gain, 4), noise=round(noise, 4) if np.isfinite(noise)
                       else None, kept=better(row, kept))
        attempts.append(row)
        files.append((path, spec))
        if judge:
            log(f"    int8 {fmt.name}: {remedy}: " + _attempt_line(row, kept))
        return path, spec, row

    def spent(reason=None):
        nonlocal stopped
        elapsed = time.perf_counter() - start
        if elapsed > max_seconds:
            stopped = (f"stopped searching after {len(attempts)} attempts: the time budget "
                       f"({max_seconds:.0f} s, export.int8_repair_seconds) was spent "
                       f"({elapsed:.0f} s)")
        elif reason:
            stopped = reason
        if stopped:
            log(f"    int8 {fmt.name}: {stopped}")
        return bool(stopped)

    def done(row):
        return bool(row.get("passed")) and confident(row, thresholds, images)

    with tempfile.TemporaryDirectory(prefix="tledge-int8-") as folder:
        first = recorded["settings"] if recorded else base
        kept = attempt(recorded["remedy"] if recorded else "plain", first, folder)
        if recorded and kept[2]["passed"]:  # reproduced: what explained it still does
            diagnosis, diagnosed = recorded.get("diagnosis"), True
        plain = kept
        narrow = judge is not None and kept[2]["passed"] and not recorded and \
            not confident(kept[2], thresholds, images) and kept[2].get("agreement") != 1.0 \
            and agreement_lower_bound(1.0, images) >= thresholds["min_agreement"]
        # (a perfect agreement, or a judge with too few images for any margin: no search)
        if recorded:  # a recorded narrow pass that no longer passes is a failure to repair
            narrow = bool(recorded.get("narrow")) and bool(kept[2]["passed"])
        search = judge is not None and (narrow or not kept[2]["passed"])
        if search and narrow:
            log(f"    int8 {fmt.name}: a narrow pass (the agreement's {CONFIDENCE:.0%} lower "
                f"bound on {images} images is below {thresholds['min_agreement']}): "
                "trying the remedies that change no kernel")
        path_names: list[str] = []  # the remedies kept so far, in order
        if search:
            for remedy, change in remedies(fmt.family, isa=isa,
                                           calibration_samples=calibration_samples,
                                           train_images=train_images):
                if narrow and set(change) & set(GRAPH_SETTINGS):
                    continue
                settings = {**kept[2]["settings"], **change}
                if settings == kept[2]["settings"]:
                    continue
                if len(attempts) >= max_attempts:
                    log(f"    int8 {fmt.name}: quantization settings stopped after "
                        f"{len(attempts)} attempts (export.int8_repair_attempts)"
                        + ("" if narrow else "; the float-layer steps follow"))
                    break
                if spent(None):
                    break
                if any(name.startswith(NEEDED_PREFIX) for name in path_names):
                    remedy = remedy.split(", with ")[0]  # the path names it already
                candidate = attempt(" + ".join(path_names + [remedy]), settings, folder,
                                    kept[2])
                if candidate[2]["kept"]:
                    kept, path_names = candidate, path_names + [remedy]
                if done(kept[2]):
                    break
        if search and not narrow and not done(kept[2]) and not stopped:
            diagnosis, diagnosed = _safe(diagnose, kept[2]["settings"], log, fmt), True
            key = "float_nodes" if fmt.family == "onnx" else "float_layers"
            previous = 0
            for count in FLOAT_LAYER_STEPS[:float_steps]:
                layers = worst_layers(diagnosis, count)
                if len(layers) <= previous:
                    break  # no diagnosis, or no more layers than the step before
                if spent(None):
                    break
                previous = len(layers)
                names = [name for layer in layers for name in layer.get("nodes", [layer["name"]])]
                remedy = (f"{len(layers)} worst layer{'s' if len(layers) > 1 else ''} in float "
                          f"({', '.join(_short(layer['name']) for layer in layers[:3])}"
                          f"{', …' if len(layers) > 3 else ''})")
                candidate = attempt(" + ".join([name for name in path_names
                                                if "in float" not in name] + [remedy]),
                                    {**kept[2]["settings"], key: names}, folder, kept[2])
                if candidate[2]["kept"]:
                    kept = candidate
                    path_names = [name for name in path_names if "in float" not in name] + \
                        [remedy]
                if done(kept[2]):
                    break
            tuned = False
            if not done(kept[2]) and not stopped and qat_steps:
                left = max_seconds - (time.perf_counter() - start)
                needed = QAT_MIN_SECONDS + _typical_seconds(attempts)
                if left < needed:
                    log(f"    int8 {fmt.name}: no quantization-aware fine-tune: {left:.0f} s "
                        f"of the time budget left, it needs about {needed:.0f} "
                        "(export.int8_repair_seconds)")
                else:
                    tuned = True
                    remedy = (f"quantization-aware fine-tune (at most {qat_steps} steps, "
                              "distilling the Keras model)")
                    candidate = attempt(
                        " + ".join(path_names + [remedy]),
                        {**kept[2]["settings"], "qat": {
                            "steps": qat_steps,
                            "seconds": round(left - _typical_seconds(attempts), 1)}},
                        folder, kept[2])
                    if candidate[2]["kept"]:
                        kept, path_names = candidate, path_names + [remedy]
            if not done(kept[2]) and not stopped:
                tried = (f"every remedy and {previous} worst layer{'s' if previous != 1 else ''}"
                         f" in float (export.int8_float_steps = {float_steps})" if previous
                         else "every remedy, no layer kept in float (no per-layer diagnosis, "
                         "or export.int8_float_steps = 0)")
                stopped = ("ended with no candidate passing with margin: " + tried +
                           (" and a quantization-aware fine-tune" if tuned else "") + " tried")
                log(f"    int8 {fmt.name}: the search {stopped}")
        path, spec, row = kept
        if judge is not None and row is not plain[2] and files[0][1] is not None \
                and spec is not None:  # the latency cost of the remedy, measured in turns
            attempts[0]["p50_ms"], row["p50_ms"] = judge.side_by_side(
                [files[0], (path, spec)], fmt)
            log(f"    int8 {fmt.name}: p50 side by side: plain {attempts[0]['p50_ms']:.3f} ms, "
                f"kept {row['p50_ms']:.3f} ms")
        if spec is None:
            raise ExportError(row["problems"][0] if row.get("problems") else
                              f"{fmt.name}: no int8 candidate could be written")
        move_file(path, out_path)  # from $TMPDIR, which may be another filesystem
    # a plain file that failed because this CPU's kernels saturate, and passed with margin
    # with what the CPU needs alone, is explained by the CPU rule: no per-layer diagnosis
    explained = judge is not None and done(row) and row["remedy"].startswith(NEEDED_PREFIX) \
        and " + " not in row["remedy"]
    if judge is not None and not attempts[0]["passed"] and not diagnosed and not explained:
        diagnosis = _safe(diagnose, first, log, fmt)
    for attempt_row in attempts:
        attempt_row.pop(AGREES, None)
    float_names = row["settings"].get("float_nodes") or row["settings"].get("float_layers") \
        or []
    return {"settings": row["settings"], "remedy": row["remedy"],
            "repaired": row["remedy"] != "plain" and bool(row["passed"]),
            "narrow": narrow,  # the plain file passed, but not by a margin the images support
            "passed": row["passed"], "confident": done(row) if judge else None,
            "split": judge.split if judge else None, "images": images or None,
            "isa": isa, "seconds": round(time.perf_counter() - start, 1),
            "stopped": stopped, "float": list(float_names),
            "attempts": attempts, "diagnosis": diagnosis, "spec": spec}


def _typical_seconds(attempts) -> float:
    """What one candidate's export and judgement took, the median of those made so far."""
    return float(np.median([row["seconds"] for row in attempts])) if attempts else 0.0


def worst_layers(diagnosis, count: int) -> list[dict]:
    """The `count` layers that add the most error, worst first."""
    if not diagnosis:
        return []
    layers = [layer for layer in diagnosis["layers"] if layer.get("error") is not None
              and not layer.get("reads_input") and not layer.get("writes_output")]
    return sorted(layers, key=lambda layer: -layer["error"])[:count]


def confident(row, thresholds, images: int) -> bool:
    """A pass that would most likely hold on other images: its agreement's lower bound clears
    the threshold too."""
    return row.get("agreement") is not None and agreement_lower_bound(
        row["agreement"], images) >= thresholds["min_agreement"]


# The settings that change the graph's kernels; the others (calibration images and method,
# reduce_range) change only its numbers, and so never its latency, whatever a noisy timer says
GRAPH_SETTINGS = ("float_layers", "float_nodes", "activations", "per_channel")


def _safe(diagnose, settings, log, fmt):
    """The diagnosis, or None with a line saying why it could not be made."""
    try:
        return diagnose(settings)
    except Exception as error:  # a diagnosis is an explanation: its failure must not cost
        log(f"    int8 {fmt.name}: no per-layer diagnosis: {first_line(error)}")  # the export
        return None


def _short(name: str) -> str:
    name = name.split(";")[0]
    return name if len(name) <= 40 else "…" + name[-39:]


def _attempt_line(row, kept=None) -> str:
    if row.get("agreement") is None:
        return "FAILED: " + "; ".join(row.get("problems") or ["no result"])
    line = (f"accuracy {row['accuracy']:.4f}, agreement {row['agreement']:.4f} "
            f"(95% lower bound {row['agreement_low']:.4f}), "
            f"{row['size_bytes'] / 1024:,.0f} KiB, p50 {row['p50_ms']:.3f} ms, "
            + ("passed" if row["passed"] else "failed: " + "; ".join(row["problems"])))
    if kept is not None and kept.get("agreement") is not None:
        noise = "-" if row.get("noise") is None else f"{row['noise']:.4f}"
        line += (f"; against the kept file's {kept['agreement']:.4f} (lower bound "
                 f"{kept['agreement_low']:.4f}): gain {row['gain']:+.4f}, noise {noise}: "
                 + ("KEPT, the next remedy builds on it" if row.get("kept") else
                    "not kept (the gain does not exceed the noise)"))
    return line


# -- diagnosis -------------------------------------------------------------------------------

def diagnose_tflite(model, calibration, *, int8_io="uint8", settings=None) -> dict:
    """Per-layer error of TFLite full-integer quantization, from TFLite's quantization
    debugger run on calibration images: each op's output compared with the same op in float
    given the same inputs, as RMSE over the quantization step (about 0.29 is rounding alone;
    much more means clipping or a badly fitting range)."""
    import tensorflow as tf
    images = np.asarray(calibration)[:DIAGNOSIS_IMAGES]
    converter = int8_converter(model, calibration, int8_io)
    with quiet():
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=_representative(images))
        debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    layers = []
    for row in csv.DictReader(io.StringIO(dump.getvalue())):
        scale, mse = float(row["scale"] or 0), float(row["mean_squared_error"] or 0)
        layers.append({"name": row["tensor_name"], "op": row["op_name"],
                       "error": _round(np.sqrt(mse) / scale) if scale > 0 else None})
    if layers:  # kept in float, the first layer would leave the input float and the last
        layers[0]["reads_input"] = True  # the output: neither is ever chosen
        layers[-1]["writes_output"] = True
        for layer in layers:  # every output of a multi-task model is its task's softmax
            if layer["op"] == "SOFTMAX":
                layer["writes_output"] = True
    return {"family": "tflite", "metric": "RMSE / quantization step, op by op",
            "images": len(images), "settings": settings or {}, "layers": layers}


def diagnose_onnx(model, calibration, *, settings=None, tasks=None) -> dict:
    """Per-layer error of ONNX QDQ quantization: the float graph and the quantized one run on
    calibration images, every layer's output compared. A layer's error is how much it adds to
    the relative error its inputs already carried (||quantized - float|| / ||float||), so the
    layers that start the damage rank first, not those that inherit it."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)
    images = np.asarray(calibration)[:DIAGNOSIS_IMAGES]
    with tempfile.TemporaryDirectory(prefix="tledge-int8-diagnosis-") as folder, quiet():
        folder = Path(folder)
        prepared = prepare_for_quantization(float_proto(model, tasks), folder)
        quantize(prepared, folder / "int8.onnx", calibration, settings)
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        activations = {}
        for name, source in (("float", prepared), ("int8", folder / "int8.onnx")):
            augmented = folder / f"{name}_all.onnx"
            modify_model_output_intermediate_tensors(str(source), str(augmented))
            activations[name] = collect_activations(str(augmented), _Images(images, pin=False),
                                                    session_options=options)
        matched = create_activation_matching(activations["int8"], activations["float"])
        graph = onnx.load(str(prepared)).graph
    drift = {}
    for tensor, pair in matched.items():
        if "float" not in pair or "post_qdq" not in pair:
            continue
        reference = np.concatenate([np.ravel(a) for a in pair["float"]])
        quantized = np.concatenate([np.ravel(a) for a in pair["post_qdq"]])
        drift[tensor] = float(np.linalg.norm(quantized - reference) /
                              max(np.linalg.norm(reference), 1e-12))
    producers = {output: node for node in graph.node for output in node.output}
    layers = []
    for node in graph.node:  # graph order: the figure reads from input to output
        produced = [name for name in node.output if name in drift]
        if not produced:
            continue
        # the nodes quantized as one with it (a Conv whose output feeds only this Relu
        # carries no quantize step of its own): kept in float together
        group, upstream = [node], node
        while upstream.input and upstream.input[0] not in drift and \
                upstream.input[0] in producers:
            upstream = producers[upstream.input[0]]
            group.insert(0, upstream)
        inherited = max([drift.get(name, 0.0) for name in group[0].input] or [0.0])
        layers.append({"name": produced[0], "nodes": [item.name for item in group],
                       "op": "+".join(item.op_type for item in group),
                       "error": _round(max(drift[produced[0]] - inherited, 0.0)),
                       "drift": _round(drift[produced[0]])})
    return {"family": "onnx", "metric": "relative error added by the layer",
            "images": len(images), "settings": settings or {}, "layers": layers}


def _round(value):
    return None if value is None or not np.isfinite(value) else float(f"{value:.4g}")


def diagnose_entry(run_dir, entry, recipe) -> dict:
    """The per-layer diagnosis of a run's int8 artifact made with its recorded settings (for
    one that failed parity in the validate stage without having been diagnosed at export)."""
    manifest = read_manifest(run_dir)
    model = load_model(verified_artifact(run_dir, find_artifact(manifest, "keras")))
    settings = (entry.get("quantization") or {}).get("settings") or defaults(entry["family"])
    calibration = calibration_images(run_splits(run_dir, recipe),
                                     settings.get("calibration_samples")
                                     or recipe.export.calibration_samples, seed=recipe.seed)
    if entry["family"] == "onnx":
        return diagnose_onnx(model, calibration, settings=settings,
                             tasks=[task["name"] for task in manifest.get("tasks") or []])
    return diagnose_tflite(model, calibration, int8_io=recipe.export.int8_io, settings=settings)
