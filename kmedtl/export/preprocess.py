"""The training preprocessing, in-graph: encoded PNG/JPEG bytes -> model pixels.

Replicates :func:`kmedtl.data.decode.load_image` + the ``tf.data`` pipeline for raster
files, step for step, so a served model sees the pixels it was trained on:

1. decode (PNG 8/16-bit, JPEG with the accurate DCT as Pillow/libjpeg use) to float32
   [0, 1]; alpha dropped, as Pillow's ``convert("L"/"RGB")`` does;
2. channels: RGB -> gray with ITU-R 601 luma (:data:`kmedtl.data.transforms.LUMA`), gray
   -> RGB by repetition;
3. resize ``pad`` / ``crop`` / ``stretch`` with the antialiased bilinear filter
   (``tf.image.resize(antialias=True)`` = Pillow's ``BILINEAR`` on float planes), the new
   size rounded half-to-even like Python's ``round``;
4. 8-bit quantisation (``rint(x * 255)``, as the cache and the uncached pipeline do),
   then ``/ 255`` and the configured normalisation.

Bytes that are not PNG/JPEG, images whose header announces more than ``max_pixels`` and
corrupt streams stop the request with ``InvalidArgumentError`` naming the problem.

Example::

    >>> import tensorflow as tf
    >>> from kmedtl.data import ImageOptions
    >>> png = tf.io.encode_png(tf.zeros((40, 20, 1), tf.uint8))
    >>> decode_batch(tf.stack([png]), ImageOptions(size=(32, 32), channels=1)).shape
    TensorShape([1, 32, 32, 1])
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kmedtl.data.options import ImageOptions
from kmedtl.data.pipeline import normalize
from kmedtl.data.transforms import LUMA

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def _hw_png(data):
    """(height, width) from a PNG's IHDR chunk (big-endian uint32 at bytes 16..24)."""
    wh = tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.uint8)
    wh = tf.cast(wh, tf.int64)
    w = wh[0] * 2 ** 24 + wh[1] * 2 ** 16 + wh[2] * 2 ** 8 + wh[3]
    h = wh[4] * 2 ** 24 + wh[5] * 2 ** 16 + wh[6] * 2 ** 8 + wh[7]
    return h, w


def decode_one(data, max_pixels: int, where: str = "image_bytes"):
    """One encoded PNG/JPEG string -> (H, W, C) float32 in [0, 1] (C = 1..4)."""
    head = tf.strings.substr(data, 0, 8)
    is_png = tf.equal(head, PNG_MAGIC)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), JPEG_MAGIC)
    length = tf.strings.length(data)
    checks = [tf.debugging.Assert(
        tf.logical_or(is_png, is_jpeg),
        [f"{where}: not a PNG or JPEG image ({{}} bytes, first bytes shown); send the "
         "encoded file bytes (base64 in TF Serving's REST API, under {\"b64\": ...}); "
         "DICOM is decoded client-side (kmedtl.serving) and sent to predict_pixels",
         length, tf.strings.substr(data, 0, tf.minimum(length, 8))], summarize=8)]
    with tf.control_dependencies(checks):
        is_png = tf.identity(is_png)
    h, w = tf.cond(is_png, lambda: _hw_png(data),
                   lambda: tuple(tf.unstack(tf.cast(
                       tf.image.extract_jpeg_shape(data)[:2], tf.int64))))
    size_ok = tf.debugging.Assert(
        tf.logical_and(h * w <= max_pixels, h * w > 0),
        [f"{where}: the image header announces", h, "x", w,
         f"pixels; refused before decoding (over data.max_pixels = {max_pixels:,}, or empty)"])
    with tf.control_dependencies([size_ok]):
        def png():
            return tf.cast(tf.io.decode_png(data, channels=0, dtype=tf.uint16),
                           tf.float32) / 65535.0

        def jpeg():
            # libjpeg only warns on a truncated stream and pads it with gray; Pillow (the
            # training decoder) refuses it: require the end-of-image marker near the end
            start = tf.maximum(length - 1024, 0)
            tail = tf.io.decode_raw(tf.strings.substr(data, start, length - start), tf.uint8)
            eoi = tf.reduce_any(tf.logical_and(tf.equal(tail[:-1], 0xFF),
                                               tf.equal(tail[1:], 0xD9)))
            check = tf.debugging.Assert(eoi, [
                f"{where}: truncated JPEG (no end-of-image marker); re-send the whole file"])
            with tf.control_dependencies([check]):
                img = tf.io.decode_jpeg(data, channels=0, dct_method="INTEGER_ACCURATE")
            return tf.cast(img, tf.float32) / 255.0

        img = tf.cond(is_png, png, jpeg)
    c = tf.shape(img)[-1]
    # gray+alpha -> gray, RGBA -> RGB (Pillow's convert drops alpha)
    img = tf.cond(tf.equal(c % 2, 0), lambda: img[..., : c - 1], lambda: img)
    img.set_shape([None, None, None])
    return img


