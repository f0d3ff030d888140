"""Content digests (exact duplicates, cache keys), perceptual hashes (near duplicates) and
low-resolution thumbnails (similar content: adjacent slices, re-crops, re-encodes)."""

from __future__ import annotations

import hashlib

import imagehash
import numpy as np
from PIL import Image


def content_digest(data: bytes) -> str:
    """SHA-256 of the file bytes (hex)."""
    return hashlib.sha256(data).hexdigest()


def perceptual_hash(img: np.ndarray) -> int:
    """64-bit DCT perceptual hash (ImageHash's ``phash``) of a [0, 1] or uint8 image."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    if a.ndim == 3:
        a = a[..., 0] if a.shape[-1] == 1 else np.asarray(Image.fromarray(a).convert("L"))
    bits = imagehash.phash(Image.fromarray(a), hash_size=8).hash.flatten()
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


#: Set bits of each byte value, for :func:`popcount` on numpy 1.x.
_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(x) -> np.ndarray:
    """Set bits per element of an integer array (of the absolute value, as
    ``np.bitwise_count``), as uint8: ``np.bitwise_count`` on numpy >= 2, else a byte table
    (numpy 1.x, which the tensorflow-io environment of ``.ci/tfio.sh`` needs)."""
    x = np.asarray(x)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    if np.issubdtype(x.dtype, np.signedinteger):
        x = np.abs(x)  # the minimum wraps to itself: its unsigned view has the one bit
    b = np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, x.dtype.itemsize)
    return _BYTE_BITS[b].sum(axis=-1, dtype=np.uint8)


def hamming_pairs(hashes: np.ndarray, max_distance: int, block: int = 2048):
    """Index pairs (i < j) whose 64-bit hashes differ in at most ``max_distance`` bits.

    Blocked all-pairs comparison with :func:`popcount`: memory stays at
    ``block * n`` words however many images there are.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    out = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        d = popcount(h[start:stop, None] ^ h[None, :])
        ii, jj = np.nonzero(d <= max_distance)
        ii = ii + start
        keep = ii < jj
        out.extend(zip(ii[keep].tolist(), jj[keep].tolist()))
    return out


#: Side of the grey thumbnail that similar-content grouping compares (see :func:`thumbnail`).
THUMB_SIZE = 32


def thumbnail(img: np.ndarray) -> bytes:
    """The 32x32 grey uint8 thumbnail of a [0, 1] or uint8 image, as 1,024 bytes.

    Taken from the audit's 64 px rendering (the same pixels the pHash sees, so cached and
    freshly decoded images give the same bytes): channels averaged, then an area (box)
    reduction to :data:`THUMB_SIZE`.  :func:`similar_pairs` compares thumbnails by Pearson
    correlation, which ignores brightness and contrast changes.
    """
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    if a.ndim == 3:
        a = np.rint(a.mean(axis=-1)).astype(np.uint8) if a.shape[-1] > 1 else a[..., 0]
    t = Image.fromarray(a).resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX)
    return np.asarray(t, dtype=np.uint8).tobytes()


def thumbnail_matrix(thumbs) -> np.ndarray:
    """Rows of zero-mean, unit-norm float32 thumbnails (a constant image gives a zero row,
    similar to nothing), so a dot product is the Pearson correlation."""
    if not len(thumbs):
        return np.zeros((0, THUMB_SIZE * THUMB_SIZE), dtype=np.float32)
    m = np.frombuffer(b"".join(thumbs), dtype=np.uint8).reshape(len(thumbs), -1)
    m = m.astype(np.float32)
    m -= m.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(m, axis=1, keepdims=True)
    return np.divide(m, norm, out=np.zeros_like(m), where=norm > 1e-6)


def similar_pairs(thumbs, threshold: float, block: int = 1024):
    """``(pairs, nearest, partner)``: index pairs ``(i, j, r)`` with ``i < j`` whose
    thumbnails correlate ``r >= threshold``, each thumbnail's highest correlation with any
    other (``nan`` for a lone image) and the index of that other (-1 for a lone image).
    Blocked matrix products: memory stays at ``block * n`` floats however many images
    there are (n = 50,000 is about 2.5e12 flops: minutes)."""
    m = thumbnail_matrix(thumbs)
    n = len(m)
    nearest = np.full(n, np.nan, dtype=np.float32)
    partner = np.full(n, -1, dtype=np.int64)
    pairs = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        sim = m[start:stop] @ m.T
        rows = np.arange(stop - start)
        sim[rows, rows + start] = -np.inf
        if n > 1:
            partner[start:stop] = sim.argmax(axis=1)
            nearest[start:stop] = sim[rows, partner[start:stop]]
        ii, jj = np.nonzero(sim >= threshold)
        keep = ii + start < jj
        ii, jj = ii[keep], jj[keep]
        pairs.extend(zip((ii + start).tolist(), jj.tolist(), sim[ii, jj].tolist()))
    return pairs, nearest, partner
