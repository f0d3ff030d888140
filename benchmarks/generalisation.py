"""What makes the main job hold up on another acquisition (brain MRI ``Testing/``)?

Issue 20, part 5.  Every *training arm* trains the main job's own train stage
(:func:`kmedtl.training.stage.run_training` on ``pipelines/brain_tumor_hierarchical.yaml``,
with that arm's ``--set`` overrides) once per seed, on ``Training/`` only (the main job's
split: similar-content groups kept on one side, Training images that copy a ``Testing/``
image dropped).  Each trained model is then scored under every *evaluation arm*, so the
evaluation arms are paired with their training arm, seed by seed:

- ``plain``: the model as trained (BatchNorm statistics as the recipe leaves them);
- ``tta``: the mean of the image and its horizontal mirror (what
  :func:`kmedtl.evaluation.predict_tta` with ``n=2`` computes, on the in-memory arrays);
- ``adabn``: every BatchNorm layer's moving mean/variance re-estimated on the images being
  scored (AdaBN, Li et al. 2016): unlabelled target images only, no label is used;
- ``adabn_tta``: both.

Temperature scaling is fitted on the internal *validation* split and applied everywhere, so
the ECE after it is reported too.  Seed ensembles (mean probabilities over the seeds of an
arm) are reported as one extra row per arm.

Choosing and reporting: ``Testing/`` is split once, stratified by class (seed 0), into a
*selection* half and a *report* half.  The RESULTS file names the best arm on the selection
half and reports it on the report half; whole-``Testing/`` numbers are shown for context.
One JSON per (training arm, seed) under ``--out``/cells holds the probabilities, so the
report is rebuilt without training (``--report``).

    python benchmarks/generalisation.py --arms pad crop intensity --seeds 0 1 2 \
        --out pipelines/study_generalisation
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "pipelines" / "brain_tumor_hierarchical.yaml"

#: Training arms: ``--set`` overrides of the main job.
ARMS = {
    "pad": {},  # the main job as committed: aspect-preserving, letterboxed with black
    # centre crop to a square: the letterbox bars (image shape predicts the class at 0.48
    # balanced accuracy on Training/, kmedtl data audit) are gone
    "crop": {"data": {"image": {"resize": "crop"}}},
    # stronger intensity augmentation: contrast +-40%, brightness +-20%
    "intensity": {"augment": {"contrast": 0.4, "brightness": 0.2}},
    # acquisition shift: the intensity arm plus per-image gamma, foreground inversion
    # (T1-like <-> T2-like contrast), blur and noise (kmedtl.data.augment).  Training/'s
    # tumour images are one contrast-enhanced T1 look while its no_tumor images span T1, T2,
    # FLAIR and CT (RESULTS.md, "Why"): the arm takes the contrast away as a cue
    "acquisition": {"augment": {"contrast": 0.4, "brightness": 0.2, "gamma": 0.4,
                                "invert": 0.3, "blur": 1.0, "noise": 0.03}},
}
EVALS = ("plain", "tta", "adabn", "adabn_tta")

#: Hand-written (not computed): the visual check behind the ``acquisition`` arm, shown in
#: RESULTS.md as such.
NOTES = """\
## Visual check (hand-written, 2026-12-07)

Montages of 160 px thumbnails, looked at by the engineer (not a radiologist):

- **The 24 `Testing/` glioma images the main job called `normal` with the highest
  confidence** (of 46 it called normal; `pipelines/results/brain_tumor_main_job/
  training_only/external/testing/predictions.csv`): a lesion (a mass, ring enhancement or
  oedema) is plainly visible in nearly all of them, so *tumour* is the right label and the
  *normal* call is the error. At least 9 of the 24 are not post-contrast T1: about 4 T2,
  3 FLAIR and 2 CT slices; several are sagittal; 3 pairs are the same image twice.
- **24 sampled `Training/` glioma images**: all post-contrast T1 with one uniform look
  (the figshare style), axial, coronal and sagittal.
- **24 sampled `Training/` no_tumor images**: T1, T2, FLAIR, CT, diffusion-like and
  sagittal slices of varied brightness and contrast.

