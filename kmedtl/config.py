"""Typed run configuration loaded from YAML.

Validation is pydantic's (every section derives from :class:`kmedtl.schema.Strict`);
errors are re-worded by :func:`kmedtl.schema.format_validation_error` into one
``ConfigError`` whose lines name the file, the dotted field path, what was given and what
is allowed, e.g.::

    pipelines/demo.yaml: invalid config:
      data.dicom.window: Input should be 'header', 'percentile', ... or 'liver', or Input
      should be a valid tuple (got 'lungs')

Path fields may reference environment variables as ``${NAME}`` (:data:`ENV_FIELDS`); a
missing variable is an error that names it (``KMEDTL_DATASETS`` is how shared datasets
are found).  ``${NAME}`` anywhere else, or a name that looks like a secret
(``PACS_PASSWORD``), is refused: credentials come only through the ``*_env`` fields of
``data.dicomweb``.  The YAML itself is read by :func:`kmedtl.safe_yaml.load_yaml`
(nesting, alias and size limits).  Every path is
resolved once, when the config is loaded, and kept absolute (:data:`READ_PATHS`: relative
to the YAML file's folder; :data:`WRITE_PATHS`: relative to the working directory).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_serializer, model_validator

from kmedtl.data.augment import Augmentation
from kmedtl.data.dicomweb import DicomWebSpec
from kmedtl.data.options import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    WINDOW_MODES,
    ImageOptions,
)
from kmedtl.errors import ConfigError, DatasetNotFoundError
from kmedtl.hierarchy import Hierarchy
from kmedtl.safe_yaml import limit, load_yaml, self_reference, too_deep, too_many_nodes
from kmedtl.schema import Strict, validate

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

WindowName = Literal[WINDOW_MODES]  # type: ignore[valid-type]


class ImageSection(Strict):
    size: Union[int, tuple[int, int]] = 224
    channels: Literal[1, 3] = 1
    resize: Literal["pad", "crop", "stretch"] = "pad"


class DicomSection(Strict):
    window: Union[WindowName, tuple[float, float]] = "header"
    percentiles: tuple[float, float] = (0.5, 99.5)
    frames: Literal["first", "middle", "all"] = "middle"


class DataSection(Strict):
    source: Literal["folder", "manifest", "dicomweb"] = "folder"
    root: str | None = None
    manifest: str | None = None
    # source: dicomweb -- url, store, labels, label_key, filters ... (see
    # kmedtl.data.dicomweb.DicomWebSpec); credentials only through environment variables
    dicomweb: dict[str, Any] | None = None
    extra_columns: list[str] = Field(default_factory=list)
    # manifest field -> the CSV's column, e.g. {label: class} (path, label, patient_id,
    # split, frame): a dataset's own manifest is read without editing it
    columns: dict[str, str] = Field(default_factory=dict)
    hierarchy: Union[dict, list, str, None] = None
    image: ImageSection = Field(default_factory=ImageSection)
    dicom: DicomSection = Field(default_factory=DicomSection)
    decoder: Literal["pydicom", "tfio"] = "pydicom"
    normalization: Literal["unit", "symmetric", "imagenet", "caffe", "raw255"] = "unit"
    balance: Literal["none", "weights", "sampling"] = "none"
    cache_dir: str | None = ".kmedtl_cache"
    workers: int | None = Field(default=None, ge=1)
    strict: bool = False
    # resource limits for untrusted files (kmedtl.data.options): pixels per frame a header
    # may announce, decoded float32 bytes of a PNG/JPEG/TIFF/BMP, bytes of a file, frames
    # of one DICOM under frames: all; over a limit the file is skipped with a kind naming it
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    max_image_bytes: int = Field(default=DEFAULT_MAX_IMAGE_BYTES, ge=1)
    max_file_bytes: int = Field(default=DEFAULT_MAX_FILE_BYTES, ge=1)
    max_frames: int = Field(default=DEFAULT_MAX_FRAMES, ge=1)
    #: labels found in the data but not in the hierarchy: an error (default) or, only
    #: when set explicitly, left out with their per-label counts printed
    unknown_labels: Literal["error", "skip"] = "error"

    @field_validator("root", "manifest")
    @classmethod
    def _no_empty(cls, v):
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return v


class SplitSection(Strict):
    method: Literal["source", "holdout", "kfold", "repeated"] = "holdout"
    val: float = Field(default=0.15, ge=0.0, lt=1.0)
    test: float = Field(default=0.15, gt=0.0, lt=1.0)
    k: int = Field(default=5, ge=2)
    repeats: int = Field(default=5, ge=1)
    seed: int = 0
    # none / exact (SHA-256) / near (+ pHash within near_threshold bits) / similar (+ 32x32
    # grey thumbnails correlating >= similar_threshold: adjacent slices, re-crops; the
    # audit reports the evidence for the threshold on each dataset)
    dedupe: Literal["none", "exact", "near", "similar"] = "near"
    near_threshold: int = Field(default=2, ge=0, le=32)
    similar_threshold: float = Field(default=0.935, gt=0.0, le=1.0)
    n_per_class: int | None = Field(default=None, ge=1)
    # Reuse a split file (``kmedtl data split``, or a run's ``data/splits.json``) instead of
    # making one, e.g. to compare two models on the same test cases.  Relative to the
    # config file's folder.  Checked against this run's data and leakage groups.
    file: str | None = None
    # Folders or manifests whose images must stay out of train, val and test: every image
    # of the data that is an exact, near or similar-content copy of one of theirs is
    # dropped from the split (listed in the split file's ``dropped``), so an external test
    # set (``pipeline.evaluate.external``) can be evaluated whole.  Relative to the YAML.
    exclude_copies_of: list[str] = Field(default_factory=list)


class AugmentSection(Strict):
    flip: Literal["horizontal", "vertical", "horizontal_and_vertical", None] = "horizontal"
    rotation: float = Field(default=0.0, ge=0)
    zoom: float = Field(default=0.0, ge=0)
    contrast: float = Field(default=0.0, ge=0)
    brightness: float = Field(default=0.0, ge=0)
    randaugment: int = Field(default=0, ge=0)
    randaugment_factor: float = Field(default=0.3, ge=0)
    mixup: float = Field(default=0.0, ge=0)
    cutmix: float = Field(default=0.0, ge=0)
    # colour jitter (3-channel input only), as torchvision's ColorJitter: saturation times
    # a factor in [1 - s, 1 + s]; hue turned by up to +-h of the colour circle
    saturation: float = Field(default=0.0, ge=0, lt=1)
    hue: float = Field(default=0.0, ge=0, le=0.5)
    # acquisition shift (another scanner, sequence or protocol): gamma exp(U(-g, g)),
    # foreground inversion with this probability (T1-like <-> T2-like contrast), Gaussian
    # blur up to this sigma (px), Gaussian noise up to this standard deviation
    gamma: float = Field(default=0.0, ge=0, le=2)
    invert: float = Field(default=0.0, ge=0, le=1)
    blur: float = Field(default=0.0, ge=0, le=10)
    noise: float = Field(default=0.0, ge=0, le=0.5)

    @model_serializer(mode="wrap")
    def _colour_only_when_set(self, handler):
        # left out at 0, so configs, and the train-stage fingerprints of runs made before
        # these fields existed, stay as they were
        out = handler(self)
        for name in ("saturation", "hue", "gamma", "invert", "blur", "noise"):
            if not out.get(name):
                out.pop(name, None)
        return out


#: flip modes and how many deterministic views each gives (identity included)
FLIP_VIEWS = {"none": 1, "horizontal": 2, "vertical": 2, "horizontal_and_vertical": 4}


class TTAOptions(Strict):
    """Test-time augmentation for evaluation (``pipeline.evaluate.tta``, ``kmedtl evaluate
    --tta``): each test and validation image is averaged over transformed copies by
    :func:`kmedtl.evaluation.tta.predict_tta`.  ``tta: true`` means the defaults (identity +
    horizontal flip), ``tta: vertical`` a flip mode with its default views."""

    flips: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "horizontal"
    n: int | None = Field(default=None, ge=1)
    rotation: float = Field(default=0.0, ge=0.0, lt=1.0)
    zoom: float = Field(default=0.0, ge=0.0, lt=1.0)
    seed: int = 0

    @property
    def flip_views(self) -> int:
        return FLIP_VIEWS[self.flips]

    @property
    def random(self) -> bool:
        return self.rotation > 0 or self.zoom > 0

    @property
    def views(self) -> int:
        """Views averaged per image."""
        return self.n if self.n is not None else self.flip_views

    @model_validator(mode="after")
    def _enough_views(self):
        k = self.flip_views
        if self.n is not None and self.n > k and not self.random:
            raise ValueError(
                f"n={self.n} views but flips {self.flips!r} gives only {k}; lower n to <= {k}, "
                "or add random views with rotation and/or zoom (> 0)")
        if self.random and self.views <= k:
            raise ValueError(
                f"rotation/zoom make the views after the {k} flip view(s) of flips "
                f"{self.flips!r}; set n > {k} (e.g. n: {k + 4}) or drop rotation/zoom")
        if self.views < 2:
            raise ValueError(
                "one view (flips 'none', no random views) is no test-time augmentation; set "
                "flips to horizontal/vertical/horizontal_and_vertical, or rotation/zoom with "
                "n >= 2, or leave tta out")
        return self

    def augment_layers(self) -> list:
        """The Keras layers that make the random views (empty when there are none)."""
        import keras  # lazy: keeps `kmedtl data` (which loads configs) free of Keras

        layers = []
        if self.rotation > 0:
            layers.append(keras.layers.RandomRotation(self.rotation, fill_mode="reflect",
                                                      seed=self.seed))
        if self.zoom > 0:
            layers.append(keras.layers.RandomZoom(self.zoom, fill_mode="reflect",
                                                  seed=self.seed + 1))
        return layers

    def describe(self) -> dict:
        """What ``metrics.json`` records under ``"tta"``."""
        return {"flips": self.flips, "n": self.views, "flip_views": min(self.views,
                                                                        self.flip_views),
                "random_views": max(0, self.views - self.flip_views),
                "rotation": self.rotation, "zoom": self.zoom,
                "seed": self.seed if self.random else None,
                "applied_to": ["test", "val"]}


def tta_options(value, where: str = "tta") -> TTAOptions | None:
    """``None``/``False`` -> no TTA; ``True`` -> defaults; a flip name; a mapping; or a
    :class:`TTAOptions`.  Errors are a :class:`ConfigError` naming ``where.<field>``."""
    if value is None or value is False:
        return None
    if isinstance(value, TTAOptions):
        return value
    if value is True:
        value = {}
    elif isinstance(value, str):
        value = {"flips": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: give a mapping (flips, n, rotation, zoom, seed), a flip "
                          f"mode {list(FLIP_VIEWS)}, true or null; got {value!r}")
    return validate(TTAOptions, value, where, prefix=(where,))


#: The fine-tuning recipe the ImageNet study (pipelines/RESULTS.md, issue 11) recommends for
#: a small medical-image set: ImageNet EfficientNet-Lite0, the hierarchical multi-head model,
#: every layer trained from the first epoch at one peak learning rate under one-cycle, with
#: the backbone's BatchNorm in inference mode.  Against fastai-style ``fine_tune`` (a
#: head-only epoch, then discriminative rates) with a flat head, 3 seeds each: retinal OCT
#: +7.0 points at 25 images per class (better), +0.5 at 50; brain MRI +0.5 at 25, +2.6 at
#: 50 (CI above 0, one seed of three disagrees).  Never behind on average, ahead in one
#: of four settings, with more seed-to-seed spread.  ``train: {recipe: recommended}``
#: starts from it (fields given beside it win); the main job
#: (pipelines/brain_tumor_hierarchical.yaml) spells it out, and a test keeps them equal.
RECOMMENDED_RECIPE = {
    "model": "hierarchical",
    "backbone": "efficientnet_lite0",
    "weights": "imagenet",
    "strategy": "full",
    "lr_multipliers": None,
    "optimizer": "adam",
    "learning_rate": 1e-3,
    "schedule": "one_cycle",
    "freeze_bn": True,
    "label_smoothing": 0.05,
    "dropout": 0.2,
    "batch_size": 32,
}
RECIPES = {"recommended": RECOMMENDED_RECIPE}


def apply_recipe(raw: dict, label: str = "config") -> dict:
    """``raw`` (a ``train`` mapping) with ``recipe: NAME`` replaced by that recipe's fields;
    the fields given beside it win."""
    raw = dict(raw)
    name = raw.pop("recipe", None)
    if name is None:
        return raw
    if name not in RECIPES:
        raise ConfigError(f"{label}: train.recipe: {name!r} is not a known recipe; choose one "
                          f"of {sorted(RECIPES)} or remove the field")
    return {**RECIPES[name], **raw}



class Config(Strict):
    """The whole run configuration. Sections not yet used by a stage are still checked."""

    name: str = "run"
    data: DataSection = Field(default_factory=DataSection)
    split: SplitSection = Field(default_factory=SplitSection)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    train: dict[str, Any] = Field(default_factory=dict)

    @field_validator("train")
    @classmethod
    def _expand_recipe(cls, v):  # every reader of cfg.train sees the recipe's fields
        try:
            return apply_recipe(v, "config")
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("config: train.")) from None
    output_dir: str = "runs"

    # ------------------------------------------------------------------ derived objects
    def image_options(self) -> ImageOptions:
        d = self.data
        return ImageOptions(size=d.image.size, channels=d.image.channels, resize=d.image.resize,
                            window=d.dicom.window, percentiles=d.dicom.percentiles,
                            frames=d.dicom.frames, max_pixels=d.max_pixels,
                            max_image_bytes=d.max_image_bytes,
                            max_file_bytes=d.max_file_bytes, max_frames=d.max_frames)

    def hierarchy(self) -> Hierarchy | None:
        h = self.data.hierarchy
        if h is None:
            return None
        if isinstance(h, str):
            return Hierarchy.from_yaml(Path(h))
        return Hierarchy(h)

    def augmentation(self, seed: int | None = None):
        return Augmentation(**self.augment.model_dump(), seed=seed)


#: Parts of a variable name that mark it as a secret: refused even in a path field (its
#: value would be stored in the run folder).  Long words match anywhere in the name,
#: short ones as a ``_``-separated part; a name ending in _DIR/_FILE/_PATH/_ROOT/_HOME/
#: _FOLDER names a place (``TLS_KEY_FILE``), not a secret.
_SECRET_WORDS = ("PASSWORD", "PASSWD", "PASSPHRASE", "SECRET", "TOKEN", "CREDENTIAL",
                 "APIKEY", "ACCESSKEY", "PRIVATE")
_SECRET_PARTS = {"KEY", "PASS", "PWD", "AUTH", "CREDS", "COOKIE", "SESSION", "PAT", "SIG",
                 "SAS"}
_PLACE_PARTS = {"DIR", "FILE", "PATH", "ROOT", "HOME", "FOLDER"}
_INDEX_RE = re.compile(r"\[\d+\]")


def secret_like(name: str) -> str | None:
    """The part of the variable ``name`` that marks it as a secret, or None.

    >>> secret_like("PACS_PASSWORD"), secret_like("KMEDTL_DATASETS"), secret_like("PWD")
    ('PASSWORD', None, None)
    """
    upper = name.upper()
    parts = [p for p in upper.split("_") if p]
    if name in ("PWD", "OLDPWD") or (parts and parts[-1] in _PLACE_PARTS):
        return None
    for word in _SECRET_WORDS:
        if word in upper:
            return word
    return next((p for p in parts if p in _SECRET_PARTS), None)


def is_env_field(where: str) -> bool:
    """True for a field where ``${VAR}`` is expanded (:data:`ENV_FIELDS`)."""
    field = _INDEX_RE.sub("", where)
    return any(field == f or field.endswith("." + f) for f in ENV_FIELDS)


def _expand_str(value: str, where: str) -> str:
    def sub(m):
        name = m.group(1)
        word = secret_like(name)
        if word:
            raise ConfigError(
                f"{where}: ${{{name}}} looks like a secret ({word} in its name) and is not "
                "expanded: a config's values are printed and stored in the run folder. "
                "DICOMweb credentials go only in data.dicomweb.username_env/password_env "
                "or token_env, which name the variable; for a folder, name the variable "
                "*_DIR or *_PATH")
        if name not in os.environ:
            hint = (" (the folder that holds the shared datasets, e.g. "
                    "export KMEDTL_DATASETS=../shared/datasets)" if name == "KMEDTL_DATASETS"
                    else "")
            raise ConfigError(f"{where}: environment variable {name} is not set{hint}")
        return os.environ[name]

    return _ENV_RE.sub(sub, value)


def expand_env(value: Any, where: str = "", label: str | None = None) -> Any:
    """A copy of ``value`` with ``${VAR}`` replaced in the strings of path fields
    (:data:`ENV_FIELDS`); a missing variable, a secret-looking one (:func:`secret_like`)
    or ``${VAR}`` in any other field raises a ConfigError naming the field and the
    variable, never its value.

    A structure that contains itself, nests deeper than ``KMEDTL_YAML_MAX_DEPTH`` or holds
    more than ``KMEDTL_YAML_MAX_NODES`` values once shared parts are counted each time they
    appear (a YAML alias bomb passed in as a mapping) is refused before it is copied out.
    ``label`` (a file name) starts those messages; default ``where`` or ``config``.
    """
    max_depth, max_nodes = limit("KMEDTL_YAML_MAX_DEPTH"), limit("KMEDTL_YAML_MAX_NODES")
    label = label or where or "config"
    count = 0
    on_path: set[int] = set()

    def walk(v, at, depth):
        nonlocal count
        count += 1
        if count > max_nodes:
            raise too_many_nodes(label, max_nodes)
        if isinstance(v, (dict, list)):
            if depth > max_depth:
                raise too_deep(label, max_depth, f" (at {at})")
            if id(v) in on_path:
                raise self_reference(label, f" (at {at})")
            on_path.add(id(v))
            try:
                if isinstance(v, dict):
                    return {k: walk(x, f"{at}.{k}" if at else str(k), depth + 1)
                            for k, x in v.items()}
                return [walk(x, f"{at}[{i}]", depth + 1) for i, x in enumerate(v)]
            finally:
                on_path.discard(id(v))
        if isinstance(v, str) and "${" in v:
            if is_env_field(at):
                return _expand_str(v, at)
            m = _ENV_RE.search(v)
            if m:
                raise ConfigError(
                    f"{at}: ${{{m.group(1)}}} is not expanded here: kmedtl expands ${{VAR}} "
                    "only in path fields (data.root, data.manifest, data.hierarchy, "
                    "output_dir, ... : kmedtl.config.ENV_FIELDS), because other values are "
                    "printed and stored in the run folder. Write the value itself; "
                    "DICOMweb credentials go in data.dicomweb.username_env/password_env or "
                    "token_env, which name the variable")
        return v

    return walk(value, where, 1)


def merge_overrides(base: dict, over: dict) -> dict:
    """``base`` with the nested mapping ``over`` merged in, key by key (``--set``)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = (merge_overrides(out[k], v) if isinstance(v, dict)
                  and isinstance(out.get(k), dict) else v)
    return out


