"""The browser as a runtime: ONNX Runtime Web and LiteRT.js in headless Chromium.

The same .onnx and .tflite files a native runtime runs are loaded by the JavaScript runtime a
web page would use (`onnxruntime-web`, `@litertjs/core`; WebAssembly with SIMD and threads),
in a real Chromium driven by Selenium through Debian's `chromium-driver`. tledge serves the
page, the runtime's files and the artifact on 127.0.0.1, with the cross-origin isolation
headers that threaded WebAssembly needs (and that give `performance.now` its 5 µs
resolution); the images go in as the artifact's prepared bytes and the outputs come back the
same way, so parity compares exactly what the page computed.

Timing happens inside the page (`time_in_place`): warm-up runs, then timed runs between two
`performance.now()` calls, the samples returned to `tledge.core.timing.summarize` like every
other row's. The Selenium round trip is never on the clock.

The JavaScript packages come from the npm registry at first use, at pinned versions, and are
checked against the registry's sha512 integrity before a byte is unpacked into tledge's cache
(`$TLEDGE_WEB_CACHE`, else `~/.cache/tledge/web`); nothing is copied into the repository.
Offline, a tarball put in that folder under its registry name is used instead.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import hashlib
import http.server
import io
import os
import shutil
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from tledge.errors import RuntimeUnavailable
from tledge.runners import Runner

REGISTRY = "https://registry.npmjs.org"


@dataclasses.dataclass(frozen=True)
class Package:
    name: str
    version: str
    integrity: str  # the registry's dist.integrity of the tarball: "sha512-<base64>"
    files: tuple[str, ...]  # what tledge serves of it, relative to the package root

    @property
    def tarball(self) -> str:
        return f"{self.name.split('/')[-1]}-{self.version}.tgz"

    @property
    def url(self) -> str:
        return f"{os.environ.get('TLEDGE_NPM_REGISTRY', REGISTRY)}/{self.name}/-/{self.tarball}"

    @property
    def folder_name(self) -> str:
        return f"{self.name.replace('@', '').replace('/', '-')}-{self.version}"


PACKAGES = {
    "onnxruntime-web": Package(
        "onnxruntime-web", "1.31.1",
        "sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw==",
        ("dist/ort.wasm.min.mjs", "dist/ort-wasm-simd-threaded.mjs",
         "dist/ort-wasm-simd-threaded.wasm")),
    "@litertjs/core": Package(
        "@litertjs/core", "2.5.3",
        "sha512-PlGmbMOq9WitX7FO0jhbdJw9GthatsyuCQXjTt/wJZo0FLaw48q4tz8IwqgqCIkviYGr9OFDL1kCnN4nzWoyJQ==",
        ("dist/index.js", "wasm/litert_wasm_internal.js", "wasm/litert_wasm_internal.wasm",
         "wasm/litert_wasm_threaded_internal.js", "wasm/litert_wasm_threaded_internal.wasm")),
    "@litertjs/wasm-utils": Package(
        "@litertjs/wasm-utils", "2.5.3",
        "sha512-4fJiw6tBQnIs+0jH/OQ16nYOiSl8/+zZnn5h2ul8aTKHi05sVqZW580Tmk78pC2kT39A9OYBVdFawteZ/sI1kQ==",
        ("dist/bundle.js",)),
}
NEEDS = {"onnxruntime_web": ("onnxruntime-web",),
         "litert_web": ("@litertjs/core", "@litertjs/wasm-utils")}


def web_cache() -> Path:
    if os.environ.get("TLEDGE_WEB_CACHE"):
        return Path(os.environ["TLEDGE_WEB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tledge" / "web"


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fetch_package(package: Package) -> Path:
    """The unpacked files of `package` in the web cache, downloaded and verified first if they
    are not there yet.

    Raises:
        RuntimeUnavailable: it cannot be downloaded here, or what came is not the pinned
            tarball (its sha512 differs from the integrity tledge pins).
    """
    root = web_cache()
    folder = root / package.folder_name
    if (folder / ".integrity").is_file() and \
            (folder / ".integrity").read_text().strip() == package.integrity:
        return folder
    local = root / package.tarball
    if local.is_file():
        data = local.read_bytes()
    else:
        try:
            with urllib.request.urlopen(package.url, timeout=120) as response:
                data = response.read()
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise RuntimeUnavailable(
                f"cannot download {package.name}@{package.version} from {package.url} "
                f"({reason}); download that file elsewhere and put it at {local}") from None
    if _integrity(data) != package.integrity:
        raise RuntimeUnavailable(
            f"{package.name}@{package.version}: the tarball's sha512 is not the one tledge "
            f"pins (from {local if local.is_file() else package.url}); nothing was unpacked")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{package.folder_name}.", dir=root))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            for name in package.files:
                member = archive.getmember(f"package/{name}")
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
        (staging / ".integrity").write_text(package.integrity)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# -- the browser ---------------------------------------------------------------------------

def _browser_paths() -> tuple[str | None, str | None]:
    browser = next((shutil.which(name) for name in ("chromium", "chromium-browser",
                                                    "google-chrome") if shutil.which(name)),
                   None)
    return browser, shutil.which("chromedriver")


def unavailable(device, loader=None) -> str | None:
    """Why a browser runtime cannot run here (None when it may)."""
    if device != "cpu":
        return f"the browser runtimes run on this machine's CPU (WebAssembly), not {device}"
    browser, driver = _browser_paths()
    if browser is None or driver is None:
        return ("no headless Chromium here: install chromium and chromium-driver (Debian: "
                "apt-get install chromium chromium-driver)")
    import importlib.util
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    return None


_ORT_PAGE = """<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>tledge onnxruntime_web</title>
<script type="module">
import * as ort from '/pkg/onnxruntime-web/dist/ort.wasm.min.mjs';
const base = new URL('/pkg/onnxruntime-web/dist/', document.baseURI).href;
let session;
window.tledgeInit = async (threads) => {
  ort.env.wasm.wasmPaths = base;
  if (threads) ort.env.wasm.numThreads = threads;
  session = await ort.InferenceSession.create('/model', {executionProviders: ['wasm']});
  return {backend: 'wasm' + (ort.env.wasm.simd === false ? '' : '-simd') +
                   (ort.env.wasm.numThreads > 1 ? '-threads' : ''),
          threads: ort.env.wasm.numThreads, version: ort.env.versions.web || ort.env.versions.common};
};
window.tledgeRun = async (array, shape, outputs) => {
  const dtype = array instanceof Float32Array ? 'float32' : array instanceof Uint8Array ? 'uint8' : 'int8';
  const feeds = {[session.inputNames[0]]: new ort.Tensor(dtype, array, shape)};
  const result = await session.run(feeds);
  return (outputs.length ? outputs : [session.outputNames[0]]).map(name => result[name].data);
};
window.tledgeReady = true;
</script>"""

_LITERT_PAGE = """<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>tledge litert_web</title>
<script type="importmap">{"imports": {"@litertjs/wasm-utils": "/pkg/litertjs-wasm-utils/dist/bundle.js"}}</script>
<script type="module">
import {loadLiteRt, loadAndCompile, Tensor} from '/pkg/litertjs-core/dist/index.js';
let model;
window.tledgeInit = async (threads) => {
  await loadLiteRt(new URL('/pkg/litertjs-core/wasm/', document.baseURI).href,
                   {threads: threads > 1});
  const cpuOptions = threads ? {numThreads: threads} : {};
  model = await loadAndCompile('/model', {accelerator: 'wasm', cpuOptions});
  return {backend: 'wasm-simd' + (threads > 1 ? '-threads' : ''), threads: threads || 1,
          version: '__LITERT_VERSION__'};
};
window.tledgeRun = async (array, shape, outputs) => {
  // the model's own batch is 1: a batch runs image by image. Named outputs (a multi-task
  // model's, by task) come from the signature's outputs by name, in the order asked
  const per = array.length / shape[0], answers = [];
  for (let i = 0; i < shape[0]; i++) {
    const input = new Tensor(array.slice(i * per, (i + 1) * per), [1, ...shape.slice(1)]);
    let results = await model.run(outputs.length ? {image: input} : input);
    input.delete();
    if (outputs.length) {
      const named = results;
      results = outputs.map(name => {
        if (!(name in named)) throw new Error(`no output ${name}; the model has ` +
                                              Object.keys(named).join(', '));
        return named[name];
      });
      for (const name of Object.keys(named)) if (!outputs.includes(name)) named[name].delete();
    }
    for (const [k, tensor] of results.entries()) {
      (answers[k] = answers[k] || []).push(tensor.toTypedArray().slice());
      tensor.delete();
    }
  }
  return answers.map(parts => {
    const joined = new parts[0].constructor(parts.reduce((n, p) => n + p.length, 0));
    let at = 0; for (const p of parts) { joined.set(p, at); at += p.length; }
    return joined;
  });
};
window.tledgeReady = true;
</script>"""

# Shared by both pages: bytes in, bytes out (base64), and the in-page clock.
_DRIVER = """
const ARRAYS = {float32: Float32Array, uint8: Uint8Array, int8: Int8Array};
window.tledgeDecode = (text, dtype) => {
  const raw = Uint8Array.from(atob(text), c => c.charCodeAt(0));
  return new ARRAYS[dtype](raw.buffer);
};
window.tledgeEncode = (array) => {
  const bytes = new Uint8Array(array.buffer, array.byteOffset, array.byteLength);
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000)
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return {data: btoa(text), dtype: array.constructor.name.replace('Array', '').toLowerCase()};
};
window.tledgeTime = async (array, shape, outputs, warmup, minRuns, minSeconds, maxRuns) => {
  let start = performance.now();
  await tledgeRun(array, shape, outputs);
  const first = performance.now() - start, samples = [];
  for (let i = 0; i < warmup; i++) await tledgeRun(array, shape, outputs);
  const deadline = performance.now() + minSeconds * 1000;
  while (samples.length < maxRuns && (samples.length < minRuns || performance.now() < deadline)) {
    start = performance.now();
    await tledgeRun(array, shape, outputs);
    samples.push(performance.now() - start);
  }
  return {first, samples};
};
"""


def page(runtime: str, packages: str = "/pkg/", model: str = "/model") -> str:
    """The page that loads `model` in `runtime` (its module script defines `tledgeInit` and
    `tledgeRun`), with the packages under `packages`: absolute for tledge's own server,
    relative for a bundle's web/ folder."""
    text = _ORT_PAGE if runtime == "onnxruntime_web" else _LITERT_PAGE.replace(
        "__LITERT_VERSION__", PACKAGES["@litertjs/core"].version)
    return text.replace("'/model'", repr(model)).replace("/pkg/", packages)