So in `Training/` the sequence is confounded with the class: anything that does not look
like a post-contrast T1 is, almost always, `no_tumor`. `Testing/` breaks the confound
(tumours on T2, FLAIR and CT), and the models call those tumours normal. The `Testing/`
tumour-versus-normal labels look right; this check cannot judge the glioma / meningioma /
pituitary subtype labels. The `acquisition` arm was designed after this look at `Testing/`
images and their predictions (no arm was tuned on its numbers), so the report half is not
untouched by that design choice; the numbers are still computed once per seed as
written above.
"""


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def _arrays(samples, hierarchy, options, cache):
    from kmedtl.data.pipeline import make_dataset
    from kmedtl.training.features import materialise

    ds = make_dataset(samples, hierarchy, options, cache=cache, batch_size=64,
                      targets="leaf")
    x, y = materialise(ds)
    return np.asarray(x, "float32"), np.asarray(y).astype(int)


def _external(cfg, hierarchy):
    """The whole ``Testing/`` folder with the run's hierarchy and image options."""
    from kmedtl.config import load_config
    from kmedtl.data.prepare import load_index

    run = cfg.model_dump(mode="json")["data"]
    root = os.path.join(os.environ["KMEDTL_DATASETS"], "brain-tumor-mri", "Testing")
    tcfg = load_config({"data": {"source": "folder", "root": root,
                                 "hierarchy": hierarchy.to_config(), "image": run["image"]}})
    index, _ = load_index(tcfg)
    ids = [os.path.relpath(s.path, root) for s in index.samples]
    return index.samples, ids


def _predict(model, x, tta: bool) -> np.ndarray:
    from kmedtl.run_folder import leaf_output

    def run(a):
        out = model.predict(a, batch_size=64, verbose=0)
        return np.asarray(leaf_output(out) if isinstance(out, dict) else out, "float64")

    p = run(x)
    if tta:
        p = (p + run(x[:, :, ::-1, :])) / 2.0
    return p


def _adabn(model, x):
    """Re-estimate every BatchNorm layer's statistics on ``x`` (AdaBN); returns the saved
    weights to restore."""
    import keras

    from kmedtl.models.weights import leaf_layers
    from kmedtl.training.batchnorm import recalibrate_batchnorm

    saved = model.get_weights()
    bns = [la for la in leaf_layers(model) if isinstance(la, keras.layers.BatchNormalization)]
    flags = [la.trainable for la in bns]
    for la in bns:
        la.trainable = True
    try:
        recalibrate_batchnorm(model, x, batch_size=64)
    finally:
        for la, f in zip(bns, flags):
            la.trainable = f
    return saved