def to_channels(img, channels: int):
    """RGB -> luma (ITU-R 601, the weights Pillow and kmedtl use) or gray -> RGB."""
    c = tf.shape(img)[-1]
    if channels == 1:
        return tf.cond(tf.equal(c, 1), lambda: img[..., :1],
                       lambda: tf.tensordot(img[..., :3], tf.constant(LUMA), axes=[[2], [0]])
                       [..., None])
    return tf.cond(tf.equal(c, 3), lambda: img[..., :3],
                   lambda: tf.tile(img[..., :1], [1, 1, 3]))


def _py_round(x):
    """Python's round() (half to even) on float64, as kmedtl.data.transforms does."""
    return tf.cast(tf.math.round(x), tf.int32)


def resize(img, size: tuple[int, int], mode: str = "pad"):
    """:func:`kmedtl.data.transforms.resize`, in-graph (antialiased bilinear)."""
    th, tw = size
    shape = tf.shape(img)
    h, w = shape[0], shape[1]
    hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    if mode == "stretch":
        nh, nw = tf.constant(th), tf.constant(tw)
    else:
        pick = tf.minimum if mode == "pad" else tf.maximum
        scale = pick(th / hf, tw / wf)
        nh = tf.maximum(1, _py_round(hf * scale))
        nw = tf.maximum(1, _py_round(wf * scale))
    same = tf.logical_and(tf.equal(nh, h), tf.equal(nw, w))
    out = tf.cond(same, lambda: img,
                  lambda: tf.image.resize(img, tf.stack([nh, nw]), method="bilinear",
                                          antialias=True))
    if mode == "pad":
        out = tf.image.pad_to_bounding_box(out, (th - nh) // 2, (tw - nw) // 2, th, tw)
    elif mode == "crop":
        out = tf.image.crop_to_bounding_box(out, (nh - th) // 2, (nw - tw) // 2, th, tw)
    return tf.ensure_shape(out, [th, tw, None])


def quantize(img):
    """:func:`kmedtl.data.transforms.to_uint8` then ``/ 255`` (what training saw)."""
    q = tf.clip_by_value(tf.math.round(img * np.float32(255.0)), 0.0, 255.0)
    return q / 255.0


def preprocess_one(data, options: ImageOptions):
    """Encoded bytes -> ``options.shape`` float32 in [0, 1] (8-bit quantised)."""
    img = decode_one(data, options.max_pixels)
    img = to_channels(img, options.channels)
    img = resize(img, options.size, options.resize)
    img = quantize(img)
    return tf.ensure_shape(img, options.shape)


def decode_batch(images, options: ImageOptions, normalization: str = "unit"):
    """A 1-D batch of encoded images -> (N, H, W, C) normalised float32 pixels."""
    images = tf.convert_to_tensor(images, tf.string)
    # checked at run time (TF Serving feeds tensors without a shape check): "Shape of
    # tensor image_bytes [] is not compatible with expected shape [?]"
    images = tf.ensure_shape(images, [None], name="image_bytes_must_be_a_1d_batch")
    px = tf.map_fn(lambda b: preprocess_one(b, options), images,
                   fn_output_signature=tf.TensorSpec(options.shape, tf.float32))
    return normalize(px, normalization)
