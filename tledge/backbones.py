"""The backbone registry: every feature extractor tledge can train, with what it needs.

A backbone carries its own default and minimum input size, its preprocessing (placed inside
the model graph, so every artifact takes raw 0-255 pixels), its layer count and where
fine-tuning starts by default. Register a new one with `@register_backbone`, after timm's
`@register_model`; the CLI, the recipe checks and the tests pick it up from here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from tledge.errors import WeightsError

# Keras is imported inside the functions that use it: the CLI imports this
# module at start-up, and it takes seconds to load.

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """`pixels * scale + offset`, per channel when the tuples have three entries.

    With `bgr`, the channels are reversed first (RGB in, BGR out) and the per-channel tuples
    are in BGR order, as keras.applications' "caffe" mode (ResNet50, VGG) expects.
    """

    scale: float | tuple[float, float, float] = 1.0
    offset: float | tuple[float, float, float] = 0.0
    bgr: bool = False

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.offset == 0.0 and not self.bgr

    def layer(self, name: str = "preprocess"):
        """The Keras layer that applies it to raw 0-255 pixels, or None for the identity.

        A Rescaling layer when no channel moves. A channel flip becomes a fixed 1x1 Conv2D
        (a permutation matrix times the scale, the offset as bias, not trainable): a built-in
        layer, so a .keras file loads with safe_mode=True and without importing tledge, and
        it converts to one CONV_2D in TFLite and one Conv in ONNX. Its products are with
        exactly 1.0 and 0.0 (caffe mode has scale 1), so the result is exact in float32.
        """
        import keras
        import numpy as np
        if self.is_identity:
            return None
        if not self.bgr:
            return keras.layers.Rescaling(self.scale, self.offset, name=name)
        scale = np.broadcast_to(np.asarray(self.scale, np.float32), (3,))
        offset = np.broadcast_to(np.asarray(self.offset, np.float32), (3,))
        kernel = np.zeros((1, 1, 3, 3), np.float32)
        for out_channel in range(3):  # BGR channel j reads RGB channel 2 - j
            kernel[0, 0, 2 - out_channel, out_channel] = scale[out_channel]
        conv = keras.layers.Conv2D(3, 1, name=name, trainable=False)
        conv.build((None, None, None, 3))
        conv.set_weights([kernel, offset.copy()])
        return conv


@dataclasses.dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable  # (input_shape, weights: str | None, alpha) -> keras.Model without top
    preprocessing: Preprocessing
    default_size: tuple[int, int]
    min_size: int
    layers: int  # layers of the backbone built with weights=None, to check `unfreeze` unbuilt
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


def _mobilenet_v3_file(variant):
    def file(size, alpha):
        # keras names the no-top file by variant and alpha only: every size loads the 224 one
        name = f"weights_mobilenet_v3_{variant}_224_{float(alpha or 1.0)}_float_no_top_v2.h5"
        return name, f"{KERAS_WEIGHTS_URL}mobilenet_v3/{name}"
    return file


def _mobilenet_v3(variant, layers, default_unfreeze):
    """MobileNetV3 keeps keras' own Rescaling to [-1, 1] (include_preprocessing=True), the
    input its ImageNet weights were trained on, so tledge's preprocessing is the identity."""
    application = "MobileNetV3Small" if variant == "small" else "MobileNetV3Large"

    @register_backbone(
        name=f"mobilenet_v3_{variant}", preprocessing=Preprocessing(),
        default_size=(224, 224), min_size=32, layers=layers, default_unfreeze=default_unfreeze,
        alphas=(0.75, 1.0), imagenet_file=_mobilenet_v3_file(variant),
        description=f"MobileNetV3-{variant.capitalize()} (Howard et al. 2019), width "
                    "multiplier alpha; rescales in its own graph")
    def build(input_shape, weights, alpha):
        import keras
        return getattr(keras.applications, application)(
            input_shape=input_shape, include_top=False, weights=weights, alpha=alpha or 1.0,
            minimalistic=False, include_preprocessing=True)
    return build


_mobilenet_v3("small", layers=157, default_unfreeze=33)  # the last two blocks and the head
_mobilenet_v3("large", layers=187, default_unfreeze=33)


def _efficientnet_file(variant):
    def file(size, alpha):
        name = f"efficientnet{variant}_notop.h5"
        # EfficientNet (v1) weights live outside keras' usual tensorflow/ folder
        return name, f"https://storage.googleapis.com/keras-applications/{name}"
    return file


