""":func:`import_weights` (``kmedtl weights import``): checks a user's file against its
family before :mod:`kmedtl.pretrained.store` keeps it.  (``kmedtl weights list`` needs no
model: :mod:`kmedtl.pretrained.sources`.)

It lives in :mod:`kmedtl.models` because it reads the backbone registry and builds a
family's model to check a file; :mod:`kmedtl.pretrained` sits below models and knows only
files (ARCHITECTURE.md).  ``kmedtl weights`` (:mod:`kmedtl.pretrained.cli`, the front end)
imports it on first use.
"""

from __future__ import annotations

from pathlib import Path

from kmedtl.errors import WeightsError
from kmedtl.models.backbones import Backbone, get_spec
from kmedtl.models.efficientnet_lite import convert_state_dict
from kmedtl.pretrained import sources, store
from kmedtl.pretrained.torch_legacy import read_state_dict


def import_weights(path, family: str) -> dict:
    """Register ``path`` as ``family``'s ImageNet weights (``kmedtl weights import``).

    An EfficientNet-Lite family takes a legacy PyTorch checkpoint (converted once to prove
    it fits); a ``keras.applications`` family takes its legacy ``..._notop.h5`` file, which
    must load into the family's graph.  Returns the record written.
    """
    path = Path(path)
    spec = get_spec(sources.check_import(path, family) or family)  # name checks first
    if not spec.pretrained:
        raise WeightsError(f"weights import --for {spec.name}: this family is trained from "
                           "scratch and has no ImageNet weights; use train.weights: <file>")
    if spec.name in store.SHIPPED:

        def validate(staged):
            convert_state_dict(read_state_dict(staged), spec.name)
    else:
        if spec.weights_change_graph:  # a registered family the store's tables lack
            raise WeightsError(
                f"weights import --for {spec.name}: keras.applications builds a different "
                f"graph for its ImageNet weights; put {path.name} in ~/.keras/models/ "
                "(Keras' own cache), where keras.applications finds it offline")

        def validate(staged):
            size = max(64, spec.min_size)
            Backbone(spec.name, (size, size, 3), weights=str(staged))

    return store.register_import(path, spec.name, validate)
