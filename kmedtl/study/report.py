"""``RESULTS.md`` from the finished cells: generated, never hand-written.

Per comparison: the arms, a table per metric (mean +- sd over seeds for each arm x N),
paired tests of every arm against the reference arm at each N (see
:mod:`kmedtl.study.stats`), and "Expected from the papers vs found": the expectation
paragraph from the study YAML followed by sentences computed from the numbers.

Inference (:meth:`Report.all_comparisons`): the seed is the unit; every comparison the
report makes at every N is one family, Holm-corrected, and a verdict is "better" or
"worse" only when the Holm-adjusted seed-level p is below the study's alpha.  The top of
the document says so, with the family size, and says which data chose the recommended
recipe (a ``topic: recipe`` comparison).  Cells that did not run are listed with the
reason; the document says how long the finished cells took and on what hardware.
Learning-curve PNGs go next to the cells (``runs/``), not into the document.
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
from kmedtl.jsonio import atomic_write
from kmedtl.study.config import METRICS
from kmedtl.study.stats import holm_family, paired, ratio, verdict

NAMES = {"balanced_accuracy": "balanced accuracy", "kappa": "Cohen's kappa",
         "auroc_macro": "macro AUROC", "f1_macro": "leaf macro F1"}


def _pt(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:+.1f}"


def _f(v, d=3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{d}f}"


def _p(p) -> str:
    return "n/a" if p is None or not math.isfinite(p) else (
        "<0.001" if p < 0.001 else f"{p:.3f}")


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


def _verdict(c) -> str:
    """The comparison's verdict: set by :func:`kmedtl.study.stats.holm_family` over the
    report's family ("better" / "worse": Holm-adjusted seed-level p < alpha; else "no
    clear difference"; "undetermined" with fewer than 2 seeds)."""
    return c.get("verdict") or verdict(c)


def _holm_text(c) -> str:
    return f"Holm p {_p(c.get('p_holm'))}"


def _seed_ci(c) -> str:
    md = c["mean_difference"]
    return f"{_pt(md['ci_low'])} to {_pt(md['ci_high'])}"


def _image_ci(c) -> str:
    il = c.get("image_level") or {}
    return f"{_pt(il.get('ci_low'))} to {_pt(il.get('ci_high'))}"


def _t_text(c) -> str:
    t = c.get("t_test") or {}
    return f"{_p(t.get('p_value'))} (df {t.get('df', '?')})"


def _chosen_paragraph(arms: list[str], where: str, papers: list[str]) -> str:
    return (f"**Who chose what.** The recommended recipe ({_sentence_list(arms)}; {where}) "
            "was chosen on this study's own test sets"
            + ("; the study file says it is " + _sentence_list([f'\"{p}\"' for p in papers])
               if papers else "")
            + ". The study has no validation split, so the data that picked it are the data "
            "that test it: its comparison with the default recipe is **selection-biased on "
            "these test sets**, in its favour. The seed-level test and Holm's correction do "
            "not remove that bias; only new data (another test set or dataset) can measure its "
            "gain without it.")


