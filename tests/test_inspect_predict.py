"""Self-describing artifacts, `tledge inspect` and `tledge predict`, on the shared built run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tledge.cli import main

CLASSES = ["circle", "square", "triangle", "cross", "ring", "star", "hbars", "checker"]
ARTIFACTS = ["model_fp32.tflite", "model_int8.tflite", "model_fp32.onnx", "model.keras"]


@pytest.fixture
def copied(built_run, tmp_path):
    """The built run's artifacts copied (the session's files are never modified)."""
    folder = tmp_path / "artifacts"
    folder.mkdir()
    for name in ARTIFACTS:
        shutil.copy(built_run[0] / name, folder / name)
    return folder


def _metadata(path, fmt_name, precision):
    from tledge.export.metadata import artifact_metadata
    from tledge.inspection import describe_file
    return artifact_metadata(labels=CLASSES, input_spec=describe_file(path)["input"],
                             recipe_hash="abc123", precision=precision, fmt_name=fmt_name)


def _litert_outputs(path, images):
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs = []
    for image in images:
        interpreter.set_tensor(source["index"], image[None].astype(source["dtype"]))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(target["index"]).copy())
    return np.concatenate(outputs)


@pytest.mark.parametrize("name,precision", [("model_fp32.tflite", "fp32"),
                                            ("model_int8.tflite", "int8")])
def test_tflite_metadata_is_read_back_from_the_file_alone_and_it_still_runs(
        copied, tmp_path, name, precision):
    from tledge.data.synthetic import generate
    from tledge.export.metadata import embed_tflite, read_metadata
    path = copied / name
    original = tmp_path / f"original_{name}"
    shutil.copy(path, original)
    assert read_metadata(path)["format"] == f"tflite_{precision}"  # the export embedded it
    metadata = _metadata(path, f"tflite_{precision}", precision)
    embed_tflite(path, metadata)
    embed_tflite(path, metadata)  # embedding again replaces, never duplicates
    alone = tmp_path / "alone" / name  # no manifest, no run directory
    alone.parent.mkdir()
    shutil.copy(path, alone)
    assert read_metadata(alone) == metadata
    assert metadata["input"]["value_range"] == [0, 255] and metadata["labels"] == CLASSES
    assert metadata["tledge_version"] and metadata["recipe_hash"] == "abc123"
    images, _ = generate(CLASSES[:4], 3, (32, 32), 0.08, seed=9)
    np.testing.assert_array_equal(_litert_outputs(alone, images),
                                  _litert_outputs(original, images))


def test_onnx_metadata_is_read_back_from_the_file_alone(copied):
    import onnx
    from tledge.export.metadata import embed_onnx, read_metadata
    path = copied / "model_fp32.onnx"
    metadata = _metadata(path, "onnx_fp32", "fp32")
    embed_onnx(path, metadata)
    assert read_metadata(path) == metadata
    model = onnx.load(str(path))
    props = {prop.key: prop.value for prop in model.metadata_props}
    assert props["labels"] == ",".join(CLASSES)
    # ONNX's standard image keys, as the input contract has it (onnx/docs/MetadataProps.md)
    assert props["Image.BitmapPixelFormat"] == "Rgb8"
    assert props["Image.ColorSpaceGamma"] == "SRGB"
    assert props["Image.NominalPixelRange"] == "NominalRange_0_255"
    assert model.graph.input[0].type.denotation == "IMAGE"
    onnx.checker.check_model(model, full_check=True)


def test_a_keras_file_has_no_embedded_metadata(copied):
    from tledge.export.metadata import read_metadata
    assert read_metadata(copied / "model.keras") is None


def test_embedding_in_a_file_that_is_not_tflite_is_an_export_error(tmp_path):
    from tledge.errors import ExportError
    from tledge.export.metadata import embed_tflite
    path = tmp_path / "bad.tflite"
    path.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ExportError, match="not a TFLite flatbuffer"):
        embed_tflite(path, {"labels": []})


def _inspect(path):
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return result, json.loads(result.stdout)


def test_inspect_int8_tflite(copied):
    info = _inspect(copied / "model_int8.tflite")[1]
    assert info["family"] == "tflite" and info["precision"] == "int8"
    # a .tflite declares the batch it was converted at (1): LiteRT.js cannot resize an input
    assert info["input"]["dtype"] == "uint8" and info["input"]["shape"] == [1, 32, 32, 3]
    assert info["input"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    assert info["output"]["dtype"] == "uint8" and info["output"]["shape"] == [1, 8]
    assert info["operators"] and "CONV_2D" in info["operators"]
    assert isinstance(info["not_on_xnnpack"], list)
    assert info["size_bytes"] == (copied / "model_int8.tflite").stat().st_size


def test_inspect_fp32_tflite_text_and_embedded_metadata(copied):
    from tledge.export.metadata import embed_tflite
    path = copied / "model_fp32.tflite"
    embed_tflite(path, _metadata(path, "tflite_fp32", "fp32"))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    for fragment in ("family     tflite", "precision fp32", "float32", "CONV_2D",
                     "not on XNNPACK", "labels     8: circle, square", "abc123"):
        assert fragment in result.output, (fragment, result.output)


def test_inspect_onnx(copied):
    info = _inspect(copied / "model_fp32.onnx")[1]
    assert info["family"] == "onnx" and info["precision"] == "fp32"
    assert info["input"] == {"name": "image", "shape": [-1, 32, 32, 3], "dtype": "float32"}
    assert info["operators"].get("Conv") and "not_on_xnnpack" not in info


def test_inspect_keras(copied):
    info = _inspect(copied / "model.keras")[1]
    assert info["family"] == "keras" and info["precision"] == "fp32"
    assert info["input"]["shape"] == [-1, 32, 32, 3] and info["output"]["shape"] == [-1, 8]
    assert info["operators"].get("Dense") and info["metadata"] is None


@pytest.mark.parametrize("name", ARTIFACTS)
def test_a_description_loads_as_a_manifest_entry(copied, name):
    from tledge.data.synthetic import generate
    from tledge.inspection import describe_file
    from tledge.runners import load
    images, _ = generate(CLASSES[:2], 2, (32, 32), 0.08, seed=3)
    probabilities = load(describe_file(copied / name), copied).predict(images)
    assert probabilities.shape == (4, 8)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=0.05)


@pytest.fixture(scope="module")
def shape_images(tmp_path_factory):
    """PNG files of known synthetic classes, written by the test."""
    from tledge.data.synthetic import generate
    folder = tmp_path_factory.mktemp("images")
    images, labels = generate(CLASSES, 3, (32, 32), 0.08, seed=11)
    paths = []
    for index, (image, label) in enumerate(zip(images, labels)):
        paths.append(folder / f"{index:02d}_{CLASSES[label]}.png")
        Image.fromarray(image).save(paths[-1])
    return paths, [CLASSES[label] for label in labels]


@pytest.mark.parametrize("name", ["model_int8.tflite", "model_fp32.tflite", "model_fp32.onnx"])
def test_predict_json_names_the_right_class_for_most_images(built_run, shape_images, name):
    paths, truth = shape_images
    result = CliRunner().invoke(main, ["predict", *map(str, paths), "--model",
                                       str(built_run[0] / name), "--top-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)  # JSON only on stdout
    assert [row["image"] for row in rows] == list(map(str, paths))
    assert all(len(row["top"]) == 3 for row in rows)
    probabilities = [item["probability"] for item in rows[0]["top"]]
    assert probabilities == sorted(probabilities, reverse=True)
    hits = sum(row["top"][0]["label"] == label for row, label in zip(rows, truth))
    assert hits >= 0.7 * len(truth), (hits, len(truth))


def test_predict_labels_come_from_embedded_metadata_when_the_file_travels_alone(
        copied, shape_images, tmp_path):
    from tledge.export.metadata import embed_tflite
    from tledge.predict import predict_files
    paths, _ = shape_images
    path = copied / "model_int8.tflite"
    renamed = [label.upper() for label in CLASSES]
    embed_tflite(path, {**_metadata(path, "tflite_int8", "int8"), "labels": renamed})
    rows = predict_files(paths[:3], path, top_k=8)
    assert {item["label"] for item in rows[0]["top"]} == set(renamed)
    import onnx
    bare = tmp_path / "bare.onnx"  # no metadata, no manifest: indices
    proto = onnx.load(str(copied / "model_fp32.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    rows = predict_files(paths[:1], bare, top_k=2)
    assert all(item["label"] == str(item["index"]) for item in rows[0]["top"])


def test_predict_text_output(built_run, shape_images):
    paths, _ = shape_images
    result = CliRunner().invoke(main, ["predict", str(paths[0]), "--model",
                                       str(built_run[0] / "model.keras"), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    header, image, *rest = result.output.splitlines()
    assert header == (f"model {built_run[0] / 'model.keras'}, runtime keras; each image "
                      "stretched to 32x32 (width x height), raw RGB 0-255")
    assert image == str(paths[0])  # already 32x32: nothing stretched
    assert rest[0].startswith("  1. ") and rest[1].startswith("  2. ") and len(rest) == 2


def test_predict_takes_folders_and_globs_and_keeps_going_past_a_bad_file(built_run,
                                                                        shape_images, tmp_path):
    """A folder gives its image files, a pattern the image files it matches; a file that is
    not an image, a folder without images and a pattern that matches nothing are rows with
    their error; every readable image is still classified, and the exit code is 1."""
    paths, truth = shape_images
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for path in paths[:3]:
        shutil.copy(path, folder / path.name)
    shutil.copy(paths[3], folder / "more" / paths[3].name)
    Image.open(paths[4]).resize((64, 40)).save(folder / "wide.png")  # stretched, not cropped
    (folder / "notes.txt").write_text("not an image, and not one by its name: skipped")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "empty").mkdir()
    run_dir = built_run[0]
    result = CliRunner().invoke(main, [
        "predict", str(folder), str(tmp_path / "nothing-*.png"), str(tmp_path / "empty"),
        str(folder / "**" / "*.png"), "--model", str(run_dir / "model_fp32.onnx"), "--json"])
    assert result.exit_code == 1, result.output
    rows = json.loads(result.stdout)
    found = sorted(str(path) for path in folder.rglob("*") if path.suffix in (".png", ".jpg"))
    pattern = sorted(str(path) for path in folder.rglob("*.png"))
    assert [row["image"] for row in rows] == found + [
        str(tmp_path / "nothing-*.png"), str(tmp_path / "empty")] + pattern
    errors = {row["image"]: row["error"] for row in rows if "error" in row}
    assert set(errors) == {str(folder / "broken.jpg"), str(tmp_path / "nothing-*.png"),
                           str(tmp_path / "empty")}
    assert "not a readable image" in errors[str(folder / "broken.jpg")]
    assert "matches no image file" in errors[str(tmp_path / "nothing-*.png")]
    assert "no image files" in errors[str(tmp_path / "empty")]
    classified = {row["image"]: row for row in rows if "error" not in row}
    assert len(classified) == 5 and all(row["runtime"] == "onnxruntime"
                                        for row in classified.values())
    assert classified[str(folder / "wide.png")]["original_size"] == [40, 64]
    # each row is its own image's answer: the error rows shift nothing
    from tledge.predict import predict_files
    for image, row in classified.items():
        alone = predict_files([image], run_dir / "model_fp32.onnx")[0]
        assert row["top"] == alone["top"], image
    assert "3 of 13 image(s) could not be classified" in result.stderr
    # the text output: the same rows, the error on its image's line, the stretch named
    result = CliRunner().invoke(main, ["predict", str(folder), "--model",
                                       str(run_dir / "model_fp32.onnx"), "--top-k", "1"])
    assert result.exit_code == 1
    assert f"{folder / 'broken.jpg'}: error: " in result.stdout
    assert f"{folder / 'wide.png'} (64x40, stretched)" in result.stdout


def test_predict_on_the_pick_of_a_run_in_another_runtime(built_run, shape_images):
    """`--model RUN` uses the run's pick and says which; `--runtime` runs it in another
    runtime of its format; a runtime that does not run the format is one line, exit 2."""
    from tledge.bench.stage import load_pick
    paths, _ = shape_images
    run_dir = built_run[0]
    pick = load_pick(run_dir)
    result = CliRunner().invoke(main, ["predict", str(paths[0]), "--model", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert f"({pick['artifact']}, the pick of {run_dir}), runtime {pick['runtime']};" in \
        result.output.splitlines()[0]
    onnx = str(run_dir / "model_fp32.onnx")
    result = CliRunner().invoke(main, ["predict", str(paths[0]), "--model", onnx,
                                       "--runtime", "openvino", "--json"])
    assert result.exit_code == 0, result.output
    in_openvino = json.loads(result.stdout)[0]
    result = CliRunner().invoke(main, ["predict", str(paths[0]), "--model", onnx, "--json"])
    in_ort = json.loads(result.stdout)[0]
    assert (in_openvino["runtime"], in_ort["runtime"]) == ("openvino", "onnxruntime")
    assert in_openvino["top"][0]["label"] == in_ort["top"][0]["label"]
    np.testing.assert_allclose([row["probability"] for row in in_openvino["top"]],
                               [row["probability"] for row in in_ort["top"]], atol=1e-4)
    _one_line_error(CliRunner().invoke(main, ["predict", str(paths[0]), "--model", onnx,
                                              "--runtime", "litert"]),
                    "runtime 'litert' does not run onnx files", "onnxruntime")


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_predict_on_a_file_that_is_not_an_image(built_run, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is text, not pixels")
    result = CliRunner().invoke(main, ["predict", str(fake), "--model",
                                       str(built_run[0] / "model_int8.tflite")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{fake}: error: not a readable image (" in result.stdout
    assert result.stderr.strip() == f"1 of 1 image(s) could not be classified: {fake}"


def test_predict_refuses_an_input_it_cannot_feed_pixels_to(tmp_path):
    """An ONNX file whose input is int64 (not the input contract): one line, no runtime
    error from inside ONNX Runtime."""
    import onnx
    from onnx import helper, TensorProto
    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["scores"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("image", TensorProto.INT64, [None, 8, 8, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 8, 8, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "int64.onnx"))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "black.png")
    _one_line_error(CliRunner().invoke(main, ["predict", str(tmp_path / "black.png"), "--model",
                                              str(tmp_path / "int64.onnx")]),
                    "its input is int64", "float32")


@pytest.mark.parametrize("command", [["inspect"], ["predict", "x.png", "--model"]])
def test_an_unknown_artifact_suffix(tmp_path, command):
    artifact = tmp_path / "model.pt"
    artifact.write_bytes(b"\0" * 16)
    _one_line_error(CliRunner().invoke(main, [*command, str(artifact)]),
                    "unknown artifact kind '.pt'", ".tflite")


@pytest.mark.parametrize("command", [["inspect"], ["predict", "x.png", "--model"]])
def test_a_missing_artifact(tmp_path, command):
    artifact = tmp_path / "absent.tflite"
    _one_line_error(CliRunner().invoke(main, [*command, str(artifact)]),
                    str(artifact), "no such artifact file")


def test_a_corrupt_tflite(tmp_path):
    artifact = tmp_path / "broken.tflite"
    artifact.write_bytes(b"garbage that is no flatbuffer")
    _one_line_error(CliRunner().invoke(main, ["inspect", str(artifact)]), "not a TFLite")


def test_a_keras_file_that_needs_unsafe_deserialization_is_refused(tmp_path, shape_images):
    import keras
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Lambda(lambda pixels: pixels * 2.0)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    for command in (["inspect", str(path)],
                    ["predict", str(shape_images[0][0]), "--model", str(path)]):
        _one_line_error(CliRunner().invoke(main, command),
                        str(path), "tledge never enables unsafe deserialization")
