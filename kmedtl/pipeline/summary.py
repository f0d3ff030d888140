"""``summary.md`` (one page) and ``summary.json`` of a pipeline run folder.

Built only from the stage records (``stages/*.json``), so it is the same whether a stage
ran in this call or was reused.  ``summary.json``::

    {"kind": "kmedtl-pipeline-summary", "version": 1, "name", "run_dir", "pipeline",
     "status": "complete" | "stopped after <stage>" | "failed in <stage>" | ...,
     "stages": [{"stage", "status", "this_call": "ran" | "resumed" | "reused" | "not run",
                 "seconds", "finished", "error"}],
     "total_seconds": sum of the stages' last run times,
     "data", "split", "pretrain", "tune", "train", "test", "export", "push": each stage's
     record "result" (null when the stage is not in the pipeline or has not finished)}

``tune`` holds the search (objective, best trial and score, the best hyperparameters,
``from_search``: the train fields the train stage takes from it, ``changed``: those that
differ from the config); ``train.tuned`` says which hyperparameters training took from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from kmedtl.jsonio import atomic_write

SUMMARY_KIND = "kmedtl-pipeline-summary"

_SECTION = {"audit": "data", "split": "split", "pretrain": "pretrain", "tune": "tune",
            "train": "train", "evaluate": "test", "export": "export", "push": "push"}


def _status(stages, records, all_stages) -> str:
    for s in stages:
        r = records.get(s) or {}
        if r.get("status") in ("failed", "interrupted", "running"):
            return f"{r['status']} in {s}"
    done = [s for s in all_stages if (records.get(s) or {}).get("status") == "done"]
    if all(s in done for s in stages):
        if stages == list(all_stages):
            return "complete"
        if done == list(all_stages):  # later stages from an earlier call
            return f"complete (stages after {stages[-1]} not checked in this call)"
        return f"stopped after {stages[-1]}"
    return "incomplete"


def write_summary(ctx, stages, res) -> dict:
    pipe = ctx.pipe
    records = dict(res.records)
    for s in pipe.spec.stages:
        if s not in records:
            r = ctx.records.read(s)
            if r is not None:
                records[s] = r
    rows = []
    for s in pipe.spec.stages:
        r = records.get(s) or {}
        this = ("resumed" if s in res.resumed else "ran" if s in res.ran else
                "reused" if s in res.skipped else "not run")
        rows.append({"stage": s, "status": r.get("status", "not run"), "this_call": this,
                     "seconds": r.get("seconds"), "cpu_seconds": r.get("cpu_seconds"),
                     "finished": r.get("finished"),
                     "error": r.get("error") if r.get("status") != "done" else None})
    doc = {"kind": SUMMARY_KIND, "version": 1, "name": pipe.config.name,
           "run_dir": str(ctx.run_dir), "pipeline": pipe.label,
           "status": _status(stages, records, pipe.spec.stages), "stages": rows,
           "total_seconds": round(sum(r["seconds"] or 0 for r in rows
                                      if r["status"] == "done"), 1)}
    for stage, key in _SECTION.items():
        r = records.get(stage)
        doc[key] = r.get("result") if r and r.get("status") == "done" else None
    atomic_write(ctx.run_dir / "summary.json",
                 lambda fh: json.dump(doc, fh, indent=1, default=str))
    md = render(doc)
    atomic_write(ctx.run_dir / "summary.md", lambda fh: fh.write(md))
    return doc


# ---------------------------------------------------------------------------- markdown
def _f(v, digits=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _secs(v):
    if v is None:
        return "-"
    return f"{v:.0f} s" if v >= 10 else f"{v:.1f} s"


def _interval(v):
    if isinstance(v, dict) and "value" in v:
        lo, hi = v.get("ci_low"), v.get("ci_high")
        ci = f"[{_f(lo)}, {_f(hi)}]" if lo is not None and hi is not None else "n/a"
        return _f(v.get("value")), ci
    return _f(v), "n/a"


def _table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def render(doc: dict) -> str:
    L = [f"# Pipeline `{doc['name']}`: {doc['status']}", "",
         f"Run folder `{doc['run_dir']}`, pipeline `{doc['pipeline']}`. Stages took "
         f"{_secs(doc['total_seconds'])} in all (last run of each).", ""]
    L += ["## Stages", ""]
    L += _table(["stage", "status", "this call", "time", "CPU time", "finished"],
                [[r["stage"], r["status"] + (f": {r['error'][:80]}" if r["error"] else ""),
                  r["this_call"], _secs(r["seconds"]), _secs(r.get("cpu_seconds")),
                  r["finished"] or "-"]
                 for r in doc["stages"]])
    L.append("")
    d = doc.get("data")
    if d:
        c = d["counts"]
        ok = "reconciled" if d.get("reconciled") else "DOES NOT RECONCILE"
        s = d.get("summary") or {}
        L += ["## Data", "",
              f"- Files read {c.get('read')} = used {c.get('used')} + skipped "
              f"{c.get('skipped')} ({ok}); samples {c.get('samples')}."]
        if d.get("skipped_by_kind"):
            L.append("- Skipped by reason: " + ", ".join(
                f"{k} {v}" for k, v in d["skipped_by_kind"].items()) + ".")
        L.append(f"- Exact-duplicate groups {s.get('duplicate_groups')} "
                 f"({s.get('duplicate_files')} files; {s.get('cross_split_duplicate_groups')} "
                 f"across the source's splits), near-duplicate groups "
                 f"{s.get('near_duplicate_groups')} ({s.get('cross_split_near_duplicate_groups')}"
                 f" across), label conflicts {s.get('label_conflicts')}.")
        L += [f"- Warning: {w}" for w in d.get("warnings") or ()]
        if d.get("by_class"):
            L.append("- Images per class: " + ", ".join(f"{k} {v}" for k, v in
                                                       d["by_class"].items()) + ".")
        L.append("")
    sp = doc.get("split")
    if sp:
        by = sp["by_class"]
        classes = sorted({k for part in by.values() for k in part})
        L += ["## Split", "",
              f"`{sp['method']}` (seed {sp['seed']}, fold {sp['fold']} of {sp['n_folds']}), "
              f"dedupe `{sp['dedupe']}`: {sp['dropped']} image(s) dropped for leakage, "
              f"{sp['unused']} usable image(s) in no part. Across train/val/test: "
              f"{sp['cross_split']['exact_duplicate_groups']} exact-duplicate groups, "
              f"{sp['cross_split']['near_duplicate_pairs']} near-duplicate pairs, "
              f"{sp['cross_split']['patients']} patients ({sp.get('patients', 0)} patient IDs "
              "known).", ""]
        L += _table(["part", *classes, "total"],
                    [[p, *[by[p].get(k, 0) for k in classes], sp["sizes"][p]]
                     for p in ("train", "val", "test")])
        L.append("")
    pt = doc.get("pretrain")
    if pt:
        fin = ", ".join(f"{k} {_f(v)}" for k, v in (pt.get("final") or {}).items())
        task = f" on `{pt['task']}` labels {pt.get('classes')}" if pt.get("task") else ""
        L += ["## Same-domain pretraining", "",
              f"{pt['method']}{task}: {pt['n_images']} images outside the fold, "
              f"{pt['epochs']} epoch(s), {_secs(pt.get('seconds'))}; last epoch: {fin}. "
              f"The backbone `{pt['backbone']}` starts training from these weights.", ""]
    tu = doc.get("tune")
    if tu:
        L += _tune_lines(tu)
    t = doc.get("train")
    if t:
        val = t.get("val_metrics") or {}
        vals = ", ".join(f"{k} {_f(v)}" for k, v in val.items() if isinstance(v, (int, float))
                         and ("loss" not in k or k == "loss"))
        tim = t.get("timings") or {}
        resumed = (f" Resumed from epoch {t['resumed_from_epoch']}."
                   if t.get("resumed_from_epoch") else "")
        L += ["## Training", "",
              f"`{t.get('model')}` on `{t.get('backbone')}`"
              f"{' cut at ' + t['cut'] if t.get('cut') else ''}, weights "
              f"`{t.get('weights')}`: {t.get('epochs_run')} epoch(s), n = {t.get('n_train')} "
              f"train / {t.get('n_val')} val; best {t.get('monitor')} {_f(t.get('best_value'))} "
              f"at epoch {t.get('best_epoch')}.{resumed}",
              f"Validation (best model): {vals or 'n/a'}. Fit "
              f"{_secs(tim.get('fit_seconds'))}, {_f(tim.get('images_per_second'), 0)} "
              "images/s.", ""]
        tuned = t.get("tuned")
        if tuned:
            L[-1:-1] = [f"Hyperparameters from the search (`{tuned.get('source')}`, trial "
                        f"{tuned.get('best_trial')}): " + _hp_text(tuned.get("from_search"))
                        + "."]
    e = doc.get("test")
    if e:
        b = e.get("bootstrap") or {}
        level = int(round(100 * (1 - b.get("alpha", 0.05))))
        L += ["## Test metrics", "",
              f"n = {e.get('n_test')} test images; {level}% CIs from a {b.get('method')} "
              f"bootstrap ({b.get('n_boot')} resamples by {b.get('unit')}).", ""]
        rows = [[k, *_interval(v)] for k, v in (e.get("headline") or {}).items()]
        L += _table(["metric", "value", f"{level}% CI"], rows)
        if e.get("leaf_f1"):
            L += ["", "Leaf F1: " + ", ".join(
                f"{k} {' '.join(_interval(v))}" for k, v in e["leaf_f1"].items()) + "."]
        if e.get("internal_vs_external"):
            rows = e["internal_vs_external"]
            keys = list(rows[0]["metrics"])
            L += ["", "### Internal vs external test", "",
                  "Internal: the held-out part of the training source. External: another "
                  "acquisition, with copies of training/validation images removed (counted)."
                  " Balanced accuracy and the rest with their CIs:", ""]
            L += _table(["test set", "images", *keys, "ECE", "removed as training copies"],
                        [[r["set"], r["n"],
                          *(" ".join(_interval(r["metrics"].get(k))) for k in keys),
                          " ".join(_interval(r.get("ece"))) if r.get("ece") else "n/a",
                          r.get("removed", "")] for r in rows])
            L.append("")
        bi = e.get("binary")
        if bi and bi.get("at_threshold"):
            a = bi["at_threshold"]
            L.append(f"Disease vs `{bi.get('negative')}` at threshold {_f(bi.get('threshold'))}"
                     f": sensitivity {_f(_val(a.get('sensitivity')))}, specificity "
                     f"{_f(_val(a.get('specificity')))}; AUROC {_f(_val(bi.get('auroc')))}.")
        L.append("")
    x = doc.get("export")
    if x:
        L += _export_lines(x)
    p = doc.get("push")
    if p:
        L += ["## Push", ""]
        if p.get("pushed"):
            L.append(f"Pushed version {p.get('version')} to `{p.get('path')}`.")
        else:
            L.append(f"Not pushed: {p.get('reason')}.")
        checks = (p.get("blessing") or {}).get("checks") if isinstance(p.get("blessing"),
                                                                       dict) else None
        for c in checks or ():
            L.append(f"- {'passed' if c.get('passed') else 'FAILED'}: {c.get('check')} "
                     f"({c.get('detail')})")
        L.append("")
    return "\n".join(L).rstrip() + "\n"


_EXPORT_STATUS = {"passed": "passed", "warned": "WARNED", "failed": "FAILED"}


def _export_lines(x: dict) -> list[str]:
    """The export section: verdict, one row per format (n images compared, agreement and
    its 95% CI for quantised variants, bound, status), warnings and failures."""
    gate = x.get("quantized_gate")
    L = ["## Export", "",
         f"{'Verified' if x.get('verified') else 'NOT verified'}; written to "
         f"`{x.get('out_dir')}`." + (f" Quantised variants: `quantized_gate: {gate}`."
                                     if gate else "")]
    rep = x.get("int8_representative")
    if isinstance(rep, dict) and rep.get("requested") is not None:
        L.append(f"int8 calibrated on {rep.get('used')} {rep.get('split')} images "
                 f"({rep.get('requested')} requested).")
    if x.get("formats"):
        L.append("")
        rows = []
        for name, f in x["formats"].items():
            par = f.get("parity") or {}
            ci = par.get("ci")
            n, ind = par.get("n"), par.get("n_independent")
            status = par.get("status") or {True: "passed", False: "failed"}.get(
                par.get("passed"), "reference")
            rows.append([name, _size(f.get("size_bytes")), _f(f.get("accuracy")),
                         f"{par['max_abs_diff']:.1e}"
                         if isinstance(par.get("max_abs_diff"), (int, float)) else "-",
                         _f(par.get("agreement")),
                         f"[{_f(ci[0])}, {_f(ci[1])}]" if ci else "-",
                         "-" if n is None else str(n) if ind in (None, n)
                         else f"{n} ({ind} test)",
                         f"{par['bound']:g} ({par.get('kind')})"
                         if isinstance(par.get("bound"), (int, float)) else "-",
                         _EXPORT_STATUS.get(status, status)])
        L += _table(["format", "size", "test accuracy", "max abs diff", "agreement",
                     "95% CI", "n (test images)", "bound", "parity"], rows)
    else:
        L += [f"- {k}: {v}" for k, v in _parity_lines(x.get("report"))]
    if x.get("warnings"):
        L += [""] + [f"- Warning: {w}" for w in x["warnings"]]
    if x.get("failures"):
        L += [""] + [f"- Failure: {f}" for f in x["failures"]]
    L.append("")
    return L


def _hp_value(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ", ".join(_hp_value(x) for x in v) + "]"
    return str(v)


def _hp_text(values) -> str:
    """``backbone cbr_tiny, learning_rate 0.00123, ...`` (fields left unset omitted)."""
    items = [(k, v) for k, v in (values or {}).items() if v not in (None, [])]
    return ", ".join(f"{k} `{_hp_value(v)}`" for k, v in items) or "n/a"


def _tune_lines(tu: dict) -> list[str]:
    s = tu.get("search") or {}
    d = tu.get("data") or {}
    by = ", ".join(f"{k.lower()} {v}" for k, v in (s.get("by_status") or {}).items())
    L = ["## Hyperparameter search", "",
         f"`{s.get('tuner')}` search, {s.get('trials')} trial(s) ({by or 'none'}) of "
         f"{s.get('trial_epochs')} epoch(s), fit on {d.get('n_train')} training and scored on "
         f"{d.get('n_val')} validation images (the {d.get('n_test_held_out')} test images are "
         f"not used); objective `{tu.get('objective')}` ({tu.get('direction')}): best "
         f"{_f(tu.get('best_score'))} (trial {tu.get('best_trial')}), "
         f"{_secs(tu.get('seconds'))}.", "",
         "Training uses: " + _hp_text(tu.get("from_search")) + f" ({s.get('train_epochs')} "
         "epoch(s)).", ""]
    changed = tu.get("changed") or {}
    if changed:
        L += _table(["field", "config", "search"],
                    [[k, _hp_value(v.get("config")), _hp_value(v.get("search"))]
                     for k, v in changed.items()])
        L.append("")
    top = tu.get("top") or []
    if top:
        keys = [k for k in dict.fromkeys(k for r in top for k in r)
                if k not in ("status", "error")]
        L += ["Best trials:", ""]
        L += _table(keys, [[_hp_value(r.get(k)) if r.get(k) is not None else "-"
                            for k in keys] for r in top])
        L.append("")
    return L


def _size(n):
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _val(v):
    return v.get("value") if isinstance(v, dict) else v


_PARITY_WORDS = ("diff", "agree", "parity", "verified", "passed", "match", "ok")


def _parity_lines(report, limit: int = 24) -> list[tuple[str, object]]:
    """Leaves of the export report whose key speaks of parity (whatever its nesting)."""
    out: list = []

    def walk(obj, path):
        if len(out) >= limit:
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(obj, list) and len(obj) <= 50:
            for i, v in enumerate(obj):
                name = v.get("name") or v.get("format") or v.get("variant") \
                    if isinstance(v, dict) else None
                walk(v, f"{path}[{name or i}]")
        else:
            key = path.rsplit(".", 1)[-1].lower()
            if any(w in key for w in _PARITY_WORDS) and isinstance(obj, (bool, int, float)):
                out.append((path, _f(obj, 6) if isinstance(obj, float) else obj))

    walk(report or {}, "")
    return out


def read_summary(run_dir) -> dict:
    with open(Path(run_dir) / "summary.json") as fh:
        return json.load(fh)