def parse_set(items) -> dict:
    """``["train.epochs=3", "pipeline.stages=[audit, split]"]`` -> a nested override dict
    (values parsed as YAML)."""
    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE with a dotted key, e.g. "
                              "--set train.epochs=3")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = load_yaml(value, f"--set {key.strip()}")
    return out


#: The paths of a run config, by what a relative one is relative to (docs/pipelines.md, "Path
#: rules").  Each is resolved once, when the config is loaded (:func:`resolve_paths`), and
#: kept absolute from then on: the run folder's ``config.yaml`` (and ``pipeline.yaml``)
#: name the same files for every later stage and for a resumed run, from any working
#: directory.  What a run *reads* (data, label tree, split file, weight file) is relative
#: to the YAML file's folder; what it *writes* (run folders, caches) to the working
#: directory, so ``kmedtl run pipelines/x.yaml`` from the repository root writes
#: ``runs/<name>/`` there.  ``${VAR}`` is expanded first; a path that *starts* with a
#: variable whose value is relative is relative to the working directory (as the variable
#: is in the shell, and as :func:`dataset_path` reads ``KMEDTL_DATASETS``).  A ``--set``
#: value is typed on the command line: relative to the working directory.
READ_PATHS = ("data.root", "data.manifest", "data.hierarchy", "data.dicomweb.store",
              "data.dicomweb.labels", "data.dicomweb.ca_bundle", "data.dicomweb.client_cert",
              "data.dicomweb.client_key", "split.file", "split.exclude_copies_of",
              "train.weights")
