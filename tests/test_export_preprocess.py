"""The in-graph preprocessing of the ``serving_default`` signature reproduces kmedtl's own
load path (:func:`kmedtl.data.decode.load_image`: Pillow decode, luma, antialiased
resize, 8-bit quantisation) on real brain-tumour MRI JPEGs and on synthetic PNG kinds."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from helpers import encode_image, png_header_only, smooth_image
from test_export_helpers import jpeg_files

from kmedtl.data import ImageOptions
from kmedtl.data.decode import decode_bytes, preprocess
from kmedtl.export.preprocess import decode_batch


def _reference(blobs, opts):
    return np.stack([preprocess(decode_bytes(b, "x", opts)[0], opts) for b in blobs]) / 255.0


def _levels(a, b):
    """Per-pixel difference in 8-bit levels."""
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) * 255.0


@pytest.mark.parametrize("opts", [
    ImageOptions(size=(64, 64), channels=1, resize="pad"),
    ImageOptions(size=(48, 64), channels=3, resize="crop"),
    ImageOptions(size=(64, 40), channels=1, resize="stretch"),
    ImageOptions(size=(300, 560), channels=1, resize="pad"),  # upsampling
], ids=["pad-gray", "crop-rgb", "stretch", "upsample"])
def test_real_jpegs_match_the_training_load_path(datasets_dir, opts):
    blobs = [f.read_bytes() for f in jpeg_files(datasets_dir, 16, "Training")
             + jpeg_files(datasets_dir, 8, "Testing")]
    ref = _reference(blobs, opts)
    got = decode_batch(tf.constant(blobs), opts).numpy()
    assert got.shape == ref.shape == (len(blobs), *opts.shape)
    d = _levels(got, ref)
    # identical up to a rounding tie at the 8-bit quantisation (float32 vs Pillow's float)
    assert d.max() <= 1.0 + 1e-3 and (d > 0.5).mean() < 1e-3


@pytest.mark.parametrize("kind", ["gray8", "gray16", "rgb", "rgba", "gray_alpha", "palette",
                                  "jpeg_rgb"])
def test_png_and_jpeg_kinds_match(kind):
    from PIL import Image

    img = smooth_image(3, size=70)
    rgb = smooth_image(4, size=70, channels=3)
    if kind == "gray8":
        blob = encode_image(img, "PNG")
    elif kind == "gray16":
        blob = encode_image((img.astype(np.uint16) * 257 + 100).astype(np.uint16), "PNG")
    elif kind == "rgb":
        blob = encode_image(rgb, "PNG")
    elif kind == "rgba":
        blob = encode_image(np.dstack([rgb, img]), "PNG")
    elif kind == "gray_alpha":
        import io

        bio = io.BytesIO()
        Image.fromarray(np.dstack([img, 255 - img]), "LA").save(bio, "PNG")
        blob = bio.getvalue()
    elif kind == "palette":
        import io

        bio = io.BytesIO()
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(bio, "PNG")
        blob = bio.getvalue()
    else:
        blob = encode_image(rgb, "JPEG", quality=90)
    for channels in (1, 3):
        opts = ImageOptions(size=(32, 48), channels=channels)
        d = _levels(decode_batch(tf.constant([blob]), opts).numpy(), _reference([blob], opts))
        assert d.max() <= 1.0 + 1e-3 and (d > 0.5).mean() < 5e-3, (kind, channels, d.max())


def test_normalisation_is_applied_after_quantisation():
    blob = encode_image(smooth_image(1, size=40), "PNG")
    opts = ImageOptions(size=(32, 32), channels=3)
    unit = decode_batch(tf.constant([blob]), opts).numpy()
    sym = decode_batch(tf.constant([blob]), opts, "symmetric").numpy()
    np.testing.assert_allclose(sym, unit * 2 - 1, atol=1e-6)


@pytest.mark.parametrize("blob, message", [
    (b"%PDF-1.4 not an image", "not a PNG or JPEG"),
    (png_header_only(40000, 40000), "refused before decoding"),
])
def test_bad_bytes_raise_invalid_argument_naming_the_input(blob, message):
    opts = ImageOptions(size=(32, 32), channels=1, max_pixels=10_000_000)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message) as info:
        decode_batch(tf.constant([blob]), opts)
    assert "image_bytes" in str(info.value)
