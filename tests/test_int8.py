"""int8 that explains and repairs itself: per-layer diagnosis, the remedies, the bounded search,
settings a rebuild reproduces, and the report's Quantization section. Every candidate is a
real TFLite or ONNX Runtime quantization, run in its real runtime."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tledge.formats import FORMATS


@pytest.fixture(scope="module")
def model_and_images(built_run):
    """The session run's trained model, its calibration images (training split) and images
    it was neither trained nor calibrated on (the test split)."""
    from tledge.data import calibration_images
    from tledge.model import load_model
    from tledge.run_inputs import run_recipe, run_splits
    run_dir, _, _ = built_run
    recipe = run_recipe(run_dir)
    splits = run_splits(run_dir, recipe)
    calibration = calibration_images(splits, 64, seed=0)
    return (load_model(run_dir / "model.keras"), calibration,
            np.asarray(splits.x_test), np.asarray(splits.y_test))


def _agreement(model, runner, images):
    reference = model(images.astype(np.float32), training=False).numpy()
    return float(np.mean(runner.predict(images).argmax(1) == reference.argmax(1)))


# ---- what each CPU needs, and the remedies ---------------------------------------------------

X86 = "processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: {model}\nflags\t\t: {flags}\n"
BASE_FLAGS = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma"
PI4 = ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
       "CPU architecture: 8\nCPU part\t: 0xd08\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
GRAVITON3 = ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
             "fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve "
             "asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 "
             "dgh rng\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd40\n")

# (/proc/cpuinfo as the CPU shows it, platform.machine(), the ISA machine_facts names, what
# ONNX int8 needs there): every kind of CPU tledge runs on, none of them this machine
CPUS = {
    "x86 AVX2 (AMD EPYC Zen 3)": (
        X86.format(vendor="AuthenticAMD", model="AMD EPYC 7B13", flags=BASE_FLAGS + " avx2"),
        "x86_64", "AVX2", {"reduce_range": True}),
    "x86 AVX-512 without VNNI (Skylake-SP)": (
        X86.format(vendor="GenuineIntel", model="Intel(R) Xeon(R) Gold 6148",
                   flags=BASE_FLAGS + " avx2 avx512f avx512dq avx512cd avx512bw avx512vl"),
        "x86_64", "AVX-512", {"reduce_range": True}),
    "x86 AVX-512 VNNI (Cascade Lake)": (
        X86.format(vendor="GenuineIntel", model="Intel(R) Xeon(R) Platinum 8280",
                   flags=BASE_FLAGS + " avx2 avx512f avx512bw avx512vl avx512_vnni"),
        "x86_64", "AVX-512 VNNI", {}),
    "x86 AVX-VNNI without AVX-512 (Alder Lake)": (
        X86.format(vendor="GenuineIntel", model="12th Gen Intel(R) Core(TM) i7-12700",
                   flags=BASE_FLAGS + " avx2 avx_vnni"),
        "x86_64", "AVX2 AVX-VNNI", {}),
    "x86 AMX (Sapphire Rapids)": (
        X86.format(vendor="GenuineIntel", model="Intel(R) Xeon(R) Platinum 8480+",
                   flags=BASE_FLAGS + " avx2 avx_vnni avx512f avx512bw avx512vl avx512_vnni "
                   "amx_bf16 amx_tile amx_int8"),
        "x86_64", "AVX-512 VNNI AMX", {}),
    "arm64 NEON (Raspberry Pi 4)": (PI4, "aarch64", "NEON", {}),
    "arm64 NEON with dotprod (Graviton 3)": (
        GRAVITON3, "aarch64", "NEON dotprod i8mm SVE", {}),
    "arm64 emulated by qemu-user on an AVX2 host": (
        X86.format(vendor="AuthenticAMD", model="AMD EPYC 7B13", flags=BASE_FLAGS + " avx2"),
        "aarch64", "aarch64 (emulated; the host has AVX2)", {}),
    "x86 without /proc/cpuinfo (an Intel Mac)": (None, "x86_64", "x86_64", {"reduce_range": True}),
    "arm64 without /proc/cpuinfo (an Apple silicon Mac)": (None, "arm64", "arm64", {}),
}


@pytest.fixture(params=list(CPUS), ids=list(CPUS))
def cpu(request, monkeypatch):
    """This process made to see another CPU: /proc/cpuinfo and the architecture, read where
    `machine_facts` reads them. Yields (the ISA it should name, what ONNX int8 needs)."""
    import builtins
    import platform
    import tledge.core.machine as core
    cpuinfo, arch, isa, needs = CPUS[request.param]

    def fake_open(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            if cpuinfo is None:
                raise FileNotFoundError(path)
            return io.StringIO(cpuinfo)
        return builtins.open(path, *args, **kwargs)
    monkeypatch.setattr(core, "open", fake_open, raising=False)
    monkeypatch.setattr(platform, "machine", lambda: arch)
    return isa, needs


def test_what_int8_needs_follows_the_cpu_that_runs_the_kernels(cpu):
    """The one rule (`int8_needs`), from the CPU facts as tledge reads them: ONNX Runtime's
    uint8 x int8 kernels saturate on x86 without VNNI, so ONNX int8 needs 7-bit weights there
    (reduce_range); AVX-512 VNNI, AVX-VNNI, AMX and ARM (sdot, or NEON's widening multiplies;
    under emulation too, whatever the host) need nothing; TFLite never does."""
    from tledge.core.machine import machine_facts
    from tledge.export.int8 import int8_needs
    isa, needs = cpu
    assert machine_facts()["isa"] == isa
    assert int8_needs() == {"onnx": needs, "tflite": {}}  # read from this (patched) machine
    assert int8_needs(isa) == int8_needs()  # and from the ISA a record names


def test_the_remedies_start_with_what_the_cpu_needs_and_keep_it(cpu):
    from tledge.export.int8 import remedies
    isa, needs = cpu
    onnx = remedies("onnx", isa=isa, calibration_samples=100, train_images=1000)
    vnni = remedies("onnx", isa="AVX-512 VNNI", calibration_samples=100, train_images=1000)
    if needs:
        assert onnx[0][1] == needs and "no VNNI" in onnx[0][0] and \
            onnx[0][0].startswith("reduce_range")
        onnx = onnx[1:]
        # every later candidate is judged with it too: without it, it would be judged
        # saturating on this CPU (and its remedy says so)
        assert all(change["reduce_range"] is True and "with reduce_range" in remedy
                   for remedy, change in onnx)
    assert [{key: value for key, value in change.items() if key not in needs}
            for _, change in onnx] == [change for _, change in vnni]
    assert all("reduce_range" not in change for _, change in vnni)  # nothing on VNNI
    assert remedies("tflite", isa=isa, calibration_samples=200, train_images=500) == \
        remedies("tflite", isa="AVX-512 VNNI", calibration_samples=200, train_images=500)


def test_remedies_follow_the_size_of_the_training_split():
    from tledge.export.int8 import remedies
    # more calibration images first (no latency cost), never more than the training split has
    tflite = remedies("tflite", isa="AVX2", calibration_samples=200, train_images=500)
    assert [change for _, change in tflite] == [{"calibration_samples": 400},
                                                {"calibration_samples": 500}]
    assert remedies("tflite", isa="AVX2", calibration_samples=64, train_images=64) == []
    vnni = remedies("onnx", isa="AVX-512 VNNI", calibration_samples=100, train_images=1000)
    onnx_methods = [change.get("method") for _, change in vnni if "method" in change]
    assert onnx_methods == ["percentile", "entropy"]


# ---- TFLite: selective quantization --------------------------------------------------------

def test_tflite_diagnosis_ranks_layers_and_keeping_them_float_keeps_raw_pixel_io(
        model_and_images, tmp_path):
    from ai_edge_litert.interpreter import Interpreter
    from tledge.export.int8 import diagnose_tflite, worst_layers
    from tledge.export.tflite import export_tflite
    from tledge.runners import RUNTIMES
    model, calibration, images, _ = model_and_images
    diagnosis = diagnose_tflite(model, calibration)
    assert diagnosis["family"] == "tflite" and diagnosis["images"] == len(calibration)
    layers = diagnosis["layers"]
    assert len(layers) >= 5 and all(layer["error"] is None or layer["error"] >= 0
                                    for layer in layers)
    worst = worst_layers(diagnosis, 2)
    # the first layer reads the input and the last writes the output: kept in float either
    # would break the uint8 contract, so neither is ever offered
    offered = worst_layers(diagnosis, len(layers))
    assert layers[0]["reads_input"] and layers[0] not in offered
    assert layers[-1]["writes_output"] and layers[-1] not in offered
    assert worst[0]["error"] >= worst[1]["error"] >= max(
        layer["error"] for layer in layers[1:-1]
        if layer not in worst and layer["error"] is not None)
    # every layer that may be offered keeps the contract when all of them are kept in float
    spec = export_tflite(model, tmp_path / "all.tflite", precision="int8",
                         calibration=calibration,
                         settings={"float_layers": [layer["name"] for layer in offered]})
    assert spec["input"]["dtype"] == "uint8" and spec["output"]["dtype"] == "uint8"

    def float_tensors(path):
        interpreter = Interpreter(model_path=str(path))
        return {detail["name"] for detail in interpreter.get_tensor_details()
                if np.dtype(detail["dtype"]) == np.float32}
    plain, selective = tmp_path / "plain.tflite", tmp_path / "selective.tflite"
    export_tflite(model, plain, precision="int8", calibration=calibration)
    spec = export_tflite(model, selective, precision="int8", calibration=calibration,
                         settings={"float_layers": [layer["name"] for layer in worst]})
    # the named layers now run in float; input and output keep the uint8 contract
    assert len(float_tensors(selective)) > len(float_tensors(plain))
    assert spec["input"]["dtype"] == "uint8" and spec["output"]["dtype"] == "uint8"
    assert spec["input"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    runner = RUNTIMES["litert"].load(selective, {**spec, "precision": "int8"}, None, "cpu")
    assert _agreement(model, runner, images) >= 0.9


# ---- ONNX: every setting a real quantization -----------------------------------------------

def _onnx_graph(path):
    import onnx
    return onnx.load(str(path)).graph


@pytest.mark.parametrize("change", [
    {"reduce_range": True}, {"method": "percentile"}, {"method": "entropy"},
    {"per_channel": False}, {"activations": "int8"}], ids=lambda change: "-".join(
        f"{key}={value}" for key, value in change.items()))
def test_each_onnx_int8_setting_quantizes_and_runs_in_onnx_runtime(change, model_and_images,
                                                                  tmp_path):
    """Each setting on top of what this CPU needs (`int8_needs`, as the repair tries them):
    on an x86 CPU without VNNI, ONNX Runtime's uint8 x int8 kernels saturate with 8-bit
    weights, whatever the calibration (agreement 0.82 on the AVX2 machine of issue 26)."""
    import onnx
    from onnx import numpy_helper
    from tledge.export.int8 import int8_needs
    from tledge.export.onnx import export_onnx
    from tledge.runners import RUNTIMES
    model, calibration, images, _ = model_and_images
    settings = {**int8_needs()["onnx"], **change}
    path = tmp_path / "m.onnx"
    spec = export_onnx(model, path, precision="int8", calibration=calibration, settings=settings)
    graph = _onnx_graph(path)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    weights = [node for node in graph.node
               if node.op_type == "DequantizeLinear" and node.input[0] in initializers
               and initializers[node.input[0]].data_type == onnx.TensorProto.INT8]
    weight_scales = [initializers[node.input[1]] for node in weights]
    assert weight_scales
    largest = max(int(np.abs(numpy_helper.to_array(initializers[node.input[0]])
                             .astype(np.int32)).max()) for node in weights)
    if settings.get("reduce_range"):  # 7-bit weights
        assert largest <= 64, largest
    else:  # symmetric 8-bit weights: the largest of each channel is 127
        assert largest == 127, largest
    if change.get("per_channel") is False:
        assert all(len(scale.dims) == 0 for scale in weight_scales)
    else:
        assert any(len(scale.dims) == 1 for scale in weight_scales)
    activation_points = [initializers[node.input[2]] for node in graph.node
                         if node.op_type == "QuantizeLinear" and len(node.input) > 2
                         and node.input[2] in initializers]
    wanted = onnx.TensorProto.INT8 if change.get("activations") == "int8" \
        else onnx.TensorProto.UINT8
    assert activation_points and all(point.data_type == wanted for point in activation_points)
    runner = RUNTIMES["onnxruntime"].load(path, {**spec, "precision": "int8"}, None, "cpu")
    assert _agreement(model, runner, images) >= 0.9


def test_onnx_diagnosis_names_nodes_that_can_be_kept_in_float(model_and_images, tmp_path):
    from tledge.export.int8 import diagnose_onnx, worst_layers
    from tledge.export.onnx import export_onnx
    model, calibration, _, _ = model_and_images
    diagnosis = diagnose_onnx(model, calibration)
    assert diagnosis["family"] == "onnx" and len(diagnosis["layers"]) >= 5
    assert all(0 <= layer["error"] <= layer["drift"] + 1e-9 for layer in diagnosis["layers"])
    [worst] = worst_layers(diagnosis, 1)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, precision="int8", calibration=calibration,
                settings={"float_nodes": worst["nodes"]})
    graph = _onnx_graph(path)
    producers = {output: node for node in graph.node for output in node.output}
    kept = [node for node in graph.node if node.name in worst["nodes"]]
    assert kept, worst["nodes"]
    # a node kept in float takes float weights: none of its inputs is dequantized int8
    for node in kept:
        assert all(producers.get(name) is None or producers[name].op_type != "DequantizeLinear"
                   for name in node.input[1:]), node


# ---- the search ----------------------------------------------------------------------------

def _repair(model, calibration, images, labels, tmp_path, *, fmt, thresholds,
            calibration_samples=32, **options):
    from tledge.core.machine import machine_facts
    from tledge.export.stage import _exporter
    tmp_path.mkdir(parents=True, exist_ok=True)
    from tledge.export.int8 import Judge, diagnose_onnx, diagnose_tflite, quantize_with_repair
    reference = model(images.astype(np.float32), training=False).numpy()
    judge = Judge(images, labels, reference, "test")
    exporter = _exporter(fmt.family)

    def pick(settings):
        count = settings.get("calibration_samples") or len(calibration)
        return calibration[:count]

    def export(settings, path):
        return exporter(model, path, precision="int8", calibration=pick(settings),
                        settings=settings)

    def diagnose(settings):
        return (diagnose_onnx if fmt.family == "onnx" else diagnose_tflite)(
            model, pick(settings), settings=settings)
    lines = []
    record = quantize_with_repair(fmt, export, tmp_path / f"kept{fmt.suffix}", judge=judge,
                                  thresholds=thresholds,
                                  calibration_samples=calibration_samples,
                                  train_images=len(calibration), isa=machine_facts()["isa"],
                                  diagnose=diagnose, log=lines.append, **options)
    return record, lines


@pytest.mark.parametrize("name", ["tflite_int8", "onnx_int8"])
def test_a_search_that_cannot_pass_is_a_bounded_path_that_keeps_only_gains_above_noise(
        name, model_and_images, tmp_path):
    """Each remedy is tried on top of the settings kept so far; a candidate is kept only when
    its gain in agreement over the kept file exceeds the noise of that paired comparison; the
    quantization settings stop at `max_attempts`, the float-layer steps come after them."""
    model, calibration, images, labels = model_and_images
    impossible = {"max_accuracy_drop": 0.0, "min_agreement": 1.0, "max_abs_diff": 1e-9}
    record, lines = _repair(model, calibration, images, labels, tmp_path, fmt=FORMATS[name],
                            thresholds=impossible, max_attempts=3, float_steps=1,
                            calibration_samples=4)
    attempts = record["attempts"]
    assert record["passed"] is False and not record["repaired"]
    assert attempts[0]["remedy"] == "plain" and len(attempts) == 4
    # TFLite has two remedies here (8 and 16 calibration images), ONNX more than the limit
    assert any("stopped after 3 attempts" in line for line in lines) == (name == "onnx_int8")
    key = "float_nodes" if name == "onnx_int8" else "float_layers"
    assert attempts[-1]["settings"][key] and "in float" in attempts[-1]["remedy"]
    assert record["diagnosis"] and record["diagnosis"]["layers"]
    assert "no candidate passing with margin" in record["stopped"]
    kept = attempts[0]
    for row in attempts[1:]:
        # composes: only the remedy's own keys (and what this CPU needs) differ from the kept
        changed = {k for k in row["settings"] if row["settings"][k] != kept["settings"].get(k)}
        assert changed and len(changed - {"reduce_range"}) <= 1, (row["settings"],
                                                                 kept["settings"])
        assert row["noise"] is not None and row["agreement_low"] <= row["agreement"]
        # never kept on a difference within its noise (a pass over a failing file aside:
        # with these thresholds nothing passes)
        assert not row["passed"]
        assert row["kept"] == (row["gain"] > row["noise"] and
                               (bool(row["passed"]) or not kept["passed"]))
        if row["kept"]:
            kept = row
    assert record["settings"] == kept["settings"] and record["remedy"] == kept["remedy"]
    assert all("_agrees" not in row for row in attempts)  # per-image data is not stored
    assert any("95% lower bound" in line and "noise" in line for line in lines)
    assert (tmp_path / f"kept{FORMATS[name].suffix}").is_file()


def test_a_gain_counts_only_above_the_noise_of_the_paired_comparison():
    from tledge.export.int8 import AGREES, better, paired_gain
    n = 500
    base = np.ones(n, bool)
    base[:20] = False                         # the kept file: 480 of 500 agree

    def row(gained, lost, passed=False):
        agrees = base.copy()
        agrees[:gained] = True                # images it newly gets right
        agrees[100:100 + lost] = False        # images it newly gets wrong
        return {"agreement": float(agrees.mean()), "passed": passed, AGREES: agrees}
    kept = {"agreement": float(base.mean()), "passed": False, AGREES: base}
    gain, noise = paired_gain(row(10, 2), kept)
    assert gain == pytest.approx(8 / n) and noise == pytest.approx(1.6449 * np.sqrt(12) / n,
                                                                   rel=1e-4)
    assert better(row(10, 2), kept)           # +8 images, noise 5.7 images
    assert not better(row(5, 2), kept)        # +3 images, noise 4.4 images: could be luck
    assert not better(row(0, 0), kept)        # the same file: no gain, nothing to keep
    assert not better(row(20, 0), {**kept, "passed": True})  # it fails what the kept passes
    assert better(row(20, 0, passed=True), {**kept, "passed": True})
    # a file that passes replaces one that fails, even within the noise (the kept file is
    # not one to ship as it is); the other way round never
    assert better(row(1, 0, passed=True), kept) and not better(row(1, 0), kept)
    assert not better(row(0, 3), {**kept, "passed": True})


def test_the_agreement_lower_bound_is_wilsons():
    from tledge.export.int8 import agreement_lower_bound
    assert agreement_lower_bound(0.5, 100) == pytest.approx(0.4189, abs=2e-4)  # tabulated
    # the quickstart's narrow pass: 189 of 192 validation images, then 0.965 on test
    assert agreement_lower_bound(189 / 192, 192) < 0.97 < 189 / 192
    assert agreement_lower_bound(189 / 192, 2000) > 0.97  # the same rate on more images
    assert agreement_lower_bound(1.0, 192) > 0.98


def _keras_classes(model, images):
    return model(images.astype(np.float32), training=False).numpy().argmax(1)


def _across_the_boundary(model, images, pairs=4, steps=30):
    """`pairs` pairs of images a pixel step or so apart on either side of the Keras model's
    decision boundary: each pair blends two images of different classes, at the two ends of a
    bisection of where the top class changes. No int8 model follows the float model's boundary
    to a pixel step: it gives both images of a pair the same class, or changes class elsewhere,
    and so disagrees with Keras on at least one image of nearly every pair, on any CPU."""
    top = _keras_classes(model, images)
    firsts = [int(np.flatnonzero(top == label)[0]) for label in np.unique(top)]
    assert len(firsts) > 1
    a = images[[firsts[k % len(firsts)] for k in range(pairs)]].astype(np.float64)
    b = images[[firsts[(k + 1) % len(firsts)] for k in range(pairs)]].astype(np.float64)

    def blend(t):
        return np.rint(a + (b - a) * t[:, None, None, None]).astype(np.uint8)
    low, high = np.zeros(pairs), np.ones(pairs)
    start = _keras_classes(model, blend(low))
    for _ in range(steps):
        middle = (low + high) / 2
        same = _keras_classes(model, blend(middle)) == start
        low, high = np.where(same, middle, low), np.where(same, high, middle)
    below, above = blend(low), blend(high)
    assert np.all(_keras_classes(model, below) != _keras_classes(model, above))
    return np.concatenate([below, above])


@pytest.mark.parametrize("name", ["tflite_int8", "onnx_int8"])
def test_a_narrow_pass_tries_the_remedies_that_change_no_kernel(name, model_and_images,
                                                              tmp_path):
    from tledge.export.int8 import GRAPH_SETTINGS, agreement_lower_bound
    model, calibration, images, labels = model_and_images
    lenient = {"max_accuracy_drop": 1.0, "min_agreement": 0.0, "max_abs_diff": None}
    # the judge's images include pairs on either side of the float model's decision boundary,
    # so the plain file agrees less than perfectly whatever kernels this CPU has
    boundary = _across_the_boundary(model, images)
    images = np.concatenate([images, boundary])
    labels = np.concatenate([labels, _keras_classes(model, boundary)])
    first, _ = _repair(model, calibration, images, labels, tmp_path / "a", fmt=FORMATS[name],
                       thresholds=lenient, calibration_samples=4)
    assert len(first["attempts"]) == 1 and not first["narrow"]  # a pass by a wide margin
    agreement = first["attempts"][0]["agreement"]
    assert agreement < 1.0
    # a threshold the plain file passes, that no lower bound of its agreement clears, and
    # that a perfect file on these images would clear (else no search could help)
    threshold = min(agreement, agreement_lower_bound(1.0, len(labels)) - 1e-9)
    assert agreement_lower_bound(agreement, len(labels)) < threshold <= agreement
    record, lines = _repair(model, calibration, images, labels, tmp_path / "b",
                            fmt=FORMATS[name], thresholds={**lenient, "min_agreement": threshold},
                            calibration_samples=4)
    attempts = record["attempts"]
    assert record["narrow"] and record["passed"] and any("narrow pass" in l for l in lines)
    assert attempts[0]["remedy"] == "plain" and len(attempts) > 1
    assert all(not set(row["settings"]) & set(GRAPH_SETTINGS) or
               all(row["settings"][key] == attempts[0]["settings"].get(key)
                   for key in GRAPH_SETTINGS if key in row["settings"]) for row in attempts)
    path_end = attempts[0]
    for row in attempts[1:]:
        if row["kept"]:
            path_end = row
    assert record["settings"] == path_end["settings"]


def test_no_search_where_no_margin_could_be_shown():
    from tledge.export.int8 import agreement_lower_bound
    # 72 validation images (the test runs' split): even a perfect file cannot show 0.97
    assert agreement_lower_bound(1.0, 72) < 0.97 <= agreement_lower_bound(1.0, 100)


def test_recorded_settings_are_tried_first_and_reproduce_without_searching(model_and_images,
                                                                          tmp_path):
    model, calibration, images, labels = model_and_images
    earlier = {"family": "tflite", "metric": "m", "images": 32, "layers": [
        {"name": "a", "op": "CONV_2D", "error": 0.3}]}
    recorded = {"settings": {"calibration_samples": 48, "float_layers": []},
                "remedy": "48 calibration images instead of 32", "diagnosis": earlier}
    lenient = {"max_accuracy_drop": 1.0, "min_agreement": 0.0, "max_abs_diff": None}
    record, _ = _repair(model, calibration, images, labels, tmp_path,
                        fmt=FORMATS["tflite_int8"], thresholds=lenient, recorded=recorded)
    assert len(record["attempts"]) == 1 and record["attempts"][0]["settings"] == \
        recorded["settings"]
    assert record["passed"] and record["repaired"] and record["remedy"] == recorded["remedy"]
    assert record["diagnosis"] == earlier  # what explained the repair still explains it


class Scripted:
    """A judge that says what `passes(settings)` decides: every image agrees with a candidate
    that passes, one in five disagrees with one that fails (the search's bookkeeping, without
    exporting anything)."""

    def __init__(self, images, passes):
        self.images, self.passes = images, passes
        self.labels, self.split = np.zeros(images), "repair"

    def __call__(self, path, fmt, spec, thresholds):
        from tledge.export.int8 import AGREES, agreement_lower_bound
        ok = self.passes(spec["settings"])
        agree = np.ones(self.images, bool) if ok else np.arange(self.images) % 5 != 0
        return {"passed": ok, "accuracy": float(agree.mean()),
                "agreement": float(agree.mean()), AGREES: agree,
                "agreement_low": agreement_lower_bound(agree.mean(), self.images),
                "size_bytes": 9, "p50_ms": 1.0,
                "problems": [] if ok else ["agreement 0.8000 < 0.97"]}

    def side_by_side(self, candidates, fmt):
        return [1.0, 1.0]


def test_a_failure_the_cpu_rule_explains_costs_no_per_layer_diagnosis(tmp_path):
    """On a CPU without VNNI a plain ONNX int8 file that fails and passes with margin once it
    has what this CPU needs (7-bit weights) is explained by that rule: no diagnosis of the
    saturating file. One that needs more than that is diagnosed as before. (The search's
    bookkeeping, with scripted candidates: whether real kernels saturate is the CPU's, see
    test_each_onnx_int8_setting_quantizes_and_runs_in_onnx_runtime.)"""
    from tledge.export.int8 import quantize_with_repair
    images = 300

    def run(passes):
        diagnosed = []

        def export(settings, path):
            Path(path).write_bytes(b"candidate")
            return {"settings": dict(settings)}

        record = quantize_with_repair(
            FORMATS["onnx_int8"], export, tmp_path / "kept.onnx",
            judge=Scripted(images, passes),
            thresholds={"max_accuracy_drop": 0.01, "min_agreement": 0.97, "max_abs_diff": None},
            calibration_samples=32, train_images=32, isa="AVX2",
            diagnose=lambda settings: diagnosed.append(settings) or {"layers": []},
            log=lambda line: None)
        return record, diagnosed

    record, diagnosed = run(lambda settings: bool(settings.get("reduce_range")))
    assert record["repaired"] and record["remedy"].startswith("reduce_range")
    assert diagnosed == [] and record["diagnosis"] is None
    record, diagnosed = run(lambda settings: settings.get("method") == "percentile")
    assert record["repaired"] and "percentile" in record["remedy"]
    assert diagnosed and not diagnosed[0].get("reduce_range")  # the plain file's


# ---- quantization-aware fine-tuning ---------------------------------------------------------

def test_the_fine_tune_rounds_the_outputs_the_exporters_quantize():
    """A convolution's output folded into its BatchNorm, and a BatchNorm fused into its ReLU,
    are not rounded; a projection's BatchNorm (no ReLU after it), an Add, the pooling, the
    preprocessing and the softmax are; a nested model's layers are judged in its graph."""
    import keras
    from tledge.export.qat import _all_layers, _quantized_output
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 127.5, -1, name="preprocess")(inputs)
    inner = keras.Input((16, 16, 3))
    y = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inner)
    y = keras.layers.BatchNormalization(name="conv_bn")(y)
    y = keras.layers.ReLU(6.0, name="conv_relu")(y)
    z = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(y)
    z = keras.layers.BatchNormalization(name="project_bn")(z)
    y = keras.layers.Add(name="add")([y, z])
    x = keras.Model(inner, y, name="backbone")(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.1, name="dropout")(x)
    outputs = keras.layers.Dense(4, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs)
    rounded = {layer.name for layer in _all_layers(model) if _quantized_output(layer)}
    assert rounded == {"preprocess", "conv_relu", "project_bn", "add", "pool",
                       "probabilities"}


