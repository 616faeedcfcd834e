"""The run directory is the database: `manifest.json` and atomic writes.

Every stage writes its files under the run directory through `atomic_path`, so an
interrupted run never leaves a half-written file that a later stage would trust, and records
what it made in `manifest.json`. Later stages read the manifest, never guess file names.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from importlib import metadata
from pathlib import Path

from tledge.errors import RunDirError
from tledge.tasks import tasks_problem

MANIFEST = "manifest.json"
RECIPE = "recipe.toml"
SPLIT = "split.json"
HISTORY = "history.json"
PARITY = "parity.json"
BENCH = "bench.json"
REPORT = "report.md"
REPORT_HTML = "report.html"
EXPLAIN = "explain.json"
DEVICES = "devices.json"  # results measured on devices and imported (`tledge bench --import`)
DOMAINS = "domains.json"  # evaluations on other data (`tledge evaluate`, `tledge adapt`)

_LIBRARIES = ("tledge", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime",
              "ai-edge-litert", "numpy")


def library_versions() -> dict:
    """Installed versions of the libraries that make and run artifacts."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# A full disk, a quota, a read-only or failing disk: the file cannot be written, and saying so
# in one line is all a stage can do
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}


@contextlib.contextmanager
def atomic_path(path, needs: int = 0):
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds.

    The temporary name keeps the suffix, because some writers (Keras) insist on it. `needs`:
    about how many bytes the writer will write; where the disk has less free, nothing starts
    (h5py, which writes Keras weights, can crash the process on a disk that fills under it
    instead of raising).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if needs:
            free = shutil.disk_usage(path.parent).free
            if free < needs:
                raise RunDirError(
                    f"cannot write {path}: the disk has {free / 2**20:,.1f} MiB free and it "
                    f"needs about {needs / 2**20:,.1f} MiB; nothing was written: free some "
                    "space (or choose another --out) and run the same command again")
        keep = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name[:-len(keep) or None]}.",
                                             suffix=f".tmp{keep}", dir=path.parent)
    except OSError as error:
        raise RunDirError(f"cannot write to {path.parent}: {error.strerror}; "
                          "choose another output directory with --out") from None
    os.close(handle)
    os.unlink(temporary)  # writers that refuse to overwrite get a free name
    try:
        yield Path(temporary)
        if os.path.isdir(temporary) and path.is_dir():  # a folder artifact replaces its old self
            shutil.rmtree(path)
        os.replace(temporary, path)
    except OSError as error:
        if error.errno not in _WRITE_ERRORS:
            raise
        raise RunDirError(f"cannot write {path}: {error.strerror}; nothing half-written was "
                          "kept: free some space (or choose another --out) and run the same "
                          "command again") from None
    finally:
        if os.path.exists(temporary):
            if os.path.isdir(temporary):
                shutil.rmtree(temporary, ignore_errors=True)
            else:
                os.unlink(temporary)


INNER_RUNS = ("baseline",)  # run directories inside a run: the other models it trained
SINGLE_TASK = "single_task"  # a multi-task run's single-task models, one run directory each
LOCK = ".tledge.lock"
LOCK_WRITE_SECONDS = 60  # a lock that holds no "host pid" line after this long is garbage


