"""The backbone registry: every feature extractor tledge can train, with what it needs.

A backbone carries its own default and minimum input size, its preprocessing (placed inside
the model graph, so every artifact takes raw 0-255 pixels), its layer count and where
fine-tuning starts by default. Register a new one with `@register_backbone`, after timm's
`@register_model`; the CLI, the recipe checks and the tests pick it up from here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """`pixels * scale + offset`, per channel when the tuples have three entries."""

    scale: float | tuple[float, float, float] = 1.0
    offset: float | tuple[float, float, float] = 0.0

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.offset == 0.0


@dataclasses.dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable  # (input_shape, weights: str | None, alpha) -> keras.Model without top
    preprocessing: Preprocessing
    default_size: tuple[int, int]
    min_size: int
    layers: int  # layers of the built backbone, for checking `unfreeze` without building it
    default_unfreeze: int
    alphas: tuple[float, ...] = ()
    imagenet_file: Callable | None = None  # (size, alpha) -> (file name, url)
    description: str = ""

    def create(self, image_size, *, weights=None, alpha=None):
        """Build the backbone (no classification head) for images of `image_size`."""
        return self.build((*image_size, 3), weights, alpha)


BACKBONES: dict[str, Backbone] = {}


def register_backbone(**spec):
    """Decorator: register the decorated builder under `spec['name']`."""
    def decorate(build):
        backbone = Backbone(build=build, **spec)
        if backbone.name in BACKBONES:
            raise ValueError(f"backbone {backbone.name!r} is registered twice")
        BACKBONES[backbone.name] = backbone
        return build
    return decorate


def _mobilenet_v2_file(size, alpha):
    rows = size[0] if size[0] in (96, 128, 160, 192, 224) else 224
    name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"
    return name, f"{KERAS_WEIGHTS_URL}mobilenet_v2/{name}"


@register_backbone(
    name="mobilenet_v2", preprocessing=Preprocessing(scale=1 / 127.5, offset=-1.0),
    default_size=(224, 224), min_size=32, layers=154, default_unfreeze=30,
    alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4), imagenet_file=_mobilenet_v2_file,
    description="MobileNetV2 (Sandler et al. 2018), width multiplier alpha")
def _mobilenet_v2(input_shape, weights, alpha):
    import keras
    return keras.applications.MobileNetV2(input_shape=input_shape, include_top=False,
                                          weights=weights, alpha=alpha or 1.0)


def _efficientnet_file(size, alpha):
    name = "efficientnetb0_notop.h5"
    return name, f"{KERAS_WEIGHTS_URL}{name}"


@register_backbone(
    name="efficientnet_b0", preprocessing=Preprocessing(),  # normalizes inside the backbone
    default_size=(224, 224), min_size=32, layers=237, default_unfreeze=20,
    imagenet_file=_efficientnet_file,
    description="EfficientNet-B0 (Tan & Le 2019); rescales and normalizes in its own graph")
def _efficientnet_b0(input_shape, weights, alpha):
    import keras
    return keras.applications.EfficientNetB0(input_shape=input_shape, include_top=False,
                                             weights=weights)


@register_backbone(
    name="small_cnn", preprocessing=Preprocessing(scale=1 / 255.0),
    default_size=(64, 64), min_size=16, layers=16, default_unfreeze=6,
    description="a compact CNN (4 conv blocks, BatchNorm); the from-scratch baseline")
def _small_cnn(input_shape, weights, alpha):
    import keras
    from keras import layers
    if weights == "imagenet":
        from tledge.errors import WeightsError
        raise WeightsError("small_cnn has no ImageNet weights; use weights = \"none\", a "
                           "weights file or a recipe")
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (32, 64, 96, 128):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x) if filters != 128 else x
    return keras.Model(inputs, x, name="small_cnn")
