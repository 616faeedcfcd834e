"""int8 that explains and repairs itself.

Diagnosis: where a full-integer artifact's error comes from, layer by layer, measured on
calibration images (TFLite's quantization debugger; for ONNX, the float and QDQ graphs'
intermediate tensors compared). Repair: when a plain int8 export fails parity, the remedies
that apply are tried in order of cost, each judged in the format's real runtime on the
validation split (never the images it was calibrated on, never the test split the validate
stage judges), and the first that passes is kept (or the best, marked failed).

    ONNX:   reduce_range (x86 CPU without VNNI, `int8_needs`; then kept in every later
            candidate), more calibration images, percentile and entropy calibration,
            per-tensor weights, signed activations, then the k worst layers kept in float
    TFLite: 2x and 4x the calibration images, then the k worst layers kept in float

The settings of the kept artifact go into its manifest entry; a later export of the same
model starts from them, so a rebuild reproduces the artifact without searching again.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import tempfile
import time
from pathlib import Path

import numpy as np

from tledge.bench.core import machine_facts, summarize, time_runner
from tledge.data import calibration_images
from tledge.errors import ExportError, first_line, TledgeError
from tledge.export.onnx import (_Images, float_proto, INT8_DEFAULTS, prepare_for_quantization,
                                quantize)
from tledge.export.tflite import _representative, int8_converter
from tledge.metrics import CONFIDENCE, wilson_lower_bound as agreement_lower_bound
from tledge.model import load_model
from tledge.parity import accuracy_of, compare, predict_all
from tledge.quiet import quiet
from tledge.run_inputs import run_splits
from tledge.rundir import find_artifact, read_manifest, verified_artifact
from tledge.runners import RUNTIMES, runtimes_for

# TensorFlow, onnx and ONNX Runtime are imported inside the functions that use them: the CLI imports this
# module at start-up, and they take seconds to load.

DIAGNOSIS_IMAGES = 64       # calibration images the per-layer comparison runs on
FLOAT_LAYER_STEPS = (1, 2, 4, 8, 16)  # how many of the worst layers to keep in float


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

    `isa` is `tledge.bench.core.machine_facts()["isa"]` (this machine's when None). ONNX
    needs `reduce_range` on x86 without VNNI (see the table above); TFLite needs nothing."""
    if isa is None:
        isa = machine_facts()["isa"]
    return {"onnx": {} if has_vnni(isa) else {"reduce_range": True}, "tflite": {}}


def remedies(family: str, *, isa: str, calibration_samples: int, train_images: int):
    """[(what is tried, settings change)] before any layer is kept in float, cheapest first:
    none of them changes the graph, so none should cost latency (signed activations can, in
    ONNX Runtime on x86: last). What this CPU needs (`int8_needs`) comes first, and every
    later step carries it too: a candidate judged without it would be judged saturating."""
    steps, count = [], calibration_samples
    needed = int8_needs(isa).get(family, {})
    if needed.get("reduce_range"):
        steps.append(("reduce_range: 7-bit weights, since this CPU has no VNNI and its "
                      "uint8 x int8 kernels can saturate", {"reduce_range": True}))
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
                "passed": row.status == "passed", "problems": row.problems,
                "p50_ms": p50, "size_bytes": Path(path).stat().st_size}

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