def lock_holder_alive(run_dir) -> bool:
    """Whether another live process holds the run directory's lock (see `run_lock`)."""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return False
    holder = _lock_holder(path)
    if holder == f"{socket.gethostname()} {os.getpid()}":
        return False
    return holder_alive(holder) if holder else _age(path) < LOCK_WRITE_SECONDS


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold the run directory for this process: one build (or stage) at a time.

    The lock is a file holding the holder's host and pid. A lock whose process is gone (a
    killed build), or that has held no readable holder for a minute, is stale and taken over;
    a live one is an error that names the holder. The same process may take it again (a
    build calls its stages).
    """
    path = Path(run_dir) / LOCK
    mine = f"{socket.gethostname()} {os.getpid()}"
    taken = False
    for _ in range(2):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if path.is_dir() and not path.is_symlink():
                raise RunDirError(f"{path} is a folder, not tledge's lock file (a file holding "
                                  "the host and pid of the run's holder); remove it and run "
                                  "the same command again") from None
            holder = _lock_holder(path)
            if holder == mine:
                break  # this process holds it already
            # an unreadable lock is being written right now, or garbage left long ago
            live = holder_alive(holder) if holder else _age(path) < LOCK_WRITE_SECONDS
            if live:
                raise RunDirError(f"{run_dir} is in use by another tledge "
                                  f"({holder or 'unreadable ' + LOCK}); wait for it to finish, "
                                  f"or stop it (a lock left by a killed run is taken over "
                                  f"by itself; delete {path} if that process is not tledge)")
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        except OSError as error:
            raise RunDirError(f"cannot write to {run_dir}: {error.strerror}; choose another "
                              "directory with --out") from None
        try:
            with os.fdopen(handle, "w") as file:
                file.write(mine + "\n")
        except OSError as error:  # a full disk: no half-written lock is left behind
            path.unlink(missing_ok=True)
            raise RunDirError(f"cannot write {path}: {error.strerror}; free some space (or "
                              "choose another --out) and run the same command again") from None
        taken = True
        break
    try:
        yield
    finally:
        if taken:
            Path(path).unlink(missing_ok=True)


def _age(path) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return 0.0


def _lock_holder(path) -> str | None:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    parts = text.split()
    return text if len(parts) == 2 and parts[1].isdigit() else None


def holder_alive(holder: str) -> bool:
    """Whether the lock's process still runs (a lock from another host counts as alive)."""
    host, pid = holder.split()
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_text(path, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def move_file(source, target) -> None:
    """Move a file to `target`, across filesystems too: a rename where it can be one (the same
    filesystem), else a copy written beside the target and renamed into place, so the target is
    never half-written, then the source removed. ($TMPDIR on another filesystem than the run
    directory made every int8 export fail with "Invalid cross-device link".)"""
    try:
        os.replace(source, target)
        return
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    target = Path(target)
    beside = target.with_name(f".{target.name}.moving")
    try:
        shutil.copy2(source, beside)
        os.replace(beside, target)
    finally:
        beside.unlink(missing_ok=True)
    os.unlink(source)


def read_json(path):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing; run the stage that writes it first "
                          "(or `tledge build RECIPE`)") from None
    except json.JSONDecodeError as error:
        raise RunDirError(f"{path} is not valid JSON ({error}); rebuild the run") from None
    except UnicodeDecodeError:
        raise RunDirError(f"{path} is not text (not a file tledge wrote); rebuild the run") \
            from None
    except OSError as error:
        raise RunDirError(f"cannot read {path}: {error.strerror or error}") from None


# What each record of a run must hold, and the stage that writes it again
_RECORDS = {PARITY: ({"split": str, "images": int, "rows": list}, "validate"),
            BENCH: ({"rows": list}, "bench"),
            SPLIT: ({"splits": dict, "fingerprint": str}, "train"),
            HISTORY: ({"phases": list}, "train"),
            EXPLAIN: ({"figures": list}, "explain"),
            DEVICES: ({"devices": dict}, "bench {run} --import"),
            DOMAINS: ({"domains": dict}, "evaluate {run} --data DATA")}


def read_record(path):
    """A run record (parity.json, bench.json, split.json, history.json, explain.json), checked
    to have the shape tledge writes; a one-line RunDirError naming the stage to rerun if not."""
    path = Path(path)
    record = read_json(path)
    shape, stage = _RECORDS[path.name]
    problem = None
    if not isinstance(record, dict):
        problem = f"a JSON {type(record).__name__} instead of an object"
    else:
        for key, kind in shape.items():
            value = record.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                problem = f"'{key}' is missing or not {kind.__name__}"
                break
            if kind is list and not all(isinstance(item, dict) for item in value):
                problem = f"'{key}' holds something other than objects"
                break
        rows = record.get("rows") if problem is None and path.name in (PARITY, BENCH) else []
        for number, row in enumerate(rows or []):
            missing = [key for key in ("artifact", "runtime", "status")
                       if not isinstance(row.get(key), str)]
            if missing:
                problem = f"rows[{number}] has no {missing[0]}"
                break
    if problem:
        command = stage.format(run=path.parent) if "{run}" in stage else f"{stage} {path.parent}"
        raise RunDirError(f"{path} is not what tledge writes ({problem}); run `tledge {command}` "
                          "again (or `tledge build`)")
    return record