def _efficientnet(variant, size, layers, default_unfreeze):
    """EfficientNet rescales and normalizes inside its own graph: tledge's step is the identity.

    With weights="imagenet" keras adds one weightless Rescaling layer after its Normalization,
    so that backbone has `layers + 1` layers; `layers` counts the weights=None build.
    """
    application = f"EfficientNet{variant.upper()}"

    @register_backbone(
        name=f"efficientnet_{variant}", preprocessing=Preprocessing(),
        default_size=(size, size), min_size=32, layers=layers,
        default_unfreeze=default_unfreeze, imagenet_file=_efficientnet_file(variant),
        description=f"EfficientNet-{variant.upper()} (Tan & Le 2019); rescales and "
                    "normalizes in its own graph")
    def build(input_shape, weights, alpha):
        import keras
        return getattr(keras.applications, application)(
            input_shape=input_shape, include_top=False, weights=weights)
    return build


_efficientnet("b0", 224, layers=237, default_unfreeze=20)
_efficientnet("b1", 240, layers=339, default_unfreeze=31)  # block 7 and the head
_efficientnet("b2", 260, layers=339, default_unfreeze=31)
_efficientnet("b3", 300, layers=384, default_unfreeze=31)


def _efficientnet_v2_file(variant):
    def file(size, alpha):
        name = f"efficientnetv2-{variant}_notop.h5"
        return name, f"{KERAS_WEIGHTS_URL}efficientnet_v2/{name}"
    return file


def _efficientnet_v2(variant, size, layers, default_unfreeze):
    application = f"EfficientNetV2{variant.upper()}"

    @register_backbone(
        name=f"efficientnet_v2_{variant}", preprocessing=Preprocessing(),
        default_size=(size, size), min_size=32, layers=layers,
        default_unfreeze=default_unfreeze, imagenet_file=_efficientnet_v2_file(variant),
        description=f"EfficientNetV2-{variant.upper()} (Tan & Le 2021); rescales and "
                    "normalizes in its own graph")
    def build(input_shape, weights, alpha):
        import keras
        return getattr(keras.applications, application)(
            input_shape=input_shape, include_top=False, weights=weights,
            include_preprocessing=True)
    return build


_efficientnet_v2("b0", 224, layers=270, default_unfreeze=18)  # the last block and the head
_efficientnet_v2("b1", 240, layers=334, default_unfreeze=18)

# keras.applications' "caffe" mode (resnet50 and vgg preprocess_input): RGB to BGR, then the
# ImageNet mean subtracted per channel, in BGR order, without scaling.
CAFFE = Preprocessing(scale=1.0, offset=(-103.939, -116.779, -123.68), bgr=True)


def _keras_file(folder, name):
    return lambda size, alpha: (name, f"{KERAS_WEIGHTS_URL}{folder}/{name}")


@register_backbone(
    name="resnet50", preprocessing=CAFFE, default_size=(224, 224), min_size=32, layers=175,
    default_unfreeze=32,  # the conv5 stage
    imagenet_file=_keras_file("resnet", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    description="ResNet-50 (He et al. 2016); caffe preprocessing (BGR, mean subtracted)")
def _resnet50(input_shape, weights, alpha):
    import keras
    return keras.applications.ResNet50(input_shape=input_shape, include_top=False,
                                       weights=weights)


@register_backbone(
    name="vgg16", preprocessing=CAFFE, default_size=(224, 224), min_size=32, layers=19,
    default_unfreeze=4,  # block 5: three convolutions and the pooling
    imagenet_file=_keras_file("vgg16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    description="VGG-16 (Simonyan & Zisserman 2015); caffe preprocessing")
def _vgg16(input_shape, weights, alpha):
    import keras
    return keras.applications.VGG16(input_shape=input_shape, include_top=False, weights=weights)


@register_backbone(
    name="vgg19", preprocessing=CAFFE, default_size=(224, 224), min_size=32, layers=22,
    default_unfreeze=5,  # block 5: four convolutions and the pooling
    imagenet_file=_keras_file("vgg19", "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    description="VGG-19 (Simonyan & Zisserman 2015); caffe preprocessing")
def _vgg19(input_shape, weights, alpha):
    import keras
    return keras.applications.VGG19(input_shape=input_shape, include_top=False, weights=weights)


@register_backbone(
    name="small_cnn", preprocessing=Preprocessing(scale=1 / 255.0),
    default_size=(64, 64), min_size=16, layers=16, default_unfreeze=6,
    description="a compact CNN (4 conv blocks, BatchNorm); the from-scratch baseline")
def _small_cnn(input_shape, weights, alpha):
    import keras
    from keras import layers
    if weights == "imagenet":
        raise WeightsError("small_cnn has no ImageNet weights; use weights = \"none\", a "
                           "weights file or a recipe")
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (32, 64, 96, 128):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x) if filters != 128 else x
    model = keras.Model(inputs, x, name="small_cnn")
    if weights is not None:  # a weights file: loaded, never silently ignored
        model.load_weights(weights)
    return model
