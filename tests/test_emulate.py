"""The device check on an emulated arm64 userland (qemu-user), for real where the machine can
(qemu-user-static, debootstrap, root, binfmt_misc, the Debian mirror and PyPI: `.ci/run`
installs the packages), and the pieces that decide whether and how it runs, everywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import invoke
from tledge.bench.emulate import (ARCHES, EmulationError, binfmt_line, check_tools,
                                  enable_binfmt, platform_tags)

SPEC = ARCHES["arm64"]
RULE = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")


def test_missing_tools_are_named_with_the_command_that_installs_them(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: neither tool is found
    with pytest.raises(EmulationError, match="needs qemu-user-static and debootstrap .*"
                                             "apt-get install qemu-user-static debootstrap"):
        check_tools(SPEC)


def test_wheels_are_asked_for_every_manylinux_tag_the_userland_takes():
    tags = platform_tags("aarch64")
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux_2_17_aarch64" in tags
    assert "manylinux2014_aarch64" in tags and tags[-1] == "any"


@pytest.mark.skipif(not RULE.is_file(), reason="qemu-user-static is not installed here (its "
                                               "binfmt rule is what is rewritten)")
def test_the_binfmt_rule_runs_the_static_qemu_opened_at_registration():
    line = binfmt_line(SPEC, "/usr/bin/qemu-aarch64-static")
    fields = line.split(":")
    assert fields[1] == "qemu-aarch64" and fields[6] == "/usr/bin/qemu-aarch64-static"
    assert fields[7] == "F"  # so a chroot without qemu inside runs arm64 binaries
    assert fields[4] == RULE.read_text().split(":")[4]  # the ELF magic Debian ships


def _why_not_here() -> str | None:
    """Why the emulated run cannot happen on this machine (None when it can)."""
    try:
        qemu = check_tools(SPEC)
        enable_binfmt(SPEC, qemu, log=lambda line: None)
    except EmulationError as error:
        return str(error)
    return None


def test_a_bundle_runs_on_emulated_arm64_and_comes_back_as_an_emulated_device(
        built_run, tmp_path, monkeypatch):
    reason = _why_not_here()
    if reason:
        pytest.skip(f"no emulated arm64 here: {reason}")
    monkeypatch.setenv("TLEDGE_EMULATE_DIR", str(tmp_path / "emulate"))
    # the run copied alone: no data cache (what it bundles are the images it carries)
    monkeypatch.setenv("TLEDGE_CACHE_DIR", str(tmp_path / "empty-cache"))
    run = shutil.copytree(built_run[0], tmp_path / "run")
    result = invoke("emulate", run, "--arch", "arm64", "--images", "24")
    if result.exit_code != 0 and ("debootstrap could not fetch" in result.output
                                  or "pip download" in result.output):
        pytest.skip(f"no package mirror reachable here: {result.output.strip()[-300:]}")
    assert result.exit_code == 0, result.output
    assert "emulate: userland:" in result.output and "emulate: check:" in result.output
    empty = tmp_path / "empty-cache"  # nothing was prepared: the carried images were bundled
    assert not empty.exists() or not any(empty.iterdir())
    device = json.loads((run / "devices.json").read_text())["devices"]["arm64 (emulated)"]
    assert device["device"]["emulated"] == "qemu-user"
    assert device["device"]["arch"] == "aarch64"
    assert "emulated by qemu-user" in device["device"]["cpu"]
    checks = {check["artifact"]: check for check in device["accuracy"]}
    assert set(checks) == {"tflite_fp32", "tflite_int8", "onnx_fp32"}
    for name, check in checks.items():
        assert check["images"] == 24 and "error" not in check, check
        if name.endswith("fp32"):  # float kernels agree across architectures
            assert check["agreement_with_host"] == 1.0 and check["max_difference"] < 1e-4
        else:  # int8: measured, in quantization steps, whatever the ARM kernels did
            assert check["difference_unit"] == "quantization steps"
            assert check["flipped_count"] == round((1 - check["agreement_with_host"]) * 24)
    report = (run / "report.md").read_text()
    assert "Emulated, not a device" in report and "### Across architectures" in report
    # a second run reuses the userland and the wheels (asked of the two steps themselves: a
    # second check under qemu would only time the emulator again)
    from tledge.bench.emulate import python_version, runtime_wheels, userland
    cache = tmp_path / "emulate" / "arm64"
    rootfs, cached = userland(cache, SPEC, lambda line: None)
    assert cached and rootfs.is_dir()
    site, cached = runtime_wheels(cache, SPEC, python_version(rootfs), lambda line: None)
    assert cached and site.is_dir()