def test_a_quantization_aware_copy_leaves_the_model_alone_and_ends_on_the_int8_grid(
        model_and_images, tmp_path):
    """The copy's kernels end on the exporters' grid, per output channel (8 bits, or 7 for
    ONNX Runtime's reduce_range), the model itself is untouched, nothing simulated is left
    in the copy's graph, and its int8 files export and run in their real runtimes."""
    from tledge.export.int8 import int8_needs
    from tledge.export.qat import _all_layers, _kernels, quantization_aware_copy
    from tledge.export.stage import _exporter
    from tledge.export.tflite import tflite_spec
    from tledge.runners import RUNTIMES
    model, calibration, images, _ = model_and_images
    before = [weight.copy() for weight in model.get_weights()]
    for bits in (8, 7):
        copy, facts = quantization_aware_copy(model, calibration, bits=bits, steps=6)
        assert facts["steps"] == 6 and facts["bits"] == bits
        kernels = _kernels(_all_layers(copy))
        assert kernels
        for variable, depthwise in kernels:
            weights = variable.numpy()
            if depthwise:
                weights = weights.reshape(*weights.shape[:2], -1)
            flat = weights.reshape(-1, weights.shape[-1])
            levels = 2 ** (bits - 1) - 1
            step = np.abs(flat).max(0) / levels
            grid = flat / np.where(step > 0, step, 1)
            assert np.allclose(grid, np.round(grid), atol=2e-3), variable.path
            assert np.abs(grid).max() <= levels + 2e-3
        assert all("call" not in vars(layer) for layer in _all_layers(copy))
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert quantization_aware_copy(model, calibration, steps=50, max_seconds=0)[1]["steps"] == 0
    onnx_settings = int8_needs()["onnx"]
    copy, _ = quantization_aware_copy(model, calibration, steps=6,
                                      bits=7 if onnx_settings.get("reduce_range") else 8)
    for family, settings in (("tflite", {}), ("onnx", onnx_settings)):
        path = tmp_path / f"copy.{family}"
        spec = _exporter(family)(copy, path, precision="int8", calibration=calibration,
                                 settings=settings)
        if family == "tflite":
            spec = tflite_spec(path)
            from ai_edge_litert.interpreter import Interpreter
            operators = {op["op_name"] for op in Interpreter(str(path))._get_ops_details()}
        else:
            operators = {node.op_type for node in _onnx_graph(path).node}
        assert not any("FAKE" in name.upper() for name in operators), operators
        runtime = "litert" if family == "tflite" else "onnxruntime"
        runner = RUNTIMES[runtime].load(path, {**spec, "precision": "int8"}, None, "cpu")
        assert _agreement(copy, runner, images) >= 0.9
        runner.close()


