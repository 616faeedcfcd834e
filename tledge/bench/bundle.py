"""Benchmarks on the device itself: `tledge bundle` packs a run, `--import` brings results back.

A bundle is a zip a user copies to a Raspberry Pi or a Jetson and runs there with nothing but
Python, numpy and one runtime (and pillow, to classify image files):

    bundle.zip
      classify.py         classify images, folders or a camera frame: runs tledge_core.classify
      requirements.txt    numpy, pillow and the runtimes, pinned to the versions that ran here
      bench_device.py     the benchmark: runs tledge_core.device
      tledge_core/...     tledge.core, copied whole (the engines, timing, metrics and
                          machine facts the build machine uses)
      bundle.json         artifacts (file, sha256, input/output spec), labels, settings
      images.npy          evaluation images, every class present, uint8 [N, H, W, 3]
      host_outputs.npz    each artifact's raw outputs for them on the build machine
      labels.txt          one class name per line
      artifacts/...       the .tflite / .onnx files
      web/...             a page that classifies a picture in the browser (LiteRT.js or ONNX
                          Runtime Web), with its artifact and the runtime's files
      README.txt          how to run it

`bench_device.py` writes result.json; `import_device_result` checks it is tledge's, that it
measured this run's files, and stores it in bench.json under the device's name.
"""

from __future__ import annotations

import datetime
import functools
import html
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import PIL

import tledge.core
from tledge.core import classify, device as device_bench
from tledge.core.engines import TFLITE_MODULES
from tledge.core.machine import runtime_versions
from tledge.errors import BundleError, RuntimeUnavailable
from tledge.flops import model_flops
from tledge.pipeline import require_current, validated_rows
from tledge.records import device_problems, read_devices
from tledge.run_inputs import evaluation_split, run_recipe, run_splits
from tledge.tasks import targets
from tledge.rundir import artifacts, atomic_path, DEVICES, read_manifest, write_json
from tledge.runners import load, runtimes_for, web_runner

DEVICE_FAMILIES = ("tflite", "onnx")  # what bench_device.py runs
DEVICE_PACKAGE = "tledge_core"  # tledge.core in a bundle

README = """\
tledge bundle of run {run!r} ({count} artifacts), made {created}.

Set up the device once. A Raspberry Pi needs its 64-bit OS (Raspberry Pi OS Bookworm 64-bit:
the runtimes publish aarch64 wheels, none for 32-bit ARM); Bookworm's Python refuses a
system-wide pip install, so use a venv. The same works on a Jetson or an x86 box with
Python 3.11+ (requirements.txt pins the versions that ran these files on the build machine;
on an older Python, install the same packages unpinned and let the check below compare):

    unzip {name} -d tledge_bundle && cd tledge_bundle
    python3 -m venv ~/tledge-venv && . ~/tledge-venv/bin/activate
    pip install -r requirements.txt

Classify (a file, a folder, or one camera frame with opencv-python-headless installed):

    python3 classify.py photo.jpg --top-k 3       # the run's pick, labels, milliseconds
    python3 classify.py photos/ --artifact {first} --json
    python3 classify.py --camera 0

Check and time every artifact on this device (accuracy and agreement with the build machine
on the bundled images, latency, memory), then bring the result back:

    python3 bench_device.py --name my-device          # writes result.json
    python3 bench_device.py --help                    # threads, batch sizes, runtime, ...

and on the build machine:

    tledge bench {run_dir} --import result.json
"""

WEB_README = """
In a browser (web/: {artifact}, its labels and the runtime's files; a picture you choose or
the camera, classified in the page):

    cd web && python3 -m http.server 8000     # then open http://localhost:8000
"""

# the pip name of each runtime module a bundle's files need
_PIP_NAMES = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime",
              "onnxruntime": "onnxruntime", "openvino": "openvino"}