@contextmanager
def trained(cfg, prefix: str, keep: Path | None = None):
    """Prepare ``cfg``'s data and train it with the pipeline's own train stage in a temporary
    run folder; yields ``(prepared, result, model, train seconds)``.  Afterwards the run
    folder is copied to ``keep`` (if given) and removed, and the Keras session cleared."""
    import keras

    from kmedtl.data.prepare import prepare
    from kmedtl.run_folder import load_model
    from kmedtl.training.stage import run_training

    t0 = time.perf_counter()
    prep = prepare(cfg)
    run_dir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        res = run_training(cfg, run_dir, prepared=prep, overwrite=True)
        yield prep, res, load_model(run_dir / "model.keras"), time.perf_counter() - t0
    finally:
        keras.utils.clear_session(free_memory=True)
        if keep is not None:
            shutil.copytree(run_dir, keep, dirs_exist_ok=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def write_cell(path: Path, cell: dict) -> None:
    """Write one cell's JSON atomically (a stopped run leaves no half cell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cell))
    os.replace(tmp, path)


def train_cell(arm: str, seed: int, out: Path, keep_runs: Path | None,
               epochs: int | None = None) -> Path:
    from kmedtl.pipeline.spec import load_pipeline

    path = out / "cells" / f"{arm}-s{seed}.json"
    if path.exists():
        print(f"{path.name}: done already", flush=True)
        return path
    train = {"seed": seed, "verbose": 0, "tensorboard": False}
    if epochs:
        train["epochs"] = epochs
    overrides = _merge(ARMS[arm], {"train": train})
    pl = load_pipeline(MAIN, overrides=overrides)
    cfg = pl.config
    t0 = time.perf_counter()
    keep = keep_runs / f"{arm}-s{seed}" if keep_runs is not None else None
    with trained(cfg, f"kmedtl-gen-{arm}-s{seed}-", keep) as (prep, res, model, train_s):
        h = prep.hierarchy
        xv, yv = _arrays(prep.samples("val"), h, prep.options, prep.cache)
        xt, yt = _arrays(prep.samples("test"), h, prep.options, prep.cache)
        ext_samples, ext_ids = _external(cfg, h)
        xe, ye = _arrays(ext_samples, h, prep.options, None)
        cell = {"arm": arm, "seed": seed, "overrides": ARMS[arm], "leaves": list(h.leaves),
                "n_train": len(prep.samples("train")), "best_epoch": res.best_epoch,
                "epochs": pl.train.epochs,
                "train_seconds": round(train_s, 1),
                "val": {"y": yv.tolist(), "plain": _predict(model, xv, False)},
                "internal": {"y": yt.tolist(), "ids": [s.id for s in prep.samples("test")]},
                "external": {"y": ye.tolist(), "ids": ext_ids}}
        for part, x in (("internal", xt), ("external", xe)):
            for ev in EVALS:
                if ev.startswith("adabn"):
                    saved = _adabn(model, x)
                    cell[part][ev] = _predict(model, x, ev.endswith("tta"))
                    model.set_weights(saved)
                else:
                    cell[part][ev] = _predict(model, x, ev == "tta")
        for part in ("val", "internal", "external"):
            for k, v in list(cell[part].items()):
                if isinstance(v, np.ndarray):
                    cell[part][k] = np.round(v, 5).tolist()
        cell["seconds"] = round(time.perf_counter() - t0, 1)
        write_cell(path, cell)
        print(f"{path.name}: trained in {train_s:.0f} s, cell {cell['seconds']:.0f} s",
              flush=True)
    return path


# ---------------------------------------------------------------------------- report
def _halves(y: np.ndarray, seed: int = 0):
    """Stratified halves of ``Testing/``: (selection rows, report rows)."""
    rng = np.random.default_rng(seed)
    sel = []
    for c in np.unique(y):
        rows = rng.permutation(np.nonzero(y == c)[0])
        sel.extend(rows[: len(rows) // 2].tolist())
    sel = np.array(sorted(sel))
    return sel, np.setdiff1d(np.arange(len(y)), sel)


def _scores(y, p, temperature=None) -> dict:
    from sklearn.metrics import balanced_accuracy_score

    from kmedtl.evaluation.calibration import apply_temperature, expected_calibration_error

    p = np.asarray(p, "float64")
    out = {"balanced_accuracy": float(balanced_accuracy_score(y, p.argmax(1))),
           "ece": float(expected_calibration_error(y, p))}
    if temperature is not None:
        out["ece_after_temperature"] = float(expected_calibration_error(
            y, apply_temperature(p, temperature)))
    return out


def _cells(out: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((out / "cells").glob("*.json"))]


def summarise(out: Path) -> dict:
    """Per (training arm, evaluation arm, seed): balanced accuracy and ECE on the internal
    test, the whole ``Testing/`` folder and its selection / report halves."""
    from kmedtl.evaluation.calibration import fit_temperature

    rows, probs = [], {}
    for c in _cells(out):
        yv = np.array(c["val"]["y"])
        t = fit_temperature(yv, np.array(c["val"]["plain"]))
        ye = np.array(c["external"]["y"])
        yi = np.array(c["internal"]["y"])
        sel, rep = _halves(ye)
        for ev in EVALS:
            pe, pi = np.array(c["external"][ev]), np.array(c["internal"][ev])
            probs[(c["arm"], ev, c["seed"])] = pe
            rows.append({"arm": c["arm"], "eval": ev, "seed": c["seed"], "temperature": t,
                         "internal": _scores(yi, pi, t), "external": _scores(ye, pe, t),
                         "selection": _scores(ye[sel], pe[sel]),
                         "report": _scores(ye[rep], pe[rep], t),
                         "train_seconds": c.get("train_seconds")})
    return {"rows": rows, "probs": probs}


def _ms(vals) -> str:
    v = np.asarray(vals, "float64")
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def _training_arms_in_domain(cells: list[dict], arms: list[str]) -> list[str]:
    """The training arms on the main job's own data, plain: internal validation (the data
    that would choose a training recipe; it also picks each cell's best epoch) and the
    internal test (reported), each paired with ``pad`` seed by seed."""
    ba = {(c["arm"], c["seed"], part): _scores(np.array(c[part]["y"]), c[part]["plain"])[
        "balanced_accuracy"] for c in cells for part in ("val", "internal")}
    lines = ["", "## Training arms on the main job's own data (plain), seed by seed", "",
             "Internal validation chooses a training recipe (it also picks each cell's best "
             "epoch, so it reads high); the internal test reports. Differences are against "
             "`pad` on the same seed.", "",
             "| training arm | seeds | validation | vs pad, per seed | internal test | "
             "vs pad, per seed |", "|---|---|---|---|---|---|"]
    for arm in arms:
        seeds = sorted({c["seed"] for c in cells if c["arm"] == arm})
        cols = []
        for part in ("val", "internal"):
            vals = [ba[(arm, sd, part)] for sd in seeds]
            diff = [ba[(arm, sd, part)] - ba[("pad", sd, part)] for sd in seeds
                    if ("pad", sd, part) in ba]
            cols += [_ms(vals), "-" if arm == "pad" else
                     ", ".join(f"{d:+.3f}" for d in diff) or "-"]
        lines.append(f"| {arm} | {len(seeds)} | " + " | ".join(cols) + " |")
    return lines


def write_report(out: Path) -> Path:
    cells = _cells(out)
    if not cells:
        raise SystemExit(f"{out}/cells: no cells yet")
    s = summarise(out)
    rows = s["rows"]
    leaves = cells[0]["leaves"]
    ye = np.array(cells[0]["external"]["y"])
    sel, rep = _halves(ye)
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    lines = ["# Generalisation to another acquisition (brain MRI `Testing/`)", "",
             "Written by `benchmarks/generalisation.py --report` from the cells in `cells/` "
             "(one per training arm and seed: the main job's train stage on `Training/` "
             "only, then every evaluation arm on the same model).", "",
             f"- `Testing/`: {len(ye)} images, none used for training or model selection "
             "inside a cell (Training images that copy one are dropped by the main job's "
             "`split.exclude_copies_of`).",
             f"- **Who chose what:** the arms were compared on a stratified *selection half* "
             f"of `Testing/` ({len(sel)} images); the chosen arm is reported on the other "
             f"*report half* ({len(rep)} images). Whole-`Testing/` numbers are context. "
             "Temperature is fitted on each cell's internal validation split.",
             "- An effect counts when it holds for every seed (the seed is the unit).", "",
             "## Balanced accuracy and ECE, mean ± sd over seeds", "",
             "| training arm | evaluation | seeds | internal test | Testing/ (all) | "
             "selection half | report half | ECE Testing/ | ECE after T |",
             "|---|---|---|---|---|---|---|---|---|"]
    table = {}
    for arm in arms:
        for ev in EVALS:
            rs = [r for r in rows if r["arm"] == arm and r["eval"] == ev]
            if not rs:
                continue
            table[(arm, ev)] = rs
            lines.append(
                f"| {arm} | {ev} | {len(rs)} | "
                f"{_ms([r['internal']['balanced_accuracy'] for r in rs])} | "
                f"{_ms([r['external']['balanced_accuracy'] for r in rs])} | "
                f"{_ms([r['selection']['balanced_accuracy'] for r in rs])} | "
                f"{_ms([r['report']['balanced_accuracy'] for r in rs])} | "
                f"{_ms([r['external']['ece'] for r in rs])} | "
                f"{_ms([r['external']['ece_after_temperature'] for r in rs])} |")
    # seed ensembles: mean probabilities over an arm's seeds
    lines += ["", "## Seed ensembles (mean probabilities over the seeds of an arm)", "",
              "| training arm | evaluation | seeds | Testing/ (all) | selection half | "
              "report half | ECE Testing/ |", "|---|---|---|---|---|---|---|"]
    for (arm, ev), rs in table.items():
        if len(rs) < 2:
            continue
        p = np.mean([s["probs"][(arm, ev, r["seed"])] for r in rs], axis=0)
        a, b, c_ = _scores(ye, p), _scores(ye[sel], p[sel]), _scores(ye[rep], p[rep])
        lines.append(f"| {arm} | {ev} | {len(rs)} | {a['balanced_accuracy']:.3f} | "
                     f"{b['balanced_accuracy']:.3f} | {c_['balanced_accuracy']:.3f} | "
                     f"{a['ece']:.3f} |")
    # paired effects against the main job (pad, plain), seed by seed, on the selection half
    base = {r["seed"]: r for r in table.get(("pad", "plain"), [])}
    lines += ["", "## Paired effects against the main job (pad, plain), seed by seed", "",
              "Selection half, balanced accuracy. `holds` = better on every shared seed.", "",
              "| training arm | evaluation | seeds | mean difference | per seed | holds |",
              "|---|---|---|---|---|---|"]
    most = max(len(rs) for rs in table.values())  # choose among fully-seeded arms
    best, best_v = None, -1.0
    for (arm, ev), rs in table.items():
        v = float(np.mean([r["selection"]["balanced_accuracy"] for r in rs]))
        if len(rs) == most and v > best_v:
            best, best_v = (arm, ev), v
        if (arm, ev) == ("pad", "plain"):
            continue
        d = [r["selection"]["balanced_accuracy"] - base[r["seed"]]["selection"][
            "balanced_accuracy"] for r in rs if r["seed"] in base]
        if not d:
            continue
        lines.append(f"| {arm} | {ev} | {len(d)} | {np.mean(d):+.3f} | "
                     f"{', '.join(f'{x:+.3f}' for x in d)} | "
                     f"{'yes' if len(d) >= 2 and min(d) > 0 else 'no'} |")
    lines += _training_arms_in_domain(cells, arms)
    rs = table[best]
    lines += ["", "## Chosen on the selection half, reported on the report half", "",
              f"- Chosen: **{best[0]} / {best[1]}** (mean selection-half balanced accuracy "
              f"{best_v:.3f} over {len(rs)} seeds).",
              f"- Report half: balanced accuracy "
              f"{_ms([r['report']['balanced_accuracy'] for r in rs])}, ECE "
              f"{_ms([r['report']['ece'] for r in rs])} (after temperature "
              f"{_ms([r['report']['ece_after_temperature'] for r in rs])}); internal test "
              f"{_ms([r['internal']['balanced_accuracy'] for r in rs])}."]
    # per-class recall and the panel's verdict on each Testing/ image
    lines += ["", "## Where the errors are: per-class recall on Testing/ (plain, mean over "
              "seeds)", "", "| training arm | " + " | ".join(leaves) + " |",
              "|---|" + "---|" * len(leaves)]
    for arm in arms:
        rs = table.get((arm, "plain"), [])
        if not rs:
            continue
        rec = []
        for k in range(len(leaves)):
            m = ye == k
            rec.append(np.mean([(s["probs"][(arm, "plain", r["seed"])][m].argmax(1) == k)
                                .mean() for r in rs]))
        lines.append(f"| {arm} | " + " | ".join(f"{v:.2f}" for v in rec) + " |")
    panel = [p for (a, ev, _), p in s["probs"].items() if ev == "plain"]
    votes = np.stack([p.argmax(1) for p in panel])  # models x images
    agree = (votes == ye[None]).mean(0)
    lines += ["", f"## The panel ({len(panel)} models: every arm and seed, plain)", ""]
    for k, name in enumerate(leaves):
        m = ye == k
        never = int(((agree == 0) & m).sum())
        others = votes[:, m & (agree == 0)]
        called = {}
        if others.size:
            vals, counts = np.unique(others, return_counts=True)
            called = {leaves[v]: int(c) for v, c in zip(vals, counts)}
        lines.append(f"- `{name}`: {never} of {int(m.sum())} images no model of the panel "
                     f"labels `{name}` (their votes: {called})")
    ceiling = float(np.mean([((agree > 0) & (ye == k)).sum() / (ye == k).sum()
                             for k in range(len(leaves))]))
    lines += ["", f"Balanced accuracy if every image some model of the panel gets right "
              f"were right (the panel's oracle ceiling): {ceiling:.3f}."]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n\n" + NOTES)
    summary = {"rows": rows, "chosen": {"arm": best[0], "eval": best[1]},
               "panel_oracle_balanced_accuracy": ceiling,
               "selection_rows": len(sel), "report_rows": len(rep)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "pipelines" / "study_generalisation")
    ap.add_argument("--keep-runs", type=Path, default=None,
                    help="copy each cell's run folder here (model.keras) for later checks")
    ap.add_argument("--epochs", type=int, default=None, help="smoke runs only")
    ap.add_argument("--report", action="store_true", help="only rebuild the report")
    args = ap.parse_args(argv)
    if "KMEDTL_DATASETS" not in os.environ:
        print("generalisation: set KMEDTL_DATASETS (the shared datasets folder)",
              file=sys.stderr)
        return 2
    if args.report:
        write_report(args.out)
        return 0
    for seed in args.seeds:  # seed-major: every arm has seeds early if stopped
        for arm in args.arms:
            train_cell(arm, seed, args.out, args.keep_runs, args.epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