def _sentence_list(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


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
        self._comps = None  # {study: {(arm, N): paired result}}, see all_comparisons
        self.family_size = 0

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

    def all_comparisons(self) -> dict:
        """``{study name: {(arm, N): paired result}}`` for every comparison of the report,
        Holm-corrected as **one family** (every arm against its reference at every N, over
        all the report's studies): each result gets ``"p_holm"``, ``"family_size"`` and
        ``"verdict"`` (Holm p below the study's alpha).  Computed once."""
        if self._comps is not None:
            return self._comps
        comps = {s.name: self.comparisons(s) for s in self.r.studies}
        family = [c for s in self.r.studies for c in comps[s.name].values()]
        self.family_size = holm_family(family)
        for s in self.r.studies:
            for c in comps[s.name].values():
                c["verdict"] = verdict(c, s.evaluation.alpha)
        self._comps = comps
        return comps

    def survivors(self) -> list[str]:
        """"<arm> at N=<n> (<verdict>)" for each comparison whose Holm-adjusted p is below
        alpha, in document order."""
        out = []
        for s in self.r.studies:
            for (arm, n), c in self.all_comparisons()[s.name].items():
                if _verdict(c) in ("better", "worse"):
                    out.append(f"{s.arm(arm).label or arm} vs "
                               f"{s.arm(s.reference).label or s.reference} at N={n} "
                               f"({_verdict(c)}, {_pt(c['mean_difference']['value'])} points, "
                               f"{_holm_text(c)})")
        return out

    def inference_lines(self) -> list[str]:
        """The paragraphs at the top of the document: unit of inference, the Holm family,
        which comparisons survive, and which data chose the recommended recipe."""
        self.all_comparisons()
        s0 = self.r.studies[0]
        ev = s0.evaluation
        m = self.family_size
        kept = self.survivors()
        L = ["## How to read the verdicts", "",
             "**The unit of inference is the training seed** (a seed fixes the training "
             "subset and the initialisation; a method helps when the effect holds across "
             f"seeds). For each comparison and N, the per-seed differences A - B of "
             f"{NAMES[ev.primary]} (both arms trained with the same seed, tested on the same "
             "images) are tested two ways: a two-level bootstrap (resample the seeds with "
             "replacement, then the test images within each class, the same image resample "
             f"for every seed and both arms; {ev.n_boot} resamples) gives the seed-level 95% "
             "CI and a two-sided p = 2 x min(P(d <= 0), P(d >= 0)), and a one-sample t-test "
             "of the per-seed differences against 0 is the cross-check. The raw p is the "
             "larger of the two (the t-test holds the test set fixed; the bootstrap "
             "understates the seed spread). With 3 seeds both are coarse: a bootstrap of 3 "
             "seeds has only 10 distinct seed resamples, and the t-test has 2 degrees of "
             f"freedom. **This report makes m = {m} comparisons** (every comparison at every "
             "N) and treats them as one family: the p-values are corrected with **Holm's** "
             f"step-down method (family-wise error rate {ev.alpha}). \"better\" / \"worse\" "
             f"= Holm-adjusted p < {ev.alpha}; anything else is \"no clear difference\". The "
             "image-level CI (one trained model per seed; describes test-set noise only) and "
             "the McNemar p-values per seed are shown for reference and decide nothing.", "",
             (f"**{len(kept)} of {m} comparisons {'survives' if len(kept) == 1 else 'survive'}"
              " Holm's correction**: "
              + _sentence_list(kept) + "." if kept else
              f"**None of the {m} comparisons survives Holm's correction.**")
             + " Every other difference below, however large its seed mean, is \"no clear "
             "difference\" at this number of seeds.", ""]
        L += self.chosen_lines() + [""]
        return L

    def chosen_lines(self) -> list[str]:
        """Which data chose the recommended recipe: a ``topic: recipe`` comparison's arm
        was chosen from this study's own results, i.e. on these test sets."""
        recipe = [(k, s) for k, s in enumerate(self.r.studies, start=1) if s.topic == "recipe"]
        if not recipe:
            return ["**Who chose what.** No comparison here is marked as the recommended "
                    "recipe (`topic: recipe`); each arm's recipe is what its study file says, "
                    "and the study files say which data, if any, chose it."]
        arms, papers = [], []
        for _, s in recipe:
            arms += [a.label or a.name for a in s.arms if a.name != s.reference
                     and (a.label or a.name) not in arms]
            why = " ".join((s.papers or "").split())
            if why and why not in papers:
                papers.append(why)
        where = _sentence_list([f"comparison {k}, \"{s.title or s.name}\"" for k, s in recipe])
        return [_chosen_paragraph(arms, where, papers)]

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
        comps = self.all_comparisons()[s.name]
        L += [f"**Paired tests** against {ref.label or ref.name} ({NAMES[ev.primary]}, "
              "points = percentage points; the seed is the unit, see \"How to read the "
              "verdicts\"). Mean diff: mean over seeds of A - B (same seed = same training "
              "subset, same test images). Seed-level 95% CI and p (bootstrap): the two-level "
              "bootstrap over seeds, then test images. p (t-test): one-sample t-test of the "
              "per-seed differences. Raw p: the larger of the two. Holm p: adjusted over the "
              f"report's family of m = {self.family_size} comparisons; the verdict is "
              f"\"better\"/\"worse\" when Holm p < {ev.alpha}. Wins: seeds where the arm "
              "beat the reference. Image-level 95% CI: one trained model per seed; describes "
              "test-set noise only (test images resampled, the models held fixed). McNemar p "
              "per seed: per-case correctness, i.e. accuracy, not balanced accuracy.", "",
              "| arm | N | mean diff (points) | seed-level 95% CI | p (bootstrap) | p (t-test) "
              "| raw p | Holm p | verdict | seeds | wins k/n | image-level 95% CI (one trained "
              "model per seed; test-set noise only) | sd over seeds | McNemar p per seed |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (arm, n), c in comps.items():
            md = c["mean_difference"]
            label = s.arm(arm).label or arm
            k = len(c["seeds"])
            L.append(f"| {label} | {n} | {_pt(md['value'])} | {_seed_ci(c)} | "
                     f"{_p(md.get('p_value'))} | {_t_text(c)} | {_p(c.get('p_value'))} | "
                     f"{_p(c.get('p_holm'))} | {_verdict(c)} | {k} | {c['wins']}/{k} | "
                     f"{_image_ci(c)} | "
                     f"{100 * (c['difference_over_seeds']['sd'] or 0):.1f} | "
                     f"{', '.join(_p(p) for p in c['mcnemar_p'])} |")
        if not comps:
            L.append("| (no finished pair yet) | | | | | | | | | | | | | |")
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
            parts, verdicts, holm_ps = [], [], []
            for n in s.grid.sizes:
                c = comps.get((arm.name, str(n)))
                if c is None:
                    continue
                md = c["mean_difference"]
                v = _verdict(c)
                verdicts.append(v)
                holm_ps.append(c.get("p_holm"))
                word = {"better": "beat", "worse": "was worse than",
                        "no clear difference": "did not clearly differ from",
                        "undetermined": "could not be compared (fewer than 2 seeds) with"}[v]
                parts.append(f"at N={n} {name} {word} {rname}: {_pt(md['value'])} points "
                             f"of {metric} (seed-level 95% CI {_seed_ci(c)}; raw p "
                             f"{_p(c.get('p_value'))}, {_holm_text(c)}; better in "
                             f"{c['wins']} of {len(c['seeds'])} seeds; image-level CI "
                             f"{_image_ci(c)}, test-set noise only)")
            if not parts:
                out.append(f"- {name}: no finished cells to compare yet.")
                continue
            finite = [p for p in holm_ps if p is not None and math.isfinite(p)]
            if all(v == "no clear difference" for v in verdicts):
                summary = (f"{name} did not clearly differ from {rname} at any N: no "
                           "difference survived Holm's correction"
                           + (f" (smallest Holm p {_p(min(finite))})" if finite else ""))
            elif all(v == "better" for v in verdicts):
                summary = f"{name} helped at every N that ran (Holm p < {s.evaluation.alpha})"
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
        points of the primary metric at each N, with the verdict and its Holm p.  Fills
        ``self._comps`` (:meth:`all_comparisons`), which
        :mod:`kmedtl.study.summary` reads."""
        sizes = []
        for s in self.r.studies:
            sizes += [str(n) for n in s.grid.sizes if str(n) not in sizes]
        self.all_comparisons()
        L = ["## Summary", "",
             "Seed-mean difference to each comparison's reference arm, in points of the "
             "primary metric, with the verdict and its Holm-adjusted seed-level p (family of "
             f"m = {self.family_size} comparisons; details in each section).",
             "", "| comparison | arm vs reference | " + " | ".join(f"N={n}" for n in sizes)
             + " |", "|---|---|" + "---|" * len(sizes)]
        for k, s in enumerate(self.r.studies, start=1):
            comps = self._comps[s.name]
            ref = s.arm(s.reference)
            for arm in s.arms:
                if arm.name == s.reference:
                    continue
                cells = []
                for n in sizes:
                    c = comps.get((arm.name, n))
                    cells.append("-" if c is None else
                                 f"{_pt(c['mean_difference']['value'])} ({_verdict(c)}; "
                                 f"{_holm_text(c)})")
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
        L += self.inference_lines()
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
              "class) per CI; paired comparisons with the seed as the unit and Holm's "
              f"correction over the report's m = {self.family_size} comparisons (see \"How "
              "to read the verdicts\").", ""]
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


def across_inference_lines(reports: list[tuple[str, Report]]) -> list[str]:
    """The top paragraphs of the cross-dataset page (:mod:`kmedtl.study.summary`):
    ``reports`` = ``(dataset name, Report)``.  Each dataset's report is one Holm family
    (the page repeats its verdicts); the paragraphs say so, with the family sizes, list
    what survives and say which data chose the recommended recipe."""
    sizes, kept, arms, papers, where = [], [], [], [], []
    for name, rep in reports:
        rep.all_comparisons()
        sizes.append(f"m = {rep.family_size} on {name}")
        kept += [f"{name}: {x}" for x in rep.survivors()]
        for s in rep.r.studies:
            if s.topic != "recipe":
                continue
            where.append(name)
            arms += [a.label or a.name for a in s.arms if a.name != s.reference
                     and (a.label or a.name) not in arms]
            why = " ".join((s.papers or "").split())
            if why and why not in papers:
                papers.append(why)
    chosen = [_chosen_paragraph(arms, "the recipe comparison on "
                                + _sentence_list(where), papers)] if where else []
    total = sum(rep.family_size for _, rep in reports)
    alpha = reports[0][1].r.studies[0].evaluation.alpha
    L = ["## How to read the verdicts", "",
         "**The unit of inference is the training seed.** Each dataset's report tests every "
         "comparison at every N on the per-seed differences (a two-level bootstrap over "
         "seeds, then test images, and a one-sample t-test of the per-seed differences as a "
         "cross-check; 3 seeds, so both are coarse: 10 distinct seed resamples, 2 degrees "
         "of freedom) and corrects the p-values with **Holm's** method over that report's "
         f"comparisons as one family ({_sentence_list(sizes)}; {total} in all). This page "
         f"repeats those verdicts: \"better\" / \"worse\" = Holm-adjusted p < {alpha}. "
         "Counted over the whole page the family-wise error rate is at most the sum of the "
         "datasets' rates; treating all comparisons as one family would only be stricter "
         "(Holm's thresholds shrink as m grows), so no \"no clear difference\" here would "
         "turn into \"better\" or \"worse\".", "",
         (f"**{len(kept)} of {total} comparisons "
          f"{'survives' if len(kept) == 1 else 'survive'} Holm's correction**: "
          + _sentence_list(kept) + "." if kept else
          f"**None of the {total} comparisons survives Holm's correction.**"), ""]
    return L + chosen + [""]


def write_report(runner, path, title: str = "Study results", command: str = "") -> Path:
    text = Report(runner).render(title, command)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(text))
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
