"""Content digests (exact duplicates, cache keys) and perceptual hashes (near duplicates)."""

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


def hamming_pairs(hashes: np.ndarray, max_distance: int, block: int = 2048):
    """Index pairs (i < j) whose 64-bit hashes differ in at most ``max_distance`` bits.

    Blocked all-pairs comparison with ``np.bitwise_count``: memory stays at
    ``block * n`` words however many images there are.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    out = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        d = np.bitwise_count(h[start:stop, None] ^ h[None, :])
        ii, jj = np.nonzero(d <= max_distance)
        ii = ii + start
        keep = ii < jj
        out.extend(zip(ii[keep].tolist(), jj[keep].tolist()))
    return out
