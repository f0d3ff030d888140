"""Files -> decoded, normalised image tensors + labels.

Public entry points::

    from kmedtl.data import ImageOptions, index_folder, read_manifest, audit, build_cache
    from kmedtl.data.pipeline import make_dataset      # tf.data (imports TensorFlow)

The modules below ``pipeline`` never import TensorFlow, so cache/audit worker processes
start without it.  ``kmedtl.data.cli`` holds the ``kmedtl data`` subcommands (not imported
here); like every module in this package it never imports ``kmedtl.config``, which sits
above: the root CLI hands it the YAML -> config loader.
"""

from kmedtl.data.audit import audit, format_summary
from kmedtl.data.cache import CacheResult, build_cache
from kmedtl.data.decode import load_image
from kmedtl.data.options import WINDOW_PRESETS, ImageOptions
from kmedtl.data.sources import DatasetIndex, Sample, Skipped, index_folder, read_manifest

__all__ = [
    "WINDOW_PRESETS",
    "CacheResult",
    "DatasetIndex",
    "ImageOptions",
    "Sample",
    "Skipped",
    "audit",
    "build_cache",
    "format_summary",
    "index_folder",
    "load_image",
    "read_manifest",
]