def test_the_quantization_aware_fine_tune_is_the_last_remedy_and_only_where_time_allows(
        tmp_path):
    """Tried after every other remedy and the float steps, on top of the kept settings, with
    the time the budget leaves it; not tried where that is too little, nor with
    qat_steps = 0. (The search's bookkeeping with scripted candidates; the fine-tune itself
    runs for real through the stage in test_an_int8_artifact_that_cannot_pass_...)"""
    from tledge.export.int8 import quantize_with_repair
    images = 300

    def run(**options):
        exported = []

        def export(settings, path):
            exported.append(dict(settings))
            if settings.get("qat"):
                settings["qat"] = {"steps": 7, "learning_rate": 1e-4}  # what ran
            Path(path).write_bytes(b"candidate")
            return {"settings": dict(settings)}

        lines = []
        diagnosis = {"layers": [{"name": f"layer{i}", "error": 1.0 / (i + 1)}
                                for i in range(4)]}
        record = quantize_with_repair(
            FORMATS["tflite_int8"], export, tmp_path / "kept.tflite",
            judge=Scripted(images, lambda settings: bool(settings.get("qat"))),
            thresholds={"max_accuracy_drop": 0.01, "min_agreement": 0.97, "max_abs_diff": None},
            calibration_samples=32, train_images=128, isa="AVX2",
            diagnose=lambda settings: diagnosis, log=lines.append, float_steps=2, **options)
        return record, exported, lines

    record, exported, lines = run(qat_steps=300, max_seconds=600)
    tuned = [settings for settings in exported if "qat" in settings]
    assert len(tuned) == 1 and exported[-1] is not None and "qat" in exported[-1]
    assert tuned[0]["qat"]["steps"] == 300 and 0 < tuned[0]["qat"]["seconds"] <= 600
    assert record["passed"] and record["repaired"]
    assert record["remedy"].endswith("quantization-aware fine-tune (at most 300 steps, "
                                     "distilling the Keras model)")
    assert record["settings"]["qat"] == {"steps": 7, "learning_rate": 1e-4}
    # on top of what was tried before it: the kept settings (nothing was kept here)
    assert {key: value for key, value in tuned[0].items() if key != "qat"} == \
        record["attempts"][0]["settings"]
    assert len(record["attempts"]) == 1 + 2 + 2 + 1  # plain, 2 calibration, 2 float, tuned
    record, exported, lines = run(qat_steps=0, max_seconds=600)
    assert not any("qat" in settings for settings in exported) and not record["passed"]
    assert "quantization-aware" not in record["stopped"]
    record, exported, lines = run(qat_steps=300, max_seconds=20)
    assert not any("qat" in settings for settings in exported)
    assert any("no quantization-aware fine-tune" in line and "export.int8_repair_seconds"
               in line for line in lines)


