"""The library API: `tledge.build` and `tledge.Run`, as a Python program uses them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import tledge
from conftest import invoke, SMALL_RECIPE, write_recipe
from tledge.errors import RunDirError


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    """One synthetic star, 32x32 as the run's input, as a PNG file and as pixels."""
    from tledge.data.synthetic import generate
    pixels, _ = generate(["star"], 1, (32, 32), noise=0.05, seed=3)
    path = tmp_path_factory.mktemp("star") / "star.png"
    Image.fromarray(pixels[0]).save(path)
    return path, pixels[0]


def test_a_run_shows_its_records_and_predicts_as_the_cli_does(built_run, star):
    from tledge.bench.stage import load_pick
    run_dir, _, _ = built_run
    run = tledge.Run(run_dir)
    assert run.status["current"] is True
    assert {"keras", "tflite_fp32", "tflite_int8", "onnx_fp32"} <= \
        {entry["name"] for entry in run.artifacts}
    assert run.pick == load_pick(run_dir) and run.pick is not None
    assert {(row["artifact"], row["runtime"]) for row in run.parity} >= \
        {("tflite_int8", "litert"), ("onnx_fp32", "onnxruntime")}
    assert run.report == run_dir / "report.html" and run.report.is_file()
    assert run.labels == json.loads((run_dir / "manifest.json").read_text())["labels"]
    path, pixels = star
    # the pick, as `tledge predict --model RUN --json` gives it
    ours = run.predict(path)
    cli = invoke("predict", path, "--model", run_dir, "--json")
    assert cli.exit_code == 0, cli.output
    assert ours == json.loads(cli.stdout)
    assert ours[0]["artifact"] == str(run_dir / next(
        entry["path"] for entry in run.artifacts if entry["name"] == run.pick["artifact"]))
    # pixels in memory: the same answer as the file they were saved to
    from_pixels = run.predict(pixels)
    assert from_pixels[0]["image"] == 0 and from_pixels[0]["top"] == ours[0]["top"]
    # any artifact, in another runtime of its format: the same file's answer as in its own
    # (not the pick's: an int8 pick may answer otherwise on a borderline image, by CPU)
    other = run.predict([path], artifact="onnx_fp32", runtime="openvino", top_k=2)
    own = run.predict([path], artifact="onnx_fp32", top_k=2)
    assert other[0]["runtime"] == "openvino" and own[0]["runtime"] == "onnxruntime"
    assert len(other[0]["top"]) == 2
    assert other[0]["top"][0]["label"] == own[0]["top"][0]["label"]


def test_a_run_refuses_what_it_cannot_vouch_for(built_run, tmp_path):
    with pytest.raises(RunDirError, match="not a tledge run directory"):
        tledge.Run(tmp_path)
    run = tledge.Run(built_run[0])
    with pytest.raises(RunDirError, match="has no artifact 'tflite_fp16'"):
        run.predict(tmp_path / "x.png", artifact="tflite_fp16")


def test_build_from_python_is_quiet_and_returns_the_run(tmp_path):
    """A program that builds through the API prints only what it prints itself: no
    TensorFlow start-up logs, no Keras progress bars, no stage lines."""
    text = SMALL_RECIPE.format(name="api", epochs=3, threads=1)
    text = text.replace('tflite = ["fp32", "int8"]\nonnx = ["fp32"]', 'tflite = ["fp32"]\nonnx = []')
    recipe = write_recipe(tmp_path, text.replace("[bench]", '[bench]\nruntimes = ["litert"]'))
    program = ("import tledge\n"
               f"run = tledge.build({str(recipe)!r}, out={str(tmp_path / 'run')!r})\n"
               "print(type(run).__name__, run.path.name, run.status['current'])\n")
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Run run True\n"
    assert done.stderr == ""
