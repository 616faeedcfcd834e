"""The prepared-data cache: every image decoded and resized once, read from disk after that.

A source's images are decoded by tledge's one image loader (in parallel worker processes for
files), resized to the recipe's size, and written per split as a uint8 `.npy` file
[N, H, W, 3] beside its labels, its file list and one pixel digest per image. Every stage
(training, calibration, validation, benchmark, explain, bundle) and every later build or
recipe that reads the same source at the same size reads that entry instead of the source.
`tledge.data.prepare` writes an entry; this module names, reads, lists and clears them.

An entry is verified like a run directory: every image row against its pixel digest when it
is read, and the labels and class names against the digests `meta.json` records when the
entry is opened; an entry that fails is named as damaged and never used (the caller prepares
it again from the source). A process that opens an entry holds it (`.held/<pid>`, removed
when the process ends): `tledge cache clear` does not delete an entry a running process
holds, and says which.

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

import atexit
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from tledge.errors import DataError
from tledge.rundir import sha256

CACHE_ENV = "TLEDGE_CACHE_DIR"
FORMAT_VERSION = 2  # 2: labels and class names carry digests
HELD = ".held"  # in an entry's folder: one file per process holding it, named by its pid
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


def file_sha256(path) -> str:
    """A source file's sha256 (an npz or csv source's identity)."""
    try:
        return sha256(path)
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None


def files_identity(given) -> str:
    """sha256 over every split's relative paths, labels, sizes and modification times: the
    identity of a folder or csv source ({split: FileSplit}) without reading an image."""
    digest = hashlib.sha256()
    for split, part in given.items():
        for path, relative, label in zip(part.paths, part.relative, part.labels):
            try:
                stat = os.stat(path)
                facts = f"{stat.st_size}\t{stat.st_mtime_ns}"
            except OSError:
                facts = "missing"
            digest.update(f"{split}\t{relative}\t{int(label)}\t{facts}\n".encode())
    return digest.hexdigest()


def pixel_digest(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(),
                           digest_size=DIGEST_BYTES).digest()


def read_npy_header(path):
    """(data offset, shape, dtype) of a .npy file."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _, dtype = reader(handle)
        return handle.tell(), shape, dtype


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
            offset, shape, dtype = read_npy_header(path)
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

    def content_digest(self) -> str:
        """sha256 over the class names and every split's labels and pixel digests: what the
        images are, wherever they came from (a copied folder has new modification times,
        hence a new key, and the same digest)."""
        digest = hashlib.sha256("\n".join(self.class_names).encode())
        for name in sorted(self.splits):
            split = self.splits[name]
            digest.update(f"\n{name}:{len(split.labels)}\n".encode())
            digest.update(np.ascontiguousarray(split.labels, dtype=np.int64).tobytes())
            digest.update(np.ascontiguousarray(split.images.digests, dtype=np.uint8).tobytes())
        return digest.hexdigest()


