"""The report: figures from the run's JSON, a self-contained HTML page, Grad-CAM that looks at
the object, and a rebuild that reproduces what the build wrote."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from conftest import assert_usage_error, invoke

BUILD_FIGURES = ["learning_curves", "confusion_reference", "per_class_accuracy", "latency",
                 "pareto", "sizes", "gradcam", "feature_maps"]


def assert_real_png(path, min_size=(200, 150)):
    """A valid PNG, at least `min_size` pixels, and not blank (its pixels vary)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1], image.size
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 5, f"{path.name} is blank (pixel std {pixels.std():.2f})"


@pytest.mark.parametrize("name", BUILD_FIGURES)
def test_the_build_draws_every_figure(built_run, name):
    run_dir, _, _ = built_run
    assert_real_png(run_dir / "figures" / f"{name}.png")
    assert f"(figures/{name}.png)" in (run_dir / "report.md").read_text()


def test_each_plot_alone_from_hand_made_json(tmp_path):
    from tledge import plots
    history = {"phases": [
        {"name": "feature_extraction", "epochs": [
            {"epoch": e, "accuracy": 0.2 * e, "loss": 2 - 0.3 * e, "val_accuracy": 0.18 * e,
             "val_loss": 2.1 - 0.3 * e} for e in (1, 2, 3)]},
        {"name": "fine_tune", "epochs": [
            {"epoch": e, "accuracy": 0.7 + 0.05 * e, "loss": 0.9 - 0.1 * e,
             "val_accuracy": 0.6 + 0.04 * e, "val_loss": 1.0 - 0.1 * e} for e in (1, 2)]}],
        "baseline": {"backbone": "small_cnn", "phase": {"epochs": [
            {"epoch": e, "val_accuracy": 0.1 * e, "val_loss": 2 - 0.2 * e} for e in (1, 2, 3)]}}}
    from tledge.core.timing import BenchRow
    rows = [BenchRow(a, r, 1, 1, "ok", p50_ms=p, p90_ms=p * 1.2) for a, r, p in
            [("keras", "keras", 4.0), ("tflite_fp32", "litert", 0.4),
             ("tflite_int8", "litert", 0.2)]]
    from tledge.parity import ParityRow
    from tledge.records import Parity
    parity = Parity("test", 300, [ParityRow("keras", "keras", "reference", accuracy=0.9),
                                  ParityRow("tflite_fp32", "litert", "passed", accuracy=0.9),
                                  ParityRow("tflite_int8", "litert", "failed", accuracy=0.7)])
    matrix = [[8, 2, 0], [1, 9, 0], [0, 3, 7]]
    labels = ["cat", "dog", "fish"]
    written = [
        plots.learning_curves(history, tmp_path / "curves.png"),
        plots.confusion(matrix, labels, "title", tmp_path / "confusion.png"),
        plots.per_class_accuracy([("reference", matrix), ("int8", matrix)], labels,
                                 tmp_path / "per_class.png"),
        plots.latency_bars(rows, tmp_path / "latency.png"),
        plots.pareto(rows, parity, {"artifact": "tflite_fp32", "runtime": "litert",
                                    "threads": 1, "batch": 1}, tmp_path / "pareto.png"),
        plots.sizes([{"name": "a", "size_bytes": 2048}, {"name": "b", "size_bytes": 900}],
                    tmp_path / "sizes.png")]
    for path in written:
        assert_real_png(path)
    # nothing to plot: no file, no error
    assert plots.learning_curves({}, tmp_path / "none.png") is None
    assert plots.latency_bars([], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_pareto_front_keeps_only_undominated_points():
    from tledge.plots import pareto_front
    points = [(4.0, 0.90), (0.4, 0.90), (0.2, 0.70), (0.5, 0.60), (0.2, 0.70)]
    # (4.0, .90) is beaten by (0.4, .90); (0.5, .60) by (0.4, .90); equal points both stay
    assert pareto_front(points) == [1, 2, 4]


def test_html_is_self_contained_and_embeds_every_image(built_run):
    run_dir, _, _ = built_run
    markdown = (run_dir / "report.md").read_text()
    page = (run_dir / "report.html").read_text()
    images = re.findall(r"<img [^>]*>", page)
    assert len(images) == markdown.count("![") >= len(BUILD_FIGURES)
    for tag in images:
        assert 'src="data:image/png;base64,' in tag
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page), "an external reference"
    assert "<link" not in page and "<script" not in page and "@import" not in page
    assert "<table>" in page and "<h2" in page