def test_a_recorded_narrow_pass_that_now_fails_gets_the_whole_search(tmp_path):
    """A rebuild starts from what the last export kept; where that was a narrow pass and it
    no longer passes at all (a full disk, another CPU), the search is a repair, with every
    remedy, not the narrow search that changes no kernel."""
    from tledge.export.int8 import quantize_with_repair

    def export(settings, path):
        Path(path).write_bytes(b"candidate")
        return {"settings": dict(settings)}
    lines = []
    record = quantize_with_repair(
        FORMATS["onnx_int8"], export, tmp_path / "kept.onnx",
        judge=Scripted(300, lambda settings: settings.get("per_channel") is False),
        thresholds={"max_accuracy_drop": 0.01, "min_agreement": 0.97, "max_abs_diff": None},
        calibration_samples=32, train_images=32, isa="AVX-512 VNNI",
        diagnose=lambda settings: {"layers": []}, log=lines.append,
        recorded={"settings": {"calibration_samples": 32, "method": "entropy"},
                  "remedy": "entropy calibration", "narrow": True})
    assert record["passed"] and "per-tensor weights" in record["remedy"]
    assert not record["narrow"] and not any("narrow pass" in line for line in lines)


def test_a_file_of_a_fine_tuned_copy_says_so():
    """The report's sentence for a file the fine-tune repaired says that it quantizes a copy
    of the model, and that parity compares it with the Keras model itself."""
    from tledge.report.int8 import sentence
    plain = {"remedy": "plain", "settings": {"calibration_samples": 32}, "passed": False,
             "agreement": 0.9, "agreement_low": 0.86, "problems": ["agreement 0.9000 < 0.97"]}
    tuned = {"remedy": "quantization-aware fine-tune (at most 300 steps, distilling the Keras "
                       "model)", "settings": {"calibration_samples": 32,
                                              "qat": {"steps": 7, "learning_rate": 1e-4}},
             "passed": True, "agreement": 0.99, "agreement_low": 0.975}
    record = {"attempts": [plain, tuned], "remedy": tuned["remedy"],
              "settings": tuned["settings"], "passed": True, "split": "repair", "images": 600}
    text = sentence(record, None)
    assert "repaired by quantization-aware fine-tune" in text
    assert "a copy of the model fine-tuned for 7 steps" in text and "unchanged" in text
    assert "fine-tuned" not in sentence({**record, "attempts": [plain, {
        **tuned, "settings": plain["settings"]}], "settings": plain["settings"]}, None)


