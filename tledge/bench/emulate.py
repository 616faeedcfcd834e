"""Edge proof without a board: a run's device check on an emulated arm64 userland.

`tledge emulate RUN --arch arm64` bundles the run, prepares (once, then cached) a Debian arm64
userland with qemu-user, installs in it the aarch64 wheels of the runtimes pinned to this
machine's versions, runs the bundle's bench_device.py inside it, and imports the result under
a device name that says "emulated". What it is for: int8 kernels differ by architecture
(LiteRT's XNNPACK on x86 and on ARM round differently), so an artifact's parity measured on the
build machine may not hold on the device; the emulated outputs are the ARM kernels' outputs.
Its latencies are the emulator's and are marked so.

Needs, on the build machine: Debian's `qemu-user-static` and `debootstrap`, root (a chroot),
and the kernel's binfmt_misc (enabled here for qemu-aarch64 when it is not). The userland is
Debian's minimal base with python3, unpacked from its packages (no second stage to run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from tledge.bench.bundle import import_device_result, write_bundle
from tledge.core.machine import runtime_versions
from tledge.errors import BundleError, first_line
from tledge.pipeline import require_current

ARCHES = {"arm64": {"debian": "arm64", "qemu": "qemu-aarch64-static", "binfmt": "qemu-aarch64",
                    "machine": "aarch64"}}
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
INSTALL = "apt-get install qemu-user-static debootstrap"
RUNTIME_WHEELS = ("numpy", "ai_edge_litert", "onnxruntime")  # OpenVINO has no aarch64 need here


class EmulationError(BundleError):
    """The emulated userland cannot be prepared or run here; the message says what to do."""


def emulate(run_dir, *, arch="arm64", name=None, images=0, cache=None, unvalidated=False,
            log=print) -> dict:
    """Bundle `run_dir`, run its device check on an emulated `arch` userland, import the
    result; returns {"device": name, "result": stored entry, "seconds": {step: seconds}}.
    The run's artifacts must be validated as they are, unless `unvalidated`."""
    spec = ARCHES.get(arch)
    if spec is None:
        raise EmulationError(f"--arch {arch}: expected one of {', '.join(ARCHES)}")
    if not unvalidated:  # before minutes of preparing a userland
        require_current(run_dir, "validate", using=f"emulate {run_dir}")
    qemu = check_tools(spec)
    enable_binfmt(spec, qemu, log)
    cache = Path(cache or Path(os.environ.get("TLEDGE_EMULATE_DIR")
                               or Path.home() / ".cache" / "tledge" / "emulate")) / arch
    seconds = {}
    start = time.perf_counter()
    rootfs, cached = userland(cache, spec, log)
    seconds["userland (cached)" if cached else "userland"] = time.perf_counter() - start
    start = time.perf_counter()
    site, cached = runtime_wheels(cache, spec, python_version(rootfs), log)
    seconds["wheels (cached)" if cached else "wheels"] = time.perf_counter() - start
    device = name or f"{arch} (emulated)"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tledge-emulate-") as folder:
        zipped = write_bundle(run_dir, Path(folder) / "bundle.zip", image_count=images,
                              unvalidated=unvalidated, log=lambda line: None)
        result = run_bundle(rootfs, site, zipped, device, log, spec)
        seconds["check"] = time.perf_counter() - start
        stored = import_device_result(run_dir, result)
    for step, value in seconds.items():
        log(f"emulate: {step}: {value:.0f} s")
    return {"device": device, "result": stored, "seconds": seconds}


def check_tools(spec) -> str:
    """The qemu-user binary; an EmulationError naming what to install otherwise."""
    qemu = shutil.which(spec["qemu"])
    missing = [package for package, tool in (("qemu-user-static", qemu),
                                             ("debootstrap", shutil.which("debootstrap")))
               if not tool]
    if missing:
        raise EmulationError(f"emulating {spec['debian']} needs {' and '.join(missing)} "
                             f"(Debian/Ubuntu: {INSTALL})")
    if os.geteuid() != 0:
        raise EmulationError("emulating a device runs its userland in a chroot, which needs "
                             "root; run tledge emulate as root (sudo)")
    return qemu


