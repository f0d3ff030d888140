"""TruncatedTL: cut a backbone at a named point and keep everything below it.

Each registry family lists its named cut points, in network order, at every block and
with stage boundaries marked (``kind="stage"``).  They are *derived from the real layer
names of the built model* (regular expressions over ``model.operations``), so they stay
right for every depth variant of a family (ResNet50/101/152 ...).  Any other layer name
of the backbone is accepted as a cut as well.  The finders (the cut-point tables) live in
:mod:`kmedtl.models.cuts`, below the backbone registry, and are re-exported here.

========================  ==============================================================
family                    named cuts
========================  ==============================================================
ResNet v1 / v2            ``conv2_block3_out`` (end of stage 2), then every block
                          ``conv{3,4,5}_block{i}_out``; v2 adds ``post_relu``
DenseNet                  ``pool2_pool``, ``pool3_pool``, ``pool4_pool``, ``relu``
EfficientNet v1 / v2      every block ``block{s}{x}_add`` (or ``_project_bn`` for a
                          block without residual), then ``top_activation``
MobileNetV2 / V3          every inverted-residual block output, then the last activation
VGG                       ``block{1..5}_pool``
InceptionV3               ``mixed0`` ... ``mixed10``
Xception                  ``block2_out`` ... ``block13_out`` (the residual adds), then
                          ``block14_sepconv2_act``
ConvNeXt                  ``stage{s}_block{b}_out`` (the residual adds), then the final
                          layer norm
CBR                       ``block{i}_pool``
parallel ResNet           ``block{i}_out``
========================  ==============================================================

Example::

    >>> from kmedtl.models import backbone, cut_points
    >>> [c.name for c in cut_points("vgg16", input_shape=(32, 32, 3))]
    ['block1_pool', 'block2_pool', 'block3_pool', 'block4_pool', 'block5_pool']
    >>> bb = backbone("resnet50", cut="conv4_block4_out", input_shape=(64, 64, 3))
    >>> bb.output_shape
    (None, 4, 4, 1024)
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from kmedtl.models.backbones import Backbone, get_spec

# The cut-point tables live in kmedtl.models.cuts (below the backbone registry, which uses
# them); they stay importable from here, where they were first defined.
from kmedtl.models.cuts import (  # noqa: F401  (re-exports)
    Cut,
    CutFinder,
    cbr_cuts,
    convnext_cuts,
    densenet_cuts,
    efficientnet_cuts,
    inception_cuts,
    mobilenetv2_cuts,
    mobilenetv3_cuts,
    named_cuts,
    parallel_resnet_cuts,
    resnet_cuts,
    resolve_cut,
    vgg_cuts,
    xception_cuts,
)


@dataclass(frozen=True)
class CutPoint:
    """What :func:`cut_points` reports for one named cut."""

    name: str
    layer: str
    kind: str
    params: int
    output_shape: tuple

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "layer": self.layer,
            "kind": self.kind,
            "params": self.params,
            "output_shape": list(self.output_shape),
        }


# ---------------------------------------------------------------------------- truncation
def truncate(model: keras.Model, cut: str, finder: CutFinder | None = None, name=None):
    """``keras.Model(model.input, <cut>.output)``: everything below the cut, weights shared.

    ``cut`` is a named cut (see :func:`cut_points`) or any layer name of ``model``.  For a
    :class:`~kmedtl.models.Backbone` prefer ``backbone(name, cut=...)``, which saves and
    reloads with the cut in its config.
    """
    if finder is None:
        finder = getattr(getattr(model, "spec", None), "cuts", None)
    op = resolve_cut(model, cut, finder, family=getattr(model, "family", model.name))
    return keras.Model(model.input, op.output, name=name or f"{model.name}_to_{cut}")


def cut_points(name: str, input_shape=None, include_preprocessing: bool = True) -> list[CutPoint]:
    """Named cut points of a registry family, in order, with parameters and output shape.

    Builds the family once (random weights) at ``input_shape`` (default: 224 px RGB, or the
    family's minimum size if larger) and reports, for each cut, the parameter count of the
    truncated model and its output shape (batch axis ``None``).
    """
    spec = get_spec(name)
    if input_shape is None:
        size = max(224, spec.min_size)
        input_shape = (size, size, 3)
    full = Backbone(spec.name, input_shape=input_shape, include_preprocessing=include_preprocessing)
    out = []
    for c in full.named_cuts():
        sub = keras.Model(full.input, c.op.output)
        out.append(
            CutPoint(c.name, c.op.name, c.kind, int(sub.count_params()), tuple(c.op.output.shape))
        )
    return out
