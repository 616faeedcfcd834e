"""The browser as a runtime: the run's files in ONNX Runtime Web and LiteRT.js inside a real
headless Chromium, judged and timed like every runtime; the JavaScript packages fetched at
pinned versions and refused when their bytes are not the pinned ones."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

from conftest import invoke


def browser_or_skip() -> None:
    """Skip, saying why, where there is no headless Chromium or no way to the npm registry
    (.ci/run installs chromium and chromium-driver, and reaches the registry)."""
    from tledge.runners.web_runner import fetch_package, PACKAGES, unavailable
    from tledge.errors import RuntimeUnavailable
    reason = unavailable("cpu")
    if reason:
        pytest.skip(reason)
    try:
        for package in PACKAGES.values():
            fetch_package(package)
    except RuntimeUnavailable as error:
        if "cannot download" in str(error):
            pytest.skip(f"the npm registry is not reachable here: {error}")
        raise


@pytest.fixture(scope="module")
def web_run(built_run, tmp_path_factory):
    """A copy of the session run benchmarked in both browser runtimes (parity first)."""
    browser_or_skip()
    run_dir = shutil.copytree(built_run[0], tmp_path_factory.mktemp("web") / "run")
    result = invoke("bench", run_dir, "--runtime", "onnxruntime_web", "--runtime",
                    "litert_web")
    assert result.exit_code == 0, result.output
    return run_dir, result.output


def test_onnx_runtime_web_classifies_like_keras_and_is_timed_in_the_page(web_run):
    run_dir, output = web_run
    parity = {(row["artifact"], row["runtime"]): row
              for row in json.loads((run_dir / "parity.json").read_text())["rows"]}
    row = parity[("onnx_fp32", "onnxruntime_web")]
    # 120 test images cannot show fp32's 0.99 agreement: not enough evidence, every figure in
    assert row["status"] == "insufficient" and not row["problems"], row
    assert row["agreement"] == 1.0 and row["max_abs_diff"] < 1e-4
    assert row["executed"].startswith("Chromium ") and "onnxruntime 1.31.1" in row["executed"]
    assert ("onnx_fp32", "onnxruntime") in parity  # the native rows are judged as before
    bench = json.loads((run_dir / "bench.json").read_text())
    [timed] = [row for row in bench["rows"] if row["runtime"] == "onnxruntime_web"]
    assert timed["status"] == "ok" and timed["p50_ms"] > 0 and timed["runs"] >= 5
    assert "wasm-simd" in timed["executed"]
    assert timed["peak_rss_mb"] is None  # the browser's memory is not this process's
    assert "parity in onnxruntime_web, litert_web first" in output


def test_litert_js_runs_the_tflite_files_as_the_native_interpreter_does(web_run):
    """The same XNNPACK kernels compiled to WebAssembly: fp32 answers as LiteRT natively does,
    to float rounding. int8 is integer arithmetic in both, but WebAssembly's SIMD is the same
    on every CPU while the native kernels are chosen by this CPU's ISA (AVX2, AVX-512 VNNI):
    a requantization can round otherwise, so int8 may differ on an image or two."""
    run_dir, _ = web_run
    parity = {(row["artifact"], row["runtime"]): row
              for row in json.loads((run_dir / "parity.json").read_text())["rows"]}
    for name in ("tflite_fp32", "tflite_int8"):
        web = parity[(name, "litert_web")]
        assert not web["problems"] and "litert 2.5.3" in web["executed"], web
    web, native = parity[("tflite_fp32", "litert_web")], parity[("tflite_fp32", "litert")]
    assert (web["status"], web["agreement"]) == (native["status"], native["agreement"])
    assert web["max_abs_diff"] < 1e-4
    web, native = parity[("tflite_int8", "litert_web")], parity[("tflite_int8", "litert")]
    images = json.loads((run_dir / "parity.json").read_text())["images"]
    assert abs(web["agreement"] - native["agreement"]) <= 2 / images
    bench = json.loads((run_dir / "bench.json").read_text())
    assert {row["artifact"] for row in bench["rows"]
            if row["runtime"] == "litert_web" and row["status"] == "ok"} == {"tflite_fp32",
                                                                             "tflite_int8"}


def test_a_dynamic_batch_is_what_litert_js_refuses_so_tledge_declares_batch_one(web_run,
                                                                              tmp_path):
    """The converter writes the batch as -1 (any); LiteRT.js cannot resize an input and
    refuses such a file. tledge's .tflite declares the batch it was converted at (1), and
    the interpreter still runs a batch of 4 by resizing."""
    import numpy as np
    from tledge.export.tflite import export_tflite
    from tledge.inspection import describe_file
    from tledge.model import load_model
    from tledge.runners import load
    run_dir, _ = web_run
    raw = tmp_path / "raw.tflite"
    export_tflite(load_model(run_dir / "model.keras"), raw, precision="fp32")  # no embed
    entry = {**describe_file(raw), "family": "tflite", "path": raw.name}
    runner = load(entry, tmp_path, "litert_web", threads=1)
    try:
        with pytest.raises(RuntimeError, match=r"does not match expected ranked tensor type "
                                               r"Float32\[-1, 32, 32, 3\]"):
            runner.predict(np.zeros((1, 32, 32, 3), np.uint8))
    finally:
        runner.close()
    shipped = describe_file(run_dir / "model_fp32.tflite")
    assert shipped["input"]["shape"] == [1, 32, 32, 3]
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    native = load({**shipped, "family": "tflite", "path": "model_fp32.tflite"}, run_dir,
                  "litert").predict(images)
    assert native.shape == (4, 8)


def _tarball(files: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_a_package_is_unpacked_only_when_its_bytes_are_the_pinned_ones(tmp_path, monkeypatch):
    from tledge.errors import RuntimeUnavailable
    from tledge.runners.web_runner import _integrity, fetch_package, Package
    monkeypatch.setenv("TLEDGE_WEB_CACHE", str(tmp_path))
    data = _tarball({"dist/x.js": b"export const x = 1;\n"})
    good = Package("@scope/x", "1.0.0", _integrity(data), ("dist/x.js",))
    (tmp_path / good.tarball).write_bytes(data)  # put there by hand, as offline users do
    folder = fetch_package(good)
    assert (folder / "dist" / "x.js").read_bytes() == b"export const x = 1;\n"
    tampered = Package("@scope/x", "1.0.1", good.integrity, ("dist/x.js",))
    (tmp_path / tampered.tarball).write_bytes(_tarball({"dist/x.js": b"evil();\n"}))
    with pytest.raises(RuntimeUnavailable, match="sha512 is not the one tledge pins"):
        fetch_package(tampered)
    assert not (tmp_path / tampered.folder_name).exists()


def test_offline_the_message_says_what_to_download_and_where(tmp_path, monkeypatch):
    from tledge.errors import RuntimeUnavailable
    from tledge.runners.web_runner import fetch_package, PACKAGES
    monkeypatch.setenv("TLEDGE_WEB_CACHE", str(tmp_path))
    monkeypatch.setenv("TLEDGE_NPM_REGISTRY", "http://127.0.0.1:9")  # nothing listens there
    package = PACKAGES["onnxruntime-web"]
    with pytest.raises(RuntimeUnavailable) as error:
        fetch_package(package)
    assert f"http://127.0.0.1:9/onnxruntime-web/-/{package.tarball}" in str(error.value)
    assert str(tmp_path / package.tarball) in str(error.value)


def test_the_bundles_web_page_classifies_a_picture_as_tledge_predict(web_run, tmp_path):
    """web/ served as its README says (`python3 -m http.server`), opened in headless Chromium,
    given a picture through its file input: the label it shows is `tledge predict`'s."""
    import socket
    import subprocess
    import sys
    import time
    import zipfile
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from tledge.data.synthetic import generate
    from tledge.predict import predict_files
    from tledge.runners.web_runner import _start_chromium
    run_dir, _ = web_run
    result = invoke("bundle", run_dir, "--out", tmp_path / "bundle.zip")
    assert result.exit_code == 0, result.output
    zipfile.ZipFile(tmp_path / "bundle.zip").extractall(tmp_path / "bundle")
    web = tmp_path / "bundle" / "web"
    document = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    readme = (tmp_path / "bundle" / "README.txt").read_text()
    assert "cd web && python3 -m http.server 8000" in readme
    shown = next(item for item in document["artifacts"] if item["name"] == document["pick"])
    assert (web / shown["file"].split("/")[-1]).is_file()  # the pick, beside its page
    # at the model's own size: the page's canvas and tledge's loader then feed the same pixels.
    # `tledge predict` runs the file in the page's runtime: WebAssembly's int8 kernels are the
    # same on every CPU, the native ones differ by ISA (a near tie could flip natively)
    pixels, _ = generate(["star", "ring", "cross"], 1, (32, 32), noise=0.05, seed=7)
    photos = []
    for number, image in enumerate(pixels):
        photos.append(tmp_path / f"photo{number}.png")
        Image.fromarray(image).save(photos[-1])
    from tledge.bench.bundle import WEB_RUNTIMES
    expected = predict_files(photos, run_dir / shown["file"].split("/")[-1],
                             runtime=WEB_RUNTIMES[shown["family"]])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                               "127.0.0.1"], cwd=web, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    browser = None
    try:
        time.sleep(1)
        browser = _start_chromium()
        browser.get(f"http://127.0.0.1:{port}/")
        status = lambda driver: driver.find_element(By.ID, "status").text  # noqa: E731
        WebDriverWait(browser, 120).until(lambda driver: status(driver) != "Loading the model…")
        assert status(browser) == "Ready: choose a picture.", status(browser)
        for photo, answer in zip(photos, expected):
            browser.find_element(By.ID, "file").send_keys(str(photo))
            WebDriverWait(browser, 60).until(lambda driver: status(driver) == "Done.")
            assert browser.find_element(By.ID, "label").text == answer["top"][0]["label"]
            browser.execute_script("document.getElementById('status').textContent = ''")
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
                  and entry["source"] != "console-api"]  # LiteRT logs INFO lines as errors
        assert not errors, errors
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(10)