def binfmt_line(spec, qemu) -> str:
    """The binfmt_misc registration of qemu for `spec`'s ELF files, from the rule Debian's
    qemu-user-static ships, run by the static qemu itself and opened at registration (F),
    so it works inside a chroot that holds no qemu."""
    rule = Path(f"/usr/lib/binfmt.d/{spec['binfmt']}.conf")
    try:
        fields = rule.read_text().strip().split(":")
    except OSError:
        raise EmulationError(f"{rule} is missing: reinstall qemu-user-static ({INSTALL})") \
            from None
    fields[6], fields[7] = qemu, "F"  # :name:type:offset:magic:mask:interpreter:flags
    return ":".join(fields)


def enable_binfmt(spec, qemu, log) -> None:
    """Make the kernel run `spec`'s binaries through qemu (binfmt_misc), unless it does."""
    entry = BINFMT / spec["binfmt"]
    if entry.is_file() and entry.read_text().startswith("enabled"):
        return
    try:
        if not (BINFMT / "register").exists():
            subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                           check=True, capture_output=True, text=True)
        if entry.exists():
            entry.write_text("1")
        else:
            (BINFMT / "register").write_text(binfmt_line(spec, qemu))
    except (OSError, subprocess.CalledProcessError) as error:
        raise EmulationError(f"cannot enable binfmt_misc for {spec['binfmt']} "
                             f"({first_line(error)}); a container needs --privileged, or "
                             "enable it on the host (binfmt-support: update-binfmts --enable "
                             f"{spec['binfmt']})") from None
    log(f"emulate: binfmt_misc runs {spec['machine']} binaries with {qemu}")


