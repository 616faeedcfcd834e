"""The report's Deploy part: what the pick (and every artifact) expects, and the code that
classifies one image with the pick in its runtime alone, without tledge.

The code is written for the run's own files and run by tests/test_deploy_code.py exactly as
the report shows it, against `tledge predict`; the README's Deploy section shows the same code
for the quickstart's files (a test holds them equal).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tledge.rundir import read_manifest

_OPEN_IMAGE = '''image = ImageOps.exif_transpose(Image.open("photo.jpg")).convert("RGB")'''

_CODE = {
    "litert": ("ai-edge-litert", '''import json

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from PIL import Image, ImageOps

labels = json.load(open({manifest}))["labels"]
interpreter = Interpreter(model_path={model})
interpreter.allocate_tensors()
source = interpreter.get_input_details()[0]
target = interpreter.get_output_details()[0]
height, width = source["shape"][1:3]
{open_image}
pixels = np.asarray(image.resize((width, height), Image.BILINEAR))  # stretched, 0-255
interpreter.set_tensor(source["index"], pixels[None].astype(source["dtype"]))
interpreter.invoke()
scores = interpreter.get_tensor(target["index"])[0]
scale, zero_point = target["quantization"]  # (0.0, 0) for a float output
probabilities = (scores.astype(np.float32) - zero_point) * scale if scale else scores
print(labels[probabilities.argmax()], round(float(probabilities.max()), 4))
'''),
    "onnxruntime": ("onnxruntime", '''import json

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

session = ort.InferenceSession({model},
                               providers=["CPUExecutionProvider"])
labels = json.loads(session.get_modelmeta().custom_metadata_map["tledge"])["labels"]
source = session.get_inputs()[0]
height, width = source.shape[1:3]
{open_image}
pixels = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32)
probabilities = session.run(None, {{source.name: pixels[None]}})[0][0]
print(labels[probabilities.argmax()], round(float(probabilities.max()), 4))
'''),
    "openvino": ("openvino", '''import json

import numpy as np
import openvino as ov
from PIL import Image, ImageOps

labels = json.load(open({manifest}))["labels"]
{compile}
height, width = (model.input(0).get_partial_shape()[axis].get_length() for axis in (1, 2))
{open_image}
pixels = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32)
probabilities = model(pixels[None])[model.output(0)][0]
print(labels[probabilities.argmax()], round(float(probabilities.max()), 4))
'''),
}


def pick_code(runtime: str, model_path: str, manifest_path: str,
              precision: str = "fp32") -> tuple[str, str] | None:
    """(the pip line, the Python code) that classifies photo.jpg with `model_path` (an IR:
    its .xml) in `runtime` alone, printing `label probability`; None for a runtime without
    one here (Keras: `tledge predict` or `tledge.Run(...).predict` run it). OpenVINO compiles
    a float artifact at f32, as tledge validated it, and an int8 one at its own choice."""
    if runtime not in _CODE:
        return None
    package, template = _CODE[runtime]
    model = json.dumps(str(model_path))
    compile_line = (f'model = ov.Core().compile_model({model}, "CPU")' if precision == "int8"
                    else f'model = ov.Core().compile_model({model}, "CPU",\n'
                         f'{" " * 32}{{"INFERENCE_PRECISION_HINT": "f32"}})')
    return (f"pip install {package} numpy pillow",
            template.format(model=model, manifest=json.dumps(str(manifest_path)),
                            open_image=_OPEN_IMAGE, compile=compile_line))


def contract_cells(spec) -> str:
    """One tensor of the input contract in words: `[1, 48, 48, 3] uint8 (scale 1, zero
    point 0)`."""
    if isinstance(spec, list):  # several outputs (tasks): each named
        return "; ".join(f"{item.get('name')}: {contract_cells(item)}" for item in spec)
    shape = ["1" if size in (-1, None) else str(size) for size in spec.get("shape", [])]
    words = f"[{', '.join(shape)}] {spec.get('dtype', '?')}"
    quantization = spec.get("quantization")
    if quantization:
        words += (f" (scale {quantization['scale']:g}, zero point "
                  f"{quantization['zero_point']})")
    return words


def section(run_dir, manifest, pick, pick_dir, md) -> list[str]:
    """## Deploy: the pick's contract and code, then every artifact's input and output."""
    run_dir = Path(run_dir)
    entries = [entry for entry in manifest["artifacts"] if entry.get("status", "ok") == "ok"]
    if not entries:
        return []
    lines = ["## Deploy", "",
             "Every artifact takes one RGB image as **raw pixels 0-255** (no mean, no std: the "
             "preprocessing is inside the graph), **stretched** to the input size (bilinear, "
             "the aspect ratio not kept, not cropped), as training saw it; it gives class "
             "probabilities in the order of `labels` in `manifest.json`, which each file also "
             "carries in its metadata.", ""]
    if pick:
        entry = next((item for item in _entries(pick_dir) if item["name"] == pick["artifact"]),
                     None)
        if entry is not None:
            lines += _pick_lines(run_dir, pick, pick_dir, entry, md)
    lines += ["| artifact | file | input | output |", "|---|---|---|---|"]
    for entry in entries:
        lines.append(f"| {md(entry['name'])} | {_code(entry['path'])} | "
                     f"{_code(contract_cells(entry.get('input', {})))} | "
                     f"{_code(contract_cells(entry.get('output', {})))} |")
    return lines + [""]


def _code(text) -> str:
    """A code span of a manifest value (a backtick inside could end it: dropped)."""
    return f"`{str(text).replace('`', '')}`"


def _entries(folder) -> list[dict]:
    return [entry for entry in read_manifest(folder)["artifacts"]
            if entry.get("status", "ok") == "ok"]


_PYTHON_CALL = "tledge.Run('.').predict('photo.jpg')"


def _pick_lines(run_dir, pick, pick_dir, entry, md) -> list[str]:
    # paths relative to the run directory: the report reads the same wherever the run is
    model_path = (Path(pick_dir).relative_to(run_dir) / entry["path"]).as_posix()
    manifest_path = (Path(pick_dir).relative_to(run_dir) / "manifest.json").as_posix()
    lines = [f"Ship {_code(model_path)} ({md(entry['name'])}, the pick, in "
             f"{md(pick['runtime'])}). In this run's folder, from the command line: "
             f"{_code('tledge predict photo.jpg --model .')}; from Python: "
             f"{_code(_PYTHON_CALL)}. On a device (a Raspberry "
             f"Pi, a Jetson): {_code('tledge bundle . --out bundle.zip')} packs the files with "
             "a script that checks and times them there.", ""]
    code = pick_code(pick["runtime"], model_path + ("/model.xml" if entry["family"] == "openvino"
                                                    else ""),
                     manifest_path, entry.get("precision", "fp32"))
    if code is None or isinstance(entry.get("output"), list):
        return lines
    pip, text = code
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return lines + [f"In Python without tledge (`{pip}`), one image, in this run's folder:",
                    "", f"{fence}python", text.rstrip(), fence, ""]
