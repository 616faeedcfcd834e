"""The `npz` source: arrays x_train, y_train (and optionally x_val, y_val, x_test, y_test,
class_names) in one .npz file, checked and resized to the recipe's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tledge.data.cache import file_sha256
from tledge.data.prepare import ArraySplit
from tledge.data.images import resize_images
from tledge.errors import DataError

_SPLITS = ("train", "val", "test")


def describe_npz(data, seed):
    """The npz source for the data cache: identified by the file's sha256."""
    path = Path(data.path)
    if not path.is_file():
        raise DataError(f"{path}: no such .npz file; check data.path")
    return {"identity": {"source": "npz", "sha256": file_sha256(path)}, "where": str(path),
            "extra": {"path": str(path)}, "gather": lambda size: _npz_arrays(path, size)}


def _npz_arrays(path, size):
    import zipfile
    if not zipfile.is_zipfile(path):  # numpy would advise loading it as pickled objects
        raise DataError(f"{path}: not a .npz archive (a .npz is a zip of .npy arrays); write "
                        "it with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except ValueError as error:
        raise DataError(f"{path}: cannot read an array ({error}); save plain numeric and "
                        "string arrays (np.savez without object arrays)") from None
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: not a readable .npz file ({error}); write it with "
                        "numpy.savez") from None
    known = {f"{axis}_{split}" for axis in "xy" for split in _SPLITS} | {"class_names"}
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise DataError(f"{path}: unknown array(s) {', '.join(unknown)}; tledge reads "
                        f"{', '.join(sorted(known))}")
    given = {}
    for split in _SPLITS:
        x_key, y_key = f"x_{split}", f"y_{split}"
        if x_key not in arrays and y_key not in arrays:
            if split == "train":
                raise DataError(f"{path}: missing keys 'x_train' and 'y_train'; found "
                                f"{', '.join(sorted(arrays)) or 'no arrays'}")
            continue
        for key in (x_key, y_key):
            if key not in arrays:
                raise DataError(f"{path}: has '{x_key if key == y_key else y_key}' but no "
                                f"'{key}'; give both or neither")
        x = _npz_images(path, x_key, arrays.pop(x_key), size)
        y = _npz_labels(path, y_key, arrays[y_key], len(x))
        given[split] = ArraySplit(x, y)
    if len(given["train"].labels) == 0:
        raise DataError(f"{path}: 'x_train' holds no images; add training data")
    largest = max(int(part.labels.max()) for part in given.values() if len(part.labels))
    if "class_names" in arrays:
        names = arrays["class_names"]
        if names.ndim != 1 or len(names) <= largest:
            raise DataError(f"{path}: 'class_names' must be 1-D with more than {largest} "
                            f"names (the largest label), found shape {list(names.shape)}")
        class_names = tuple(str(name) for name in names)
    else:
        class_names = tuple(str(label) for label in range(largest + 1))
    if len(class_names) < 2:
        raise DataError(f"{path}: only one class; a classifier needs at least 2")
    return given, class_names


def _npz_images(path, key, x, size):
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)  # grayscale to RGB
    if x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"{path}: '{key}' must be images [N, h, w, 3] or grayscale "
                        f"[N, h, w], found shape {list(x.shape)}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise DataError(f"{path}: '{key}' holds images of size {x.shape[1]}x{x.shape[2]}; "
                        "store images with pixels")
    if x.dtype.kind == "f":
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise DataError(f"{path}: '{key}' holds {bad:,} NaN or infinite pixel values; "
                            "store pixel values 0-255")
        if x.size and np.nanmax(x) <= 1.0 and np.nanmax(x) > 0:
            raise DataError(f"{path}: '{key}' holds floats in 0-1; tledge expects pixel "
                            "values 0-255 (multiply by 255 or store uint8)")
        if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 255):
            raise DataError(f"{path}: '{key}' holds values outside 0-255 "
                            f"({np.nanmin(x):g} to {np.nanmax(x):g}); store pixel values")
        x = np.rint(np.nan_to_num(x)).astype(np.uint8)
    elif x.dtype != np.uint8:
        if x.dtype.kind not in "iu" or (x.size and (x.min() < 0 or x.max() > 255)):
            raise DataError(f"{path}: '{key}' must be uint8 (or 0-255 numbers), found "
                            f"{x.dtype}")
        x = x.astype(np.uint8)
    return resize_images(x, size)


def _npz_labels(path, key, y, count):
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != count or y.dtype.kind not in "iu":
        raise DataError(f"{path}: '{key}' must be integer labels [N] with N={count} "
                        f"(as many as images), found {y.dtype} {list(y.shape)}")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: '{key}' has negative labels; labels are 0..classes-1")
    return y.astype(np.int64)
