"""In-model input normalisation: images in ``[0, 1]`` -> what a backbone family expects.

Design choice
-------------
The data pipeline (``kmedtl.data``) delivers float32 images in ``[0, 1]`` with 1 or 3
channels.  Every backbone built by :func:`kmedtl.models.backbone` starts with an
:class:`ImagePreprocessing` layer that maps that range to the family's expected input, so

* training, evaluation, TF Serving, TFLite and ONNX all feed the same ``[0, 1]`` tensor and
  nobody has to remember ``preprocess_input`` (a classic source of silent accuracy loss);
* the mode is part of the saved model's config (``model.preprocessing`` on kmedtl models
  reads ``"unit"`` -- "give me [0, 1]"; the family's native mode is kept in the layer).

Pass ``include_preprocessing=False`` to :func:`~kmedtl.models.backbone` to get the raw
``keras.applications`` input contract instead (then ``model.preprocessing`` names it).

Modes (the same names as ``keras.applications.imagenet_utils.preprocess_input``):

========  ===================================================================
``caffe``  RGB -> BGR, scale to 0-255, subtract the ImageNet BGR mean (ResNet v1, VGG)
``tf``     scale to ``[-1, 1]`` (ResNet v2, Inception, Xception, MobileNetV2)
``torch``  subtract the ImageNet RGB mean and divide by its std (DenseNet)
``none``   scale to 0-255; the keras model rescales itself (EfficientNet, ConvNeXt, ...)
``unit``   leave ``[0, 1]`` as it is (kmedtl's from-scratch CBR / parallel ResNet)
``lite``   ``(255 x - 127) / 128``, the TFLite uint8 convention (EfficientNet-Lite)
========  ===================================================================

One-channel (grey) input uses the channel-average of the constants (``caffe``: subtract
114.8; ``torch``: mean 0.449, std 0.226), so zero padding means "mean grey", as it means
"mean colour" for RGB.
:func:`kmedtl.models.weights.transfer_weights` folds RGB-pretrained first-layer kernels
into such a model; see its docstring for when that is exact.

Example::

    >>> import numpy as np
    >>> layer = ImagePreprocessing("tf")
    >>> np.asarray(layer(np.array([[[[0.0, 0.5, 1.0]]]], "float32")))
    array([[[[-1.,  0.,  1.]]]], dtype=float32)
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kmedtl.errors import ModelError

PREPROCESSING_MODES = ("caffe", "tf", "torch", "none", "unit", "lite")

_IMAGENET_RGB_MEAN = np.array([0.485, 0.456, 0.406])
_IMAGENET_RGB_STD = np.array([0.229, 0.224, 0.225])
_CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68])


def check_mode(mode: str, argument: str = "preprocessing") -> str:
    if mode not in PREPROCESSING_MODES:
        raise ModelError(
            f"{argument}={mode!r} is not a known preprocessing mode; "
            f"choose one of {list(PREPROCESSING_MODES)}"
        )
    return mode


def affine_constants(mode: str, channels: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(scale, offset, flip)`` such that ``out = flip(x) * scale + offset`` per channel."""
    check_mode(mode)
    if mode in ("unit", "none", "tf", "lite"):
        scale, offset = {"unit": (1.0, 0.0), "none": (255.0, 0.0), "tf": (2.0, -1.0),
                         "lite": (255.0 / 128.0, -127.0 / 128.0)}[mode]
        return np.full(channels, scale), np.full(channels, offset), False
    if channels not in (1, 3):
        raise ModelError(
            f"preprocessing={mode!r} defines per-channel ImageNet constants for 1 or 3 "
            f"channels, got {channels}; use 'tf', 'none' or 'unit' for other channel counts"
        )
    if mode == "torch":
        mean, std = _IMAGENET_RGB_MEAN, _IMAGENET_RGB_STD
        if channels == 1:
            mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
        return 1.0 / std, -mean / std, False
    # caffe: x * 255 - BGR mean, channels reversed first (RGB -> BGR).
    mean = _CAFFE_BGR_MEAN if channels == 3 else _CAFFE_BGR_MEAN.mean(keepdims=True)
    return np.full(channels, 255.0), -mean, channels == 3


@keras.saving.register_keras_serializable(package="kmedtl")
class ImagePreprocessing(keras.layers.Layer):
    """Map images in ``[0, 1]`` to the input a backbone family expects.

    Args:
        mode: one of ``"caffe"``, ``"tf"``, ``"torch"``, ``"none"``, ``"unit"``, ``"lite"``.

    Pure ``keras.ops``; no weights, so it never disturbs weight loading.
    """

    def __init__(self, mode: str = "unit", **kwargs):
        super().__init__(**kwargs)
        self.mode = check_mode(mode, "mode")
        self._scale = self._offset = None
        self._flip = False

    def build(self, input_shape):
        channels = int(input_shape[-1])
        scale, offset, self._flip = affine_constants(self.mode, channels)
        self._scale = scale.astype("float32").tolist()
        self._offset = offset.astype("float32").tolist()

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self._flip:
            x = ops.flip(x, axis=-1)
        scale = ops.convert_to_tensor(self._scale, dtype=self.compute_dtype)
        offset = ops.convert_to_tensor(self._offset, dtype=self.compute_dtype)
        return x * scale + offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
