"""The `cifar10` source: keras' own download and cache, read without unsafe unpickling.

keras.datasets.cifar10 caches under `$KERAS_HOME/datasets` (read at import, so tledge reads
the variable itself at call time). Already extracted batches are used as they are; otherwise
the archive is fetched through `keras.utils.get_file` with keras' name, URL and checksum,
and offline the error says which file to download and where to unpack it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from tledge.data.images import resize_images
from tledge.data.prepare import ArraySplit
from tledge.errors import DataError, first_line

# Keras is imported inside the functions that use it: the CLI imports this
# module at start-up, and it takes seconds to load.

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
_CIFAR_ORIGIN = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
# keras.datasets.cifar10 caches under this name (archive: <name>_archive, extracted: <name>/)
_CIFAR_KERAS_NAME = "cifar-10-batches-py-target"
_CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def describe_cifar10(data, seed):
    """The `cifar10` source for the data cache: identified by its batch files' sizes and
    modification times; gathered as CIFAR-10's train and test sets, resized. A clear
    message offline."""
    folder = _cifar_folder()
    identity = []
    for name in _CIFAR_BATCHES:
        stat = (folder / name).stat()
        identity.append([name, stat.st_size, stat.st_mtime_ns])

    def gather(size):
        x_train, y_train = _cifar_batches(folder, _CIFAR_BATCHES[:-1])
        x_test, y_test = _cifar_batches(folder, _CIFAR_BATCHES[-1:])
        given = {"train": ArraySplit(resize_images(x_train, size), y_train),
                 "test": ArraySplit(resize_images(x_test, size), y_test)}
        return given, CIFAR10_CLASSES
    return {"identity": {"source": "cifar10", "batches": identity}, "where": str(folder),
            "extra": {"path": str(folder)}, "gather": gather}


def cifar10_datasets_dir() -> Path:
    """Where CIFAR-10 is looked for and cached: $KERAS_HOME/datasets, else ~/.keras/datasets.

    Read at call time: keras itself reads KERAS_HOME once, when it is imported."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home).expanduser() / "datasets"


def _cifar_folder() -> Path:
    """The extracted `cifar-10-batches-py` folder, downloaded through keras if not there."""
    datasets = cifar10_datasets_dir()
    # keras 3 extracts to <name>/cifar-10-batches-py; `tar xzf` by hand (and keras 2) give
    # cifar-10-batches-py directly. Either is read without touching the network.
    for folder in (datasets / _CIFAR_KERAS_NAME / "cifar-10-batches-py",
                   datasets / "cifar-10-batches-py"):
        if all((folder / name).is_file() for name in _CIFAR_BATCHES):
            return folder
    try:
        import keras
        datasets.mkdir(parents=True, exist_ok=True)
        # The same call keras.datasets.cifar10.load_data makes, but with the cache folder
        # given, so a KERAS_HOME set after keras was imported is honoured. It reuses a
        # <name>_archive already in the folder when its sha256 matches.
        extracted = keras.utils.get_file(fname=_CIFAR_KERAS_NAME, origin=_CIFAR_ORIGIN,
                                         extract=True, file_hash=_CIFAR_SHA256,
                                         cache_dir=str(datasets.parent))
    except Exception as error:  # keras raises bare Exception for a failed download
        reason = first_line(error)
        raise DataError(
            f"cifar10: cannot get {_CIFAR_ORIGIN} ({reason}); download cifar-10-python.tar.gz "
            f"where there is network and unpack it with `tar xzf cifar-10-python.tar.gz -C "
            f"{datasets}` so that {datasets / 'cifar-10-batches-py' / 'data_batch_1'} exists "
            "(set KERAS_HOME to use another folder than ~/.keras)") from None
    folder = Path(extracted) / "cifar-10-batches-py"
    missing = [name for name in _CIFAR_BATCHES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}; delete {Path(extracted)} "
                        f"and unpack {_CIFAR_ORIGIN} again")
    return folder


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; refuse anything but numpy arrays, so a tampered file
    cannot run code (keras guards its own reader the same way)."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar_batches(folder: Path, names) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 3] and labels int64 [N] from CIFAR python batch files."""
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as file:
                batch = _ArrayUnpickler(file, encoding="bytes").load()
            pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            batch_labels = np.asarray(batch[b"labels"], dtype=np.int64).reshape(-1)
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError,
                ValueError) as error:
            raise DataError(f"{path}: not a CIFAR-10 batch ({error}); unpack "
                            f"{_CIFAR_ORIGIN} again") from None
        if len(pixels) != len(batch_labels):
            raise DataError(f"{path}: {len(pixels)} images but {len(batch_labels)} labels")
        images.append(pixels.transpose(0, 2, 3, 1))  # stored channels-first
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)
