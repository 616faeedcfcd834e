"""A generated dataset of shapes: deterministic, offline, fast, and learnable by a small CNN.

Each class is a shape or a texture drawn as a mask in a jittered frame (position, scale,
rotation up to +-15 degrees, so `square` never becomes `diamond` nor `plus` becomes
`cross`). Foreground and background colours are drawn independently from one distribution
for every image, so colour says nothing about the class: the expected mean colour of an
image is the same for every class, and only structure tells classes apart.

A multi-task set ([[data.tasks]]) labels each image several ways at once: its shape, the
colour the shape is painted in, and its size; each combination of labels is a class of its
own for splitting, so every split holds every combination.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np

from tledge.data import corruptions
from tledge.errors import DataError

# Shapes are functions of (u, v): coordinates in the shape's own frame, where the shape
# fills roughly the square [-1, 1]^2 and v grows downwards.
_Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _box(u, v, half=0.8):
    return np.maximum(np.abs(u), np.abs(v)) < half


def _circle(u, v):
    return u * u + v * v < 0.8 ** 2


def _ring(u, v):
    radius2 = u * u + v * v
    return (radius2 > 0.5 ** 2) & (radius2 < 0.85 ** 2)


def _square(u, v):
    return _box(u, v, 0.7)


def _frame(u, v):
    return _box(u, v, 0.8) & ~_box(u, v, 0.5)


def _diamond(u, v):
    return np.abs(u) + np.abs(v) < 0.9


def _triangle(u, v):
    # Apex up at v = -0.8, base at v = 0.6, 1.6 wide
    return (v < 0.6) & (np.abs(u) < (v + 0.8) * (0.8 / 1.4))


def _cross(u, v):
    near_diagonal = np.minimum(np.abs(u - v), np.abs(u + v)) < 0.28
    return near_diagonal & _box(u, v, 0.8)


def _plus(u, v):
    return ((np.abs(u) < 0.2) | (np.abs(v) < 0.2)) & _box(u, v, 0.8)


def _star(u, v):
    angle = np.arctan2(u, -v)  # 0 points up, so one spike is on top
    spike = np.abs(((angle * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at spikes, 0 between
    return np.sqrt(u * u + v * v) < 0.35 + 0.55 * spike


def _hbars(u, v):
    return (np.sin(v * np.pi * 2.5) > 0) & _box(u, v, 0.8)


def _vbars(u, v):
    return (np.sin(u * np.pi * 2.5) > 0) & _box(u, v, 0.8)


def _diagonal(u, v):
    return (np.sin((u + v) * np.pi * 2.0) > 0) & _box(u, v, 0.8)


def _checker(u, v):
    cells = np.floor((u + 0.8) * 2.5) + np.floor((v + 0.8) * 2.5)
    return (cells % 2 == 0) & _box(u, v, 0.8)


def _grid(u, v):
    lines = (np.abs(((u + 0.8) % 0.8) - 0.4) > 0.3) | (np.abs(((v + 0.8) % 0.8) - 0.4) > 0.3)
    return lines & _box(u, v, 0.85)


def _dots(u, v):
    # A 3x3 lattice of small discs
    du = ((u + 0.9) % 0.6) - 0.3
    dv = ((v + 0.9) % 0.6) - 0.3
    return (du * du + dv * dv < 0.17 ** 2) & _box(u, v, 0.9)


def _ellipse(u, v):
    return (u / 0.9) ** 2 + (v / 0.42) ** 2 < 1.0


def _arc(u, v):
    # The lower half of a thick ring: a "U"
    return _ring(u, v) & (v > -0.1)


def _crescent(u, v):
    shifted = (u - 0.35) ** 2 + v * v
    return _circle(u, v) & (shifted > 0.65 ** 2)


def _zigzag(u, v):
    wave = np.abs(((u + 0.8) % 0.8) - 0.4) * 1.6 - 0.32  # triangle wave, period 0.8
    return (np.abs(v - wave) < 0.17) & (np.abs(u) < 0.85)


_SHAPES: dict[str, _Mask] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "cross": _cross,
    "ring": _ring, "star": _star, "hbars": _hbars, "checker": _checker,
    "vbars": _vbars, "diagonal": _diagonal, "dots": _dots, "diamond": _diamond,
    "ellipse": _ellipse, "plus": _plus, "arc": _arc, "zigzag": _zigzag,
    "frame": _frame, "grid": _grid, "crescent": _crescent,
}

SHAPES: tuple[str, ...] = tuple(_SHAPES)

_MAX_ROTATION = np.deg2rad(15.0)
_MIN_CONTRAST = 90.0  # luma difference (0-255) between foreground and background


# The attributes a multi-task synthetic set labels besides the shape ([[data.tasks]] with
# labels = "colour" or "size"): the shape's colour, and its size as a range of scales
COLOURS = {"red": (215, 35, 35), "green": (35, 170, 55), "blue": (40, 75, 220),
           "yellow": (235, 215, 35), "purple": (140, 50, 190), "orange": (245, 135, 25),
           "white": (240, 240, 240), "black": (20, 20, 20)}
SIZES = ("small", "large")
_SIZE_SCALES = {"small": (0.45, 0.62), "large": (0.78, 0.95)}
ATTRIBUTES = ("shape", "colour", "size")


def generate(classes: Sequence[str], samples_per_class: int, size: tuple[int, int],
             noise: float, seed: int, domain=None,
             attributes=None) -> tuple[np.ndarray, np.ndarray]:
    """Draw a labelled image set of the given shape classes.

    Args:
        classes: names from SHAPES; label i is classes[i].
        samples_per_class: images drawn for each class.
        size: (height, width) of every image.
        noise: standard deviation of gaussian pixel noise, as a fraction of 255.
        seed: the same arguments and seed give identical arrays.
        domain: how the world looks (`DomainRecipe`: palette, background texture, contrast,
            brightness, blur); None or the default domain draws the same images as ever.
        attributes: several labellings at once (multi-task): [(kind, values)] with kind
            shape | colour | size. The classes are then every combination of the values
            (`joint_classes`), `samples_per_class` images each; a shape not labelled is
            drawn from `classes`, a colour not labelled is random. None: shapes only.

    Returns:
        (x, y): uint8 [N, height, width, 3] and int64 [N], grouped by class in `classes`
        order (or `joint_classes(attributes)` order), N = classes * samples_per_class.

    Raises:
        DataError: an unknown class name or a non-positive count or size.
    """
    unknown = [name for name in classes if name not in _SHAPES]
    if unknown:
        raise DataError(f"unknown synthetic classes {', '.join(map(repr, unknown))}; "
                        f"choose from {', '.join(SHAPES)}")
    if samples_per_class < 1:
        raise DataError(f"samples_per_class must be at least 1, found {samples_per_class}")
    height, width = (int(side) for side in size)
    if height < 1 or width < 1:
        raise DataError(f"image size must be positive, found {height}x{width}")

    rng = np.random.default_rng(seed)
    combinations = joint_classes(attributes) if attributes else None
    total = (len(combinations) if combinations else len(classes)) * samples_per_class
    labels = np.repeat(np.arange(total // samples_per_class, dtype=np.int64), samples_per_class)
    short_side = min(height, width)
    # Pixel centres, relative to the image centre
    rows = np.arange(height, dtype=np.float32)[:, None] + 0.5 - height / 2
    cols = np.arange(width, dtype=np.float32)[None, :] + 0.5 - width / 2

    # Every random draw for the whole set is made up front, in a fixed order, so the
    # result depends on the seed alone and not on how the loop below is written.
    scales = rng.uniform(0.55, 0.95, total) * short_side / 2
    slack = short_side / 2 - scales * 0.9
    shifts = rng.uniform(-1.0, 1.0, (total, 2)) * slack[:, None]
    angles = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, total)
    foregrounds, backgrounds = _colour_pairs(rng, total)
    grain = rng.standard_normal((total, height, width, 3), dtype=np.float32)
    shape_of = np.asarray(classes)[labels] if not combinations else \
        _attributes(combinations, attributes, labels, classes, scales, shifts, foregrounds,
                    backgrounds, short_side, seed)

    shifted = domain is not None and not is_default(domain)
    if shifted:
        foregrounds, backgrounds = _palette(foregrounds, domain.palette), \
            _palette(backgrounds, domain.palette)
        textures = _textures(domain.background, total, rows, cols, short_side, seed)

    images = np.empty((total, height, width, 3), dtype=np.uint8)
    for index in range(total):
        cos, sin = np.cos(angles[index]), np.sin(angles[index])
        dy = (rows - shifts[index, 0]) / scales[index]
        dx = (cols - shifts[index, 1]) / scales[index]
        u = cos * dx + sin * dy
        v = -sin * dx + cos * dy
        mask = _SHAPES[shape_of[index]](u, v)
        background = backgrounds[index] if not shifted or textures is None else \
            backgrounds[index] + textures[index][..., None]
        image = np.where(mask[..., None], foregrounds[index], background)
        if shifted:  # the scene, then the optics (blur), then the sensor (noise)
            image = corruptions.contrast(image[None], domain.contrast)
            image = corruptions.brightness(image, domain.brightness)
            image = corruptions.gaussian_blur(image, domain.blur)[0].astype(np.float32)
        image = image + grain[index] * (noise * 255.0)
        images[index] = np.clip(np.rint(image), 0, 255)
    return images, labels


def attribute_values(attributes) -> dict:
    """What the attributes' names stand for (colours in RGB, sizes as scales): part of the
    data cache's key, so changing what a name draws prepares the data again."""
    kinds = {kind: names for kind, names in attributes}
    return {"colour": {name: list(COLOURS[name]) for name in kinds.get("colour", ())},
            "size": {name: list(_SIZE_SCALES[name]) for name in kinds.get("size", ())}}


