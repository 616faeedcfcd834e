"""The prepared-data cache: every image decoded and resized once, read from disk after that.

A source's images are decoded by tledge's one image loader (in parallel worker processes for
files), resized to the recipe's size, and written per split as a uint8 `.npy` file
[N, H, W, 3] beside its labels, its file list and one pixel digest per image. Every stage
(training, calibration, validation, benchmark, explain, bundle) and every later build or
recipe that reads the same source at the same size reads that entry instead of the source.

An entry lives in `<cache root>/<key>/`; the key is a hash of the source's identity (the
relative file list with sizes and modification times, a file's sha256, the generator's
settings) and the image size, so a changed file makes a new entry. `meta.json` is written
last: an entry without it is not an entry. The root is `data.cache_dir` in a recipe, else
$TLEDGE_CACHE_DIR, else `$XDG_CACHE_HOME/tledge/data` (`~/.cache/tledge/data`).

Rows are read with positioned reads (`os.pread`), not through a memory map: the pages then
sit in the kernel's page cache, not in the process's resident memory, so reading a 15 GB
split once per epoch leaves the training process as small as reading 15 MB.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from tledge.errors import DataError

CACHE_ENV = "TLEDGE_CACHE_DIR"
FORMAT_VERSION = 1
META = "meta.json"
DIGEST_BYTES = 16  # blake2b-128 of each image's pixels: leakage check, fingerprint, verify


def cache_root(configured=None) -> Path:
    """Where prepared data lives: the recipe's `data.cache_dir`, else $TLEDGE_CACHE_DIR,
    else $XDG_CACHE_HOME/tledge/data (~/.cache/tledge/data)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tledge" / "data"