def _other_filesystem(path):
    """A folder on another filesystem than `path` (tmpfs /dev/shm), or None where there is
    none to write to."""
    import os
    import tempfile
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or \
            os.stat(shm).st_dev == os.stat(path).st_dev:
        return None
    return Path(tempfile.mkdtemp(prefix="tledge-test-", dir=shm))


@pytest.mark.parametrize("name", ["tflite_int8", "onnx_int8"])
def test_int8_exports_with_tmpdir_on_another_filesystem(name, model_and_images, tmp_path,
                                                       monkeypatch):
    """The repair search writes its candidates in $TMPDIR; the kept one is moved into the run
    directory, which may be another filesystem (a rename alone: "Invalid cross-device link")."""
    import tempfile
    other = _other_filesystem(tmp_path)
    if other is None:
        pytest.skip("no writable filesystem other than the test folder's (/dev/shm) here")
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(other))
        model, calibration, images, labels = model_and_images
        lenient = {"max_accuracy_drop": 1.0, "min_agreement": 0.0, "max_abs_diff": None}
        record, _ = _repair(model, calibration, images, labels, tmp_path, fmt=FORMATS[name],
                            thresholds=lenient, calibration_samples=8)
        kept = tmp_path / f"kept{FORMATS[name].suffix}"
        assert record["spec"] and kept.stat().st_size > 1000
        assert not list(kept.parent.glob(".*.moving"))  # nothing half-moved left beside it
        assert not any(other.iterdir())  # the candidates' folder is gone from $TMPDIR
    finally:
        import shutil
        shutil.rmtree(other, ignore_errors=True)