def package_folders(runtime: str) -> dict[str, Path]:
    """{the name a page finds it under: the unpacked package} of what `runtime` needs,
    fetched and verified first where it is not in the cache."""
    return {PACKAGES[name].folder_name.rsplit("-", 1)[0]: fetch_package(PACKAGES[name])
            for name in NEEDS[runtime]}


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _handler(text: str, model: Path, packages: dict[str, Path]):
    types = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
             ".html": "text/html"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # the page's requests are not tledge's output
            pass

        def do_GET(self):  # noqa: N802 (the standard library's name)
            path = self.path.split("?")[0]
            if path in ("/", "/index.html"):
                body, kind = text.encode(), "text/html"
            elif path == "/model":
                body, kind = model.read_bytes(), "application/octet-stream"
            elif path.startswith("/pkg/"):
                name, _, rest = path[len("/pkg/"):].partition("/")
                root = packages.get(name)
                file = (root / rest).resolve() if root else None
                if file is None or root.resolve() not in file.parents or not file.is_file():
                    self.send_error(404)
                    return
                body, kind = file.read_bytes(), types.get(file.suffix, "application/octet-stream")
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            # cross-origin isolation: SharedArrayBuffer (threads) and a fine performance.now
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
    return Handler


class BrowserSession:
    """One artifact loaded in one runtime in one headless Chromium, served from 127.0.0.1."""

    def __init__(self, runtime: str, model: Path, threads: int | None, outputs=()):
        packages = package_folders(runtime)
        text = page(runtime).replace("<script type=\"module\">", "<script>" + _DRIVER +
                                     "</script>\n<script type=\"module\">", 1)
        self.server = _Server(("127.0.0.1", 0), _handler(text, Path(model), packages))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.outputs = list(outputs or ())
        self.driver = None
        atexit.register(self.close)  # a process that dies with it open leaves no browser
        try:
            self.driver = _start_chromium()
            self.driver.get(f"http://127.0.0.1:{self.server.server_address[1]}/")
            self._wait_ready()
            facts = self._call("return await tledgeInit(arguments[0]);", threads or 0)
        except RuntimeUnavailable:
            self.close()
            raise
        except Exception as error:  # the runtime refused the artifact: a failed row, said
            self.close()
            raise RuntimeError(_message(error)) from None
        version = self.driver.capabilities.get("browserVersion", "?")
        self.executed = (f"Chromium {version}, {facts['backend']}, {facts['threads']} "
                         f"thread(s), {runtime.replace('_web', '')} {facts['version']}")

    def _wait_ready(self):
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(self.driver, 60).until(
            lambda driver: driver.execute_script("return window.tledgeReady === true"))

    def _call(self, body: str, *args):
        script = ("const done = arguments[arguments.length - 1];"
                  f"(async () => {{ {body} }})().then(done, e => done({{error: String(e)}}));")
        answer = self.driver.execute_async_script(script, *args)
        if isinstance(answer, dict) and "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def run(self, prepared: np.ndarray) -> np.ndarray:
        prepared = np.ascontiguousarray(prepared)
        answers = self._call(
            "const out = await tledgeRun(tledgeDecode(arguments[0], arguments[1]), arguments[2],"
            " arguments[3]); return out.map(tledgeEncode);",
            base64.b64encode(prepared.tobytes()).decode(), prepared.dtype.name,
            list(prepared.shape), self.outputs)
        arrays = [np.frombuffer(base64.b64decode(answer["data"]), dtype=answer["dtype"])
                  .reshape(prepared.shape[0], -1) for answer in answers]
        return np.concatenate(arrays, axis=-1) if len(arrays) > 1 else arrays[0]

    def time(self, prepared, *, warmup, min_runs, min_seconds, max_runs):
        prepared = np.ascontiguousarray(prepared)
        answer = self._call(
            "return await tledgeTime(tledgeDecode(arguments[0], arguments[1]), arguments[2], "
            "arguments[3], arguments[4], arguments[5], arguments[6], arguments[7]);",
            base64.b64encode(prepared.tobytes()).decode(), prepared.dtype.name,
            list(prepared.shape), self.outputs, warmup, min_runs, min_seconds, max_runs)
        return float(answer["first"]), [int(sample * 1e6) for sample in answer["samples"]]

    def close(self):
        if self.driver is not None:
            try:
                self.driver.quit()
            except Exception:  # a browser that already died has nothing left to close
                pass
            self.driver = None
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        atexit.unregister(self.close)


