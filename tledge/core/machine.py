"""The facts of the machine a figure was measured on: CPU, its vector ISA (int8 kernels and
their results differ between AVX2, AVX-512 VNNI, AMX and ARM's dot-product extensions), cores,
OS, Python, a board's model, emulation, and the versions of the runtimes installed.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from .engines import ONNX_MODULES, TFLITE_MODULES

def machine_facts() -> dict:
    """CPU model, its vector ISA, cores, OS and Python of this machine; the board's model
    where it says; and whether it is emulated. The ISA matters: int8 kernels differ between
    AVX2, AVX-512 (VNNI) and ARM's dot-product extensions, and so do their speed and, at
    times, their results."""
    try:
        with open("/proc/cpuinfo") as handle:
            cpuinfo = handle.read()
    except OSError:
        cpuinfo = ""
    facts = cpu_facts(cpuinfo, platform.machine(), platform.processor())
    facts.update({"cores": os.cpu_count(), "system": platform.platform(),
                  "arch": platform.machine(), "python": platform.python_version()})
    try:  # a Raspberry Pi or a Jetson names itself here
        with open("/proc/device-tree/model", "rb") as handle:
            facts["model"] = handle.read().decode("utf-8", "replace").strip("\x00 \n")
    except OSError:
        pass
    return facts


# ARM's CPU part numbers (implementer 0x41) as people name them
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55",
             "0xd07": "Cortex-A57", "0xd08": "Cortex-A72", "0xd09": "Cortex-A73",
             "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1",
             "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
             "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710",
             "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2"}
ARM_ARCHES = ("aarch64", "arm64", "armv7l", "armv8l", "armv6l")


def cpu_facts(cpuinfo: str, arch: str, processor: str = "") -> dict:
    """{cpu, isa, emulated?} from /proc/cpuinfo as this machine shows it. An ARM userland under
    qemu-user sees the x86 host's /proc/cpuinfo: that is detected and said (`emulated`), the
    CPU named as the emulated one, so no figure passes as a device's."""
    lines = [line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line]
    fields = {}
    for key, value in lines:
        fields.setdefault(key.strip(), value.strip())
    flags = {flag for key, value in lines if key.strip() in ("flags", "Features")
             for flag in value.split()}
    x86_host = "vendor_id" in fields or "sse2" in flags
    if arch in ARM_ARCHES and x86_host:
        host = fields.get("model name", "an x86 CPU")
        return {"cpu": f"{arch} emulated by qemu-user on {host}",
                "isa": f"{arch} (emulated; the host has {cpu_isa(flags, 'x86_64')})",
                "emulated": "qemu-user"}
    if fields.get("CPU implementer") == "0x41" and fields.get("CPU part") in ARM_PARTS:
        cpu = f"ARM {ARM_PARTS[fields['CPU part']]}"
    else:
        cpu = fields.get("model name") or fields.get("Model") or fields.get("Hardware") \
            or processor or arch
    return {"cpu": cpu, "isa": cpu_isa(flags, arch)}


def cpu_isa(flags, arch: str) -> str:
    """The widest vector ISA in a CPU's /proc/cpuinfo flags, as people name it, with the int8
    extensions that change which int8 kernels run: VNNI and AMX beside AVX-512, AVX-VNNI
    beside AVX2 (Alder Lake and later, without AVX-512), dotprod and i8mm beside NEON."""
    if "avx512f" in flags:
        extras = [name for flag, name in (("avx512_vnni", "VNNI"), ("amx_int8", "AMX"))
                  if flag in flags]
        return " ".join(["AVX-512", *extras])
    if "avx2" in flags and "avx_vnni" in flags:
        return "AVX2 AVX-VNNI"
    for flag, name in (("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2")):
        if flag in flags:
            return name
    if "asimd" in flags or "neon" in flags:
        extras = [name for flag, name in (("asimddp", "dotprod"), ("i8mm", "i8mm"),
                                          ("sve", "SVE")) if flag in flags]
        return " ".join(["NEON", *extras])
    return arch or "unknown"


def runtime_versions() -> dict:
    """The version of each runtime module this Python would import, read from the metadata
    of the distribution installed beside that module (onnxruntime-gpu installs the module
    `onnxruntime` under another name, and two distributions can hold it at once). Nothing
    is imported: in a foreign userland importing a runtime has crashed the process."""
    import importlib.metadata
    import importlib.util
    versions = {"numpy": np.__version__}
    for module in TFLITE_MODULES + ONNX_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None:
            continue
        versions[module] = "unknown"  # built from source, without metadata
        folder = Path(spec.origin or next(iter(spec.submodule_search_locations))).parent.parent
        for dist in importlib.metadata.distributions(path=[str(folder)]):
            top = (dist.read_text("top_level.txt") or "").split()
            files = [str(name) for name in (dist.files or [])]
            if module in top or any(name.startswith(module + "/") for name in files):
                versions[module] = dist.version
                break
    return versions