def test_a_file_moves_across_filesystems_whole(tmp_path):
    from tledge.rundir import move_file
    other = _other_filesystem(tmp_path)
    if other is None:
        pytest.skip("no writable filesystem other than the test folder's (/dev/shm) here")
    try:
        source = other / "candidate.tflite"
        source.write_bytes(b"x" * 100_000)
        (tmp_path / "model_int8.tflite").write_bytes(b"old")
        move_file(source, tmp_path / "model_int8.tflite")
        assert (tmp_path / "model_int8.tflite").read_bytes() == b"x" * 100_000
        assert not source.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
            "model_int8.tflite"]
    finally:
        import shutil
        shutil.rmtree(other, ignore_errors=True)


# ---- through the stages --------------------------------------------------------------------

def _tighten(run_dir, table: str):
    path = run_dir / "recipe.toml"
    text = path.read_text()
    text = text.replace("[validate.per_format]\n", "[validate.per_format]\n" + table)
    text = re.sub(r"int8_repair_attempts = \d+", "int8_repair_attempts = 3", text)
    text = re.sub(r"int8_(float_steps|repair_images|qat_steps) = \d+\n", "", text)
    # 100 repair images (enough to show 0.97) leave the calibration remedies room to try;
    # a short quantization-aware fine-tune ends the search
    path.write_text(text.replace("int8_repair_attempts = 3", "int8_repair_attempts = 3\n"
                                 "int8_float_steps = 1\nint8_repair_images = 100\n"
                                 f"int8_qat_steps = {QAT_STEPS}"))


