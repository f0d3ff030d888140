"""Analytic FLOP count of a functional Keras model from its layer shapes.

Why hand-written: the usual tools either need the TensorFlow profiler (TF-only, against
the keras-only rule of this package) or PyTorch; counting from layer shapes is exact for
the layers that dominate CNN cost and works on any backend.

Counted (FLOPs = 2 x multiply-accumulates, per image): ``Conv2D`` (incl. grouped),
``DepthwiseConv2D``, ``SeparableConv2D``, ``Conv2DTranspose`` and ``Dense`` (also when
applied per pixel, as in ConvNeXt).  Bias additions, normalisation, activations, pooling
and element-wise ops are ignored (a few percent of the total for CNNs).  Nested models
are counted once per call, so a backbone shared by two inputs counts twice.

Example::

    >>> import keras
    >>> m = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)])
    >>> count_flops(m)  # 6*6 outputs * 4 filters * 3*3*3 MACs * 2
    7776
"""

from __future__ import annotations

import math

import keras


def _hw(shape) -> int:
    return int(math.prod(d for d in shape[1:-1] if d is not None))


def layer_flops(layer, input_shape, output_shape) -> int:
    """FLOPs of one call of ``layer`` (batch size 1); 0 for uncounted layers."""
    L = keras.layers
    if isinstance(layer, L.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return 2 * _hw(output_shape) * kh * kw * int(output_shape[-1])
    if isinstance(layer, L.SeparableConv2D):
        kh, kw = layer.kernel_size
        cin = int(input_shape[-1])
        mid = cin * layer.depth_multiplier
        return 2 * _hw(output_shape) * (kh * kw * mid + mid * int(output_shape[-1]))
    if isinstance(layer, L.Conv2DTranspose):
        kh, kw = layer.kernel_size
        return 2 * _hw(input_shape) * kh * kw * int(input_shape[-1]) * int(output_shape[-1])
    if isinstance(layer, L.Conv2D):
        kh, kw = layer.kernel_size
        cin = int(input_shape[-1]) // layer.groups
        return 2 * _hw(output_shape) * kh * kw * cin * int(output_shape[-1])
    if isinstance(layer, L.Dense):
        positions = int(math.prod(d for d in output_shape[1:-1] if d is not None))
        return 2 * positions * int(input_shape[-1]) * int(output_shape[-1])
    return 0


def count_flops(model: keras.Model) -> int:
    """Total FLOPs of one forward pass of ``model`` for one image (see module docstring).

    Spatial dimensions must be known (build the model with a fixed ``input_shape``).
    """
    # Functional graphs keep every call in ``_nodes_by_depth``; a Sequential wraps one.
    graph = model if hasattr(model, "_nodes_by_depth") else getattr(model, "_functional", None)
    if graph is None:
        raise TypeError(f"count_flops needs a functional or Sequential model, got {model!r}")
    total = 0
    for depth_nodes in graph._nodes_by_depth.values():  # every call in the graph
        for node in depth_nodes:
            op = node.operation
            if isinstance(op, keras.layers.InputLayer):
                continue
            if isinstance(op, keras.Model):
                total += count_flops(op)
                continue
            if not node.input_tensors or not node.output_tensors:
                continue
            total += layer_flops(
                op, tuple(node.input_tensors[0].shape), tuple(node.output_tensors[0].shape)
            )
    return total