def userland(cache: Path, spec, log) -> tuple[Path, bool]:
    """(the cached Debian userland with python3, whether it was already there)."""
    rootfs = cache / "rootfs"
    if (rootfs / ".tledge-ready").is_file():
        return rootfs, True
    log(f"emulate: preparing a Debian {SUITE} {spec['debian']} userland in {rootfs} "
        "(once; downloads about 60 MB)")
    cache.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache))
    try:
        done = subprocess.run(["debootstrap", f"--arch={spec['debian']}", "--variant=minbase",
                               "--foreign", "--include=python3", SUITE, str(building), MIRROR],
                              capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
            raise EmulationError(f"debootstrap could not fetch {SUITE} {spec['debian']} from "
                                 f"{MIRROR} ({tail[0] if tail else 'exit ' + str(done.returncode)})")
        for package in sorted((building / "var/cache/apt/archives").glob("*.deb")):
            done = subprocess.run(["dpkg", "-x", str(package), str(building)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise EmulationError(f"cannot unpack {package.name} "
                                     f"({first_line(done.stderr)})")
        (building / ".tledge-ready").write_text(f"{SUITE} {spec['debian']}\n")
        shutil.rmtree(rootfs, ignore_errors=True)
        building.rename(rootfs)
    except OSError as error:
        raise EmulationError(f"cannot prepare the userland in {cache}: {error.strerror or error}") \
            from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return rootfs, False


def python_version(rootfs: Path) -> str:
    """"3.11" for the userland's python3."""
    try:
        target = os.readlink(rootfs / "usr/bin/python3")  # python3 -> python3.11
    except OSError:
        raise EmulationError(f"the userland in {rootfs} has no python3; delete that folder "
                             "and run tledge emulate again") from None
    return target.replace("python", "")


def platform_tags(machine: str) -> list[str]:
    """Every manylinux tag a Debian bookworm (glibc 2.36) userland takes, newest first."""
    return [f"manylinux_2_{minor}_{machine}" for minor in range(36, 16, -1)] + \
        [f"manylinux2014_{machine}", "any"]


def runtime_wheels(cache: Path, spec, version: str, log) -> tuple[Path, bool]:
    """(the folder of runtime packages for the userland, pinned to this machine's versions;
    whether it was cached)."""
    pinned = {module: value for module, value in runtime_versions().items()
              if module in RUNTIME_WHEELS}
    key = "-".join(f"{module}{value}" for module, value in sorted(pinned.items()))
    site = cache / f"site-py{version}-{key}"
    if (site / ".tledge-ready").is_file():
        return site, True
    log(f"emulate: installing {', '.join(f'{m} {v}' for m, v in pinned.items())} "
        f"({spec['machine']} wheels for Python {version})")
    flags = [argument for tag in platform_tags(spec["machine"])
             for argument in ("--platform", tag)]
    requirements = [f"{module.replace('_', '-')}=={value}" for module, value in pinned.items()]
    wheels = cache / "wheels"
    common = ["--only-binary=:all:", *flags, "--python-version", version,
              "--implementation", "cp", "--disable-pip-version-check", "-q"]
    shutil.rmtree(site, ignore_errors=True)
    for command in (["download", *common, "-d", str(wheels), *requirements],
                    ["install", *common, "--no-index", "--find-links", str(wheels),
                     "--target", str(site), *requirements]):
        done = subprocess.run([sys.executable, "-m", "pip", *command], capture_output=True,
                              text=True)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
            raise EmulationError(f"pip {command[0]} of the {spec['machine']} runtimes failed: "
                                 + (lines[-1] if lines else f"exit {done.returncode}"))
    (site / ".tledge-ready").write_text(" ".join(requirements) + "\n")
    return site, False


def run_bundle(rootfs: Path, site: Path, zipped: Path, device: str, log, spec) -> Path:
    """Run bench_device.py of the bundle inside the userland; returns its result.json."""
    inside = rootfs / "opt/tledge"
    shutil.rmtree(inside, ignore_errors=True)
    (inside / "bundle").mkdir(parents=True)
    shutil.copytree(site, inside / "site")
    with zipfile.ZipFile(zipped) as archive:
        archive.extractall(inside / "bundle")
    proc = rootfs / "proc"
    proc.mkdir(exist_ok=True)
    # /proc, so the script sees a CPU (the host's, and says it is emulated); never /sys,
    # whose host CPU lists made onnxruntime and LiteRT crash in the userland
    mounted = subprocess.run(["mount", "-t", "proc", "proc", str(proc)],
                             capture_output=True).returncode == 0
    log(f"emulate: running the bundle's check under qemu-user as {device!r}")
    try:
        command = ["chroot", str(rootfs), "/usr/bin/env", "-i", "HOME=/root",
                   "PYTHONPATH=/opt/tledge/site", "PATH=/usr/bin:/bin", "/bin/sh", "-c",
                   f"cd /opt/tledge/bundle && exec /usr/bin/python3 bench_device.py "
                   f"--name {_quote(device)}"]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as process:
            for line in process.stdout:
                if line.startswith("  ") or line.startswith(("note:", "wrote")):
                    log("  " + line.rstrip())
        if process.returncode != 0:
            raise EmulationError(f"bench_device.py ended with exit code {process.returncode} "
                                 "in the emulated userland")
    finally:
        if mounted and subprocess.run(["umount", str(proc)], capture_output=True).returncode:
            log(f"warning: could not unmount {proc}; unmount it (umount {proc}) before "
                "deleting the cache")
    result = inside / "bundle" / "result.json"
    if not result.is_file():
        raise EmulationError("bench_device.py wrote no result.json in the emulated userland")
    # the script tells emulation from /proc/cpuinfo, which a newer qemu fakes as an ARM
    # CPU's: what this command knows is written in, so no emulated figure passes as a device's
    document = json.loads(result.read_text(encoding="utf-8"))
    device = document.get("device") or {}
    device.update({"emulated": "qemu-user", "arch": device.get("arch") or spec["machine"]})
    if "emulated" not in str(device.get("cpu", "")):
        device["cpu"] = f"{device.get('arch')} emulated by qemu-user ({device.get('cpu', '?')})"
    result.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return result


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
