"""ECE and reliability curves by hand; temperature scaling recovers a known temperature."""

import numpy as np
import pytest

from kmedtl.errors import ConfigError
from kmedtl.evaluation import (
    apply_temperature,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    load_calibration,
    negative_log_likelihood,
    reliability_curve,
    save_calibration,
)


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_ece_hand_computed():
    # top-label confidences .9 .8 .6 .55, correct 1 0 1 1; 10 bins, right-closed
    probs = np.array([[.9, .1], [.8, .2], [.4, .6], [.55, .45]])
    y = np.array([0, 1, 1, 0])
    curve = reliability_curve(y, probs, 10)
    assert curve["count"].tolist() == [0, 0, 0, 0, 0, 2, 0, 1, 1, 0]
    assert curve["accuracy"][5] == 1.0 and curve["confidence"][5] == pytest.approx(0.575)
    # bins (.8,.9]: gap .1; (.7,.8]: gap .8; (.5,.6]: gap .425 -> weights 1/4, 1/4, 2/4
    assert expected_calibration_error(y, probs, 10) == pytest.approx(
        0.25 * 0.1 + 0.25 * 0.8 + 0.5 * 0.425)
    # one bin: |accuracy - mean confidence| = |0.75 - 0.7125|
    assert expected_calibration_error(y, probs, 1) == pytest.approx(0.0375)


def test_bins_are_right_closed_at_the_edges():
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    c = reliability_curve(np.array([0, 0]), probs, 2)
    assert c["count"].tolist() == [1, 1]  # 0.5 -> (0, .5], 1.0 -> (.5, 1]


def test_apply_temperature_matches_logits_and_keeps_argmax():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 4)) * 3
    p = _softmax(z)
    np.testing.assert_allclose(apply_temperature(p, 2.0), _softmax(z / 2.0), atol=1e-9)
    np.testing.assert_allclose(apply_temperature(z, 2.0, from_logits=True), _softmax(z / 2.0))
    np.testing.assert_allclose(apply_temperature(p, 1.0), p, atol=1e-12)
    assert (apply_temperature(p, 3.0).argmax(1) == p.argmax(1)).all()
    with pytest.raises(ConfigError, match="temperature"):
        apply_temperature(p, 0.0)


def test_apply_temperature_on_backend_tensors_and_as_a_layer(tmp_path):
    import keras

    from kmedtl.evaluation.layers import TemperatureScaling

    p = _softmax(np.random.default_rng(1).normal(size=(6, 3))).astype("float32")
    expected = apply_temperature(p, 1.7)
    out = keras.ops.convert_to_numpy(apply_temperature(keras.ops.convert_to_tensor(p), 1.7))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    inp = keras.Input((3,))
    model = keras.Model(inp, TemperatureScaling(1.7)(inp))
    model.save(tmp_path / "t.keras")
    loaded = keras.saving.load_model(tmp_path / "t.keras")
    np.testing.assert_allclose(loaded.predict(p, verbose=0), expected, atol=1e-5)


def test_temperature_scaling_recovers_known_temperature(tmp_path):
    rng = np.random.default_rng(0)
    n, k, true_t = 6000, 5, 2.5
    z = rng.normal(size=(n, k)) * 1.5
    y = np.array([rng.choice(k, p=row) for row in _softmax(z)])  # calibrated labels
    overconfident = _softmax(z * true_t)  # what an over-confident model outputs
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(true_t, rel=0.08)
    fixed = apply_temperature(overconfident, t)
    assert negative_log_likelihood(y, fixed) < negative_log_likelihood(y, overconfident)
    assert expected_calibration_error(y, fixed) < 0.5 * expected_calibration_error(
        y, overconfident)
    assert fit_temperature(y, z * true_t, from_logits=True) == pytest.approx(t, rel=1e-3)

    result = calibrate(y[:3000], overconfident[:3000])
    assert result["nll_after"] < result["nll_before"]
    assert result["ece_after"] < result["ece_before"]
    path = save_calibration(tmp_path / "calibration.json", result)
    assert load_calibration(path)["temperature"] == pytest.approx(result["temperature"])
    (tmp_path / "bad.json").write_text('{"temperature": -1}')
    with pytest.raises(ConfigError, match="positive"):
        load_calibration(tmp_path / "bad.json")
