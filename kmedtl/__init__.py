"""kmedtl: transfer learning for small medical-image datasets.

The packages are layered (ARCHITECTURE.md; checked by ``tests/test_layers.py``): ``data``
and ``pretrained`` at the bottom, then ``models``, ``evaluation`` and ``export``, then
``training``, then ``pipeline`` and ``study``; ``kmedtl.hierarchy`` (the label tree) and
``kmedtl.errors`` sit below them all.
"""

from kmedtl.errors import KmedtlError
from kmedtl.hierarchy import Hierarchy

__version__ = "0.1.0"

__all__ = ["Hierarchy", "KmedtlError", "__version__"]
