"""Decoding and preprocessing parameters shared by every data path.

``ImageOptions`` is a frozen, picklable dataclass: the same object drives the uncached
``tf.data`` pipeline, the process-pool cache (its :meth:`ImageOptions.key` is part of
every cache key) and ``kmedtl data show``.  It deliberately has no TensorFlow import so
cache worker processes start fast.
"""

from __future__ import annotations

import hashlib
import json
import operator
from dataclasses import asdict, dataclass, field
from typing import Literal

from kmedtl.errors import ConfigError

#: CT window presets as (center, width) in Hounsfield units (common radiology defaults).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "soft_tissue": (50.0, 400.0),
    "abdomen": (60.0, 400.0),
    "liver": (30.0, 150.0),
}

WINDOW_MODES = ("header", "percentile", "minmax", *WINDOW_PRESETS)
FRAME_MODES = ("first", "middle", "all")
RESIZE_MODES = ("pad", "crop", "stretch")

#: Refuse images whose header announces more than this many pixels per frame (before
#: allocating anything).  100 megapixels is far beyond any radiograph, mammogram (about
#: 30 MP) or camera photo, and keeps one gray image's decode near 1 GB at most.
DEFAULT_MAX_PIXELS = 100_000_000

#: Refuse raster images (PNG/JPEG/TIFF/BMP) whose header announces a decoded size
#: (width x height x channels x 4 bytes, the float32 working copy) over this: 512 MiB is
#: 134 MP gray or 44 MP RGB, and bounds one file's decode to roughly 1 GB peak RSS.
DEFAULT_MAX_IMAGE_BYTES = 512 << 20

#: Files larger than this are not read (checked with ``stat`` before opening, and the read
#: itself never goes past it): 1 GiB holds any single image and most multi-frame DICOMs.
DEFAULT_MAX_FILE_BYTES = 1 << 30

#: With ``frames: all``, a DICOM announcing more frames than this is skipped (one sample
#: per frame would otherwise be made for a 10^9-frame header of a few hundred bytes).
DEFAULT_MAX_FRAMES = 10_000

#: The resource limits: they decide which files are refused, never the pixels of the
#: others, so they are not part of :meth:`ImageOptions.key` (the cache key).
LIMIT_FIELDS = ("max_pixels", "max_image_bytes", "max_file_bytes", "max_frames")


@dataclass(frozen=True)
class ImageOptions:
    """How a file becomes the model's input image.

    - ``size``: output (height, width) in pixels.
    - ``channels``: 1 (grayscale; RGB is converted with ITU-R 601 luma) or 3 (gray repeated).
    - ``resize``: ``pad`` (aspect-preserving, letterboxed with black), ``crop``
      (aspect-preserving, centre crop) or ``stretch``.
    - ``window``: DICOM intensity mapping: ``header`` (Window Center/Width or VOI LUT from
      the file, falling back to percentiles when it has none), a CT preset name (see
      ``WINDOW_PRESETS``), ``percentile`` (``percentiles`` lower/upper), ``minmax``, or an
      explicit ``(center, width)`` pair.
    - ``frames``: which frame(s) of a multi-frame DICOM: ``first``, ``middle`` or ``all``
      (every frame becomes its own sample).
    - ``max_pixels``: refuse images announcing more pixels (per frame) before decoding.
    - ``max_image_bytes``: refuse raster images whose decoded float32 size (width x
      height x channels x 4) would be larger, before decoding.
    - ``max_file_bytes``: do not read files larger than this.
    - ``max_frames``: with ``frames: all``, skip DICOMs announcing more frames.
    """

    size: tuple[int, int] = (224, 224)
    channels: int = 1
    resize: Literal["pad", "crop", "stretch"] = "pad"
    window: str | tuple[float, float] = "header"
    percentiles: tuple[float, float] = (0.5, 99.5)
    frames: Literal["first", "middle", "all"] = "middle"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_frames: int = DEFAULT_MAX_FRAMES
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        size = self.size
        if isinstance(size, int):
            size = (size, size)
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 8 or max(size) > 8192:
            raise ConfigError(
                f"data.image.size: expected one or two ints in 8..8192, got {self.size!r}")
        object.__setattr__(self, "size", size)
        if self.channels not in (1, 3):
            raise ConfigError(f"data.image.channels: must be 1 or 3, got {self.channels!r}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(
                f"data.image.resize: {self.resize!r} is not one of {list(RESIZE_MODES)}"
            )
        if self.frames not in FRAME_MODES:
            raise ConfigError(
                f"data.dicom.frames: {self.frames!r} is not one of {list(FRAME_MODES)}")
        window = self.window
        if isinstance(window, (list, tuple)):
            if len(window) != 2 or float(window[1]) <= 0:
                raise ConfigError(
                    f"data.dicom.window: an explicit window is [center, width] with width > 0, "
                    f"got {window!r}"
                )
            window = (float(window[0]), float(window[1]))
        elif window not in WINDOW_MODES:
            raise ConfigError(
                f"data.dicom.window: {window!r} is not one of {list(WINDOW_MODES)} "
                "or a [center, width] pair"
            )
        object.__setattr__(self, "window", window)
        lo, hi = (float(p) for p in self.percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ConfigError(
                f"data.dicom.percentiles: need 0 <= lower < upper <= 100, got {self.percentiles!r}"
            )
        object.__setattr__(self, "percentiles", (lo, hi))
        for name in LIMIT_FIELDS:
            value = getattr(self, name)
            try:
                n = operator.index(value) if not isinstance(value, bool) else 0
            except TypeError:
                n = 0
            if n < 1:
                raise ConfigError(f"data.{name}: must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(n))

    def key(self) -> str:
        """Stable digest of every parameter that changes the decoded pixels."""
        d = asdict(self)
        d.pop("extra")
        for name in LIMIT_FIELDS:
            d.pop(name)
        d["version"] = PREPROCESSING_VERSION
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.size, self.channels)


#: Bump when the decoding/resizing code changes what pixels come out, so caches rebuild.
PREPROCESSING_VERSION = 1
