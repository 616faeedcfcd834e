"""Common image corruptions: the shifts between where a model was trained and where it runs.

Each corruption is a function of uint8 images [N, H, W, 3] and one parameter, and has five
severities after the standard corruption benchmark (Hendrycks & Dietterich 2019, "ImageNet-C"):
a cheap camera (noise, blur, JPEG), another light (brightness, contrast). `tledge corrupt`
writes a shifted copy of an image folder with one of them; the synthetic source's domain
settings use the same functions, so a shift practised offline is a shift a user can make of
their own photos.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from tledge.data.images import image_files, visible_dirs
from tledge.errors import DataError, first_line


def brightness(images, shift: float, rng=None):
    """Every pixel moved by `shift` x 255 (positive: brighter)."""
    return _clip(images.astype(np.float32) + shift * 255.0)


def contrast(images, factor: float, rng=None):
    """Each image's pixels pulled towards (factor < 1) or pushed from its mean colour."""
    images = images.astype(np.float32)
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    return _clip(mean + (images - mean) * factor)


def gaussian_noise(images, sigma: float, rng=None):
    """Sensor noise: gaussian, `sigma` x 255 per channel."""
    rng = rng if rng is not None else np.random.default_rng(0)
    noise = rng.standard_normal(images.shape, dtype=np.float32) * (sigma * 255.0)
    return _clip(images.astype(np.float32) + noise)


def gaussian_blur(images, sigma: float, rng=None):
    """Defocus: a gaussian blur of `sigma` pixels."""
    if sigma <= 0:
        return images.astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))
                     for image in images.astype(np.uint8)])


def jpeg(images, quality: float, rng=None):
    """JPEG compression at `quality` (1-95)."""
    out = []
    for image in images.astype(np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        out.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return np.stack(out)


# name -> (function, its parameter at severities 1 to 5)
CORRUPTIONS = {
    "brightness": (brightness, (0.1, 0.2, 0.3, 0.4, 0.5)),
    "contrast": (contrast, (0.4, 0.3, 0.2, 0.1, 0.05)),
    "gaussian_noise": (gaussian_noise, (0.08, 0.12, 0.18, 0.26, 0.38)),
    "gaussian_blur": (gaussian_blur, (1.0, 2.0, 3.0, 4.0, 6.0)),
    "jpeg": (jpeg, (25, 18, 15, 10, 7)),
}


def corrupt(images, name: str, severity: int, seed: int = 0):
    """`images` with corruption `name` at `severity` (1 to 5)."""
    function, levels = CORRUPTIONS[name]
    return function(np.asarray(images), levels[severity - 1], np.random.default_rng(seed))


def corrupt_folder(source, out, name: str, severity: int, *, seed: int = 0, log=None) -> int:
    """Write every image under `source` (class sub-folders, any depth) to the same place under
    `out`, corrupted, as PNG; returns how many were written.

    Raises:
        DataError: `out` is not empty or lies inside `source`, `source` holds no image, or
            an image cannot be read.
    """
    source, out = Path(source).resolve(), Path(out).resolve()
    if out == source or source in out.parents:
        raise DataError(f"{out} is inside {source}; write the corrupted copy elsewhere")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty; choose a new folder for the corrupted copy")
    # the images a folder source reads: class folders (symlinked ones too), any depth below
    where = {path: out / folder.name / path.relative_to(folder)
             for folder in visible_dirs(source) for path in image_files(folder)}
    files = sorted(where)
    targets = {}
    for path in files:  # a.jpg and a.png would both become a.png
        target = where[path].with_suffix(".png")
        if target in targets:
            raise DataError(f"{targets[target].name} and {path.name} in {path.parent} would "
                            f"both be written as {target.name}; rename one")
        targets[target] = path
    if not files:
        raise DataError(f"{source}: no images (expected class sub-folders of images)")
    rng = np.random.default_rng(seed)
    function, levels = CORRUPTIONS[name]
    for number, path in enumerate(files, 1):
        try:
            with Image.open(path) as opened:
                image = np.asarray(opened.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(f"{path}: not a readable image ({first_line(error)})") from None
        target = where[path].with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(function(image[None], levels[severity - 1], rng)[0]).save(target)
        if log and number % 500 == 0:
            log(f"corrupt: {number} of {len(files)} images")
    return len(files)


def _clip(values):
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