WRITE_PATHS = ("output_dir", "data.cache_dir", "train.tune.cache_dir")
#: READ_PATHS fields that hold a list of paths.
LIST_PATHS = ("split.exclude_copies_of",)
#: Values of path fields that name something other than a file.
_NOT_PATHS = {"train.weights": ("imagenet",)}

#: Where ``${VAR}`` is expanded: the path fields (:data:`READ_PATHS`, :data:`WRITE_PATHS`,
#: the pipeline section's, a study's ``results``/``costs``), matched on the last segments
#: of the field's dotted name (list indices dropped: ``comparisons[0].data.root`` is a
#: ``data.root``).  Anywhere else ``${VAR}`` is refused: every other value is printed or
#: stored in the run folder (``config.yaml``, ``pipeline.yaml``), and a variable there is
#: how a secret would end up in them.  Credentials reach kmedtl only through the
#: ``data.dicomweb`` fields ``username_env``/``password_env``/``token_env``, which *name*
#: the variables.
ENV_FIELDS = (*READ_PATHS, *WRITE_PATHS, "pipeline.evaluate.external.source",
              "pipeline.push.root", "pipeline.export.out_dir", "results", "costs")


def resolve_path(value: str, base_dir=None, where: str = "") -> str:
    """``value`` with ``${VAR}`` and ``~`` expanded, as an absolute normalised path: a
    relative one joined to ``base_dir`` (default: the working directory), unless it
    starts with a variable (then the working directory).  No symlink is resolved."""
    from_env = value.lstrip().startswith("${")
    value = os.path.expanduser(_expand_str(value, where).strip())
    if not os.path.isabs(value) and base_dir is not None and not from_env:
        value = os.path.join(os.fspath(base_dir), value)
    return os.path.abspath(value)