def labels_digest(labels) -> str:
    """sha256 of a split's labels, as an entry records them."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


def names_digest(class_names) -> str:
    """sha256 of the class names, in order."""
    return hashlib.sha256("\n".join(class_names).encode()).hexdigest()


def open_entry(root, key, damage: list | None = None) -> Entry | None:
    """The complete, verified entry `key` under `root`, held by this process; None when there
    is none, or when it cannot be used: half-written, of an older format, or damaged (labels
    or class names that do not match their digests, files of the wrong shape). Where the
    folder exists but is not usable, `damage` (a list) receives one line saying why."""
    folder = Path(root) / key
    if not folder.is_dir():
        return None
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("key") != key:
            raise DataError("its meta.json is not this entry's")
        if meta.get("format") != FORMAT_VERSION:
            raise DataError(f"written by another version of tledge (format "
                            f"{meta.get('format')!r}, this one reads {FORMAT_VERSION})")
        if meta.get("class_names_sha256") != names_digest(meta["class_names"]):
            raise DataError("its class names do not match their digest")
        splits = {}
        for split, facts in meta["splits"].items():
            labels = np.load(folder / f"{split}.labels.npy", allow_pickle=False)
            digests = np.load(folder / f"{split}.digests.npy", allow_pickle=False)
            if len(labels) != facts["count"] or digests.shape != (facts["count"], DIGEST_BYTES):
                raise DataError(f"its {split} labels or digests are not {facts['count']} rows")
            if labels.dtype.kind not in "iu" or facts.get("labels_sha256") != \
                    labels_digest(labels):
                raise DataError(f"its {split} labels do not match their digest")
            files = None
            if facts.get("files"):
                files = json.loads((folder / f"{split}.files.json").read_text(encoding="utf-8"))
            splits[split] = CachedSplit(ImageRows.open(folder / f"{split}.images.npy", digests),
                                        labels.astype(np.int64), files)
    except FileNotFoundError as error:
        if damage is not None and Path(error.filename or "").name != META:
            damage.append(f"cache entry {folder}: {Path(error.filename).name} is missing")
        return None  # no meta.json: half-written, not an entry yet
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DataError) as error:
        if damage is not None:
            reason = str(error) if isinstance(error, DataError) else \
                f"unreadable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
            damage.append(f"cache entry {folder} is not usable: {reason}")
        return None
    _hold(folder)
    return Entry(key, folder, meta, splits)


# ---- holding: an entry a running process reads is not deleted under it ---------------------

_HELD_HERE: set = set()


def _hold(folder: Path) -> None:
    """Mark `folder` as held by this process until it ends (nothing where the cache cannot be
    written: a read-only cache cannot be cleared either)."""
    marker = folder / HELD / str(os.getpid())
    if marker in _HELD_HERE:
        return
    try:
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
    except OSError:
        return
    if not _HELD_HERE:
        atexit.register(_release_all)
    _HELD_HERE.add(marker)


def _release_all() -> None:
    for marker in list(_HELD_HERE):
        try:
            marker.unlink()
        except OSError:
            pass
        _HELD_HERE.discard(marker)


def holders(folder) -> list[int]:
    """The pids of the other running processes that hold the entry in `folder` (markers of
    processes that have ended are removed)."""
    found = []
    try:
        markers = list((Path(folder) / HELD).iterdir())
    except OSError:
        return found
    for marker in markers:
        try:
            pid = int(marker.name)
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        if _alive(pid):
            found.append(pid)
        else:
            try:
                marker.unlink()
            except OSError:
                pass
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


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


def clear_entries(root, keys=()) -> tuple[list[str], dict[str, list[int]]]:
    """Delete the named entries (all of them, and any half-written ones, when none is named);
    returns (the keys deleted, {key: pids} of those kept because a running process holds
    them). An unknown key is an error, so a typo deletes nothing; so is a named key that a
    running process holds (deleting it would pull the data from under that process)."""
    root = Path(root)
    if not root.is_dir():
        if keys:
            raise DataError(f"no cache entry {keys[0]!r}: {root} does not exist")
        return [], {}
    present = {folder.name: folder for folder in root.iterdir() if folder.is_dir()}
    unknown = [key for key in keys if key not in present]
    if unknown:
        raise DataError(f"no cache entry {', '.join(map(repr, unknown))} in {root}; "
                        "`tledge cache list` shows the keys")
    chosen = list(keys) or sorted(present)
    held = {key: holders(present[key]) for key in chosen}
    held = {key: pids for key, pids in held.items() if pids}
    if keys and held:
        key, pids = next(iter(held.items()))
        raise DataError(f"cache entry {key} is in use by a running tledge process (pid "
                        f"{', '.join(map(str, pids))}); let it finish or stop it, then clear "
                        "it (nothing was deleted)")
    for key in chosen:
        if key not in held:
            shutil.rmtree(present[key])
    return [key for key in chosen if key not in held], held