def test_the_story_comes_first_with_its_numbers(built_run):
    run_dir, _, _ = built_run
    import json
    parity = json.loads((run_dir / "parity.json").read_text())
    reference = next(row for row in parity["rows"] if row["artifact"] == "keras")
    head = (run_dir / "report.md").read_text().split("## Data")[0]
    assert "Trained small_cnn from scratch" in head
    assert f"{reference['accuracy']:.1%}" in head
    assert "Full int8 (tflite_int8) scores" in head and "smaller than fp32" in head


def test_failed_parity_leads_the_page(run_copy):
    import json
    path = run_copy / "parity.json"
    parity = json.loads(path.read_text())
    row = next(row for row in parity["rows"] if row["artifact"] == "tflite_int8")
    row.update(status="failed", problems=["agreement 0.8000 < 0.9"])
    path.write_text(json.dumps(parity))
    assert invoke("report", run_copy).exit_code == 0
    first = (run_copy / "report.md").read_text().splitlines()[2]
    assert first.startswith("> **FAILED PARITY: tflite_int8**") and "agreement 0.8000" in first
    assert "FAILED PARITY: tflite_int8" in (run_copy / "report.html").read_text()


def test_a_rebuilt_report_equals_the_one_the_build_wrote(built_run, run_copy):
    run_dir, _, _ = built_run
    for name in ("report.md", "report.html", "figures/pareto.png"):
        (run_copy / name).unlink()
    result = invoke("report", run_copy)
    assert result.exit_code == 0, result.output
    for name in ["report.md", "report.html"] + [f"figures/{n}.png" for n in BUILD_FIGURES]:
        assert (run_copy / name).read_bytes() == (run_dir / name).read_bytes(), name


CANVAS, SIDE = 48, 16  # 48: the probe trains in 20 s, not 50 (64x64 cost 2.4x the compute)


def scattered_shapes(count_per_class, seed):
    """Small shapes (SIDE x SIDE) at random places on a plain CANVAS of their background
    colour: the class is only in that box, and the box is known."""
    from tledge.data.synthetic import generate
    shapes, labels = generate(["circle", "square", "cross", "hbars"], count_per_class,
                              (SIDE, SIDE), noise=0.0, seed=seed)
    rng = np.random.default_rng(seed)
    images = np.empty((len(shapes), CANVAS, CANVAS, 3), np.uint8)
    boxes = np.zeros((len(shapes), CANVAS, CANVAS), bool)
    for index, shape in enumerate(shapes):
        top, left = rng.integers(0, CANVAS - SIDE + 1, 2)
        images[index] = shape[0, 0]  # at noise 0 the corner pixel is the background
        images[index, top:top + SIDE, left:left + SIDE] = shape
        # the heat map's resolution is one cell of the 6x6 feature map (8 px): the box grows
        # by half a cell on each side, to 24x24 px, 25 % of the image
        boxes[index, max(0, top - 4):top + SIDE + 4, max(0, left - 4):left + SIDE + 4] = True
    return images, labels, boxes