def resolve_paths(raw: dict, base_dir=None, *, read=READ_PATHS, write=WRITE_PATHS) -> dict:
    """A copy of the config mapping ``raw`` with every path field present in it made
    absolute by :func:`resolve_path`: the ``read`` fields against ``base_dir`` (the YAML
    file's folder; default the working directory), the ``write`` fields against the
    working directory.  Values that are not path strings (``null``, a mapping, an empty
    string, ``train.weights: imagenet``) are left for validation to judge."""
    out = copy.deepcopy(raw)
    for keys, base in ((read, base_dir), (write, None)):
        for key in keys:
            *parents, last = key.split(".")
            node = out
            for p in parents:
                node = node.get(p) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                continue
            value = node.get(last)
            if (isinstance(value, str) and value.strip()
                    and value.strip() not in _NOT_PATHS.get(key, ())):
                node[last] = resolve_path(value, base, key)
            elif isinstance(value, list) and key in LIST_PATHS:  # e.g. exclude_copies_of
                # (a list elsewhere -- data.hierarchy: [a, b] -- is not paths)
                node[last] = [resolve_path(v, base, f"{key}[{i}]")
                              if isinstance(v, str) and v.strip() else v
                              for i, v in enumerate(value)]
    return out


def load_config(source: str | Path | dict, base_dir: str | Path | None = None,
                overrides: dict | None = None, *, schema: type[Config] | None = None) -> Config:
    """Load and validate a YAML config (path or already-parsed dict), with ``overrides``
    (:func:`parse_set`) merged in before validation.

    Every path is resolved here, once, and kept absolute (:data:`READ_PATHS`,
    :data:`WRITE_PATHS`): files the run reads (``data.root``/``manifest``/``hierarchy``,
    ``data.dicomweb`` files, ``split.file``, ``train.weights``) against the config file's
    folder (``base_dir``; for a mapping without one, the working directory), folders it
    writes (``output_dir``, ``data.cache_dir``, ``train.tune.cache_dir``) and the
    ``overrides``' paths against the working directory.

    ``schema``: a subclass of :class:`Config` to validate into (training's
    :class:`kmedtl.training.config.RunConfig`, whose ``train`` section is typed).
    """
    label = str(source) if not isinstance(source, dict) else "config"
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        raw = load_yaml(path.read_text(), str(path)) or {}
        base_dir = base_dir or path.parent
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of sections")
    try:
        if overrides:
            raw = merge_overrides(raw, resolve_paths(overrides))
            label += " (with --set)"
        raw = expand_env(resolve_paths(raw, base_dir), label=label)
    except ConfigError as exc:  # name the file (a limit's message names it already)
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(label) else f"{label}: {msg}") from None
    cfg = validate(schema or Config, raw, label)
    for section, field in ((cfg, "output_dir"), (cfg.data, "cache_dir")):  # the defaults
        value = getattr(section, field)
        if value and not os.path.isabs(value):
            setattr(section, field, os.path.abspath(value))
    _check_source(cfg, label)
    return cfg


