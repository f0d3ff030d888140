"""kmedtl: transfer learning for small medical-image datasets.

Rooms (imports point one way): ``kmedtl.data`` -> ``kmedtl.models`` ->
``kmedtl.training`` -> ``kmedtl.evaluation`` -> ``kmedtl.export``; ``kmedtl.hierarchy``
(the label tree) and ``kmedtl.errors`` sit below them all.
"""

from kmedtl.errors import KmedtlError
from kmedtl.hierarchy import Hierarchy

__version__ = "0.1.0"

__all__ = ["Hierarchy", "KmedtlError", "__version__"]