def quantize_with_repair(fmt, export, out_path, *, judge, thresholds, calibration_samples,
                         train_images, isa, diagnose, recorded=None, max_attempts=8,
                         max_seconds=300.0, log=print) -> dict:
    """Write the int8 artifact of `fmt` at `out_path`, repairing it when it fails parity.

    Args:
        export: `export(settings, path) -> spec`: one int8 export with these settings.
        judge: a `Judge`; None exports once with `recorded` or the default settings.
        diagnose: `diagnose(settings) -> diagnosis`, called when the plain export fails.
        recorded: what a previous export of this model kept (`{"settings", "remedy",
            "diagnosis"}`): tried first, so a rebuild reproduces a repaired artifact without
            searching (and keeps the diagnosis that explained it).

    Returns:
        The record kept in the manifest entry: settings, remedy, attempts, diagnosis, spec.
    """
    base = {**defaults(fmt.family), "calibration_samples": calibration_samples}
    start = time.perf_counter()
    attempts: list[dict] = []
    diagnosis, diagnosed = None, False

    files = []  # (path, spec) of each attempt

    def attempt(remedy, settings, folder):
        path = Path(folder) / f"candidate{len(attempts)}{fmt.suffix}"
        began = time.perf_counter()
        try:
            spec = export(settings, path)
            verdict = judge(path, fmt, spec, thresholds) if judge else {"passed": None}
        except TledgeError as error:
            spec, verdict = None, {"passed": False, "problems": [first_line(error)]}
        row = {"remedy": remedy, "settings": settings, **verdict,
               "seconds": round(time.perf_counter() - began, 1)}
        attempts.append(row)
        files.append((path, spec))
        if judge:
            log(f"    int8 {fmt.name}: {remedy}: " + _attempt_line(row))
        return path, spec, row

    with tempfile.TemporaryDirectory(prefix="tledge-int8-") as folder:
        first = recorded["settings"] if recorded else base
        kept = attempt(recorded["remedy"] if recorded else "plain", first, folder)
        if recorded and kept[2]["passed"]:  # reproduced: what explained it still does
            diagnosis, diagnosed = recorded.get("diagnosis"), True
        fast = _fast_enough(kept[2])
        narrow = judge is not None and kept[2]["passed"] and not recorded and \
            not confident(kept[2], thresholds, len(judge.labels)) and \
            kept[2].get("agreement") != 1.0 and \
            agreement_lower_bound(1.0, len(judge.labels)) >= thresholds["min_agreement"]
        # (a perfect agreement, or a judge with too few images for any margin: no search)
        if recorded:
            narrow = bool(recorded.get("narrow"))
        if narrow and not recorded:
            log(f"    int8 {fmt.name}: a narrow pass (the agreement's {CONFIDENCE:.0%} lower "
                f"bound on {len(judge.labels)} images is below {thresholds['min_agreement']}): "
                "trying the remedies that change no kernel")
            for remedy, change in remedies(fmt.family, isa=isa,
                                           calibration_samples=calibration_samples,
                                           train_images=train_images):
                if set(change) & set(GRAPH_SETTINGS) or len(attempts) >= max_attempts or \
                        time.perf_counter() - start > max_seconds:
                    continue
                candidate = attempt(remedy, {**base, **change}, folder)
                if _score(candidate[2], fast) > _score(kept[2], fast):
                    kept = candidate
                if candidate[2]["passed"] and confident(candidate[2], thresholds,
                                                        len(judge.labels)):
                    break
        if judge is not None and not kept[2]["passed"]:
            for remedy, settings in _search(fmt, base, kept[2], isa=isa,
                                            calibration_samples=calibration_samples,
                                            train_images=train_images):
                if len(attempts) >= max_attempts or \
                        time.perf_counter() - start > max_seconds:
                    log(f"    int8 {fmt.name}: stopped searching after {len(attempts)} "
                        f"attempts ({time.perf_counter() - start:.0f} s; "
                        "export.int8_repair_attempts / int8_repair_seconds)")
                    break
                if settings == "diagnose":
                    diagnosis, diagnosed = _safe(diagnose, first, log, fmt), True
                    continue
                if callable(settings):  # float layers chosen from the diagnosis, added to
                    settings = settings(diagnosis, best(attempts, fast)["settings"])  # the
                    if settings is None:  # closest candidate that costs no latency
                        continue
                candidate = attempt(remedy if isinstance(remedy, str) else remedy(settings),
                                    settings, folder)
                if _score(candidate[2], fast) > _score(kept[2], fast):
                    kept = candidate
                if candidate[2]["passed"] and fast(candidate[2]):
                    break  # a pass that costs latency is kept only if no cheaper one passes
        path, spec, row = kept
        if judge is not None and row is not attempts[0] and files[0][1] is not None \
                and spec is not None:  # the latency cost of the remedy, measured in turns
            attempts[0]["p50_ms"], row["p50_ms"] = judge.side_by_side(
                [files[0], (path, spec)], fmt)
            log(f"    int8 {fmt.name}: p50 side by side: plain {attempts[0]['p50_ms']:.3f} ms, "
                f"kept {row['p50_ms']:.3f} ms")
        if spec is None:
            raise ExportError(row["problems"][0] if row.get("problems") else
                              f"{fmt.name}: no int8 candidate could be written")
        Path(path).replace(out_path)
    if judge is not None and not attempts[0]["passed"] and not diagnosed:
        diagnosis = _safe(diagnose, first, log, fmt)
    return {"settings": row["settings"], "remedy": row["remedy"],
            "repaired": row["remedy"] != "plain" and bool(row["passed"]),
            "narrow": narrow,  # the plain file passed, but not by a margin the images support
            "passed": row["passed"], "split": judge.split if judge else None,
            "attempts": attempts, "diagnosis": diagnosis, "spec": spec}


