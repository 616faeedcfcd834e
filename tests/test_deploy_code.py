"""The code a user copies to deploy: the README's Deploy section and each report's Deploy
part. Each Python snippet runs as written, in a process of its own, against a run laid out as
the quickstart's, and answers as `tledge predict` does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parent.parent / "README.md"


def deploy_snippets() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Deploy\n"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


SNIPPETS = deploy_snippets()
RUNTIME_OF = {"ai_edge_litert": "litert", "onnxruntime": "onnxruntime", "openvino": "openvino"}


def snippet_id(code: str) -> str:
    for runtime in ("ai_edge_litert", "onnxruntime", "openvino", "tledge"):
        if re.search(rf"^(import|from) {runtime}\b", code, flags=re.M):
            return runtime
    return "unknown"


def test_the_deploy_section_shows_each_python_runtime():
    assert sorted(map(snippet_id, SNIPPETS)) == ["ai_edge_litert", "onnxruntime", "openvino",
                                                 "tledge"]


@pytest.mark.parametrize("code", [code for code in SNIPPETS if snippet_id(code) in RUNTIME_OF],
                         ids=lambda code: snippet_id(code))
def test_the_readme_shows_the_code_the_reports_write(code):
    """One home for the deploy code: the README's snippet for a runtime is what a report
    writes for the quickstart's file in that runtime."""
    from tledge.report.deploy import pick_code
    name = re.search(r'models/quickstart/(model[\w.]+)"', code).group(1)
    _, written = pick_code(RUNTIME_OF[snippet_id(code)], f"models/quickstart/{name}",
                           "models/quickstart/manifest.json")
    assert code == written


@pytest.fixture(scope="module")
def deploy_dir(built_run, tmp_path_factory):
    """A folder laid out as a user's checkout after the quickstart: models/quickstart (the
    session's run) and photo.jpg, a photo of another size than the model's input."""
    from tledge.data.synthetic import generate
    folder = tmp_path_factory.mktemp("deploy")
    (folder / "models").mkdir()
    (folder / "models" / "quickstart").symlink_to(built_run[0], target_is_directory=True)
    pixels, _ = generate(["star"], 1, (56, 40), noise=0.05, seed=5)
    Image.fromarray(pixels[0]).save(folder / "photo.jpg", quality=92)
    return folder


def run_snippet(code, folder) -> tuple[str, float]:
    """Run `code` in a fresh Python in `folder`; the label and probability it printed last."""
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    label, probability = done.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    return label, float(probability)


def assert_predicts_alike(label, probability, photo, path, runtime=None):
    from tledge.predict import predict_files
    best = predict_files([photo], path, runtime=runtime)[0]["top"][0]
    assert label == best["label"]
    assert abs(probability - best["probability"]) <= 1e-4, (probability, best)


@pytest.mark.parametrize("code", SNIPPETS, ids=[snippet_id(code) for code in SNIPPETS])
def test_a_readme_snippet_runs_as_written_and_agrees_with_tledge_predict(code, deploy_dir):
    from tledge.predict import pick_artifact
    label, probability = run_snippet(code, deploy_dir)
    run_dir = deploy_dir / "models" / "quickstart"
    if snippet_id(code) == "tledge":
        path, runtime = pick_artifact(run_dir), None
    else:
        path = run_dir / re.search(r'models/quickstart/(model[\w.]+)"', code).group(1)
        runtime = RUNTIME_OF[snippet_id(code)]
    assert_predicts_alike(label, probability, deploy_dir / "photo.jpg", path, runtime)


def test_the_report_shows_the_picks_contract_and_code_that_runs_it(built_run, run_copy,
                                                                  deploy_dir):
    """The built run's report: its Deploy part names the pick's file and runtime, lists every
    artifact's input and output, and its code, run in the run's folder, classifies like
    `tledge predict` with the pick. Its paths are the run's own: the part reads the same
    wherever the run is."""
    import shutil
    from tledge.predict import pick_artifact
    from tledge.rundir import read_manifest
    text = (run_copy / "report.md").read_text(encoding="utf-8")
    part = text[text.index("\n## Deploy\n"):]
    part = part[:part.index("\n## ", 1)]
    pick = read_manifest(run_copy)["pick"]
    path = pick_artifact(run_copy)
    assert f"Ship `{path.name}` ({pick['artifact']}, the pick, in {pick['runtime']})" in part
    assert "| tflite_int8 | `model_int8.tflite` | `[1, 32, 32, 3] uint8 (scale 1, zero point " \
           "0)` | `[1, 8] uint8 (scale 0.00390625, zero point 0)` |" in part
    assert "| onnx_fp32 | `model_fp32.onnx` | `[1, 32, 32, 3] float32` | `[1, 8] float32` |" \
        in part
    assert str(built_run[0]) not in part  # written where it was built, read anywhere
    code = re.findall(r"```python\n(.*?)```", part, flags=re.S)
    assert len(code) == 1, part
    shutil.copy(deploy_dir / "photo.jpg", run_copy / "photo.jpg")
    label, probability = run_snippet(code[0], run_copy)
    assert_predicts_alike(label, probability, deploy_dir / "photo.jpg", path, pick["runtime"])
