"""A parallel-convolution residual network, trained from scratch.

In the spirit of Alzubaidi et al., "Towards a Better Understanding of Transfer Learning
for Medical Imaging: A Case Study", Applied Sciences 10(13):4523, 2020, whose hybrid model
runs convolutions of several kernel sizes *in parallel*, concatenates them, and adds
residual connections, batch normalisation, ReLU and global average pooling -- a small
network meant to be pretrained on same-domain images rather than ImageNet.

Each block here:  ``[conv kxk for k in kernel_sizes]`` (in parallel, ``filters // n``
channels each, the first block at stride 1 and the others at stride 2) -> concatenate ->
BN -> ReLU -> 3x3 conv -> BN, plus a shortcut (identity, or 1x1 strided conv + BN when the
shape changes) -> add -> ReLU (``block{i}_out``).  The exact layer counts of the paper are
not reproduced; the widths and kernel sizes are arguments.

Example::

    >>> from kmedtl.models import backbone
    >>> backbone("parallel_resnet", input_shape=(32, 32, 1)).output_shape
    (None, 4, 4, 256)
"""

from __future__ import annotations

import keras

from kmedtl.errors import ModelError

DEFAULT_FILTERS = (32, 64, 128, 256)
DEFAULT_KERNELS = (1, 3, 5, 7)


def parallel_resnet(
    include_top=False,
    weights=None,
    input_tensor=None,
    input_shape=None,
    filters=DEFAULT_FILTERS,
    kernel_sizes=DEFAULT_KERNELS,
    name="parallel_resnet",
):
    """Build the parallel-convolution residual network; returns the last feature map."""
    if weights == "imagenet":
        raise ModelError(
            f"{name} has no ImageNet weights; use weights=None or a same-domain weight file"
        )
    if include_top:
        raise ModelError(f"{name}: include_top=True is not supported; use a kmedtl head")
    n = len(kernel_sizes)
    if any(f % n for f in filters):
        raise ModelError(
            f"filters={tuple(filters)} must be divisible by len(kernel_sizes)={n} "
            "(each parallel branch gets filters // n channels)"
        )
    inputs = input_tensor if input_tensor is not None else keras.Input(
        shape=input_shape or (None, None, 3), name="image"
    )
    L = keras.layers
    x = L.Conv2D(filters[0], 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    for i, f in enumerate(filters, start=1):
        stride = 1 if i == 1 else 2
        p = f"block{i}"
        branches = [
            L.Conv2D(f // n, k, strides=stride, padding="same", use_bias=False,
                     name=f"{p}_conv{k}x{k}")(x)
            for k in kernel_sizes
        ]
        y = L.Concatenate(name=f"{p}_concat")(branches) if n > 1 else branches[0]
        y = L.BatchNormalization(name=f"{p}_bn1")(y)
        y = L.ReLU(name=f"{p}_relu1")(y)
        y = L.Conv2D(f, 3, padding="same", use_bias=False, name=f"{p}_conv_mix")(y)
        y = L.BatchNormalization(name=f"{p}_bn2")(y)
        if stride != 1 or x.shape[-1] != f:
            s = L.Conv2D(f, 1, strides=stride, use_bias=False, name=f"{p}_shortcut_conv")(x)
            s = L.BatchNormalization(name=f"{p}_shortcut_bn")(s)
        else:
            s = x
        x = L.Add(name=f"{p}_add")([y, s])
        x = L.ReLU(name=f"{p}_out")(x)
    source = keras.utils.get_source_inputs(inputs) if input_tensor is not None else inputs
    model = keras.Model(source, x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model
