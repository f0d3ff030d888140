"""The Transfusion CBR family: small conv-BN-ReLU networks trained from scratch.

Raghu, Zhang, Kleinberg & Bengio, "Transfusion: Understanding Transfer Learning for
Medical Imaging", NeurIPS 2019 (arXiv:1902.07208), Appendix on the CBR architectures:
each layer is a 2-D convolution (stride 1), batch normalisation and ReLU, followed by a
3x3 max-pool with stride 2; the network ends in global average pooling and one dense
layer.  Channel and kernel configurations (as in the paper and in independent
re-implementations, e.g. the ``_CONFIGS`` table of several public PyTorch ports):

===========  ==========================  ======
name         channels                    kernel
===========  ==========================  ======
CBR-LargeT   32, 64, 128, 256, 512       7x7
CBR-LargeW   64, 128, 256, 512           7x7
CBR-Small    32, 64, 128, 256            7x7
CBR-Tiny     64, 128, 256, 512           5x5
===========  ==========================  ======

kmedtl returns the feature map after the last pool (the *backbone*); the heads add global
average pooling and the dense layer, which together give the paper's network.  We use
``"same"`` padding for convolutions and pools so the networks accept small inputs (the
paper does not fix the padding; on 224 px+ images the choice changes only a few border
pixels per block).

The builders follow the ``keras.applications`` signature so the backbone registry treats
them like any other family.

Example::

    >>> from kmedtl.models import backbone
    >>> bb = backbone("cbr_tiny", input_shape=(32, 32, 1))
    >>> bb.output_shape
    (None, 2, 2, 512)
"""

from __future__ import annotations

import keras

from kmedtl.errors import ModelError

CBR_CONFIGS: dict[str, tuple[tuple[int, ...], int]] = {
    "cbr_larget": ((32, 64, 128, 256, 512), 7),
    "cbr_largew": ((64, 128, 256, 512), 7),
    "cbr_small": ((32, 64, 128, 256), 7),
    "cbr_tiny": ((64, 128, 256, 512), 5),
}


def _input(input_tensor, input_shape):
    if input_tensor is not None:
        return input_tensor
    return keras.Input(shape=input_shape or (None, None, 3), name="image")


def _check_weights(weights, name):
    if weights == "imagenet":
        raise ModelError(
            f"{name} has no ImageNet weights (it is trained from scratch); use weights=None "
            "or a path to a .keras / .weights.h5 file from same-domain pretraining"
        )


def cbr_network(
    filters,
    kernel_size,
    input_tensor=None,
    input_shape=None,
    weights=None,
    name="cbr",
    include_top=False,
):
    """A CBR network: ``len(filters)`` conv-BN-ReLU-maxpool blocks; returns the feature map.

    ``include_top`` must be False (heads live in :mod:`kmedtl.models.heads`).
    """
    _check_weights(weights, name)
    if include_top:
        raise ModelError(f"{name}: include_top=True is not supported; use a kmedtl head")
    inputs = _input(input_tensor, input_shape)
    x = inputs
    for i, f in enumerate(filters, start=1):
        x = keras.layers.Conv2D(
            f, kernel_size, padding="same", use_bias=False, name=f"block{i}_conv"
        )(x)
        x = keras.layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = keras.layers.ReLU(name=f"block{i}_relu")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name=f"block{i}_pool")(x)
    source = keras.utils.get_source_inputs(inputs) if input_tensor is not None else inputs
    model = keras.Model(source, x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model


def _cbr(config_name):
    filters, kernel = CBR_CONFIGS[config_name]

    def build(include_top=False, weights=None, input_tensor=None, input_shape=None, **kwargs):
        if kwargs:
            raise ModelError(f"{config_name}: unexpected arguments {sorted(kwargs)}")
        return cbr_network(
            filters, kernel, input_tensor, input_shape, weights, config_name, include_top
        )

    build.__name__ = config_name
    build.__doc__ = f"{config_name}: channels {filters}, {kernel}x{kernel} kernels."
    return build


CBRLargeT = _cbr("cbr_larget")
CBRLargeW = _cbr("cbr_largew")
CBRSmall = _cbr("cbr_small")
CBRTiny = _cbr("cbr_tiny")
