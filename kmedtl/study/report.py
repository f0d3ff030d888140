"""``RESULTS.md`` from the finished cells: generated, never hand-written.

Per comparison: the arms, a table per metric (mean +- sd over seeds for each arm x N),
paired tests of every arm against the reference arm at each N (see
:mod:`kmedtl.study.stats`), and "Expected from the papers vs found": the expectation
paragraph from the study YAML followed by sentences computed from the numbers.  Cells that
did not run are listed with the reason; the document says how long the finished cells
took and on what hardware.  Learning-curve PNGs go next to the cells (``runs/``), not into
the document.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kmedtl.evaluation import mean_sd
from kmedtl.study.config import METRICS
from kmedtl.study.stats import paired, ratio

NAMES = {"balanced_accuracy": "balanced accuracy", "kappa": "Cohen's kappa",
         "auroc_macro": "macro AUROC", "f1_macro": "leaf macro F1"}


def _pt(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:+.1f}"


def _f(v, d=3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{d}f}"


def _p(p) -> str:
    return "n/a" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _recipe_text(recipe: dict, init: str, n_folds: int) -> str:
    bits = [recipe.get("model", "hierarchical"), recipe.get("backbone", "cbr_small")]
    if recipe.get("cut"):
        bits.append(f"cut {recipe['cut']}")
    if init == "scratch" and recipe.get("weights") == "imagenet":
        init = "ImageNet"
    bits.append("init " + init)
    bits.append(recipe.get("strategy", "full"))
    if recipe.get("lr_multipliers"):
        bits.append("lr x " + "/".join(f"{m:.3g}" for m in recipe["lr_multipliers"]))
    if recipe.get("unfreeze_at"):
        bits.append("unfreeze at " + ",".join(str(u) for u in recipe["unfreeze_at"]))
    bits.append(recipe.get("schedule", "constant"))
    bits.append(f"lr {recipe.get('learning_rate', 1e-3)}")
    if recipe.get("model") == "staged":
        bits.append(f"{n_folds}-fold stacking")
    return ", ".join(str(b) for b in bits)


def _verdict(summary) -> str:
    """"better" / "worse" only when the 95% CI of the seed-mean difference excludes 0 *and*
    every seed's difference has that sign (the CI covers test-set sampling only, not the
    seed-to-seed spread); "no clear difference, seeds disagree" when the CI excludes 0 but
    some seed goes the other way; else "no clear difference"."""
    ci = summary["mean_difference"]
    lo, hi = ci.get("ci_low"), ci.get("ci_high")
    n = len(summary["seeds"])
    if lo is None or hi is None:
        return "undetermined"
    if lo > 0:
        return "better" if summary["wins"] == n else "no clear difference, seeds disagree"
    if hi < 0:
        return "worse" if summary["losses"] == n else "no clear difference, seeds disagree"
    return "no clear difference"


def _agree(c, alpha: float = 0.05) -> str:
    """Flag a verdict that McNemar (per-case correctness, i.e. accuracy) does not back."""
    v = _verdict(c)
    sig = c["mcnemar_significant_seeds"]
    n = len(c["seeds"])
    if v in ("better", "worse") and sig < (n + 1) // 2:
        return f" (McNemar p < {alpha} in only {sig} of {n} seeds)"
    if v.startswith("no clear difference") and sig > n // 2:
        return f" (but McNemar p < {alpha} in {sig} of {n} seeds)"
    return ""


class Report:
    def __init__(self, runner):
        self.r = runner
        with open(runner.out / "split.json") as fh:
            self.split = json.load(fh)
        self.y = np.asarray(self.split["y_test"])
        by = defaultdict(dict)  # (study, arm) -> {(n, seed): cell}
        self.status = defaultdict(dict)
        for c in runner.all_planned:
            row = runner.read_cell(c.key) if c.skip_reason is None else None
            if row is not None and row.get("fingerprint") != self.split["fingerprint"]:
                row = None
            by[(c.study, c.arm)][(str(c.n), c.seed)] = row
            err = runner.cell_path(c.key).with_suffix(".error.json")
            self.status[(c.study, c.arm)][(str(c.n), c.seed)] = (
                "done" if row else c.skip_reason or (
                    "failed (see cells/*.error.json)" if err.exists() else
                    "not run: the run's time budget (--max-minutes) ended first; --resume "
                    "trains it"))
        self.cells = by

    # ------------------------------------------------------------------ pieces
    def values(self, study, arm, n, metric):
        return [row["metrics"][metric]["value"] for (nn, _), row in
                sorted(self.cells[(study, arm)].items(), key=lambda t: t[0][1])
                if nn == str(n) and row is not None]

    def probs(self, study, arm, n) -> dict:
        return {s: np.asarray(row["probs"]) for (nn, s), row in self.cells[(study, arm)].items()
                if nn == str(n) and row is not None}

    def table(self, s, metric) -> list[str]:
        sizes = [str(n) for n in s.grid.sizes]
        lines = ["| arm | " + " | ".join(f"N={n}" for n in sizes) + " |",
                 "|---|" + "---|" * len(sizes)]
        for arm in s.arms:
            cells = []
            for n in sizes:
                v = self.values(s.name, arm.name, n, metric)
                st = self.status[(s.name, arm.name)]
                if not v:
                    na = any(str(r).startswith("not applicable") for (nn, _), r in st.items()
                             if nn == n)
                    outside = n not in [str(x) for x in s.sizes_of(arm)]
                    cells.append("n/a" if na or outside else "not run")
                    continue
                ms = mean_sd(v)
                cells.append(f"{ms['mean']:.3f} ± {ms['sd']:.3f} ({ms['n']})")
            lines.append(f"| {arm.label or arm.name} | " + " | ".join(cells) + " |")
        return lines

    def comparisons(self, s) -> dict:
        out = {}
        ev = s.evaluation
        for arm in s.arms:
            if arm.name == s.reference:
                continue
            for n in s.grid.sizes:
                a = self.probs(s.name, arm.name, n)
                b = self.probs(s.name, s.reference, n)
                res = paired(self.y, a, b, ev.primary, n_boot=ev.n_boot, alpha=ev.alpha)
                if res is not None:
                    out[(arm.name, str(n))] = res
        return out

    # ------------------------------------------------------------------ document
    def study_section(self, s, k: int) -> list[str]:
        ev = s.evaluation
        ref = s.arm(s.reference)
        L = [f"## {k}. {s.title or s.name}", ""]
        if s.papers:
            L += [f"Papers: {s.papers.strip()}", ""]
        L += [f"Study file: `{Path(s.source).name}`; reference arm for paired tests: "
              f"**{ref.label or ref.name}**.", "", "| arm | recipe |", "|---|---|"]
        for arm in s.arms:
            recipe = s.recipe_of(arm)
            L.append(f"| {arm.label or arm.name} | {_recipe_text(recipe, arm.init, arm.n_folds)}"
                     " |")
        L.append("")
        for metric in METRICS:
            L += [f"**{NAMES[metric]}** on the test set, mean ± sd over seeds (number of seeds)",
                  "", *self.table(s, metric), ""]
        L += self.costs(s) + self.moonshot_lines(s)
        comps = getattr(self, "_comps", {}).get(s.name) or self.comparisons(s)
        L += [f"**Paired tests** against {ref.label or ref.name} ({NAMES[ev.primary]}, "
              "points = percentage points). Per seed: the same training subset and the same "
              "test cases; mean difference over seeds with a paired bootstrap 95% CI over test "
              "cases (the same resample for every seed); sd of the difference over seeds; "
              "McNemar p-value per seed (per-case correctness, i.e. accuracy, not balanced "
              "accuracy). Verdict \"better\"/\"worse\" needs the CI to exclude 0 *and* "
              "every seed to agree in sign; otherwise \"no clear difference\".", "",
              "| arm | N | mean diff (points) | 95% CI | sd over seeds | seeds better/worse "
              "| McNemar p per seed | verdict |", "|---|---|---|---|---|---|---|---|"]
        for (arm, n), c in comps.items():
            md = c["mean_difference"]
            label = s.arm(arm).label or arm
            L.append(f"| {label} | {n} | {_pt(md['value'])} | {_pt(md['ci_low'])} to "
                     f"{_pt(md['ci_high'])} | {100 * (c['difference_over_seeds']['sd'] or 0):.1f}"
                     f" | {c['wins']}/{c['losses']} of {len(c['seeds'])} | "
                     f"{', '.join(_p(p) for p in c['mcnemar_p'])} | {_verdict(c)}{_agree(c)} |")
        if not comps:
            L.append("| (no finished pair yet) | | | | | | | |")
        L += ["", "### Expected from the papers vs found", ""]
        if s.expectation:
            L += ["*Expected* (written before the run): " + " ".join(s.expectation.split()), ""]
        L += ["*Found* (generated from the numbers above):", ""]
        L += self.found(s, comps) + [""]
        if s.caveats:
            L += ["*Caveats of this design* (hand-written in the study file): "
                  + " ".join(s.caveats.split()), ""]
        return L

    def moonshot(self, s) -> dict | None:
        m = s.moonshot
        if m is None:
            return None
        ev = s.evaluation
        return ratio(self.y, self.probs(s.name, m.arm, m.small),
                     self.probs(s.name, m.arm, m.large), ev.primary, n_boot=ev.n_boot,
                     alpha=ev.alpha)

    def moonshot_lines(self, s) -> list[str]:
        if s.moonshot is None:
            return []
        m, r = s.moonshot, self.moonshot(s)
        arm = s.arm(m.arm)
        head = (f"**Moonshot ratio** of {arm.label or arm.name}: {NAMES[s.evaluation.primary]} "
                f"with N={m.small} per class divided by that with N={m.large}")
        if r is None:
            return [head + ": not yet (no seed has both cells).", ""]
        return [head + f" = **{r['value']:.3f}** (95% CI {r['ci_low']:.3f} to "
                f"{r['ci_high']:.3f}; {r['small']:.3f} / {r['large']:.3f}, mean of "
                f"{len(r['seeds'])} seed(s); per seed "
                + ", ".join(f"{v:.3f}" for v in r["per_seed"]) + "). The CI resamples test "
                "cases, the same resample for every seed.", ""]

    def costs(self, s) -> list[str]:
        """Parameters, GFLOPs and CPU images/s (from the study's ``costs`` benchmark file)
        beside each arm's primary metric."""
        if not s.costs:
            return []
        with open(s.costs) as fh:
            bench = json.load(fh)
        rows = {(r["family"], r["cut"]): r for r in bench["rows"]}
        env = bench.get("environment", {})
        sizes = [str(n) for n in s.grid.sizes]
        L = [f"**Cost of each arm's backbone** (`{Path(s.costs).name}`, written by "
             f"`benchmarks/models.py` at {env.get('input', ['?'])[0]} px on "
             f"{env.get('cpu_count', '?')} CPU cores: inference, batch 32, ratios to the full "
             f"network measured in the same run) beside {NAMES[s.evaluation.primary]}", "",
             "| arm | params (M) | ratio | GFLOPs | ratio | CPU img/s | ratio | "
             + " | ".join(f"N={n}" for n in sizes) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(sizes)]
        for arm in s.arms:
            recipe = s.recipe_of(arm)
            r = rows.get((recipe.get("backbone"), recipe.get("cut") or "(full)"))
            if r is None:
                continue
            accs = []
            for n in sizes:
                v = self.values(s.name, arm.name, n, s.evaluation.primary)
                accs.append(f"{mean_sd(v)['mean']:.3f}" if v else "-")
            L.append(f"| {arm.label or arm.name} | {r['params'] / 1e6:.2f} | "
                     f"{r['params_ratio']:.2f} | {r['flops'] / 1e9:.2f} | {r['flops_ratio']:.2f}"
                     f" | {r['images_per_s']:.0f} | {r['images_per_s_ratio']:.2f} | "
                     + " | ".join(accs) + " |")
        return L + [""]

    def found(self, s, comps) -> list[str]:
        ref = s.arm(s.reference)
        rname = ref.label or ref.name
        metric = NAMES[s.evaluation.primary]
        out = []
        for arm in s.arms:
            if arm.name == s.reference:
                continue
            name = arm.label or arm.name
            parts, verdicts = [], []
            for n in s.grid.sizes:
                c = comps.get((arm.name, str(n)))
                if c is None:
                    continue
                md = c["mean_difference"]
                v = _verdict(c)
                verdicts.append(v)
                word = {"better": "beat", "worse": "was worse than",
                        "no clear difference": "did not clearly differ from",
                        "no clear difference, seeds disagree":
                            "did not clearly differ (seeds disagree) from",
                        "undetermined": "could not be compared with"}[v]
                parts.append(f"at N={n} {name} {word} {rname}: {_pt(md['value'])} points "
                             f"of {metric} (95% CI {_pt(md['ci_low'])} to {_pt(md['ci_high'])}; "
                             f"better in {c['wins']} of {len(c['seeds'])} seeds; McNemar p "
                             f"{', '.join(_p(p) for p in c['mcnemar_p'])}{_agree(c)})")
            if not parts:
                out.append(f"- {name}: no finished cells to compare yet.")
                continue
            if all(v.startswith("no clear difference") for v in verdicts):
                summary = f"{name} did not help: no N showed a difference whose CI excludes 0"
            elif all(v == "better" for v in verdicts):
                summary = f"{name} helped at every N that ran"
            else:
                by = defaultdict(list)
                for n, v in zip([str(n) for n in s.grid.sizes
                                 if (arm.name, str(n)) in comps], verdicts):
                    by[v].append(n)
                summary = f"{name}: " + "; ".join(f"{v} at N={', '.join(ns)}"
                                                  for v, ns in by.items())
            out.append(f"- **{summary}.** In detail: " + "; ".join(parts) + ".")
        return out

    def summary(self) -> list[str]:
        """One line per (comparison, arm): the seed-mean difference to the reference arm in
        points of the primary metric at each N, with the verdict."""
        sizes = []
        for s in self.r.studies:
            sizes += [str(n) for n in s.grid.sizes if str(n) not in sizes]
        L = ["## Summary", "",
             "Seed-mean difference to each comparison's reference arm, in points of the "
             "primary metric, with the verdict of the paired test (details in each section).",
             "", "| comparison | arm vs reference | " + " | ".join(f"N={n}" for n in sizes)
             + " |", "|---|---|" + "---|" * len(sizes)]
        self._comps = {}
        for k, s in enumerate(self.r.studies, start=1):
            comps = self.comparisons(s)
            self._comps[s.name] = comps
            ref = s.arm(s.reference)
            for arm in s.arms:
                if arm.name == s.reference:
                    continue
                cells = []
                for n in sizes:
                    c = comps.get((arm.name, n))
                    cells.append("-" if c is None else
                                 f"{_pt(c['mean_difference']['value'])} ({_verdict(c)})")
                L.append(f"| {k}. {s.name} | {arm.label or arm.name} vs "
                         f"{ref.label or ref.name} | " + " | ".join(cells) + " |")
        return L + [""]

    def coverage(self) -> list[str]:
        L = ["| comparison | arm | N | seeds done | not run (reason) |", "|---|---|---|---|---|"]
        missing_any = False
        for s in self.r.studies:
            for arm in s.arms:
                for n in s.sizes_of(arm):
                    st = {seed: r for (nn, seed), r in self.status[(s.name, arm.name)].items()
                          if nn == str(n)}
                    done = [str(x) for x, r in st.items() if r == "done"]
                    other = defaultdict(list)
                    for x, r in st.items():
                        if r != "done":
                            other[r].append(str(x))
                    if any(not k.startswith("not applicable") for k in other):
                        missing_any = True
                    why = "; ".join(f"seeds {','.join(v)}: {k}" for k, v in other.items())
                    L.append(f"| {s.name} | {arm.name} | {n} | {','.join(done) or '-'} | "
                             f"{why or '-'} |")
        return L, missing_any

    def render(self, title: str = "Study results", command: str = "") -> str:
        r = self.r
        rows = [r.read_cell(c.key) for c in r.cells if c.skip_reason is None]
        rows = [x for x in rows if x]
        secs = sum(x.get("seconds", 0) for x in rows)
        pre = []
        for p in sorted((r.out / "pretrain").glob("*.json")) if (r.out / "pretrain").exists() \
                else []:
            with open(p) as fh:
                pre.append(json.load(fh))
        secs += sum(p.get("seconds", 0) for p in pre)
        hw = rows[0]["hardware"] if rows else {}
        per_cell = defaultdict(list)
        for x in rows:
            what = (f"{x.get('model')}, {x.get('backbone')}"
                    + (f" cut {x['cut']}" if x.get("cut") else "")
                    + f", {x.get('strategy')}" + ("" if x.get("init") == "scratch"
                                                  else f", init {x.get('init')}"))
            per_cell[(what, str(x["n"]))].append(x["seconds"])
        times = sorted(x["finished_at"] for x in rows if x.get("finished_at"))
        sm = self.split["summary"]
        s0 = r.studies[0]
        pre_text = ", ".join(
            f"{p['name']} ({p['method']}, pool {p.get('pool', 'shared')}"
            + (f", seed {p['seed']}" if p.get("pool") == "per_seed" else "")
            + f"): {p['n_images']} images, {p['epochs']} epochs, {p['seconds'] / 60:.1f} min"
            for p in pre)
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        L = [f"# {title}", "",
             f"Generated by `{command or 'python -m kmedtl.study'}` on {now} from "
             f"`{r.out}/cells/*.json`. Do not edit by hand: rerun the command (add `--resume` to "
             "train only the cells still missing).", ""]
        L += ["## Set-up", "",
              f"- **Hardware**: {hw.get('cpu_count', '?')} CPU cores shared with other jobs, "
              f"no GPU ({hw.get('gpus', 0)} visible); TensorFlow {hw.get('tensorflow', '?')}, "
              f"Keras {hw.get('keras', '?')} ({hw.get('backend', '?')} backend).",
              f"- **Run time**: {len(rows)} finished cells + {len(pre)} pretraining run(s) took "
              f"{secs / 60:.1f} min of wall time in total (cell training + prediction + "
              "bootstrap)" + (f"; cells finished between {times[0]} and {times[-1]}"
                              if times else "") + ".",
              f"- **Data**: {os.path.basename(str(s0.data.root).rstrip('/'))}"
              + (f" ({s0.data.manifest}, patients grouped)" if s0.data.manifest else "")
              + f", {sm.get('image')}; test = "
              f"{'the Testing folder' if s0.data.test == 'source' else 'a fixed holdout'}; "
              f"exact (SHA-256) and near (pHash, <= {s0.data.near_threshold} bits) duplicates "
              f"grouped: {sm.get('dropped_train_leaking_into_test')} training images that "
              f"duplicate a test image dropped, {sm.get('train_duplicates_removed')} "
              f"within-training and {sm.get('test_duplicates_removed')} within-test duplicate "
              f"copies removed, {sm.get('label_conflict_groups')} label-conflict group(s) "
              f"removed ({sm.get('train_label_conflicts_removed')} training, "
              f"{sm.get('test_label_conflicts_removed')} test images).",
              f"- Training pool {sm.get('train_total')} images {sm.get('train_per_class')}; "
              f"test set {sm.get('test_total')} images {sm.get('test_per_class')}.",
              "- **Subsets**: N images per class drawn with `per_class_subset` (nested: "
              "N=25 inside N=50 inside N=100 for a seed); `all` = the whole pool (imbalanced).",
              "- **Pretraining** (SimCLR and rotation without labels; level1 on the pool "
              "images' coarse level-1 labels, e.g. normal vs disease): on training images "
              "outside every "
              "finite-N subset of every seed (pool `shared`) or of that seed (`per_seed`): "
              f"{pre_text or 'none ran'}; pretrained arms at N=all are not applicable.",
              f"- **Recipe shared by all arms** unless the arm overrides it: "
              f"`{json.dumps(s0.train)}`; no validation split (fixed epochs per N, the "
              "last epoch is kept), no augmentation, test set untouched until the end; "
              + ("backbone BatchNorm kept in inference mode (`freeze_bn`)."
                 if s0.train.get("freeze_bn") and not s0.train.get("recalibrate_bn", True)
                 else "after training, BatchNorm moving statistics are recomputed on the "
                 "cell's training images (`kmedtl.study.training.recalibrate_batchnorm`: "
                 "with Keras' momentum 0.99 a few hundred steps leave them far from the "
                 "data and the model predicts one class)."),
              f"- **Statistics**: {s0.evaluation.n_boot} bootstrap resamples (stratified by "
              "class) per CI; paired tests per seed (see each comparison).", ""]
        notes = [x.notes for x in r.studies if x.notes]
        if notes:
            L += ["**Design notes** (hand-written in the study files, not recomputed):", ""]
            L += [" ".join(n.split()) for n in notes] + [""]
        if per_cell:
            L += ["**Time per cell** (median seconds: train + predict + bootstrap; "
                  "staged = 3 node models x (2 folds + final))", "",
                  "| model, backbone, strategy, init | N | cells | median s |",
                  "|---|---|---|---|"]
            nkey = {"25": 0, "50": 1, "100": 2, "all": 3}
            for (what, n), v in sorted(per_cell.items(),
                                       key=lambda t: (t[0][0], nkey.get(t[0][1], 9))):
                L.append(f"| {what} | {n} | {len(v)} | {np.median(v):.0f} |")
            L.append("")
        L += self.summary()
        for k, s in enumerate(r.studies, start=1):
            L += self.study_section(s, k)
        cov, missing = self.coverage()
        L += ["## Coverage: which cells ran", "",
              ("Some cells did not run; `python -m kmedtl.study ... --resume` trains exactly "
               "those." if missing else "Every planned cell ran (cells marked not applicable "
               "excepted)."), "", *cov, ""]
        return "\n".join(L)


def write_report(runner, path, title: str = "Study results", command: str = "") -> Path:
    text = Report(runner).render(title, command)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def plot_learning_curves(runner, out_dir) -> list[Path]:
    """One PNG per comparison (primary metric, mean +- sd over seeds vs N) into ``out_dir``
    (matplotlib's object API and the Agg canvas: no pyplot, no global state)."""
    rep = Report(runner)
    paths = []
    for s in runner.studies:
        fig = Figure(figsize=(5, 3.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        sizes = [str(n) for n in s.grid.sizes]
        for arm in s.arms:
            xs, ms, sds = [], [], []
            for i, n in enumerate(sizes):
                v = rep.values(s.name, arm.name, n, s.evaluation.primary)
                if v:
                    st = mean_sd(v)
                    xs.append(i)
                    ms.append(st["mean"])
                    sds.append(st["sd"])
            if xs:
                ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label=arm.label or arm.name)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_xlabel("images per class")
        ax.set_ylabel(NAMES[s.evaluation.primary])
        ax.set_title(s.title or s.name, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = Path(out_dir) / f"learning_curve_{s.name}.png"
        fig.savefig(p, dpi=100)
        paths.append(p)
    return paths
