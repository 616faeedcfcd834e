"""The report as a reader sees it: epochs numbered one way, integer epoch ticks, chart labels
that do not cover each other, speed claimed only beyond the noise, splits named as they were
made; and the page opened in a real browser (headless Chromium): every image loads, no console
error, a screenshot."""

from __future__ import annotations

import json
import shutil

import pytest

from tledge.core.timing import BenchRow, compare_p50


def history_of_two_phases():
    """8 epochs of feature extraction, then 12 of fine-tuning, its best epoch the 19th."""
    def rows(numbers):
        return [{"epoch": n, "loss": 1 / n, "accuracy": 0.5 + n / 50, "val_loss": 1.2 / n,
                 "val_accuracy": 0.45 + n / 50} for n in numbers]
    phase = {"skipped": None, "wall_seconds": 10.0, "images_per_second": 100.0,
             "trainable_params": 10, "total_params": 20}
    return {"backbone": "mobilenet_v2", "pretrained": True,
            "phases": [{**phase, "name": "feature_extraction", "epochs": rows(range(1, 9)),
                        "best_epoch": 8, "best_val_accuracy": 0.61},
                       {**phase, "name": "fine_tune", "epochs": rows(range(9, 21)),
                        "best_epoch": 19, "best_val_accuracy": 0.83}],
            "verdict": {"kept": "fine_tune"}, "test_accuracy": 0.8}


def captured_figure(monkeypatch):
    """Replace save_figure: the figure a plot draws is kept for the test to read."""
    import tledge.plots
    kept = []

    def keep(figure, path, **_):
        kept.append(figure)
        return path
    monkeypatch.setattr(tledge.plots, "save_figure", keep)
    return kept


def test_epochs_are_numbered_one_way_across_phases(monkeypatch, tmp_path):
    from tledge.plots import learning_curves
    from tledge.report.document import _training_section
    lines = _training_section(history_of_two_phases())
    assert any(line.startswith("| feature_extraction | 1-8 (8) | 8 |") for line in lines)
    assert any(line.startswith("| fine_tune | 9-20 (12) | 19 |") for line in lines), lines
    kept = captured_figure(monkeypatch)
    learning_curves(history_of_two_phases(), tmp_path / "curves.png")
    for axis in kept[0].axes:
        ticks = [tick for tick in axis.get_xticks() if 1 <= tick <= 20]
        assert ticks and all(float(tick).is_integer() for tick in ticks), ticks


def test_labels_of_points_at_one_place_do_not_cover_each_other(monkeypatch, tmp_path):
    """Four files of nearly one speed and accuracy: their names stay apart."""
    from tledge.parity import ParityRow
    from tledge.plots import pareto
    from tledge.records import Parity
    rows = [BenchRow(name, runtime, 2, 1, "ok", p50_ms=0.20 + index * 0.001)
            for index, (name, runtime) in enumerate([
                ("tflite_fp32", "litert"), ("tflite_int8", "litert"),
                ("onnx_fp32", "onnxruntime"), ("onnx_int8", "onnxruntime")])]
    parity = Parity("test", 280, [ParityRow(row.artifact, row.runtime, "passed",
                                            accuracy=0.9) for row in rows])
    kept = captured_figure(monkeypatch)
    pareto(rows, parity, None, tmp_path / "pareto.png")
    figure = kept[0]
    renderer = figure.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in figure.axes[0].texts]
    assert len(boxes) == 4
    assert not [(a, b) for a in range(4) for b in range(a + 1, 4)
                if boxes[a].overlaps(boxes[b])]


@pytest.mark.parametrize("mine, theirs, clear", [
    ((0.285, 0.310), (0.293, 0.330), False),  # 1.03x: inside both spreads and within 5 %
    ((0.200, None), (0.209, None), False),  # no spread known: 5 % is the floor
    ((0.100, 0.110), (0.200, 0.220), True),  # 2x, far beyond the spread
    ((0.100, 0.300), (0.150, 0.160), False),  # 1.5x, but one file's runs spread by 0.2 ms
])
def test_a_speed_is_claimed_only_beyond_the_measured_spread(mine, theirs, clear):
    ours = BenchRow("a", "litert", 2, 1, "ok", p50_ms=mine[0], p90_ms=mine[1])
    other = BenchRow("b", "litert", 2, 1, "ok", p50_ms=theirs[0], p90_ms=theirs[1])
    ratio, beyond = compare_p50(ours, other)
    assert ratio == pytest.approx(theirs[0] / mine[0]) and beyond is clear
    from tledge.records import Bench
    from tledge.report.document import md
    from tledge.report.int8 import speed
    bench = Bench([BenchRow("tflite_int8", "litert", 2, 1, "ok", p50_ms=mine[0],
                            p90_ms=mine[1]),
                   BenchRow("tflite_fp32", "litert", 2, 1, "ok", p50_ms=theirs[0],
                            p90_ms=theirs[1])], machine={"cpu": "AMD EPYC", "isa": "AVX2"})
    line = speed({"name": "tflite_int8", "family": "tflite"}, bench, md)
    assert ("faster than fp32" in line) is clear
    assert ("inside the measured spread" in line) is not clear


def test_the_train_split_is_named_as_what_carving_left(built_run):
    text = (built_run[0] / "report.md").read_text()
    split = json.loads((built_run[0] / "split.json").read_text())["splits"]
    assert f"| train | {split['train']['count']} | given, less what val and test took " \
           "from it |" in text
    assert f"| val | {split['val']['count']} | carved (15% of train) |" in text


def _browser():
    """A headless Chromium driven by Selenium, or the reason there is none here."""
    try:
        from selenium import webdriver
    except ImportError:
        return None, "selenium is not installed (pip install -e '.[dev]')"
    driver_path = shutil.which("chromedriver")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not driver_path or not browser_path:
        return None, "no chromium and chromedriver (Debian: apt-get install chromium " \
                     "chromium-driver; .ci/run installs them)"
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,2000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options), None


def test_the_report_reads_right_in_a_real_browser(run_copy, tmp_path):
    """report.html in headless Chromium: every image decoded and drawn, no console error, the
    Deploy part present; a screenshot is written (the README's comes from the quickstart's)."""
    driver, reason = _browser()
    if driver is None:
        pytest.skip(reason)
    try:
        driver.get((run_copy / "report.html").as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        headings = driver.execute_script(
            "return Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        errors = [entry for entry in driver.get_log("browser")
                  if entry["level"] in ("SEVERE", "ERROR")]
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert len(images) >= 6, images
    assert all(complete and width > 0 for _, complete, width in images), images
    assert not errors, errors
    assert "Deploy" in headings and "Training" in headings
    from test_report import assert_real_png
    assert_real_png(shot, min_size=(1000, 800))