def joint_classes(attributes) -> list[tuple[str, ...]]:
    """Every combination of the attributes' values, the first varying slowest."""
    return list(itertools.product(*[tuple(values) for _, values in attributes]))


def _attributes(combinations, attributes, labels, classes, scales, shifts, foregrounds,
                backgrounds, short_side, seed) -> np.ndarray:
    """Give each image the shape, colour and size of its combination (in place for scales,
    shifts and colours); return each image's shape. Its own generator: the draws shared with
    a shapes-only set stay as they were."""
    rng = np.random.default_rng([seed, 13])
    kinds = [kind for kind, _ in attributes]
    chosen = np.asarray(combinations, dtype=object)[labels]
    total = len(labels)
    shape_of = chosen[:, kinds.index("shape")] if "shape" in kinds \
        else np.asarray(classes)[rng.integers(0, len(classes), total)]
    if "size" in kinds:
        unit = rng.uniform(0.0, 1.0, total)
        low, high = np.array([_SIZE_SCALES[name] for name in chosen[:, kinds.index("size")]]).T
        old_slack = short_side / 2 - scales * 0.9
        scales[:] = (low + unit * (high - low)) * short_side / 2
        shifts *= ((short_side / 2 - scales * 0.9) / old_slack)[:, None]
    if "colour" in kinds:
        named = np.array([COLOURS[name] for name in chosen[:, kinds.index("colour")]],
                         dtype=np.float32)
        foregrounds[:] = np.clip(named + rng.uniform(-20, 20, named.shape), 0, 255)
        # a conveyor belt, not a rainbow: backgrounds are greys (slightly tinted), redrawn
        # until the shape stands out from them
        luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        backgrounds[:] = _greys(rng, total)
        while True:
            weak = np.abs((foregrounds - backgrounds) @ luma) < _MIN_CONTRAST / 2
            if not weak.any():
                break
            backgrounds[weak] = _greys(rng, int(weak.sum()))
    return np.asarray(shape_of, dtype=object)