def _jsonable(value):
    import numpy as np
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def sha256(path) -> str:
    """Of a file's bytes; of a folder (a SavedModel): its files' names and bytes, in order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


_CHECKED: dict = {}  # (path, size, mtime) -> sha256, so one command hashes a file once


def checked_sha256(path) -> str | None:
    """`sha256` of a run file, hashed once per command while its size and modification time
    stay the same (a folder is hashed every time); None when it is not there."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_dir():
        return sha256(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED:
        _CHECKED[key] = sha256(path)
    return _CHECKED[key]


def verified_artifact(run_dir, entry: dict) -> Path:
    """The path of a manifest artifact, after checking the file is the one recorded.

    Raises:
        RunDirError: the file is missing or its sha256 is not the manifest's; the message says
            how to make it again.
    """
    path = Path(run_dir) / entry["path"]
    remake = ("retrain it with `tledge train " + str(run_dir) + "`" if entry["name"] == "keras"
              else f"export it again with `tledge export {run_dir} --format {entry['name']}`")
    if not path.exists():
        raise RunDirError(f"{path} ({entry['name']}) is missing; {remake}, or run `tledge "
                          "build`, which redoes what is missing")
    if checked_sha256(path) != entry.get("sha256"):
        raise RunDirError(f"{path} ({entry['name']}) is not the file the manifest records "
                          f"(sha256 differs: changed or replaced since it was written); "
                          f"{remake}, or run `tledge build`, which redoes it")
    return path


def size_bytes(path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def check_run_dir(run_dir) -> Path:
    """The run directory as a Path, or a RunDirError saying how to make one."""
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        raise RunDirError(f"{run_dir} is not a tledge run directory (no {MANIFEST}); "
                          "create one with `tledge build RECIPE` or `tledge train RECIPE`")
    return run_dir


def read_manifest(run_dir) -> dict:
    """The run's manifest, checked to be what tledge writes (see `manifest_problem`)."""
    path = check_run_dir(run_dir) / MANIFEST
    manifest = read_json(path)
    listed = manifest.get("artifacts") if isinstance(manifest, dict) else None
    for entry in listed if isinstance(listed, list) else []:
        if isinstance(entry, dict) and "format" in entry and "family" not in entry:
            entry["family"] = entry.pop("format")  # the key before tledge 0.1.0 (issue 14)
    problem = manifest_problem(manifest)
    if problem:
        raise RunDirError(f"{path} is not a manifest tledge wrote ({problem}); rebuild the run "
                          "(`tledge build RECIPE --force`)")
    return manifest


def manifest_problem(manifest) -> str | None:
    """What is wrong with a manifest's structure, or None. Artifact paths must stay inside
    the run directory: a manifest is data, not a pointer to any file on the disk."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__} instead of an object"
    for key, kind in (("recipe", dict), ("labels", list), ("image_size", list),
                      ("stages", dict), ("artifacts", list)):
        if not isinstance(manifest.get(key), kind):
            return f"'{key}' is missing or not a{'n' if kind is list else ''} " \
                   f"{'list' if kind is list else 'object'}"
    if not all(isinstance(label, str) for label in manifest["labels"]):
        return "'labels' holds something other than names"
    if not all(isinstance(stage, dict) for stage in manifest["stages"].values()):
        return "a stage record is not an object"
    if "tasks" in manifest:
        problem = tasks_problem(manifest["tasks"], manifest["labels"])
        if problem:
            return problem
    for number, entry in enumerate(manifest["artifacts"]):
        where = f"artifacts[{number}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            return f"{where} has no name"
        if entry.get("status", "ok") != "ok":
            continue
        path = entry.get("path")
        if not isinstance(path, str) or not path:
            return f"{where} ({entry['name']}) has no path"
        parts = Path(path).parts
        if Path(path).is_absolute() or ".." in parts:
            return f"{where} ({entry['name']}) points outside the run directory: {path}"
        for key in ("family", "sha256"):
            if not isinstance(entry.get(key), str):
                return f"{where} ({entry['name']}) has no {key}"
        if "tasks" in entry and entry["tasks"] != manifest.get("tasks"):
            return f"{where} ({entry['name']}) lists other tasks than the manifest"
    if manifest.get("pick") is not None and not isinstance(manifest["pick"], dict):
        return "'pick' is not an object"
    return None


def write_manifest(run_dir, manifest: dict) -> None:
    write_json(Path(run_dir) / MANIFEST, manifest)


def new_manifest(recipe, run_dir, labels, image_size) -> dict:
    return empty_manifest({"name": recipe.name, "source": portable(recipe.path, run_dir),
                           "file": RECIPE, "hash": recipe.hash()}, labels, image_size)


def portable(path, run_dir) -> str:
    """A path as a run's records keep it: relative to the run directory when it is a file
    path (a run moved or copied elsewhere does not point into its old place), unchanged when
    it is a keyword such as 'imagenet'."""
    path = str(path)
    if not Path(path).is_absolute():
        return path
    return os.path.relpath(path, Path(run_dir).resolve())


def empty_manifest(recipe_facts: dict, labels, image_size) -> dict:
    return {"tledge_version": library_versions()["tledge"], "recipe": recipe_facts,
            "labels": list(labels), "image_size": list(image_size),
            "stages": {}, "artifacts": []}


def record_stage(manifest: dict, stage: str, *, outputs=(), reads=(), run_dir=None,
                 **facts) -> None:
    """Enter a finished stage in the manifest (not saved): its facts, the sha256 of each
    record it wrote (`outputs`) and of each run file it read (`reads`; None for one that was
    not there; kept by name, or by path from `run_dir` when given). A stage is current
    only while both are still what they were (see `tledge.pipeline.stage_state`): a record rewritten after
    the manifest, or an input that changed or appeared since, makes the stage run again."""
    manifest["stages"][stage] = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **facts}
    if reads:
        manifest["stages"][stage]["reads"] = {
            Path(os.path.relpath(path, run_dir)).as_posix() if run_dir else Path(path).name:
            checked_sha256(path) for path in reads}
    for path in outputs:
        note_output(manifest, stage, path)


def note_output(manifest: dict, stage: str, path) -> None:
    """Record the sha256 of a record `stage` (re)wrote in its manifest entry (not saved)."""
    record = manifest["stages"].get(stage)
    if record is not None:
        record.setdefault("outputs", {})[Path(path).name] = sha256(path)


def artifacts(manifest: dict, *, include_failed=False) -> list[dict]:
    return [entry for entry in manifest["artifacts"]
            if include_failed or entry.get("status", "ok") == "ok"]


def find_artifact(manifest: dict, name: str) -> dict:
    for entry in manifest["artifacts"]:
        if entry["name"] == name:
            return entry
    names = ", ".join(entry["name"] for entry in manifest["artifacts"]) or "none"
    raise RunDirError(f"the run has no artifact {name!r} (it has: {names})")


def set_artifact(manifest: dict, entry: dict) -> None:
    """Add or replace the artifact entry with the same name."""
    manifest["artifacts"] = [item for item in manifest["artifacts"]
                             if item["name"] != entry["name"]] + [entry]


def artifact_entry(run_dir, path, fmt, *, recipe_hash, labels, input_spec, output_spec,
                   **extra) -> dict:
    """The manifest entry of one written artifact: what it is and how to feed it."""
    path = Path(path)
    return {"name": fmt.name, "status": "ok", "path": str(path.relative_to(run_dir)),
            "family": fmt.family, "precision": fmt.precision,
            "size_bytes": size_bytes(path), "sha256": sha256(path),
            "input": input_spec, "output": output_spec, "labels": list(labels),
            "recipe_hash": recipe_hash, "versions": library_versions(), **extra}


def failed_entry(fmt, reason: str) -> dict:
    return {"name": fmt.name, "status": "failed", "family": fmt.family,
            "precision": fmt.precision, "error": reason}