@pytest.mark.parametrize("isa, int8_ms, says", [
    ("AVX2", 0.30, "**int8 is slower than fp32 here**: 1.50x the fp32 file's time"),
    ("AVX-512 VNNI", 0.10, "int8 is 2.00x faster than fp32"),
    ("AVX2", 0.205, "about the same speed"),
])
def test_the_quantization_section_says_what_int8_costs_in_time_on_this_cpu(isa, int8_ms, says):
    """Measured, not assumed: int8's p50 against its fp32 file's in the same runtime, threads
    and batch, with the CPU and its ISA; an ONNX int8 file on x86 without VNNI says what that
    CPU's kernels need (the rule the repair follows) and whether the kept file has it."""
    from tledge.core.timing import BenchRow
    from tledge.records import Bench
    from tledge.report.document import md
    from tledge.report.int8 import kernels, speed
    bench = Bench([BenchRow("onnx_int8", "onnxruntime", 2, 1, "ok", p50_ms=int8_ms),
                   BenchRow("onnx_fp32", "onnxruntime", 2, 1, "ok", p50_ms=0.20),
                   BenchRow("onnx_int8", "openvino", 2, 1, "ok", p50_ms=9.0)],
                  machine={"cpu": "AMD EPYC", "isa": isa})
    entry = {"name": "onnx_int8", "family": "onnx"}
    line = speed(entry, bench, md)
    assert says in line and "AMD EPYC" in line and isa.split()[0] in line
    assert f"p50 {int8_ms:.3f} ms against 0.200 ms for onnx_fp32" in line  # not openvino's
    assert speed({"name": "tflite_int8", "family": "tflite"}, bench, md) == ""  # not timed
    record = {"isa": isa, "settings": {"reduce_range": True}}
    if isa == "AVX2":
        assert "has no VNNI" in kernels(entry, record, bench, md)
        assert "made without it" in kernels(entry, {"isa": isa, "settings": {}}, bench, md)
    else:
        assert kernels(entry, record, bench, md) == ""
    assert kernels({"name": "tflite_int8", "family": "tflite"}, record, bench, md) == ""


def test_gradcam_looks_at_the_object(tmp_path):
    """A model that had to find a small shape on an empty canvas: for the images it gets
    right, Grad-CAM's mass falls mostly inside the shape's box."""
    import keras
    from tests_support import small_classifier
    from tledge.explain import gradcam
    images, labels, _ = scattered_shapes(80, seed=1)
    model = small_classifier(tmp_path, classes=4, size=(CANVAS, CANVAS))
    keras.utils.set_random_seed(0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(images.astype(np.float32), labels, epochs=16, batch_size=32, verbose=0)
    test_images, test_labels, boxes = scattered_shapes(10, seed=2)
    heats, explained = gradcam(model, test_images)
    right = explained == test_labels
    assert right.mean() > 0.5, f"the model did not learn the task ({right.mean():.0%})"
    assert heats.shape == (len(test_labels), CANVAS, CANVAS)
    assert heats.min() >= 0 and heats.max() <= 1
    shares = (heats * boxes).sum(axis=(1, 2)) / np.maximum(heats.sum(axis=(1, 2)), 1e-9)
    # a heat map blind to the object would put about 25 % of its mass in the box
    assert np.median(shares[right]) > 0.5, np.round(shares, 2)


def test_explain_writes_an_overlay_for_an_image(built_run, tmp_path):
    run_dir, _, _ = built_run
    image = tmp_path / "shape.png"
    from tledge.data.synthetic import generate
    pixels, _ = generate(["star"], 1, (32, 32), noise=0.0, seed=1)
    Image.fromarray(pixels[0]).save(image)
    (tmp_path / "b").mkdir()
    Image.fromarray(pixels[0][::-1]).save(tmp_path / "b" / "shape.png")  # the same name
    result = invoke("explain", run_dir, image, tmp_path / "b" / "shape.png",
                    "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert_real_png(tmp_path / "out" / "shape.gradcam.png")
    assert_real_png(tmp_path / "out" / "b_shape.gradcam.png")  # not written over the first
    # the older grammar (--run) still works
    result = invoke("explain", image, "--run", run_dir, "--out", tmp_path / "old")
    assert result.exit_code == 0, result.output
    assert_real_png(tmp_path / "old" / "shape.gradcam.png")


def test_explain_a_missing_image(built_run, tmp_path):
    run_dir, _, _ = built_run
    assert_usage_error(invoke("explain", run_dir, tmp_path / "nope.png"), "nope.png")
    assert_usage_error(invoke("explain", tmp_path), "not a tledge run directory")