def requirements(families) -> str:
    """requirements.txt of a bundle: numpy, pillow and one runtime per file format, pinned to
    the versions installed here (the ones that just ran the files for the host outputs the
    device check compares against); OpenVINO as a comment, for Intel boxes."""
    versions = runtime_versions()
    lines = [f"numpy=={versions['numpy']}", f"pillow=={PIL.__version__}"]
    wanted = [("tflite", TFLITE_MODULES), ("onnx", ("onnxruntime",))]
    for family, modules in wanted:
        module = next((name for name in modules if name in versions), None)
        if family in families and module:
            lines.append(f"{_PIP_NAMES[module]}=={versions[module]}")
    if "onnx" in families and "openvino" in versions:
        lines.append(f"# openvino=={versions['openvino']}  (Intel CPUs: --runtime openvino)")
    return "\n".join(lines) + "\n"


def select_artifacts(manifest: dict, names=None) -> list[dict]:
    """The artifacts to bundle: those named, else every one a device script can run."""
    runnable = {entry["name"]: entry for entry in artifacts(manifest)
                if entry["family"] in DEVICE_FAMILIES}
    if not names:
        if not runnable:
            raise BundleError("the run has no .tflite or .onnx artifact to bundle; run "
                              "`tledge export RUN_DIR` first")
        return list(runnable.values())
    known = {entry["name"] for entry in artifacts(manifest)}
    for name in names:
        if name not in known:
            raise BundleError(f"no artifact named {name!r} in the run; it has: "
                              f"{', '.join(sorted(known)) or 'none'}")
        if name not in runnable:
            raise BundleError(f"{name} cannot run on a device from a bundle: bench_device.py "
                              "runs .tflite and .onnx artifacts only")
    return [runnable[name] for name in names]


IMAGE_CAP = 512  # evaluation images a bundle carries at most (`--images 0`, the default)


def bundle_images(run_dir, recipe, count: int = 0):
    """Evaluation images and their classes, stratified: a seeded choice taking the classes
    in turns, so every class is present and as evenly as the split allows, `count` of them
    (0: all, up to IMAGE_CAP). The split is sorted by class: its first 32 images once covered
    2 classes of 8 and hid a difference between two CPUs' int8 kernels."""
    images, labels, _ = evaluation_split(run_splits(run_dir, recipe))
    labels = np.asarray(labels)
    count = min(count or IMAGE_CAP, len(labels))
    rng = np.random.default_rng(recipe.seed)
    queues = [list(rng.permutation(np.flatnonzero(labels == label)))
              for label in np.unique(labels)]
    chosen = []
    while len(chosen) < count:
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    chosen = np.sort(np.array(chosen, dtype=np.int64))
    return np.asarray(images[chosen]), labels[chosen]