def _check_source(cfg: Config, label: str):
    d = cfg.data
    if d.source == "folder" and not d.root:
        raise ConfigError(f"{label}: data.root is required when data.source is 'folder'")
    if d.source == "manifest" and not d.manifest:
        raise ConfigError(f"{label}: data.manifest is required when data.source is 'manifest'")
    if d.source == "dicomweb":
        if not d.dicomweb:
            raise ConfigError(f"{label}: data.dicomweb (url, store, labels ...) is required "
                              "when data.source is 'dicomweb'")
        try:
            DicomWebSpec.from_dict(d.dicomweb)
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc}") from None
    try:
        cfg.image_options()
        cfg.hierarchy()
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    except Exception as exc:  # HierarchyError and friends name their field already
        raise ConfigError(f"{label}: data.hierarchy: {exc}") from None


def dataset_path(name: str) -> Path:
    """``$KMEDTL_DATASETS/<name>``, with a clear error when the variable or folder is missing."""
    base = os.environ.get("KMEDTL_DATASETS")
    if not base:
        raise DatasetNotFoundError(
            f"KMEDTL_DATASETS is not set: set it to the folder that holds {name!r} "
            "(e.g. export KMEDTL_DATASETS=../shared/datasets)")
    path = Path(base) / name
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"dataset {name!r} not found at {path} (KMEDTL_DATASETS={base}); check the "
            "variable or copy the dataset there")
    return path
