"""Writing an entry of the prepared-data cache: decode every image once, in parallel.

Files are decoded by `decode_chunk` (tledge's one image loader) in worker processes and in
the caller, written straight into the split's `.npy` at their row, each with the digest of
its pixels; unreadable files are collected, not raised, so one pass lists them all. Arrays a
source already holds (npz, cifar10, synthetic) are written as they are. The entry is built
under a temporary name and renamed into place, `meta.json` last.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tledge.data.cache import (CACHE_ENV, DIGEST_BYTES, Entry, FORMAT_VERSION, labels_digest,
                               META, names_digest, open_entry, pixel_digest, read_npy_header)
from tledge.data.prepare_worker import decode_chunk
from tledge.errors import DataError


@dataclasses.dataclass(frozen=True, eq=False)
class FileSplit:
    """A split given as image files, decoded into the cache in parallel."""

    paths: list       # absolute paths
    relative: list    # as recorded (relative to the source)
    labels: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySplit:
    """A split given as images already in memory (npz, cifar10, synthetic)."""

    images: np.ndarray  # uint8 [N, H, W, 3] at the cache's size
    labels: np.ndarray


def prepare(root, key, *, describe: dict, class_names, given: dict, size, workers=0,
            progress=None) -> Entry:
    """Write the entry `key` for `given` splits ({split: FileSplit | ArraySplit}).

    Unreadable files are not fatal here: they are left out of the entry and listed in its
    `bad_images`; whether that stops a build is the caller's decision.
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(_mkdtemp(root, key))
    except OSError as error:
        raise DataError(f"cannot write the data cache in {root}: {error.strerror}; set "
                        f"{CACHE_ENV} or data.cache_dir to a writable folder") from None
    height, width = (int(side) for side in size)
    bad, facts = [], {}
    try:
        for split, part in given.items():
            path = staging / f"{split}.images.npy"
            if isinstance(part, FileSplit):
                digests, failed = _decode_files(path, part.paths, (height, width), workers,
                                                progress, split)
                keep = np.asarray([i not in failed for i in range(len(part.paths))], bool)
                for index in sorted(failed):
                    bad.append({"split": split, "file": part.relative[index],
                                "reason": failed[index]})
                if failed:
                    _compact(path, keep, (height, width))
                labels, files = part.labels[keep], [f for f, k in zip(part.relative, keep) if k]
                digests = digests[keep]
            else:
                digests = _write_array(path, part.images)
                labels, files = part.labels, None
            np.save(staging / f"{split}.labels.npy", np.asarray(labels, np.int64))
            np.save(staging / f"{split}.digests.npy", digests)
            if files is not None:
                (staging / f"{split}.files.json").write_text(json.dumps(files),
                                                             encoding="utf-8")
            facts[split] = {"count": int(len(labels)), "files": files is not None,
                            "labels_sha256": labels_digest(labels)}
        meta = {"format": FORMAT_VERSION, "key": key, **describe,
                "image_size": [height, width], "class_names": list(class_names),
                "class_names_sha256": names_digest(class_names),
                "splits": facts, "bad_images": bad,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (staging / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache
        target = root / key
        try:
            os.rename(staging, target)
        except OSError:  # another process finished the same entry first: use theirs
            if open_entry(root, key) is None:
                shutil.rmtree(target, ignore_errors=True)
                os.rename(staging, target)
    except OSError as error:
        raise DataError(f"cannot write the data cache in {root}: {error.strerror or error}; "
                        f"free space or set {CACHE_ENV} to another folder") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    entry = open_entry(root, key)
    if entry is None:
        raise DataError(f"{root / key}: the prepared data could not be read back; "
                        f"clear it with `tledge cache clear {key}`")
    return entry


def _mkdtemp(root, key) -> str:
    return tempfile.mkdtemp(prefix=f".{key}.partial-", dir=root)


def _new_npy(path, count, size) -> int:
    """Create `path` as a uint8 [count, H, W, 3] .npy of zeros; returns the data offset."""
    header = {"descr": "|u1", "fortran_order": False, "shape": (count, *size, 3)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        offset = handle.tell()
        handle.truncate(offset + count * size[0] * size[1] * 3)
    return offset


def _write_array(path, images) -> np.ndarray:
    count = len(images)
    offset = _new_npy(path, count, images.shape[1:3])
    digests = np.zeros((count, DIGEST_BYTES), dtype=np.uint8)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        for index in range(count):
            row = np.ascontiguousarray(images[index], dtype=np.uint8)
            handle.write(row.tobytes())
            digests[index] = np.frombuffer(pixel_digest(row), np.uint8)
    return digests


def _decode_files(path, paths, size, workers, progress, split):
    """Decode `paths` into the .npy at `path`; (digests, {index: reason} of bad files)."""
    count = len(paths)
    offset = _new_npy(path, count, size)
    digests = np.zeros((count, DIGEST_BYTES), dtype=np.uint8)
    failed = {}
    chunk = 64
    tasks = [(str(path), offset, size, [(i, str(paths[i])) for i in range(start,
                                                                        min(start + chunk, count))])
             for start in range(0, count, chunk)]
    workers = resolve_workers(workers)
    bar = Progress(f"prepare {split}", count, progress)

    def take(result):
        for index, digest, reason in result:
            if reason is None:
                digests[index] = np.frombuffer(digest, np.uint8)
            else:
                failed[index] = reason
        bar.advance(len(result))

    if workers <= 1 or count <= chunk:
        for task in tasks:
            take(decode_chunk(*task))
    else:
        _decode_in_parallel(tasks, workers, take)
    bar.finish()
    return digests, failed


# What a worker process runs. Not `python -m tledge.data.prepare_worker`: the package
# tledge.data imports that module before runpy runs it as __main__, and runpy then prints a
# RuntimeWarning ("found in sys.modules after import of package") to the user's terminal.
WORKER_COMMAND = "from tledge.data.prepare_worker import main; main()"


def _decode_in_parallel(tasks, workers, take) -> None:
    """Run `decode_chunk` over `tasks` on `workers` decoders: `workers - 1` worker processes
    and this process too (a thread: PIL, hashlib and pwrite release the GIL), each taking the
    next chunk when it is done with one.

    The workers are plain Python processes running `prepare_worker.main` (`WORKER_COMMAND`)
    and talking JSON lines, not multiprocessing's: those re-run the caller's main script (a
    notebook or an unguarded script would start over), and fork is unsafe beside
    TensorFlow's threads.
    """
    lock = threading.Lock()
    pending = iter(tasks)
    package_parent = str(Path(__file__).resolve().parents[2])  # the folder holding tledge/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}

    def next_task():
        with lock:
            return next(pending, None)

    def done(result):
        with lock:
            take(result)

    def run_here():
        while (task := next_task()) is not None:
            done(decode_chunk(*task))

    def run_process(process):
        while (task := next_task()) is not None:
            process.stdin.write(json.dumps(task) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
            if not line:
                raise DataError("a data-preparation worker process stopped unexpectedly "
                                f"(exit code {process.wait()}); run again, or set "
                                "data.workers = 1")
            done([(row, bytes.fromhex(digest) if digest else None, reason)
                  for row, digest, reason in json.loads(line)])

    processes = [subprocess.Popen([sys.executable, "-c", WORKER_COMMAND],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env) for _ in range(workers - 1)]
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as threads:
            futures = [threads.submit(run_process, process) for process in processes]
            futures.append(threads.submit(run_here))
            for future in futures:
                future.result()
    finally:
        for process in processes:
            process.stdin.close()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def _compact(path, keep, size) -> None:
    """Rewrite the .npy at `path` with only the rows where `keep`, a chunk at a time."""
    count = int(keep.sum())
    row_bytes = size[0] * size[1] * 3
    old_offset = read_npy_header(path)[0]
    temporary = path.with_suffix(".compact")
    new_offset = _new_npy(temporary, count, size)
    with open(path, "rb") as old, open(temporary, "r+b") as new:
        new.seek(new_offset)
        for index in np.flatnonzero(keep):
            old.seek(old_offset + int(index) * row_bytes)
            new.write(old.read(row_bytes))
    os.replace(temporary, path)


def resolve_workers(workers) -> int:
    """0 means every core this process may use."""
    if workers and workers > 0:
        return int(workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class Progress:
    """A one-line progress bar on stderr: done/total, images/s, time left.

    Quiet for work that takes under a second; on a terminal it redraws in place, in a log
    file it writes a line every 10 s.
    """

    def __init__(self, label, total, enabled=None, stream=None):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.enabled = (total > 0) if enabled is None else bool(enabled) and total > 0
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.started = time.perf_counter()
        self.last = self.started + 1.0 - (0.2 if self.tty else 10.0)  # first after 1 s
        self.shown = False

    def advance(self, count):
        self.done += count
        now = time.perf_counter()
        if self.enabled and (now - self.last >= (0.2 if self.tty else 10.0)):
            self.last, self.shown = now, True
            self._show(end="\r" if self.tty else "\n")

    def finish(self):
        if self.enabled and self.shown:
            self._show(end="\n")

    def _show(self, end):
        seconds = max(time.perf_counter() - self.started, 1e-9)
        rate = self.done / seconds
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        left_text = "done" if self.done >= self.total else f"{left:.0f} s left"
        self.stream.write(f"  {self.label}: {self.done:,}/{self.total:,} images  "
                          f"{rate:,.0f} img/s  {seconds:.0f} s  {left_text}   {end}")
        self.stream.flush()