QAT_STEPS = 12


def test_an_int8_artifact_that_cannot_pass_is_explained_in_the_report(built_run, tmp_path):
    from tledge.export.qat import LEARNING_RATE
    from tledge.export.stage import export_run
    from tledge.run_inputs import run_recipe, run_splits
    from tledge.report.document import report_run
    from tledge.rundir import find_artifact, read_manifest
    from tledge.validate import validate_run
    run_dir = shutil.copytree(built_run[0], tmp_path / "run")
    _tighten(run_dir, "\n[validate.per_format.tflite_int8]\nmin_agreement = 1.0\n"
                      "max_abs_diff = 0.000001\n")
    lines = []
    export_run(run_dir, log=lines.append)
    entry = find_artifact(read_manifest(run_dir), "tflite_int8")
    record = entry["quantization"]
    # three quantization settings, one float-layer step on top of the kept ones, then a
    # quantization-aware fine-tune of the model on top of the kept file's settings
    assert len(record["attempts"]) == 5 and record["passed"] is False
    float_step, tuned = record["attempts"][-2:]
    assert float_step["settings"]["float_layers"]
    assert tuned["remedy"].endswith("quantization-aware fine-tune (at most 12 steps, "
                                    "distilling the Keras model)")
    # what ran is recorded, so that a rebuild repeats it (the time cap is not)
    assert tuned["settings"]["qat"] == {"steps": QAT_STEPS, "learning_rate": LEARNING_RATE}
    assert any("quantization-aware fine-tune: 12 steps" in line for line in lines)
    assert "and a quantization-aware fine-tune tried" in record["stopped"]
    # judged on training images held apart from calibration, as many as the split spares
    # beside twice the calibration images, and on the validation split
    recipe = run_recipe(run_dir)
    splits = run_splits(run_dir, recipe)
    held = min(100, len(splits.y_train) - 2 * recipe.export.calibration_samples)
    assert held == recipe.export.int8_repair_images
    assert record["images"] == held + len(splits.y_val)
    assert record["split"] == "repair" and record["model_sha256"] == \
        find_artifact(read_manifest(run_dir), "keras")["sha256"]
    assert any("kept:" in line and "still fails parity" in line for line in lines)
    report = validate_run(run_dir, log=lines.append)
    assert "tflite_int8" in [row.artifact for row in report.failed]
    text = report_run(run_dir).read_text()
    section = text[text.index("## Quantization"):]
    assert "**tflite_int8**: the plain export failed" in section
    assert "no remedy passed" in section and "FAILED" in section and "| 5 |" in section
    assert "quantization-aware fine-tune" in section
    assert "repaired" not in section.split("**tflite_int8**")[1].split("\n")[0]
    assert "95 % lower bound" in section and "gain / noise" in section
    assert "layer stayed in float" not in section or record["remedy"] != "plain"
    assert "(figures/quantization_tflite_int8.png)" in section
    assert (run_dir / "figures" / "quantization_tflite_int8.png").stat().st_size > 1000
    worst = max((layer for layer in record["diagnosis"]["layers"] if layer["error"]),
                key=lambda layer: layer["error"])
    assert worst["name"].split(";")[0] in section


