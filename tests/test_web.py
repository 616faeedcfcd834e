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


@pytest.fixture(scope="module")
def web_run(built_run, tmp_path_factory):
    """A copy of the session run benchmarked in both browser runtimes (parity first)."""
    from tledge.runners.web_runner import fetch_package, PACKAGES, unavailable
    from tledge.errors import RuntimeUnavailable
    reason = unavailable("cpu")
    if reason:
        pytest.skip(reason)  # .ci/run installs chromium and chromium-driver
    try:
        for package in PACKAGES.values():
            fetch_package(package)
    except RuntimeUnavailable as error:
        if "cannot download" in str(error):
            pytest.skip(f"the npm registry is not reachable here: {error}")
        raise
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


def test_a_file_litert_js_refuses_is_a_failed_row_with_its_reason(web_run):
    """LiteRT.js 2.5.3 has no way to resize an input, and tledge's .tflite files declare a
    dynamic batch (-1): it refuses them. That is a row that says so, not a crash, and the
    pick never takes it."""
    run_dir, _ = web_run
    parity = {(row["artifact"], row["runtime"]): row
              for row in json.loads((run_dir / "parity.json").read_text())["rows"]}
    for name in ("tflite_fp32", "tflite_int8"):
        row = parity[(name, "litert_web")]
        assert row["status"] == "failed" and "litert_web cannot run it" in row["problems"][0]
        assert "[-1, 32, 32, 3]" in row["problems"][0]
        assert parity[(name, "litert")]["status"] != "failed"  # natively it runs
    bench = json.loads((run_dir / "bench.json").read_text())
    assert bench["pick"] is None or bench["pick"]["runtime"] != "litert_web"


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