def _search(fmt, base, plain, *, isa, calibration_samples, train_images):
    """The remedies after a failed plain export, in order: (label, settings) pairs, the marker
    "diagnose" where the per-layer error is measured, then float-layer steps that pick the
    worst layers from it."""
    for remedy, change in remedies(fmt.family, isa=isa, calibration_samples=calibration_samples,
                                   train_images=train_images):
        yield remedy, {**base, **change}
    yield None, "diagnose"
    key = "float_nodes" if fmt.family == "onnx" else "float_layers"
    for count in FLOAT_LAYER_STEPS:
        def keep_worst(diagnosis, settings, count=count):
            layers = worst_layers(diagnosis, count)
            if len(layers) <= count // 2:
                return None  # no diagnosis, or no more layers than the step before
            return {**settings, key: [name for layer in layers
                                      for name in layer.get("nodes", [layer["name"]])]}
        yield (lambda settings: f"{len(settings[key])} worst layer"
               f"{'s' if len(settings[key]) > 1 else ''} kept in float "
               f"({', '.join(_short(name) for name in settings[key][:3])}"
               f"{', …' if len(settings[key]) > 3 else ''})"), keep_worst


def worst_layers(diagnosis, count: int) -> list[dict]:
    """The `count` layers that add the most error, worst first."""
    if not diagnosis:
        return []
    layers = [layer for layer in diagnosis["layers"] if layer.get("error") is not None
              and not layer.get("reads_input") and not layer.get("writes_output")]
    return sorted(layers, key=lambda layer: -layer["error"])[:count]


LATENCY_ALLOWANCE = 0.10  # a remedy may cost this much p50 over the plain int8 file


def confident(row, thresholds, images: int) -> bool:
    """A pass that would most likely hold on other images: its agreement's lower bound clears
    the threshold too."""
    return row.get("agreement") is not None and agreement_lower_bound(
        row["agreement"], images) >= thresholds["min_agreement"]


# The settings that change the graph's kernels; the others (calibration images and method,
# reduce_range) change only its numbers, and so never its latency, whatever a noisy timer says
GRAPH_SETTINGS = ("float_layers", "float_nodes", "activations", "per_channel")


def _fast_enough(plain):
    """Whether an attempt is as fast as the plain one: it changes no kernel, or its p50 is
    within `LATENCY_ALLOWANCE` of the plain attempt's."""
    limit, settings = plain.get("p50_ms"), plain.get("settings") or {}

    def fast(row):
        if all((row.get("settings") or {}).get(key) == settings.get(key)
               for key in GRAPH_SETTINGS):
            return True
        return limit is None or row.get("p50_ms") is None or \
            row["p50_ms"] <= limit * (1 + LATENCY_ALLOWANCE)
    return fast


def best(attempts, fast) -> dict:
    """The closest attempt among those that cost no more latency than allowed (the plain
    one is always among them): by agreement, then accuracy."""
    judged = [row for row in attempts if row.get("agreement") is not None and fast(row)]
    return max(judged, key=lambda row: _score(row, fast)) if judged else attempts[0]


def _score(row, fast):
    """Passed beats failed, then no latency cost beats a cost, then agreement and accuracy."""
    return (bool(row.get("passed")), bool(fast(row)), row.get("agreement") or 0.0,
            row.get("accuracy") or 0.0)


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


def _attempt_line(row) -> str:
    if row.get("agreement") is None:
        return "FAILED: " + "; ".join(row.get("problems") or ["no result"])
    return (f"accuracy {row['accuracy']:.4f}, agreement {row['agreement']:.4f}, "
            f"{row['size_bytes'] / 1024:,.0f} KiB, p50 {row['p50_ms']:.3f} ms, "
            + ("passed" if row["passed"] else "failed: " + "; ".join(row["problems"])))


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