def cache_key(identity: dict, size) -> str:
    text = json.dumps({"format": FORMAT_VERSION, "identity": identity,
                       "image_size": [int(side) for side in size]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def pixel_digest(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(),
                           digest_size=DIGEST_BYTES).digest()


class ImageRows:
    """Rows of a prepared split, read on demand: behaves like a read-only uint8 array
    [N, H, W, 3] for `len`, `shape`, slicing and index arrays, but holds only the row
    numbers. Every row read is checked against the digest recorded when it was prepared.
    """

    def __init__(self, path, digests: np.ndarray, rows=None, *, offset: int, row_shape):
        self.path = Path(path)
        self._digests = digests
        self._rows = np.arange(len(digests), dtype=np.int64) if rows is None else rows
        self._offset = offset
        self._row_shape = tuple(row_shape)
        self._row_bytes = int(np.prod(self._row_shape))
        self.largest_read = 0  # the most rows one read returned: tests check it stays small
        self.rows_read = 0     # rows read in all

    @classmethod
    def open(cls, path, digests):
        path = Path(path)
        try:
            offset, shape, dtype = _read_header(path)
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: prepared data unreadable ({error}); clear it with "
                            f"`tledge cache clear {path.parent.name}`") from None
        expected = offset + len(digests) * int(np.prod(shape[1:]))
        if dtype != np.uint8 or len(shape) != 4 or shape[0] != len(digests) \
                or path.stat().st_size != expected:
            raise DataError(f"{path}: prepared data has the wrong shape or size (truncated or "
                            f"replaced); clear it with `tledge cache clear {path.parent.name}`")
        return cls(path, digests, offset=offset, row_shape=shape[1:])

    @property
    def shape(self):
        return (len(self._rows), *self._row_shape)

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __len__(self):
        return len(self._rows)

    def subset(self, indices) -> "ImageRows":
        """The rows at `indices` of this one, still unread."""
        view = ImageRows(self.path, self._digests, self._rows[np.asarray(indices, np.int64)],
                         offset=self._offset, row_shape=self._row_shape)
        return view

    @property
    def digests(self) -> np.ndarray:
        """The pixel digest of every row, uint8 [N, DIGEST_BYTES]."""
        return self._digests[self._rows]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.read(np.asarray([key]))[0]
        if isinstance(key, slice):
            return self.read(np.arange(len(self._rows))[key])
        return self.read(np.asarray(key))

    def __array__(self, dtype=None, copy=None):
        images = self.read(np.arange(len(self._rows)))
        return images if dtype is None else images.astype(dtype)

    def read(self, indices) -> np.ndarray:
        """uint8 [len(indices), H, W, 3] for these positions (of this view), verified."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(indices), *self._row_shape), dtype=np.uint8)
        if not len(indices):
            return out
        rows = self._rows[indices]
        flat = out.reshape(len(indices), self._row_bytes)
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            for position, row in enumerate(rows):
                data = os.pread(descriptor, self._row_bytes,
                                self._offset + int(row) * self._row_bytes)
                if len(data) != self._row_bytes:
                    raise DataError(f"{self.path}: prepared data is truncated at row {row}; "
                                    f"clear it with `tledge cache clear {self.path.parent.name}`")
                flat[position] = np.frombuffer(data, dtype=np.uint8)
                if hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest() \
                        != self._digests[row].tobytes():
                    raise DataError(f"{self.path}: row {row} differs from the image prepared "
                                    "there (the cache file was changed); clear it with "
                                    f"`tledge cache clear {self.path.parent.name}` and run again")
        finally:
            os.close(descriptor)
        self.largest_read = max(self.largest_read, len(indices))
        self.rows_read += len(indices)
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class CachedSplit:
    images: ImageRows
    labels: np.ndarray
    files: list | None


@dataclasses.dataclass(frozen=True, eq=False)
class Entry:
    """One prepared source at one size."""

    key: str
    folder: Path
    meta: dict
    splits: dict  # split name -> CachedSplit

    @property
    def class_names(self) -> tuple:
        return tuple(self.meta["class_names"])

    @property
    def bad_images(self) -> list:
        return self.meta.get("bad_images", [])


def open_entry(root, key) -> Entry | None:
    """The complete entry `key` under `root`, or None when there is none (or it is broken
    beyond use: a half-written or hand-edited entry is treated as absent)."""
    folder = Path(root) / key
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
            return None
        splits = {}
        for split, facts in meta["splits"].items():
            labels = np.load(folder / f"{split}.labels.npy", allow_pickle=False)
            digests = np.load(folder / f"{split}.digests.npy", allow_pickle=False)
            if len(labels) != facts["count"] or digests.shape != (facts["count"], DIGEST_BYTES):
                return None
            files = None
            if facts.get("files"):
                files = json.loads((folder / f"{split}.files.json").read_text(encoding="utf-8"))
            splits[split] = CachedSplit(ImageRows.open(folder / f"{split}.images.npy", digests),
                                        labels.astype(np.int64), files)
    except (OSError, ValueError, KeyError, TypeError, DataError):
        return None
    return Entry(key, folder, meta, splits)


# ---- writing an entry ---------------------------------------------------------------------

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
            facts[split] = {"count": int(len(labels)), "files": files is not None}
        meta = {"format": FORMAT_VERSION, "key": key, **describe,
                "image_size": [height, width], "class_names": list(class_names),
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


def _read_header(path):
    """(data offset, shape, dtype) of a .npy file."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _, dtype = reader(handle)
        return handle.tell(), shape, dtype


def _mkdtemp(root, key) -> str:
    import tempfile
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
    from tledge.data.prepare_worker import decode_chunk
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


def _decode_in_parallel(tasks, workers, take) -> None:
    """Run `decode_chunk` over `tasks` on `workers` decoders: `workers - 1` worker processes
    and this process too (a thread: PIL, hashlib and pwrite release the GIL), each taking the
    next chunk when it is done with one.

    The workers are plain `python -m tledge.data.prepare_worker` processes talking JSON
    lines, not multiprocessing's: those re-run the caller's main script (a notebook or an
    unguarded script would start over), and fork is unsafe beside TensorFlow's threads.
    """
    import concurrent.futures
    import subprocess
    import threading
    import tledge
    from tledge.data.prepare_worker import decode_chunk
    lock = threading.Lock()
    pending = iter(tasks)
    package_parent = str(Path(tledge.__file__).resolve().parent.parent)
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

    processes = [subprocess.Popen([sys.executable, "-m", "tledge.data.prepare_worker"],
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
    old_offset = _read_header(path)[0]
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


# ---- listing and clearing -----------------------------------------------------------------

def list_entries(root) -> list[dict]:
    """Every entry under `root` with its source, size, image count and bytes on disk."""
    root = Path(root)
    rows = []
    if not root.is_dir():
        return rows
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
            rows.append({"key": folder.name, "source": meta.get("source"),
                         "where": meta.get("where"), "image_size": meta.get("image_size"),
                         "images": sum(s["count"] for s in meta["splits"].values()),
                         "bad_images": len(meta.get("bad_images", [])),
                         "bytes": size, "created": meta.get("created")})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            rows.append({"key": folder.name, "source": None, "where": "incomplete entry",
                         "image_size": None, "images": 0, "bad_images": 0, "bytes": size,
                         "created": None})
    return rows


def clear_entries(root, keys=()) -> list[str]:
    """Delete the named entries (all of them, and any half-written ones, when none is named);
    returns the keys deleted. An unknown key is an error, so a typo deletes nothing."""
    root = Path(root)
    if not root.is_dir():
        if keys:
            raise DataError(f"no cache entry {keys[0]!r}: {root} does not exist")
        return []
    present = {folder.name: folder for folder in root.iterdir() if folder.is_dir()}
    unknown = [key for key in keys if key not in present]
    if unknown:
        raise DataError(f"no cache entry {', '.join(map(repr, unknown))} in {root}; "
                        "`tledge cache list` shows the keys")
    chosen = list(keys) or sorted(present)
    for key in chosen:
        shutil.rmtree(present[key])
    return chosen