def test_an_int8_that_fails_only_in_the_validate_stage_gets_its_diagnosis(built_run, tmp_path):
    from tledge.export.stage import export_run
    from tledge.rundir import find_artifact, read_manifest
    from tledge.validate import validate_run
    run_dir = shutil.copytree(built_run[0], tmp_path / "run")
    path = run_dir / "recipe.toml"
    path.write_text(path.read_text().replace('int8_repair = "auto"', 'int8_repair = "off"'))
    export_run(run_dir, log=lambda line: None)
    assert "diagnosis" not in (find_artifact(read_manifest(run_dir), "tflite_int8")
                               .get("quantization") or {}) or \
        find_artifact(read_manifest(run_dir), "tflite_int8")["quantization"]["diagnosis"] is None
    _tighten(run_dir, "\n[validate.per_format.tflite_int8]\nmin_agreement = 1.0\n"
                      "max_abs_diff = 0.000001\n")
    lines = []
    validate_run(run_dir, log=lines.append)
    assert any("measuring its quantization error layer by layer" in line for line in lines)
    diagnosis = find_artifact(read_manifest(run_dir), "tflite_int8")["quantization"]["diagnosis"]
    assert diagnosis["family"] == "tflite" and diagnosis["layers"]


# ---- the repair split ----------------------------------------------------------------------

def test_the_repair_split_is_training_images_calibration_never_takes(built_run, tmp_path):
    """Held apart from every calibration set the search can ask for, from the validation and
    test splits, and the same images when a copied run reads the images it carries."""
    from tledge.data import calibration_images
    from tledge.run_inputs import (carried_splits, carry_inputs, int8_order, repair_count,
                                   run_recipe, run_splits)
    from tledge.rundir import read_manifest, SPLIT, read_record, write_manifest
    run_dir = shutil.copytree(built_run[0], tmp_path / "run")
    recipe = run_recipe(run_dir)
    splits = run_splits(run_dir, recipe)
    calibration, repair = int8_order(splits, recipe)
    total = len(splits.y_train)
    assert len(repair) == repair_count(total, recipe.export) == \
        min(recipe.export.int8_repair_images, total - 2 * recipe.export.calibration_samples) > 0
    assert not set(calibration) & set(repair) and len(calibration) + len(repair) == total
    # the plain calibration set is the one it always was (a prefix of the same order)
    assert np.array_equal(splits.x_train[calibration[:recipe.export.calibration_samples]],
                          calibration_images(splits, recipe.export.calibration_samples,
                                             seed=recipe.seed))
    # every class is in it
    assert set(np.asarray(splits.y_train)[repair]) == set(np.asarray(splits.y_train))
    # a run copied without its data cache carries the repair split beside calibration
    manifest = read_manifest(run_dir)
    manifest.setdefault("data", {})["inputs"] = carry_inputs(run_dir, splits, recipe)
    write_manifest(run_dir, manifest)
    carried = carried_splits(run_dir, read_record(run_dir / SPLIT))
    carried_calibration, carried_repair = int8_order(carried, recipe)
    assert np.array_equal(carried.x_train[carried_repair], splits.x_train[repair])
    count = len(carried_calibration)
    assert np.array_equal(carried.x_train[carried_calibration],
                          splits.x_train[calibration[:count]])