def write_bundle(run_dir, out, *, names=None, image_count: int = 0, unvalidated=False,
                 log=print) -> Path:
    """Write the bundle of `run_dir` to `out` (a .zip file).

    The run's artifacts must be validated as they are (`tledge.pipeline.require_current`);
    with `unvalidated` they are packed as they are, each marked so in bundle.json."""
    run_dir, out = Path(run_dir), Path(out)
    if out.is_dir():
        raise BundleError(f"{out} is a directory; give the bundle a file name, e.g. "
                          f"{out / 'bundle.zip'}")
    if out.suffix.lower() != ".zip":
        raise BundleError(f"{out}: a bundle is a .zip file; give a name ending in .zip")
    if out.exists() and not zipfile.is_zipfile(out):
        raise BundleError(f"{out} exists and is not a zip file; tledge overwrites only a "
                          "bundle it wrote: give another name")
    manifest = read_manifest(run_dir)
    entries = select_artifacts(manifest, names)
    if not unvalidated:
        require_current(run_dir, "validate", names=[entry["name"] for entry in entries],
                        using=f"bundle {run_dir}")
    judged = validated_rows(run_dir, manifest)
    recipe = run_recipe(run_dir)
    images, expected = bundle_images(run_dir, recipe, image_count)
    listed, outputs = [], {}
    for entry in entries:
        runner = load(entry, run_dir)  # what the build machine outputs, in the real runtime
        try:  # raw, image by image at batch 1, as bench_device.py will run it
            outputs[entry["name"]] = np.concatenate(
                [runner.run(runner.prepare(images[i:i + 1])) for i in range(len(images))])
        finally:
            runner.close()
        listed.append({"name": entry["name"], "family": entry["family"],
                       "precision": entry.get("precision"),
                       "file": f"artifacts/{Path(entry['path']).name}",
                       "sha256": entry["sha256"], "size_bytes": entry["size_bytes"],
                       "input": entry["input"], "output": entry["output"],
                       "parity": _parity_of(entry, judged)})
    settings = recipe.bench
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    document = {"format": device_bench.BUNDLE_FORMAT, "version": device_bench.VERSION,
                "run": manifest["recipe"]["name"], "recipe_hash": manifest["recipe"]["hash"],
                "created": created, "labels": manifest["labels"],
                "pick": _bundled_pick(manifest, listed),
                **({"tasks": manifest["tasks"]} if manifest.get("tasks") else {}),
                "flops_per_image": model_flops(run_dir, manifest),
                "settings": {"threads": list(settings.threads),
                             "batch_sizes": list(settings.batch_sizes),
                             "warmup": settings.warmup, "min_runs": settings.min_runs,
                             "min_seconds": settings.min_seconds},
                "images": {"file": "images.npy", "count": int(len(images)),
                           "stratified": True, "cap": IMAGE_CAP,
                           "expected": targets(expected, manifest.get("tasks"),
                                               manifest["labels"]).tolist()},
                "host_outputs": device_bench.HOST_OUTPUTS,
                "artifacts": listed}
    pixels, raw = io.BytesIO(), io.BytesIO()
    np.save(pixels, np.ascontiguousarray(images, dtype=np.uint8))
    np.savez(raw, **outputs)
    with atomic_path(out) as temporary:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            add = functools.partial(_add_file, archive)
            add("bench_device.py", device_bench.LAUNCHER)
            add("classify.py", classify.LAUNCHER)
            add("requirements.txt", requirements({item["family"] for item in listed}))
            for source in sorted(Path(tledge.core.__file__).parent.glob("*.py")):
                archive.write(source, f"{DEVICE_PACKAGE}/{source.name}")
            add("bundle.json", json.dumps(document, indent=2) + "\n")
            add("images.npy", pixels.getvalue())
            add(device_bench.HOST_OUTPUTS, raw.getvalue())
            add("labels.txt", "\n".join(manifest["labels"]) + "\n")
            for entry, item in zip(entries, listed):
                archive.write(run_dir / entry["path"], item["file"])
                log(f"  {item['file']}  {entry['size_bytes'] / 1024:,.0f} KiB")
            web = _web_files(archive, run_dir, entries, listed, manifest, log)
            add("README.txt", README.format(
                run=manifest["recipe"]["name"], count=len(listed), created=created, name=out.name,
                run_dir=run_dir, first=listed[0]["name"]) + (WEB_README.format(artifact=web)
                                                             if web else ""))
    return out


WEB_RUNTIMES = {"tflite": "litert_web", "onnx": "onnxruntime_web"}