def _message(error) -> str:
    text = str(getattr(error, "msg", None) or error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _start_chromium():
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    browser, driver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    try:
        chromium = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    except WebDriverException as error:
        raise RuntimeUnavailable(f"headless Chromium did not start: {_message(error)}") \
            from None
    chromium.set_script_timeout(600)
    return chromium


class WebRunner(Runner):
    """An artifact in a browser runtime. `time_in_place` times it inside the page."""

    out_of_process = True  # the browser's memory is not this process's: no RSS figures

    def __init__(self, runtime, path, spec, threads, device):
        super().__init__(spec, threads, device)
        reason = unavailable(device)
        if reason:
            raise RuntimeUnavailable(reason)
        self.runtime = runtime
        # a multi-task model's outputs by task name; one output: the model's own
        self.session = BrowserSession(runtime, path, threads, self.outputs)
        self.executed = self.session.executed

    def _run(self, prepared):  # litert_web's page runs a batch image by image (batch 1)
        return self.session.run(prepared)

    def time_in_place(self, prepared, *, warmup, min_runs, min_seconds, max_runs):
        """(first-inference ms, samples in ns) timed by the page's own clock."""
        if self.runtime == "litert_web" and len(prepared) > 1:
            raise RuntimeUnavailable("litert_web runs the model's own batch, 1: a batch of "
                                     f"{len(prepared)} would be timed as {len(prepared)} runs")
        return self.session.time(prepared, warmup=warmup, min_runs=min_runs,
                                 min_seconds=min_seconds, max_runs=max_runs)

    def close(self):
        self.session.close()


def load_onnxruntime_web(path, spec, *, threads=None, device="cpu") -> WebRunner:
    return WebRunner("onnxruntime_web", path, spec, threads, device)


def load_litert_web(path, spec, *, threads=None, device="cpu") -> WebRunner:
    return WebRunner("litert_web", path, spec, threads, device)
