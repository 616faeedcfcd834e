"""What a model costs: floating-point operations per image and parameter counts.

FLOPs are counted from the Keras graph, not measured: each weighted linear layer contributes
2 FLOPs (one multiply, one add) per multiply-accumulate, the convention of fvcore and of most
papers' "FLOPs" once their multiply-add figures are doubled.
"""

from __future__ import annotations

import dataclasses
import math

from tledge.model import load_model
from tledge.rundir import artifacts, verified_artifact

# Keras is imported inside the functions that use it: the CLI imports this
# module at start-up, and it takes seconds to load.


@dataclasses.dataclass(frozen=True)
class BackboneCost:
    """What one backbone (no classification head) costs at one input size."""

    name: str
    image_size: tuple[int, int]
    trainable_params: int
    total_params: int
    flops: int  # per image, see count_flops


def backbone_cost(backbone, image_size=None, alpha=None) -> BackboneCost:
    """Build `backbone` without weights at `image_size` (its default if None) and count it.

    Raises:
        ValueError: `image_size` is below the backbone's minimum.
    """
    image_size = tuple(image_size or backbone.default_size)
    if min(image_size) < backbone.min_size:
        raise ValueError(f"'{backbone.name}' needs at least {backbone.min_size}x"
                         f"{backbone.min_size}, received {image_size[0]}x{image_size[1]}")
    model = backbone.create(image_size, weights=None, alpha=alpha)
    trainable, total = count_params(model)
    return BackboneCost(backbone.name, image_size, trainable, total,
                        count_flops(model, (*image_size, 3)))


def count_flops(model, input_shape=None) -> int:
    """FLOPs for one image through `model`: 2 per multiply-accumulate of its linear layers.

    Counted: Conv1D/2D/3D (grouped too), DepthwiseConv1D/2D, SeparableConv1D/2D (depthwise
    and pointwise), Conv1D/2D/3DTranspose and Dense, from the shapes the graph gives each
    call of the layer, recursing into nested models. A layer's MACs are the number of output
    positions (input positions for a transposed convolution) times the size of its kernel,
    which covers groups and depth multipliers. Not counted: bias adds, activations,
    BatchNormalization (folded into the convolution by every exporter), pooling, padding,
    elementwise adds and multiplies (residuals, squeeze-excite gates) and resizing; together
    they are well under 1% of a convolutional network's total.

    Args:
        model: a built functional or Sequential `keras.Model`.
        input_shape: (height, width, channels) the caller expects; FLOPs depend on it, so a
            model built for another shape is an error rather than a silent other count.

    Raises:
        ValueError: the model is not a graph model, its shapes are not fully defined, or it
            was built for another input shape.
    """
    graph = _graph(model)
    if input_shape is not None:
        built = tuple(graph.inputs[0].shape[1:])
        if built != tuple(input_shape):
            raise ValueError(f"count_flops: model '{model.name}' is built for input shape "
                             f"{built}, received input_shape={tuple(input_shape)}; build the "
                             "model for the shape to count")
    return 2 * _macs(graph)


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; non-trainable include BatchNorm statistics."""
    trainable = sum(math.prod(weight.shape) for weight in model.trainable_weights)
    total = sum(math.prod(weight.shape) for weight in model.weights)
    return int(trainable), int(total)


def _graph(model):
    """The functional graph of `model` (a Sequential model keeps one inside)."""
    import keras
    graph = getattr(model, "_functional", None) if isinstance(model, keras.Sequential) else model
    if graph is None or not hasattr(graph, "_nodes_by_depth"):
        raise ValueError(f"count_flops: expected a built functional or Sequential keras.Model, "
                         f"received {type(model).__name__} '{model.name}'")
    return graph


def _macs(graph) -> int:
    import keras
    total = 0
    for nodes in graph._nodes_by_depth.values():
        for node in nodes:
            layer = node.operation
            if isinstance(layer, keras.Model):
                total += _macs(_graph(layer))  # a nested model counted once per call
            else:
                total += _layer_macs(layer, node)
    return total


def _layer_macs(layer, node) -> int:
    from keras import layers
    if isinstance(layer, (layers.Conv1DTranspose, layers.Conv2DTranspose,
                          layers.Conv3DTranspose)):
        # every input position scatters the whole kernel
        kernels, shape = [layer.kernel], node.arguments.keras_tensors[0].shape
    elif isinstance(layer, (layers.SeparableConv1D, layers.SeparableConv2D)):
        # depthwise at every output position, then pointwise at every output position
        kernels, shape = [layer.depthwise_kernel, layer.pointwise_kernel], node.outputs[0].shape
    elif isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D, layers.DepthwiseConv1D,
                            layers.DepthwiseConv2D, layers.Dense)):
        # kernel (*window, in_channels / groups, out_channels) or (*window, in, multiplier)
        kernels, shape = [layer.kernel], node.outputs[0].shape
    else:
        return 0
    positions = shape[1:-1]  # every axis but batch and channels
    if any(dim is None for dim in positions):
        raise ValueError(f"count_flops: layer '{layer.name}' has an undefined output shape "
                         f"{tuple(shape)}; build the model with a fixed input size")
    return math.prod(positions) * sum(math.prod(kernel.shape) for kernel in kernels)


def model_flops(run_dir, manifest) -> int | None:
    """FLOPs per image of a run's Keras model, counted once from its verified file; None for
    a run without one, or a graph the counter does not understand."""
    entry = next((e for e in artifacts(manifest) if e["name"] == "keras"), None)
    if entry is None:
        return None
    try:
        return int(count_flops(load_model(verified_artifact(run_dir, entry))))
    except (ValueError, TypeError):
        return None