# The bundle's web page: the runtime's page (`tledge.runners.web_runner.page`, which defines
# tledgeInit and tledgeRun) and this interface: a picture chosen or a camera frame, stretched
# to the model's size on a canvas, fed as the input contract says, the top classes shown.
WEB_UI = """
<style>body{font:16px system-ui,sans-serif;max-width:40em;margin:2em auto;padding:0 1em}
#top li{margin:.2em 0}</style>
<h1>__TITLE__</h1>
<p>Choose a picture, or take one from the camera. It is stretched to __W__&times;__H__ (not
cropped), as the model was trained, and classified in this page by __RUNTIME__: nothing leaves
the browser.</p>
<p><input type="file" id="file" accept="image/*"> <button id="camera">Camera</button></p>
<video id="video" width="240" hidden playsinline></video>
<p id="status">Loading the model&hellip;</p>
<p><strong id="label"></strong> <span id="ms"></span></p>
<ol id="top"></ol>
<script type="module">
const facts = __FACTS__;
const [height, width] = facts.input.shape.slice(1, 3);
const status = document.getElementById('status');
try {
  await tledgeInit(0);
  status.textContent = 'Ready: choose a picture.';
} catch (error) {
  status.textContent = 'The model did not load: ' + error;
}
function input(source) {
  const canvas = document.createElement('canvas');
  canvas.width = width; canvas.height = height;
  const context = canvas.getContext('2d');
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = 'high';
  context.drawImage(source, 0, 0, width, height);
  const rgba = context.getImageData(0, 0, width, height).data;
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2];
  }
  const q = facts.input.quantization;  // raw 0-255 pixels, in the input's own type
  if (facts.input.dtype === 'float32') return Float32Array.from(rgb);
  if (!q || (q.scale === 1 && q.zero_point === 0)) return facts.input.dtype === 'uint8' ? rgb
    : Int8Array.from(rgb, v => v - 128);
  const low = facts.input.dtype === 'int8' ? -128 : 0, Kind = low ? Int8Array : Uint8Array;
  return Kind.from(rgb, v => Math.min(low + 255, Math.max(low, Math.round(v / q.scale) + q.zero_point)));
}
async function classify(source) {
  const started = performance.now();
  const [raw] = await tledgeRun(input(source), [1, height, width, 3], [facts.output.name]);
  const ms = performance.now() - started;
  const q = facts.output.quantization;
  const scores = Array.from(raw, v => q && q.scale ? (v - q.zero_point) * q.scale : v);
  const order = scores.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0]).slice(0, 3);
  document.getElementById('label').textContent = facts.labels[order[0][1]];
  document.getElementById('ms').textContent = `(${ms.toFixed(1)} ms)`;
  document.getElementById('top').innerHTML = '';
  for (const [p, i] of order) {
    const item = document.createElement('li');
    item.textContent = `${facts.labels[i]} ${p.toFixed(4)}`;
    document.getElementById('top').append(item);
  }
  status.textContent = 'Done.';
}
document.getElementById('file').addEventListener('change', async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  status.textContent = 'Classifying…';
  const image = await createImageBitmap(file);
  await classify(image);
});
document.getElementById('camera').addEventListener('click', async () => {
  const video = document.getElementById('video');
  if (!video.srcObject) {
    video.srcObject = await navigator.mediaDevices.getUserMedia({video: true});
    video.hidden = false;
    await video.play();
    return;
  }
  await classify(video);
});
</script>
"""


def web_page(entry, labels, title: str) -> tuple[str, str] | None:
    """(runtime, index.html) of the bundle's page for `entry`; None for an artifact no
    browser runtime runs (a multi-output one, an OpenVINO IR, a SavedModel)."""
    runtime = WEB_RUNTIMES.get(entry["family"])
    if runtime is None or isinstance(entry.get("output"), list):
        return None
    facts = {"labels": list(labels), "input": entry["input"], "output": entry["output"]}
    text = web_runner.page(runtime, "./runtime/", f"./{Path(entry['path']).name}")
    ui = (WEB_UI.replace("__FACTS__", json.dumps(facts)).replace("__W__", str(
        entry["input"]["shape"][2])).replace("__H__", str(entry["input"]["shape"][1]))
          .replace("__RUNTIME__", "LiteRT.js" if runtime == "litert_web"
                   else "ONNX Runtime Web").replace("__TITLE__", html.escape(title)))
    return runtime, text + ui


def _web_files(archive, run_dir, entries, listed, manifest, log) -> str | None:
    """web/: the page, its artifact, and the runtime's files (from tledge's web cache); the
    name of the artifact it runs, or None when none can run in a browser or the packages
    cannot be had here (said in the log)."""
    pick = _bundled_pick(manifest, listed)
    order = sorted(zip(entries, listed), key=lambda pair: (
        pair[1]["name"] != pick, pair[0]["family"] != "tflite"))
    for entry, item in order:
        made = web_page(entry, manifest["labels"], manifest["recipe"]["name"])
        if made is None or item["parity"] not in ("passed", "insufficient"):
            continue
        runtime, text = made
        try:
            folders = web_runner.package_folders(runtime)
        except RuntimeUnavailable as error:
            log(f"  web/ left out: {error}")
            return None
        archive.writestr("web/index.html", text)
        archive.write(Path(run_dir) / entry["path"], f"web/{Path(entry['path']).name}")
        for name, folder in folders.items():
            for file in sorted(folder.rglob("*")):
                if file.is_file() and not file.name.startswith("."):
                    archive.write(file, f"web/runtime/{name}/{file.relative_to(folder)}")
        log(f"  web/index.html  {entry['name']} in {runtime}")
        return entry["name"]
    return None


