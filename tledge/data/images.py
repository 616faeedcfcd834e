"""The one image loader: training, calibration, validation, benchmark and prediction all
read pixels through `load_image`, and resize through the same `_resize`, so a model never
sees pixels prepared differently at serve time than at train time.

Conversions, chosen once here:
- every mode becomes 8-bit RGB; grayscale is repeated over the three channels;
- alpha (RGBA, LA, palette transparency) is dropped, not composited: the stored colour under
  a transparent pixel is kept, as `keras.utils.load_img` and `tf.io.decode_png(channels=3)`
  do, so arrays match what those loaders give for the same file;
- 16-bit and 32-bit integer images are scaled to 0-255 (65535 -> 255), not clipped;
- the EXIF orientation tag is applied, so a photo is seen upright, as its labeller saw it;
- animated images (GIF) give their first frame;
- resizing is PIL bilinear to exactly (width, height), only when the size differs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

from tledge.errors import DataError, first_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def is_image_file(path) -> bool:
    """Whether a file name has one of IMAGE_SUFFIXES, in any case."""
    return os.fspath(path).lower().endswith(IMAGE_SUFFIXES)


def visible_dirs(folder: Path) -> list[Path]:
    """The class folders of a folder source: sub-folders (symlinks to folders too), not hidden."""
    return sorted(path for path in folder.iterdir()
                  if path.is_dir() and not path.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    """Image files anywhere below `folder` (as keras' image_dataset_from_directory looks),
    skipping hidden files and folders; sorted, so the order does not depend on the disk."""
    found = []
    for path in folder.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if not hidden and path.is_file() and is_image_file(path.name):
            found.append(path)
    return sorted(found)


def load_image(path, size: tuple[int, int]) -> np.ndarray:
    """Read one image file as RGB pixels at `size`.

    Args:
        path: an image file (JPEG, PNG, BMP, GIF or anything else PIL decodes).
        size: (height, width) of the result.

    Returns:
        uint8 array [height, width, 3].

    Raises:
        DataError: the file is missing or cannot be decoded.
    """
    return load_image_sized(path, size)[0]


def load_image_sized(path, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """`load_image`, and the (height, width) the file had (upright) before resizing."""
    if os.path.exists(path) and not os.path.isfile(path):  # a pipe would block forever
        raise DataError(f"{path}: not a readable image (not a regular file: a folder, a pipe "
                        "or a device); replace or remove it")
    try:
        with Image.open(path) as image:
            image.seek(0)
            # load() forces the decode here, so a truncated file fails inside this try
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except FileNotFoundError:
        raise DataError(f"{path}: not a readable image (no such file)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = first_line(error)
        raise DataError(f"{path}: not a readable image ({reason}); "
                        "replace or remove the file") from None
    return _resize(rgb, size), (rgb.height, rgb.width)


def load_images(paths: Iterable, size: tuple[int, int]) -> np.ndarray:
    """Read many image files with `load_image`; uint8 [N, height, width, 3]."""
    height, width = _check_size(size)
    images = [load_image(path, size) for path in paths]
    if not images:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    return np.stack(images)


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a batch of RGB images the way `load_image` resizes a file.

    Args:
        images: uint8 [N, h, w, 3].
        size: (height, width) of the result.

    Returns:
        uint8 [N, height, width, 3]; `images` itself when it already has that size.

    Raises:
        DataError: `images` is not a uint8 [N, h, w, 3] array.
    """
    height, width = _check_size(size)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"expected uint8 images of shape [N, h, w, 3], found "
                        f"{images.dtype} {list(images.shape)}")
    if images.shape[1:3] == (height, width):
        return images
    out = np.empty((len(images), height, width, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        out[index] = _resize(image, size)
    return out


def _resize(image, size: tuple[int, int]) -> np.ndarray:
    """The one resize: PIL bilinear to exactly (width, height); a PIL image or an array in,
    a uint8 [height, width, 3] array out. Nothing is resampled when the size already fits."""
    height, width = _check_size(size)
    if isinstance(image, np.ndarray):
        if image.shape[:2] == (height, width):
            return image
        image = Image.fromarray(image)
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB (see the module docstring for the choices)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_wide_to_uint8(np.asarray(image), mode), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        # Going through RGBA keeps PIL from warning about palette transparency
        image = image.convert("RGBA")
    if mode in ("PA", "LA", "La"):
        image = image.convert("RGBA")
    return image.convert("RGB")


def _wide_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit gray to 8-bit by scale, so a 16-bit PNG is not clipped to white."""
    if mode.startswith("I;16"):
        top = 65535.0
    elif mode == "F" and pixels.size and pixels.max() <= 1.0:
        top = 1.0  # float images are usually 0-1
    elif pixels.size and pixels.max() > 255:
        top = 65535.0  # 32-bit "I" mode is how PIL hands out most 16-bit files
    else:
        top = 255.0
    scaled = pixels.astype(np.float64) * (255.0 / top)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _check_size(size) -> tuple[int, int]:
    try:
        height, width = (int(side) for side in size)
    except (TypeError, ValueError):
        raise DataError(f"image size must be (height, width), found {size!r}") from None
    if height < 1 or width < 1:
        raise DataError(f"image size must be positive, found {height}x{width}")
    return height, width
