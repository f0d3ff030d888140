"""A Keras layer that applies a fitted temperature, for exporting calibrated models.

Example::

    >>> import keras, numpy as np
    >>> layer = TemperatureScaling(2.0)
    >>> np.round(np.asarray(layer(np.array([[0.8, 0.2]], "float32"))), 3)
    array([[0.667, 0.333]], dtype=float32)

Wrap a trained classifier's probability output with it (``T`` from ``calibration.json``,
see :func:`kmedtl.evaluation.load_calibration`).  Import ``kmedtl.evaluation.layers``
before loading a ``.keras`` file that contains it.
"""

from __future__ import annotations

import keras

from kmedtl.errors import ConfigError
from kmedtl.evaluation.calibration import apply_temperature


@keras.saving.register_keras_serializable(package="kmedtl")
class TemperatureScaling(keras.layers.Layer):
    """``softmax(log(p) / T)`` on probabilities (``from_logits``: ``softmax(z / T)``);
    float32, no weights."""

    def __init__(self, temperature: float = 1.0, from_logits: bool = False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not float(temperature) > 0:
            raise ConfigError(f"TemperatureScaling: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.from_logits = bool(from_logits)

    def call(self, inputs):
        return apply_temperature(keras.ops.cast(inputs, "float32"), self.temperature,
                                 from_logits=self.from_logits, eps=1e-7)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature,
                "from_logits": self.from_logits}
