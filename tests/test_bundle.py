"""`tledge bundle`, the bundle's bench_device.py run as on a device, and `bench --import`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import assert_usage_error, invoke


def unpack(run_dir, tmp_path, *options):
    out = tmp_path / "bundle.zip"
    result = invoke("bundle", run_dir, "--out", out, *options)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "device"
    with zipfile.ZipFile(out) as archive:
        archive.extractall(folder)
    return folder


def bench_on_device(folder, *options):
    """The bundle's script as a device runs it: isolated (-I: no tledge, no site-packages of
    the user), from its own folder, against whatever runtimes are installed."""
    done = subprocess.run([sys.executable, "-I", "bench_device.py", "--min-runs", "3",
                           "--min-seconds", "0", "--threads", "1", *options],
                          cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads((folder / "result.json").read_text()), done.stdout


@pytest.fixture(scope="module")
def device_result(built_run, tmp_path_factory):
    run_dir, _, _ = built_run
    tmp_path = tmp_path_factory.mktemp("bundle")
    folder = unpack(run_dir, tmp_path, "--images", "24")
    result, printed = bench_on_device(folder, "--name", "bench-pi")
    return folder, result, printed


def test_bundle_holds_what_the_device_needs(built_run, device_result):
    run_dir, _, _ = built_run
    folder, _, _ = device_result
    manifest = json.loads((run_dir / "manifest.json").read_text())
    bundle = json.loads((folder / "bundle.json").read_text())
    device_formats = {"tflite", "onnx"}
    expected = {entry["name"] for entry in manifest["artifacts"]
                if entry["family"] in device_formats}
    assert {entry["name"] for entry in bundle["artifacts"]} == expected  # no .keras
    from tledge.rundir import sha256
    import numpy as np
    outputs = np.load(folder / bundle["host_outputs"])
    for entry in bundle["artifacts"]:
        assert sha256(folder / entry["file"]) == entry["sha256"]
        assert len(outputs[entry["name"]]) == 24  # the build machine's raw outputs
    images = np.load(folder / "images.npy")
    assert images.dtype == np.uint8 and images.shape == (24, 32, 32, 3)
    # stratified: 24 images of 8 classes are 3 of each (the split is sorted by class: its
    # first 24 were 2 classes)
    assert sorted(np.bincount(bundle["images"]["expected"]).tolist()) == [3] * 8
    assert (folder / "labels.txt").read_text().split() == manifest["labels"]
    assert "python3 bench_device.py" in (folder / "README.txt").read_text()


def test_device_script_times_and_checks_every_artifact(built_run, device_result):
    folder, result, printed = device_result
    bundle = json.loads((folder / "bundle.json").read_text())
    assert result["format"] == "tledge-device-bench" and result["device"]["name"] == "bench-pi"
    assert result["device"]["cores"] >= 1 and result["device"]["python"]
    versions = result["device"]["runtimes"]
    assert {"numpy", "ai_edge_litert", "onnxruntime"} <= set(versions)
    import ai_edge_litert
    import onnxruntime
    # the version of the module that runs (onnxruntime-gpu holds `onnxruntime` under another
    # distribution name), not a distribution's metadata
    assert versions["onnxruntime"] == onnxruntime.__version__
    assert versions["ai_edge_litert"] == ai_edge_litert.__version__
    rows = {row["artifact"]: row for row in result["rows"]}
    assert set(rows) == {entry["name"] for entry in bundle["artifacts"]}
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert row["runtime"] == ("onnxruntime" if name.startswith("onnx") else "ai_edge_litert")
        assert row["runs"] >= 3 and 0 < row["min_ms"] <= row["p50_ms"] <= row["p99_ms"]
        assert row["peak_rss_mb"] > row["runtime_rss_mb"] > 0  # measured in its own process
        assert row["gflops_per_second"] > 0
    for check in result["accuracy"]:
        # the same file in the same runtime on the same machine gives the same outputs
        assert check["agreement_with_host"] == 1.0, check
        assert check["accuracy"] == check["host_accuracy"]
        assert check["max_difference"] == 0.0 and check["flipped"] == [], check
        assert check["difference_unit"] == ("quantization steps" if check["artifact"] ==
                                            "tflite_int8" else "absolute")
    assert "accuracy" in printed and "wrote result.json" in printed


def test_device_script_is_python_3_9_and_needs_only_numpy_and_a_runtime(device_result):
    """bench_device.py, classify.py and tledge.core, copied whole and unchanged as
    tledge_core/: Python 3.9, and nothing but the standard library, numpy, a runtime and the
    package itself (classify.py also Pillow, to read image files, and OpenCV for a camera)."""
    import tledge.core
    folder, _, _ = device_result
    package = Path(tledge.core.__file__).parent
    copied = sorted(path.name for path in (folder / "tledge_core").glob("*.py"))
    assert copied == sorted(path.name for path in package.glob("*.py"))
    for name in copied:
        assert (folder / "tledge_core" / name).read_bytes() == (package / name).read_bytes()
    allowed = set(sys.stdlib_module_names) | {"numpy", "ai_edge_litert", "tflite_runtime",
                                              "onnxruntime", "openvino", "tledge_core"}
    reader = {"classify.py": {"PIL", "cv2"}}
    for path in [folder / "bench_device.py", folder / "classify.py",
                 *(folder / "tledge_core").glob("*.py")]:
        tree = ast.parse(path.read_text(), feature_version=(3, 9))  # a SyntaxError fails
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = ["tledge_core"] if node.level else [node.module]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] in allowed | reader.get(path.name, set()), \
                    (path.name, module)


def test_device_script_skips_a_runtime_it_does_not_have_and_reports_a_crash(device_result,
                                                                             tmp_path):
    import shutil
    folder = shutil.copytree(device_result[0], tmp_path / "copy")
    (folder / "result.json").unlink()
    broken = next(folder.glob("artifacts/*.onnx"))
    broken.write_bytes(broken.read_bytes()[:1000])  # truncated in transfer
    result, printed = bench_on_device(folder, "--runtime", "onnxruntime")
    rows = {row["artifact"]: row for row in result["rows"]}
    for name, row in rows.items():
        if name.startswith("tflite"):
            assert row["status"] == "skipped" and "onnxruntime does not run .tflite" in \
                row["reason"]
        else:
            assert row["status"] == "failed" and row["reason"], row
    assert "is not the file that was bundled" in printed
    checks = {check["artifact"]: check for check in result["accuracy"]}
    assert "error" in checks[broken.stem.replace("model_", "onnx_")]  # a row, not a crash
    assert (folder / "result.json").is_file()


def test_a_runtime_that_kills_the_check_costs_its_row_only(device_result, tmp_path):
    """A runtime that segfaults (seen with a foreign userland's /sys under qemu-user) dies in
    a child process: its check is a failed row, and result.json is written all the same."""
    import shutil
    folder = shutil.copytree(device_result[0], tmp_path / "copy")
    (folder / "result.json").unlink()
    script = folder / "tledge_core" / "device.py"
    text = script.read_text()
    script.write_text(text.replace(  # the check of one artifact dies the hardest way
        "def check_one(job: dict) -> dict:\n",
        "def check_one(job: dict) -> dict:\n    if job['entry']['name'] == 'tflite_int8':\n"
        "        os.kill(os.getpid(), 11)\n"))
    result, printed = bench_on_device(folder, "--runtime", "ai_edge_litert")
    checks = {check["artifact"]: check for check in result["accuracy"]}
    assert "the benchmark process died" in checks["tflite_int8"]["error"]
    assert checks["tflite_fp32"]["agreement_with_host"] == 1.0
    assert "accuracy check failed" in printed


def test_bench_device_names_the_cpu_it_sees_and_says_when_it_is_emulated():
    from tledge.core.machine import cpu_facts
    pi = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
          "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd08\n"
          "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
    assert cpu_facts(pi, "aarch64") == {"cpu": "ARM Cortex-A72", "isa": "NEON"}
    host = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
            "flags\t\t: fpu sse sse2 avx avx2\n")
    emulated = cpu_facts(host, "aarch64")  # qemu-user: the userland sees the host's file
    assert emulated["emulated"] == "qemu-user"
    assert emulated["cpu"] == "aarch64 emulated by qemu-user on AMD EPYC 7B13"
    assert "AVX2" in emulated["isa"] and "emulated" in emulated["isa"]
    assert "emulated" not in cpu_facts(host, "x86_64")


def test_an_emulated_device_is_marked_in_the_report(run_copy, device_result, tmp_path):
    folder, result, _ = device_result
    emulated = json.loads(json.dumps(result))
    emulated["device"].update({"name": "qemu-arm64", "emulated": "qemu-user",
                               "arch": "aarch64",
                               "cpu": "aarch64 emulated by qemu-user on AMD EPYC"})
    path = tmp_path / "result.json"
    path.write_text(json.dumps(emulated))
    assert invoke("bench", run_copy, "--import", path).exit_code == 0
    section = (run_copy / "report.md").read_text().split("## On devices")[1]
    assert "### qemu-arm64 (emulated: qemu-user)" in section
    assert "latencies are the emulator's" in section
    assert "largest output difference" in section


def test_import_stores_the_device_beside_bench_json_and_in_the_report(run_copy,
                                                                      device_result):
    folder, result, _ = device_result
    answer = invoke("bench", run_copy, "--import", folder / "result.json")
    assert answer.exit_code == 0, answer.output
    assert "imported bench-pi" in answer.output
    before = (run_copy / "bench.json").read_bytes()
    devices = json.loads((run_copy / "devices.json").read_text())
    assert devices["devices"]["bench-pi"]["rows"] == result["rows"]
    assert (run_copy / "bench.json").read_bytes() == before  # one writer: the bench stage
    report = (run_copy / "report.md").read_text()
    section = report[report.index("## On devices"):]
    assert "### bench-pi" in section
    for row in result["rows"]:
        assert f"| {row['artifact']} | {row['runtime']} | 1 | 1 | ok |" in section
        assert f"{row['p50_ms']:.3f}" in section

    assert "int8 kernels differ" not in section  # the same CPU: the same int8 kernels

    # a new bench on this machine keeps what the devices measured
    answer = invoke("bench", run_copy, "--runtime", "litert", "--threads", "1")
    assert answer.exit_code == 0, answer.output
    devices = json.loads((run_copy / "devices.json").read_text())
    assert set(devices["devices"]) == {"bench-pi"}
    assert json.loads((run_copy / "bench.json").read_text())["rows"]


def test_a_device_whose_int8_kernels_disagree_is_flagged(run_copy, device_result, tmp_path):
    """Another CPU's int8 kernels (no VNNI, an ARM core) can change top classes: the device's
    agreement with the build machine below 1 is named in the report. No second kind of CPU is
    at hand, so the device's answer is edited the way such a device would answer."""
    folder, result, _ = device_result
    changed = json.loads(json.dumps(result))
    for check in changed["accuracy"]:
        if check["artifact"] == "tflite_int8":
            check["agreement_with_host"] = 0.875
    path = tmp_path / "result.json"
    path.write_text(json.dumps(changed))
    answer = invoke("bench", run_copy, "--import", path)
    assert answer.exit_code == 0, answer.output
    report = (run_copy / "report.md").read_text()
    section = report[report.index("## On devices"):]
    assert "**int8 kernels differ**: on this device tflite_int8" in section, section
    assert "for 12.5% of the bundled images" in section
    parity = json.loads((run_copy / "parity.json").read_text())
    assert all(row["machine"] and "(" in row["machine"] for row in parity["rows"]
               if row["status"] != "skipped")


def malformed(result):
    broken = json.loads(json.dumps(result))
    broken["rows"][0]["p50_ms"] = "fast"
    return broken


def other_file(result):
    changed = json.loads(json.dumps(result))
    name = next(iter(changed["artifacts"]))
    changed["artifacts"][name] = "0" * 64
    return changed


def changed(path, value):
    """A result with one value replaced (`path`: keys and indexes down to it)."""
    def change(result):
        broken = json.loads(json.dumps(result))
        target = broken
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return broken
    return change


@pytest.mark.parametrize("content, fragments", [
    ("not json at all", ["is not JSON"]),
    ({"rows": [], "device": {"name": "x"}}, ["is not a tledge device benchmark"]),
    (malformed, ["rows[0].p50_ms: expected a number", "result.json"]),
    (other_file, ["measured a different", "make a new bundle"]),
    # what the report and the pick read: refused before it lands in devices.json
    (changed(("device", "runtimes"), "ai-edge-litert 2.3"), ["device.runtimes: expected"]),
    (changed(("device", "cpu"), ["ARM"]), ["device.cpu: expected text"]),
    (changed(("rows", 0, "colour"), "red"), ["rows[0]", "colour"]),
    (changed(("accuracy", 0, "flipped"), [3]), ["accuracy[0].flipped"]),
    (changed(("accuracy", 0, "agreement_with_host"), "all"), ["agreement_with_host: expected"]),
])
def test_import_rejects_what_is_not_a_device_result_of_this_run(run_copy, device_result,
                                                                 tmp_path, content, fragments):
    before = (run_copy / "bench.json").read_text()
    path = tmp_path / "result.json"
    if callable(content):
        content = content(device_result[1])
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert_usage_error(invoke("bench", run_copy, "--import", path), *fragments)
    assert (run_copy / "bench.json").read_text() == before  # nothing merged


def test_bundle_to_a_path_that_cannot_be_written(built_run, tmp_path):
    run_dir, _, _ = built_run
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_usage_error(invoke("bundle", run_dir, "--out", blocker / "bundle.zip"),
                       "cannot write to", "a_file")
    assert_usage_error(invoke("bundle", run_dir, "--out", tmp_path), "is a directory")


@pytest.mark.parametrize("names, fragment", [("keras", "runs .tflite and .onnx artifacts only"),
                                             ("tflite_fp16", "no artifact named 'tflite_fp16'")])
def test_bundle_refuses_artifacts_it_cannot_carry(built_run, tmp_path, names, fragment):
    run_dir, _, _ = built_run
    assert_usage_error(invoke("bundle", run_dir, "--artifacts", names, "--out",
                              tmp_path / "b.zip"), fragment)
    assert not (tmp_path / "b.zip").exists()


def test_bundle_of_chosen_artifacts_only(built_run, tmp_path):
    run_dir, _, _ = built_run
    folder = unpack(run_dir, tmp_path, "--artifacts", "tflite_int8,onnx_fp32", "--images", "4")
    bundle = json.loads((folder / "bundle.json").read_text())
    assert [entry["name"] for entry in bundle["artifacts"]] == ["tflite_int8", "onnx_fp32"]
    assert sorted(path.name for path in (folder / "artifacts").iterdir()) == \
        ["model_fp32.onnx", "model_int8.tflite"]


def test_bench_on_a_run_without_artifacts(run_copy):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["artifacts"] = []
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_usage_error(invoke("bench", run_copy), "has no artifacts to benchmark")
    assert_usage_error(invoke("bundle", run_copy, "--out", run_copy / "b.zip"),
                       "no .tflite or .onnx artifact")


def test_a_devices_record_damaged_by_hand_is_one_line_for_every_reader(run_copy, device_result):
    """devices.json edited by hand (runtimes as text) is refused by its one reader, in one
    line that says how to recover, by the report and by status alike: never a traceback."""
    path = run_copy / "devices.json"
    result = json.loads(json.dumps(device_result[1]))
    result["device"]["runtimes"] = "ai-edge-litert 2.3"
    path.write_text(json.dumps({"devices": {"pi": {
        key: result.get(key) for key in ("device", "settings", "rows", "accuracy", "artifacts",
                                         "measured", "bundle")}}}))
    outcome = invoke("report", run_copy)
    assert outcome.exit_code == 2 and "Traceback" not in outcome.output, outcome.output
    assert "devices.json is not what tledge writes" in outcome.output
    assert "device.runtimes" in outcome.output and "--import" in outcome.output


# -- classify.py: the bundle as an app starter ---------------------------------------------

def photos(folder):
    """Three synthetic photos at sizes other than the model's (stretched on the way in), and
    a file that is not an image."""
    from PIL import Image
    from tledge.data.synthetic import generate
    folder.mkdir()
    pixels, _ = generate(["star", "ring", "cross"], 1, (40, 56), noise=0.05, seed=7)
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"photo{index}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return sorted(folder.glob("photo*.png"))


def assert_classified_as_predict(rows, run_dir, bundle, artifact):
    from tledge.predict import predict_files
    entry = next(item for item in bundle["artifacts"] if item["name"] == artifact)
    for row in rows:
        theirs = predict_files([row["image"]], run_dir / Path(entry["file"]).name,
                               top_k=len(row["top"]))[0]
        assert [item["label"] for item in row["top"]] == \
            [item["label"] for item in theirs["top"]], row["image"]
        for ours, expected in zip(row["top"], theirs["top"]):
            assert abs(ours["probability"] - expected["probability"]) <= 1e-5, row["image"]
        assert row["ms"] > 0


def test_classify_in_the_bundle_answers_as_tledge_predict(built_run, device_result, tmp_path):
    """The bundle's classify.py, isolated from tledge as on a device: the run's pick by
    default, any artifact by name, a folder with a bad file in it (its row, exit 1)."""
    run_dir, _, _ = built_run
    folder, _, _ = device_result
    bundle = json.loads((folder / "bundle.json").read_text())
    pick = json.loads((run_dir / "manifest.json").read_text())["pick"]["artifact"]
    assert bundle["pick"] == pick
    images = photos(tmp_path / "photos")
    for artifact in (None, "onnx_fp32"):
        done = subprocess.run([sys.executable, "-I", "classify.py", str(tmp_path / "photos"),
                               "--json", "--top-k", "3", "--threads", "1",
                               *(["--artifact", artifact] if artifact else [])],
                              cwd=folder, capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stderr  # the bad file
        rows = json.loads(done.stdout)
        assert [row["image"] for row in rows] == \
            [str(tmp_path / "photos" / "broken.jpg")] + [str(path) for path in images]
        assert "not a readable image" in rows[0]["error"]
        assert {row["artifact"] for row in rows} == {artifact or pick}
        assert_classified_as_predict(rows[1:], run_dir, bundle, artifact or pick)
    done = subprocess.run([sys.executable, "-I", "classify.py", str(images[0])], cwd=folder,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    header, line, *top = done.stdout.splitlines()
    assert header.endswith("images stretched to 32x32") and pick in header
    assert line.startswith(f"{images[0]}  ") and line.endswith(" ms") and len(top) == 3


def test_a_fresh_venv_with_only_the_bundles_requirements_classifies_as_tledge_predict(
        built_run, device_result, tmp_path):
    """What a Raspberry Pi's user does: a new venv, `pip install -r requirements.txt` (the
    versions pinned are the ones installed here), then classify.py."""
    from tledge.core.machine import runtime_versions
    run_dir, _, _ = built_run
    folder, _, _ = device_result
    required = (folder / "requirements.txt").read_text().splitlines()
    versions = runtime_versions()
    assert f"numpy=={versions['numpy']}" in required
    assert f"ai-edge-litert=={versions['ai_edge_litert']}" in required
    assert f"onnxruntime=={versions['onnxruntime']}" in required
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", "-r", "requirements.txt"],
                          cwd=folder, capture_output=True, text=True, timeout=900)
    unreachable = ("NewConnectionError", "Temporary failure in name resolution",
                   "Network is unreachable", "Failed to establish a new connection")
    if done.returncode != 0 and any(text in done.stderr for text in unreachable):
        pytest.skip(f"no package index reachable here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True).stdout
    assert "tledge" not in {item["name"] for item in json.loads(listed)}
    images = photos(tmp_path / "photos")
    bundle = json.loads((folder / "bundle.json").read_text())
    done = subprocess.run([str(python), "-I", "classify.py", *map(str, images), "--json",
                           "--top-k", "3", "--threads", "1"],
                          cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_classified_as_predict(json.loads(done.stdout), run_dir, bundle, bundle["pick"])