def _greys(rng, count) -> np.ndarray:
    return rng.uniform(0, 255, (count, 1)) + rng.uniform(-12, 12, (count, 3))


DEFAULT_DOMAIN = {"palette": "any", "background": "flat", "contrast": 1.0, "brightness": 0.0,
                  "blur": 0.0}
PALETTES = ("any", "warm", "cool", "grey", "dark", "light")
BACKGROUNDS = ("flat", "texture")


def is_default(domain) -> bool:
    return all(getattr(domain, key) == value for key, value in DEFAULT_DOMAIN.items())


def _palette(colours: np.ndarray, palette: str) -> np.ndarray:
    """Colours as another world shows them (uniform colours mapped into the palette)."""
    if palette == "warm":
        return colours * np.array([1.0, 0.75, 0.45], np.float32) + np.array([40, 10, 0])
    if palette == "cool":
        return colours * np.array([0.45, 0.75, 1.0], np.float32) + np.array([0, 10, 40])
    if palette == "grey":
        luma = colours @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.repeat(luma[:, None], 3, axis=1)
    if palette == "dark":
        return colours * 0.45
    if palette == "light":
        return 140.0 + colours * 0.45
    return colours


def _textures(background: str, total: int, rows, cols, short_side: int, seed: int):
    """Per image, a striped texture (random direction, period and phase) of amplitude 45
    for the background, or None for flat backgrounds. Drawn from its own generator, so a
    textured domain shows the same shapes in the same colours as a flat one."""
    if background != "texture":
        return None
    rng = np.random.default_rng([seed, 7])
    angles = rng.uniform(0, np.pi, total)
    periods = rng.uniform(0.15, 0.4, total) * short_side
    phases = rng.uniform(0, 2 * np.pi, total)
    return np.stack([45.0 * np.sin(2 * np.pi * (np.cos(a) * cols + np.sin(a) * rows) / p + f)
                     for a, p, f in zip(angles, periods, phases)]).astype(np.float32)


def _colour_pairs(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent uniform colours for foreground and background, redrawn until their
    brightness differs enough to see the shape. The rule is symmetric in the two, so
    both keep the same distribution and the mean colour stays uninformative."""
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    foregrounds = rng.uniform(0, 255, (count, 3)).astype(np.float32)
    backgrounds = rng.uniform(0, 255, (count, 3)).astype(np.float32)
    while True:
        weak = np.abs((foregrounds - backgrounds) @ luma) < _MIN_CONTRAST
        if not weak.any():
            return foregrounds, backgrounds
        redraw = int(weak.sum())
        foregrounds[weak] = rng.uniform(0, 255, (redraw, 3))
        backgrounds[weak] = rng.uniform(0, 255, (redraw, 3))
