"""Artifacts the deployment clients accept as they are: standard TFLite Model Metadata that
MediaPipe Tasks reads (labels included), `image` / `probabilities` names in every format, and
MediaPipe's own ImageClassifier agreeing with `tledge predict`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import invoke


def entries(run_dir) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {entry["name"]: run_dir / entry["path"] for entry in manifest["artifacts"]
            if entry.get("status", "ok") == "ok"}, manifest["labels"]


@pytest.fixture(scope="module")
def every_tflite(built_run, tmp_path_factory):
    """A copy of the session run with every TFLite precision exported."""
    run_dir = shutil.copytree(built_run[0], tmp_path_factory.mktemp("clients") / "run")
    result = invoke("export", run_dir, "--format", "tflite", "--precision", "fp16",
                    "--precision", "dynamic")
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.mark.parametrize("name", ["tflite_fp32", "tflite_fp16", "tflite_dynamic",
                                  "tflite_int8"])
def test_every_tflite_carries_the_standard_metadata_and_real_names(every_tflite, name):
    from ai_edge_litert.interpreter import Interpreter
    from tledge.inspection import describe_file
    paths, labels = entries(every_tflite)
    info = describe_file(paths[name])
    standard = info["standard_metadata"]
    assert standard["name"] == "small" and standard["min_parser_version"] == "1.0.0"
    image = standard["inputs"][0]
    assert image["content"] == "image" and image["color_space"] == "RGB"
    assert image["normalization"] == {"mean": [0.0], "std": [1.0]}  # raw pixels go in
    assert image["range"] == [0.0, 255.0]
    assert standard["outputs"][0]["associated_files"] == [{"name": "labels.txt", "type": 2}]
    assert standard["labels"] == labels  # packed into the model, in output order
    assert info["metadata"]["labels"] == labels  # tledge's own entry is there too
    interpreter = Interpreter(model_path=str(paths[name]))
    assert interpreter.get_input_details()[0]["name"] == "image"
    assert interpreter.get_output_details()[0]["name"] == "probabilities"
    assert interpreter.get_signature_list() == {
        "serving_default": {"inputs": ["image"], "outputs": ["probabilities"]}}


def test_the_two_metadata_entries_and_the_labels_survive_rewrites(every_tflite, tmp_path):
    """tledge's entry written again keeps the standard one and labels.txt; entries and packed
    files written by another tool are kept as well."""
    from tledge.export import tflite_standard as standard
    from tledge.export.metadata import embed_tflite, read_metadata, tflite_metadata_entries
    paths, labels = entries(every_tflite)
    path = shutil.copy(paths["tflite_int8"], tmp_path / "model.tflite")
    data = open(path, "rb").read()
    flatbuffer_end = data.index(b"PK\x03\x04")  # the appended zip's first member
    foreign = standard.with_associated_files(
        data[:flatbuffer_end], {**standard.associated_files(data), "vocab.txt": b"other\n"})
    open(path, "wb").write(foreign)
    before = np.asarray(_run(path))
    metadata = read_metadata(path)
    embed_tflite(path, {**metadata, "recipe_hash": "again"})
    entries_now = tflite_metadata_entries(path)
    assert {"tledge", standard.ENTRY} <= set(entries_now)
    assert read_metadata(path)["recipe_hash"] == "again"
    files = standard.associated_files(open(path, "rb").read())
    assert files["labels.txt"].decode().split() == labels and files["vocab.txt"] == b"other\n"
    np.testing.assert_array_equal(_run(path), before)  # names and metadata only


def _run(path):
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    pixels = np.arange(np.prod(detail["shape"])).reshape(detail["shape"]) % 256
    interpreter.set_tensor(detail["index"], pixels.astype(detail["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.fixture(scope="module")
def photos(built_run, tmp_path_factory):
    """Test-split images of the session run as PNG files at the model's own size."""
    from tledge.run_inputs import run_splits
    folder = tmp_path_factory.mktemp("photos")
    splits = run_splits(built_run[0])
    paths = []
    for index in range(24):
        path = folder / f"{index:02d}.png"
        Image.fromarray(np.asarray(splits.x_test[index])).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("name, tolerance", [("tflite_fp32", 1e-5),
                                             ("tflite_int8", 1 / 256 + 1e-6)])
def test_mediapipe_image_classifier_agrees_with_tledge_predict(built_run, photos, name,
                                                               tolerance):
    """MediaPipe Tasks runs the file as exported: labels from the packed labels.txt, the same
    top class and scores (within one quantization step for int8) as `tledge predict`."""
    import mediapipe
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions
    from tledge.predict import predict_files
    paths, labels = entries(built_run[0])
    ours = predict_files(photos, paths[name], top_k=len(labels))
    options = vision.ImageClassifierOptions(
        base_options=BaseOptions(model_asset_path=str(paths[name])), max_results=len(labels))
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for photo, mine in zip(photos, ours):
            found = classifier.classify(mediapipe.Image.create_from_file(str(photo)))
            theirs = {category.category_name: category.score
                      for category in found.classifications[0].categories}
            assert set(theirs) == set(labels)  # names, not indices
            expected = {row["label"]: row["probability"] for row in mine["top"]}
            for label, score in expected.items():
                assert abs(theirs[label] - score) <= tolerance, (photo, label, theirs, expected)
            best = max(theirs.values())  # the top class, allowing for exact ties
            assert abs(expected[mine["top"][0]["label"]] - best) <= tolerance
