"""Proof that the shipped ImageNet weights are real: the converted EfficientNet-Lite0
classifier labels real photos (from the scikit-image wheel) correctly, in Keras and in its
TFLite float32 and int8 exports (the edge use case); Lite0, Lite1 and Lite2 each label the
same photos and matplotlib's portrait of Grace Hopper (class 652, military uniform) at
their own resolution.

Random, shuffled or mis-mapped weights cannot pass: the three photos need three different,
specific classes out of 1000.
"""

from pathlib import Path

import numpy as np
import pytest

skimage = pytest.importorskip("skimage", reason="scikit-image (test extra) ships the photos")

from kmedtl.models.efficientnet_lite import VARIANTS, EfficientNetLite  # noqa: E402

PHOTOS = Path(skimage.__file__).parent / "data"
SIZE = 224
CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = {967, 968}  # espresso, cup
MOPED = {665, 670}  # moped, motor scooter
MILITARY_UNIFORM = 652  # Grace Hopper's portrait (matplotlib's sample data)
# Calibration photos for full-integer quantisation: none of the three under test.
CALIBRATION = ("astronaut.png", "rocket.jpg", "hubble_deep_field.jpg", "motorcycle_right.png",
               "ihc.png", "retina.jpg", "coins.png", "camera.png")


def photo(name, size: int = SIZE) -> np.ndarray:
    """RGB photo (a file of scikit-image's, or a path) resized to ``size`` and scaled as
    EfficientNet-Lite expects: (x-127)/128."""
    from PIL import Image

    img = Image.open(PHOTOS / name).convert("RGB").resize((size, size), Image.BILINEAR)
    return (np.asarray(img, np.float32) - 127.0) / 128.0


@pytest.fixture(scope="module")
def classifier():
    return EfficientNetLite("efficientnet_lite0", include_top=True, weights="imagenet")


@pytest.fixture(scope="module")
def photos():
    return np.stack([photo(n) for n in ("chelsea.png", "coffee.png", "motorcycle_left.png")])


def check_labels(probs: np.ndarray, where: str):
    top = np.argsort(probs, axis=1)[:, ::-1]
    assert int(top[0, 0]) in CATS, f"{where}: chelsea top-5 {top[0, :5]}"
    assert int(top[1, 0]) in ESPRESSO, f"{where}: coffee top-5 {top[1, :5]}"
    assert MOPED & {int(top[2, 0]), int(top[2, 1])}, f"{where}: motorcycle top-5 {top[2, :5]}"


@pytest.mark.slow
def test_keras_classifier_labels_real_photos(classifier, photos):
    probs = classifier.predict(photos, verbose=0)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    check_labels(probs, "keras")
    assert probs[0, 285] > 0.3 and probs[1, 967] > 0.5  # confident, not just first


def test_mislabelled_weights_would_fail(classifier, photos):
    """The check has teeth: the same network with one stage's weights shuffled misses."""
    import keras

    probe = keras.models.clone_model(classifier)
    probe.set_weights(classifier.get_weights())
    layer = probe.get_layer("block4a_project_conv")
    k = layer.get_weights()[0]
    layer.set_weights([k[..., np.random.default_rng(0).permutation(k.shape[-1])]])
    with pytest.raises(AssertionError):
        check_labels(probe.predict(photos, verbose=0), "shuffled")


@pytest.mark.slow
def test_tflite_float32_and_int8_exports_label_real_photos(classifier, photos, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from kmedtl.export.tflite import convert

    saved = tmp_path / "saved_model"
    classifier.export(str(saved), verbose=False)
    reps = np.stack([photo(n) for n in CALIBRATION])
    reps = np.concatenate([reps, reps[:, :, ::-1]])  # + mirror images: 16 calibration images
    sizes = {}
    for variant in ("float32", "int8"):
        path = convert(saved, variant, tmp_path / f"lite0_{variant}.tflite",
                       representative=reps if variant == "int8" else None)
        sizes[variant] = path.stat().st_size
        interp = Interpreter(model_path=str(path))
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        probs = []
        for x in photos:
            interp.resize_tensor_input(inp["index"], [1, SIZE, SIZE, 3])
            interp.allocate_tensors()
            interp.set_tensor(inp["index"], x[None].astype(np.float32))
            interp.invoke()
            probs.append(interp.get_tensor(out["index"])[0])
        check_labels(np.asarray(probs), f"tflite {variant}")
    assert sizes["int8"] < 0.4 * sizes["float32"]  # really quantised


@pytest.mark.parametrize("variant", [
    "efficientnet_lite0",
    pytest.param("efficientnet_lite1", marks=pytest.mark.slow),
    pytest.param("efficientnet_lite2", marks=pytest.mark.slow),
])
def test_every_lite_variant_labels_real_photos_at_its_resolution(variant, request):
    """Each shipped checkpoint converts into its own graph (Lite1 is deeper, Lite2 also
    wider) and labels the photos; a checkpoint mapped onto the wrong variant is refused by
    the conversion, a mis-mapped one fails here."""
    from matplotlib import cbook

    size = VARIANTS[variant].resolution
    if variant == "efficientnet_lite0":
        model = request.getfixturevalue("classifier")
    else:
        model = EfficientNetLite(variant, include_top=True, weights="imagenet")
    hopper = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    x = np.stack([photo(n, size) for n in (hopper, "chelsea.png", "coffee.png",
                                           "motorcycle_left.png")])
    probs = model.predict(x, verbose=0)
    assert int(np.argmax(probs[0])) == MILITARY_UNIFORM, \
        f"{variant}: Grace Hopper top-5 {np.argsort(probs[0])[::-1][:5]}"
    check_labels(probs[1:], variant)
