"""report.html is safe to mail: nothing from data, devices or files becomes markup."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from conftest import write_recipe

HOSTILE = ('<script>alert("class")</script>', "<img src=x onerror=alert(1)>",
           "[click](javascript:alert(1)) | *bold* $\\frac$ `tick`")

RECIPE = """
name = "hostile"
seed = 0

[data]
source = "npz"
path = "hostile.npz"
image_size = [16, 16]
val_fraction = 0.2
test_fraction = 0.3

[model]
backbone = "small_cnn"
weights = "none"

[train.feature_extraction]
epochs = 1

[export]
tflite = ["fp32"]
onnx = []
"""


@pytest.fixture
def hostile_run(tmp_path, monkeypatch):
    from tledge.export.stage import export_run
    from tledge.stages import train_run
    from tledge.recipe.load import load_recipe
    from tledge.validate import validate_run
    monkeypatch.setenv("TLEDGE_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    images = rng.integers(0, 60, (60, 16, 16, 3), dtype=np.uint8)
    images[np.arange(60), :, :, labels] += 180
    np.savez(tmp_path / "hostile.npz", x_train=images, y_train=labels,
             class_names=np.array(HOSTILE))
    recipe = load_recipe(write_recipe(tmp_path, RECIPE))
    quiet = dict(log=lambda line: None)
    run_dir = train_run(recipe, tmp_path / "run", verbose=0, **quiet)
    export_run(run_dir, **quiet)
    validate_run(run_dir, **quiet)
    return run_dir


def hostile_device(run_dir, tmp_path):
    """A device result whose every free-text field is hostile (it passes the format checks:
    nothing forces a device's name or CPU string to be plain text; its core count is a
    number, as `bench --import` checks)."""
    from tledge.core import device as device_bench
    row = {"artifact": "<script>alert('row')</script>", "runtime": "<b onmouseover=x()>",
           "threads": 1, "batch": 1, "status": "ok", "p50_ms": 1.0, "p90_ms": 1.0,
           "p99_ms": 1.0, "mean_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0, "throughput_ips": 1.0}
    document = {"format": device_bench.RESULT_FORMAT, "version": device_bench.VERSION,
                "device": {"name": "<iframe src=javascript:alert(2)>",
                           "model": "<svg onload=alert(3)>",
                           "cpu": "[x](javascript:alert(4)) <u>4</u>",
                           "cores": 4, "system": "![i](http://evil.example/p.png)",
                           "runtimes": {"<script>": "<script>"}},
                "rows": [row], "artifacts": {}, "measured": "<marquee>now</marquee>"}
    path = tmp_path / "result.json"
    path.write_text(json.dumps(document))
    return path


def test_no_tag_or_attribute_from_data_or_a_device_survives(hostile_run, tmp_path):
    from tledge.bench.bundle import import_device_result
    from tledge.report.document import report_run
    import_device_result(hostile_run, hostile_device(hostile_run, tmp_path))
    # An explain record pointing out of the run directory
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not for the report")
    (hostile_run / "figures").mkdir(exist_ok=True)
    (hostile_run / "explain.json").write_text(json.dumps(
        {"split": "test", "models": {}, "figures": [
            {"title": "escape", "file": "figures/../../secret.png"}]}))
    report_run(hostile_run)
    page = (hostile_run / "report.html").read_text()
    tags = set(re.findall(r"<\s*([a-zA-Z][a-zA-Z0-9]*)", page))
    assert tags <= {"html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "h3",
                    "p", "table", "thead", "tbody", "tr", "th", "td", "code", "pre", "img",
                    "strong", "em", "blockquote", "ul", "ol", "li", "hr", "br"}, tags
    for forbidden in ("<script", "<iframe", "<svg", "<marquee", "<a ", "<b ", "<u>",
                      "onerror", "onload", "onmouseover", "javascript:", "evil.example"):
        if forbidden.startswith("<"):
            assert forbidden not in page.lower(), forbidden
        else:  # as an attribute, never; as escaped text in a cell it is harmless
            assert not re.search(rf"<[^>]*{forbidden}", page, re.IGNORECASE), forbidden
    for source in re.findall(r'<img[^>]*src="([^"]*)"', page):
        assert source.startswith("data:image/png;base64,")
    assert base64.b64encode(secret.read_bytes()).decode() not in page
    # The hostile names are shown, as text
    assert "&lt;script&gt;alert" in page and "onerror=alert(1)" in page
    markdown = (hostile_run / "report.md").read_text()
    assert "<script>" not in markdown and "\\[click\\]\\(javascript:alert\\(1\\)\\)" in markdown
    device_rows = [line for line in markdown.splitlines()
                   if line.startswith("| &lt;script&gt;alert\\('row'\\)")]
    assert device_rows and all(line.count(" | ") == device_rows[0].count(" | ")
                               for line in device_rows)