def _bundled_pick(manifest, listed) -> str | None:
    """The run's pick, when the bundle holds its file (classify.py runs it by default)."""
    pick = manifest.get("pick") or {}
    if pick.get("model", "model") != "model":
        return None
    return pick.get("artifact") if pick.get("artifact") in {item["name"] for item in listed} \
        else None


def _parity_of(entry, judged) -> str:
    """An artifact's parity as the bundle says it: its own runtime's row on the file as it is
    ("passed", "failed"...), else "unvalidated"."""
    row = judged.get((entry["name"], runtimes_for(entry["family"])[0]))
    return row.status if row else "unvalidated"


def _add_file(archive, name: str, data) -> None:
    """A file written from memory, readable by all once unzipped (writestr's default is 0600)."""
    info = zipfile.ZipInfo(name, date_time=datetime.datetime.now().timetuple()[:6])
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)


# -- bringing a device's result back ---------------------------------------------------------

_ROW_FIELDS = {"artifact": str, "runtime": str, "threads": int, "batch": int, "status": str}
_OK_FIELDS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "throughput_ips")


def check_device_result(document, source) -> list[str]:
    """Every way `document` is not a device result tledge can import (empty when it is)."""
    if not isinstance(document, dict) or document.get("format") != device_bench.RESULT_FORMAT:
        return [f"{source} is not a tledge device benchmark (bench_device.py from `tledge "
                "bundle` writes one, with \"format\": \"tledge-device-bench\")"]
    problems = []
    if document.get("version") != device_bench.VERSION:
        problems.append(f"version {document.get('version')!r}, this tledge reads "
                        f"{device_bench.VERSION}")
    device = document.get("device")
    if not isinstance(device, dict) or not isinstance(device.get("name"), str) \
            or not device["name"].strip():
        problems.append("device.name is missing")
    rows = document.get("rows")
    if not isinstance(rows, list):
        return problems + ["rows is not a list"]
    for number, row in enumerate(rows):
        where = f"rows[{number}]"
        if not isinstance(row, dict):
            problems.append(f"{where} is not an object")
            continue
        for key, kind in _ROW_FIELDS.items():
            if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                problems.append(f"{where}.{key}: expected {kind.__name__}, found "
                                f"{row.get(key)!r}")
        if row.get("status") not in ("ok", "skipped", "failed"):
            problems.append(f"{where}.status: expected ok/skipped/failed, found "
                            f"{row.get('status')!r}")
        elif row["status"] == "ok":
            for key in _OK_FIELDS:
                value = row.get(key)
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    problems.append(f"{where}.{key}: expected a number >= 0, found {value!r}")
    if not isinstance(document.get("artifacts"), dict):
        problems.append("artifacts (file checksums) is missing")
    return problems


def import_device_result(run_dir, path) -> dict:
    """Store a device's result.json in the run's devices.json, under the device's name
    (replacing an earlier result of that name); returns the stored entry."""
    run_dir, path = Path(run_dir), Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BundleError(f"cannot read {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise BundleError(f"{path} is not JSON ({error}); give the result.json that "
                          "bench_device.py wrote") from None
    problems = check_device_result(document, path)
    if not problems:  # and what reading devices.json will check, before it lands there
        stored = {key: document.get(key) for key in
                  ("device", "settings", "rows", "accuracy", "artifacts", "measured", "bundle")}
        problems = device_problems(stored)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise BundleError(f"{path}: {problems[0]}{more}")
    manifest = read_manifest(run_dir)
    ours = {entry["name"]: entry["sha256"] for entry in artifacts(manifest)}
    for name, checksum in document["artifacts"].items():
        if name not in ours:
            raise BundleError(f"{path} measured an artifact {name!r} that {run_dir} does not "
                              "have; was the bundle made from another run?")
        if checksum != ours[name]:
            raise BundleError(f"{path} measured a different {name} than {run_dir} has now "
                              "(sha256 differs): the run was re-exported since the bundle was "
                              "made; make a new bundle")
    record = run_dir / DEVICES  # written here alone: bench.json is the bench stage's
    devices = {name: result.to_json() for name, result in read_devices(run_dir).items()}
    name = document["device"]["name"].strip()
    devices[name] = stored
    write_json(record, {"devices": devices})
    return stored
