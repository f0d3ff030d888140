"""Grad-CAM: a tiny CNN trained to detect a bright square looks at the square; the target
layer is found inside full and truncated backbones of kmedtl classifiers."""

import keras
import numpy as np
import pytest

from kmedtl.errors import ModelError
from kmedtl.evaluation.gradcam import GradCAM, find_target_layer, grad_cam, overlay
from kmedtl.hierarchy import Hierarchy
from kmedtl.models import FlatClassifier, HierarchicalClassifier, backbone

SIZE, SQUARE = 32, 6


def _squares(rng, n):
    """Half the images hold a bright square (class 1) at a random place; boxes returned."""
    x = rng.normal(0.25, 0.06, (n, SIZE, SIZE, 1)).clip(0, 1).astype("float32")
    y = np.arange(n) % 2
    boxes = np.zeros((n, 2), int)
    for i in np.nonzero(y)[0]:
        r, c = rng.integers(1, SIZE - SQUARE - 1, 2)
        x[i, r:r + SQUARE, c:c + SQUARE] = 0.95
        boxes[i] = r, c
    return x, y, boxes


def _tiny_backbone():
    inp = keras.Input((SIZE, SIZE, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c2")(h)
    h = keras.layers.MaxPooling2D(2, name="pool1")(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="c3")(h)
    return keras.Model(inp, h, name="tiny_cnn")


@pytest.fixture(scope="module")
def square_model():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y, _ = _squares(rng, 512)
    model = FlatClassifier(_tiny_backbone(), ["empty", "square"])
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(x, y, epochs=6, batch_size=32, verbose=0)
    return model


@pytest.mark.slow
def test_heatmap_peaks_inside_the_square(square_model):
    rng = np.random.default_rng(1)
    x, y, boxes = _squares(rng, 60)
    pos = np.nonzero(y)[0]
    probs = square_model.predict(x, verbose=0)
    assert (probs.argmax(1) == y).mean() > 0.9, "the tiny CNN did not learn the task"
    cam = GradCAM(square_model)
    assert cam.layer_name == "c3"  # last 4-D layer inside the backbone
    heat, cls, p = cam(x[pos], class_index=1)
    assert heat.shape == (len(pos), SIZE, SIZE) and (cls == 1).all()
    assert heat.min() >= 0 and heat.max() <= 1
    np.testing.assert_allclose(p, probs[pos], atol=1e-5)
    inside = 0
    for h, (r, c) in zip(heat, boxes[pos]):
        pr, pc = np.unravel_index(h.argmax(), h.shape)
        inside += (r <= pr < r + SQUARE) and (c <= pc < c + SQUARE)
    assert inside >= 0.8 * len(pos), f"{inside}/{len(pos)} heatmap peaks inside the square"
    rgb = overlay(x[pos[0]], heat[0])
    assert rgb.shape == (SIZE, SIZE, 3) and rgb.dtype == np.uint8


def test_target_layer_in_truncated_and_hierarchical_models():
    h = Hierarchy({"normal": None, "tumor": {"glioma": None, "pituitary": None}})
    model = HierarchicalClassifier(backbone("vgg16", cut="block3_pool",
                                            input_shape=(32, 32, 3)), h)
    container, layer = find_target_layer(model)
    assert container is model.backbone and layer.name == "block3_pool"
    x = np.random.default_rng(0).random((3, 32, 32, 3)).astype("float32")
    heat, cls, probs = grad_cam(model, x)
    assert heat.shape == (3, 32, 32)
    np.testing.assert_allclose(probs, model.predict(x, verbose=0)["leaf"], atol=1e-5)
    heat2, _, _ = grad_cam(model, x, target_layer="block2_pool")
    assert heat2.shape == (3, 32, 32)
    with pytest.raises(ModelError, match="no layer named"):
        GradCAM(model, target_layer="nope")


def test_flat_functional_model_without_a_nested_backbone():
    inp = keras.Input((16, 16, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(h))
    cam = GradCAM(keras.Model(inp, out))
    assert cam.layer_name == "conv"
    assert cam(np.random.default_rng(0).random((2, 16, 16, 1)))[0].shape == (2, 16, 16)
