"""README.md and docs/: a short front door, the commands CI runs, links that resolve, and
every number quoted for a committed run re-derived from the committed records.

The records are the files under ``pipelines/`` that runs and studies wrote: the main job's
``pipelines/results/brain_tumor_main_job/*/{metrics,export,compare}.json`` and
``summary.md``, the study reports ``pipelines/RESULTS*.md`` and the generalisation study's
``pipelines/study_generalisation/RESULTS.md``.  A test here builds the number the docs
must show from a record and looks for it in the page that quotes it; it never pins the
sentence around it.  When a run is redone, commit its record and update the docs: these
tests then say which quoted number is stale.

Only the last test runs code on the real data (the brain-tumour audit, ``slow``): it checks
that today's audit still gives the committed audit counts the docs quote.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MAIN = ROOT / "pipelines" / "results" / "brain_tumor_main_job"
MAX_README_LINES = 200


# ------------------------------------------------------------------------------ helpers
def _flat(text: str) -> str:
    """Whitespace collapsed and Markdown bold dropped: a number may wrap or be emphasised."""
    return " ".join(text.replace("**", "").split())


def _page(name: str) -> str:
    return _flat((ROOT / name).read_text())


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _f3(x: float) -> str:
    return f"{x:.3f}"


def _ci3(m: dict) -> str:
    """``0.943 [0.913, 0.966]``: a value with its CI, as every results table shows it."""
    return f"{_f3(m['value'])} [{_f3(m['ci_low'])}, {_f3(m['ci_high'])}]"


def _sci(x: float) -> str:
    """``1.8e-7``: one decimal, exponent without padding."""
    mantissa, exp = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exp)}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}".replace("100.0", "100")


def _tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of ``text``: rows of stripped cells, separator rows left out."""
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def _table(text: str, first_header: str) -> dict[str, list[str]]:
    """The table whose header starts with ``first_header``, as {first cell: row}."""
    for t in _tables(text):
        if t[0][0].startswith(first_header):
            return {r[0]: r for r in t[1:]}
    raise AssertionError(f"no table headed {first_header!r}")


def _summary_stage_seconds(summary: str) -> dict[str, str]:
    rows = _table(summary, "stage")
    return {stage: row[3].removesuffix(" s") for stage, row in rows.items()}


# ----------------------------------------------------------------- the front door itself
def test_readme_is_short_and_links_every_docs_page():
    text = (ROOT / "README.md").read_text()
    n = len(text.splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move sections to docs/"
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert pages, "docs/ holds no pages"
    toc = text.split("## Documentation", 1)[1].split("\n## ", 1)[0]
    unlinked = [p for p in pages if f"(docs/{p})" not in toc]
    assert not unlinked, f"README.md's table of contents (## Documentation) leaves out {unlinked}"
    # the fast-lane sentence: a marker the lead fills with the measured time
    after = text.split("<!-- fast-lane -->", 1)
    assert len(after) == 2, "README.md lost its <!-- fast-lane --> marker"
    assert 'pytest -m "not slow"' in after[1].split("\n\n", 1)[0]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"slow:', pyproject), "the slow marker the fast lane leaves out"


def test_readme_set_up_commands_are_the_scripts_ci_runs():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", quick, flags=re.S).group(1)
    commands = [ln.strip() for ln in block.splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    assert commands == ["bash pipelines/run_main.sh", "bash tests/run.sh"], commands
    # 1. the main job: builds its environment, then runs the pipeline the README names
    main = (ROOT / "pipelines" / "run_main.sh").read_text()
    assert re.search(r'kmedtl"? run pipelines/brain_tumor_hierarchical\.yaml', main)
    assert "kmedtl run pipelines/brain_tumor_hierarchical.yaml" in block
    assert (ROOT / "pipelines" / "brain_tumor_hierarchical.yaml").is_file()
    # 2. the tests: what CI runs, and what runs the whole suite
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^bash tests/run\.sh\b", ci, flags=re.M), ".ci/run must call tests/run.sh"
    run = (ROOT / "tests" / "run.sh").read_text()
    assert re.search(r'-m pytest "\$@"', run) and 'pip install -q -e ".[test]"' in run
    for script in ("pipelines/run_main.sh", "tests/run.sh"):
        first = (ROOT / script).read_text().splitlines()[0]
        assert first.startswith("#!") and "bash" in first, script


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    s = heading.strip().lower().replace("`", "")
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_relative_link_in_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    broken, checked = [], 0
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in _LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            checked += 1
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert checked > 20, checked
    assert not broken, "\n".join(broken)


def test_cli_reference_flags_exist_in_the_parsers():
    """Every ``--flag`` docs/cli.md lists for a command is one its argparse parser takes."""
    from kmedtl.cli import build_parser

    def subparsers(parser):
        return next((a.choices for a in parser._actions
                     if isinstance(a.choices, dict) and a.dest), {})

    block = re.search(r"```\n(kmedtl .*?)```", (DOCS / "cli.md").read_text(), flags=re.S)
    entries: list[list[str]] = []
    for line in block.group(1).splitlines():
        line = line.split("  #", 1)[0]
        if line.startswith("kmedtl "):
            entries.append(line.split()[1:])
        elif line.strip():
            entries[-1] += line.split()
    root = build_parser()
    seen = 0
    for words in entries:
        parser, path = root, []
        while words and words[0] in subparsers(parser):
            parser = subparsers(parser)[words[0]]
            path.append(words.pop(0))
        assert path, f"docs/cli.md: no such command: kmedtl {' '.join(words)}"
        known = {s for a in parser._actions for s in a.option_strings}
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(words)):
            assert flag in known, f"docs/cli.md: kmedtl {' '.join(path)} has no {flag}"
            seen += 1
    assert len(entries) >= 15 and seen >= 30, (len(entries), seen)


# ----------------------------------------------------------- the main job's committed run
def test_headline_numbers_come_from_the_committed_main_job():
    doc = _json(MAIN / "training_only" / "metrics.json")
    rows = {r["set"]: r for r in doc["internal_vs_external"]}
    internal, external = rows["internal test"], rows["external: testing"]
    ba_int = internal["metrics"]["balanced_accuracy"]
    ba_ext = external["metrics"]["balanced_accuracy"]
    gap = round(100 * (ba_int["value"] - ba_ext["value"]))
    readme, results = _page("README.md"), _page("docs/results.md")
    for text in (readme,):
        assert f"{_ci3(ba_int)} on the internal test ({internal['n']} images" in text
        assert f"{_ci3(ba_ext)} on the external `Testing/` folder ({external['n']} images" in text
        assert "training_only/metrics.json" in text
    assert f"gap of {gap} points" in readme
    assert f"{gap} points of balanced accuracy" in results

    # docs/results.md's table: every cell of both rows
    table = _table((DOCS / "results.md").read_text(), "test set")
    got = {("internal" if "internal" in k else "external"): v for k, v in table.items()}
    assert set(got) == {"internal", "external"}, table
    for name, row in (("internal", internal), ("external", external)):
        m = row["metrics"]
        want = [str(row["n"]), *(_ci3(m[k]) for k in
                ("balanced_accuracy", "kappa", "auroc_macro", "f1_macro")), _ci3(row["ece"])]
        assert [c.replace("**", "") for c in got[name][1:]] == want, (name, got[name], want)


def test_main_job_details_come_from_the_committed_run():
    base = MAIN / "training_only"
    doc = _json(base / "metrics.json")
    results = _page("docs/results.md")
    sizes = [sum(doc["data"]["split_sizes"][p].values()) for p in ("train", "val", "test")]
    assert " / ".join(f"{n:,}" for n in sizes) + " images" in results
    summary = (base / "summary.md").read_text()
    dropped = re.search(r"(\d+) image\(s\) dropped for leakage", summary).group(1)
    assert f"the {dropped} `Training/` images that copy a `Testing/` image" in results

    # on Testing/: glioma F1, tumour sensitivity/specificity, ECE before and after T
    ext = _json(base / "external" / "testing" / "metrics.json")
    glioma_f1 = ext["tasks"]["leaf"]["per_class"]["glioma"]["f1"]["value"]
    at = ext["binary"]["at_threshold"]
    cal = ext["calibration"]
    assert f"glioma F1 is {glioma_f1:.2f}" in results
    assert f"tumour sensitivity {at['sensitivity']['value']:.2f} " \
           f"(specificity {at['specificity']['value']:.2f})" in results
    assert f"(ECE {cal['ece']['value']:.2f};" in results
    assert f"makes it worse, {cal['ece_after_temperature']['value']:.2f})" in results

    # wall time, from the run's own summary
    secs = _summary_stage_seconds(summary)
    total = re.search(r"Stages took (\d+) s in all", summary).group(1)
    speed = re.search(r"Fit \d+ s, (\d+) images/s", summary).group(1)
    assert (f"audit {secs['audit']} s, split {secs['split']} s, train {secs['train']} s "
            f"({speed} images/s), evaluate {secs['evaluate']} s") in results
    assert f"export {secs['export']} s: {int(total):,} s in all" in results

    # export parity, from export.json
    exp = _json(base / "export.json")
    par = {k: v["parity"] for k, v in exp["formats"].items() if v.get("parity")}
    n = {p["n"] for p in par.values()}
    assert n == {doc["n_test"]} and f"Export parity on the {doc['n_test']} internal" in results
    assert (f"SavedModel {_sci(par['savedmodel']['max_abs_diff'])} max absolute difference, "
            f"TFLite float32 {_sci(par['tflite_float32']['max_abs_diff'])}, "
            f"ONNX {_sci(par['onnx']['max_abs_diff'])}, "
            f"float16 {_sci(par['tflite_float16']['max_abs_diff'])}") in results
    dyn, full = par["tflite_dynamic_int8"], par["tflite_int8"]
    calib = exp["int8_representative"]["used"]
    assert (f"{_pct(dyn['agreement'])}% of leaves [{_pct(dyn['ci'][0])}, {_pct(dyn['ci'][1])}]"
            in results)
    assert (f"full int8 ({calib} calibration images) on {_pct(full['agreement'])}% "
            f"[{_pct(full['ci'][0])}, {_pct(full['ci'][1])}]") in results

    # training_all/: the same recipe without leaving out the copies of Testing/
    alld = _json(MAIN / "training_all" / "metrics.json")
    rows = {r["set"]: r for r in alld["internal_vs_external"]}
    ext_all = alld["external"]["testing"]
    removed = ext_all["removed_as_training_lookalikes"]
    by = removed["by_reason"]
    internal_all = rows["internal test"]["metrics"]["balanced_accuracy"]["value"]
    assert f"internal test reads {internal_all:.3f}" in results
    assert f"only {ext_all['n']} `Testing/` images survive" in results
    assert (f"({removed['count']} are copies: {by['exact']} exact, {by['near']} pHash, "
            f"{by['similar']} similar)") in results
    assert f"scores {_ci3(ext_all['headline']['balanced_accuracy'])}" in results
    assert removed["count"] + ext_all["n"] == removed["of"] == 394


def test_fresh_main_job_wall_time_comes_from_its_record():
    rec = _json(MAIN / "wall_time.json")
    st = {k: round(v["seconds"]) for k, v in rec["stages"].items()}
    assert rec["wall_seconds"] == pytest.approx(
        rec["environment_seconds"] + rec["pipeline_seconds"], abs=1)
    assert sum(v["seconds"] for v in rec["stages"].values()) <= rec["pipeline_seconds"]
    assert f"The main job took {rec['wall_seconds']} s from a fresh clone" in _page("README.md")
    results = _page("docs/results.md")
    t = rec["train_timings"]
    assert (f"{rec['wall_seconds']} s in all, of which the environment "
            f"{round(rec['environment_seconds'])} s, audit {st['audit']} s, train {st['train']} s "
            f"({round(t['images_per_second'])} images/s, median epoch "
            f"{t['median_epoch_seconds']:.1f} s), evaluate {st['evaluate']} s and export "
            f"{st['export']} s") in results
    scores = [rec[k] for k in ("internal_test_balanced_accuracy",
                               "external_testing_balanced_accuracy")]
    assert f"scored {_ci3(scores[0])} on the internal test and {_ci3(scores[1])}" in results


def test_pooled_split_numbers_come_from_the_committed_runs():
    """Before issue 19: the pooled-split main job and the from-scratch comparison
    (tests/test_evaluation_compare.py re-derives compare.json from the predictions)."""
    results = _page("docs/results.md")
    lite0 = _json(MAIN / "lite0" / "metrics.json")
    assert f"reported {_ci3(lite0['headline']['balanced_accuracy'])} on {lite0['n_test']} test" \
        in results
    cmp = _json(MAIN / "compare.json")
    d = cmp["difference"]
    pts = [f"{100 * d[k]:+.1f}" for k in ("value", "ci_low", "ci_high")]
    assert f"on the same {cmp['n']} pooled test images" in results
    assert f"scored {_f3(cmp['a']['value'])} against {_f3(cmp['b']['value'])} from scratch, " \
           f"{pts[0]} points [{pts[1]}, {pts[2]}]" in results
    assert f"McNemar {cmp['mcnemar']['b']} / {cmp['mcnemar']['c']}" in results
    p = float(re.search(r"p = (1e-\d+)", results).group(1))
    assert p / 10 < cmp["mcnemar"]["p_value"] <= p


def test_audit_and_class_mix_numbers_come_from_committed_records():
    """The pooled brain-tumour audit counts (docs/features.md) are the committed lite0 run's
    audit; the Training/Testing class mix (docs/results.md) the committed main job's."""
    audit = _json(MAIN / "lite0" / "metrics.json")["data"]["audit"]
    features = _page("docs/features.md")
    assert (f"{audit['duplicate_groups']} byte-identical groups ({audit['duplicate_files']} "
            f"files), {audit['cross_split_duplicate_groups']} of them across Training/Testing"
            in features)
    assert (f"{audit['near_duplicate_groups']} near-duplicate groups (re-encoded copies; "
            f"{audit['cross_split_near_duplicate_groups']} across splits) and "
            f"{audit['label_conflicts']} groups whose copies carry different labels" in features)

    summary = (MAIN / "training_only" / "summary.md").read_text()
    train = {k: int(v) for k, v in re.findall(
        r"(\w+) (\d+)", re.search(r"Images per class: (.*)\.", summary).group(1))}
    test = _json(MAIN / "training_only" / "metrics.json")["external"]["testing"]["by_class"]
    nt, ntr = sum(test.values()), sum(train.values())
    results = _page("docs/results.md")
    pc = {c: (round(100 * test[c] / nt), round(100 * train[c] / ntr)) for c in test}
    assert (f"normal is {pc['normal'][0]}% of Testing's {nt} images but {pc['normal'][1]}% "
            f"of Training's {ntr:,}; pituitary {pc['pituitary'][0]}% against "
            f"{pc['pituitary'][1]}%") in results


# --------------------------------------------------------------------------- the studies
_STUDY_ROWS = {  # a docs/results.md row (by a phrase in its label) -> (RESULTS.md section, arm)
    "recommended": ("recipe", "hierarchical + full fine-tune (one LR)"),
    "multi-head": ("hierarchy", "hierarchical multi-head"),
    "staged": ("hierarchy", "staged (hierarchy transfer + stacking)"),
    "random": ("init", "random weights"),
    "same-domain": ("transfer", "ImageNet + same-domain"),
    "cross-domain": ("transfer", "ImageNet + retinal OCT (cross-domain)"),
    "stage 6": ("truncation", "cut at block6d_add (end of stage 6)"),
    "stage 5": ("truncation", "cut at block5c_add (end of stage 5)"),
    "stage 4": ("truncation", "cut at block4c_add (end of stage 4)"),
    "linear probe": ("freezing", "linear probe"),
    "gradual": ("freezing", "gradual unfreezing + discriminative LRs"),
    "full fine-tune, one LR": ("freezing", "full fine-tune (one LR)"),
    "KerasTuner": ("search", "KerasTuner search"),
}


def _study_cells() -> dict[tuple[str, str, str], tuple[str, str, float]]:
    """pipelines/RESULTS.md: (section, arm, N) -> (OCT cell, brain cell) as
    (difference, verdict, Holm p)."""
    text = (ROOT / "pipelines" / "RESULTS.md").read_text()
    out = {}
    for section, body in re.findall(r"^### (\w+)\n(.*?)(?=^##|\Z)", text, flags=re.M | re.S):
        for t in _tables(body):
            for row in t[1:]:
                cells = []
                for c in row[2:4]:
                    m = re.match(r"([+-]\d+\.\d) \(.*?\) (better|worse|no clear difference); "
                                 r"Holm p (\d\.\d{3})", c)
                    assert m, c
                    cells.append((m.group(1), m.group(2), float(m.group(3))))
                out[(section, row[0], row[1])] = tuple(cells)
    return out


def test_study_numbers_come_from_pipelines_results():
    cells = _study_cells()
    results_md = (DOCS / "results.md").read_text()
    table = _table(results_md, "comparison")
    used = set()
    for label, row in table.items():
        keys = [k for k in _STUDY_ROWS if k in label]
        assert keys, f"docs/results.md: study row {label!r} has no record in _STUDY_ROWS"
        key = keys[0]
        used.add(key)
        section, arm = _STUDY_ROWS[key]
        # columns: OCT N=25, OCT N=50, brain N=25, brain N=50
        for col, (ds, n) in enumerate(((0, "25"), (0, "50"), (1, "25"), (1, "50")), start=1):
            cell = row[col]
            rec = cells.get((section, arm, n))
            if rec is None:
                assert cell == "-", (label, n, cell)
                continue
            diff, verdict, _ = rec[ds]
            bold = cell.startswith("**")
            assert cell.strip("*") == diff, (label, n, ds, cell, diff)
            assert bold == (verdict != "no clear difference"), (label, n, ds, cell, verdict)
    assert used == set(_STUDY_ROWS), set(_STUDY_ROWS) - used
    assert len(table) == len(_STUDY_ROWS), sorted(table)

    # every Holm p the prose quotes is one the reports computed
    holm = {p for pair in cells.values() for _, _, p in pair}
    quoted = re.findall(r"Holm p (\d\.\d{3})(?:-(\d\.\d{3}))?", results_md)
    assert len(quoted) >= 8
    for lo, hi in quoted:
        for p in filter(None, (lo, hi)):
            assert float(p) in holm, f"docs/results.md quotes Holm p {p}: not in RESULTS.md"

    # reference arm and moonshot ratio, from each dataset's report and the summary
    results = _flat(results_md)
    summary = (ROOT / "pipelines" / "RESULTS.md").read_text()
    moon = {r[0]: r for r in _tables(summary.split("## Moonshot ratio", 1)[1])[0][1:]}
    for name, report, ds in (("OCT", "RESULTS_imagenet_oct.md", "kermany-oct2017-test"),
                             ("brain MRI", "RESULTS_imagenet_brain.md", "brain-tumor-mri")):
        text = (ROOT / "pipelines" / report).read_text()
        ref = next(r for tb in _tables(text) if tb[0][:2] == ["arm", "N=25"]
                   for r in tb if r[0] == "flat softmax (default recipe)")  # balanced accuracy
        means = " / ".join(c.split(" ±")[0] for c in ref[1:5])
        assert f"{name} {means}" in results, (name, means)
        ratio, ci = moon[ds][3], moon[ds][4].split(" to ")
        assert f"{name} {ratio.strip('*')} [{ci[0]}, {ci[1]}]" in results, (name, ratio, ci)
        minutes = float(re.search(r"took ([\d.]+) min of wall time", text).group(1))
        m = re.search(r"(\d+) min \(OCT\) and (\d+) min \(brain MRI\) of training.*?plus "
                      r"(\d+) and (\d+) min", results)
        train_min, pre_min = (m.group(1), m.group(3)) if name == "OCT" else (m.group(2),
                                                                             m.group(4))
        assert abs(int(train_min) + int(pre_min) - minutes) <= 1, (name, minutes)


def test_generalisation_numbers_come_from_its_results():
    text = (ROOT / "pipelines" / "study_generalisation" / "RESULTS.md").read_text()
    results = _page("docs/results.md")
    tables = _tables(text)
    means = {(r[0], r[1]): r for r in tables[0][1:]}  # arm, evaluation -> mean ± sd cells
    header = tables[0][0]
    col = {h: i for i, h in enumerate(header)}
    main = means[("pad", "plain")]
    assert f"the main job scores {main[col['Testing/ (all)']]} on `Testing/`" in results
    paired = {(r[0], r[1]): r for r in tables[2][1:]}
    assert f"TTA (mirror) changes it by {paired[('pad', 'tta')][3]}" in results
    per_seed = [float(x) for x in paired[("acquisition", "plain")][4].split(",")]
    assert f"varies from {max(per_seed):+.3f} to {min(per_seed):+.3f} by seed" in results

    def mean(row, name):
        return float(row[col[name]].split(" ±")[0])

    adabn = [mean(means[(arm, "adabn")], "ECE Testing/") for arm in ("pad", "acquisition")]
    assert (f"cuts the ECE from {mean(main, 'ECE Testing/'):.2f} to "
            f"{min(adabn):.2f}-{max(adabn):.2f}") in results
    cost = mean(main, "internal test") - mean(means[("pad", "adabn")], "internal test")
    assert f"costs {round(100 * cost)} points on the internal test" in results
    crop = means[("crop", "plain")]
    assert f"leaves `Testing/` where it was, {crop[col['Testing/ (all)']]}" in results
    domain = {r[0]: r for r in tables[3][1:]}  # arm -> seeds, val, diffs, test, diffs
    assert tables[3][0][2] == "validation" and tables[3][0][4] == "internal test"
    test_d, val_d = ([float(x) for x in domain["crop"][k].split(",")] for k in (5, 3))
    assert min(test_d) > 0 > max(val_d)  # "higher ... on every seed", "lower ... every seed"
    assert (f"internal test on every seed ({domain['crop'][4]} against {domain['pad'][4]})"
            in results)
    assert (f"internal validation on every seed ({domain['crop'][2]} against "
            f"{domain['pad'][2]})") in results
    ens = [float(r[3]) for r in tables[1][1:]]
    assert f"seed ensembles of 3 reach {min(ens):.3f}-{max(ens):.3f}" in results
    chosen = re.search(r"Chosen: \*\*(\w+) / (\w+)\*\*", text).groups()
    assert chosen == ("acquisition", "adabn")
    report = re.search(r"Report half: balanced accuracy ([\d.]+)", text).group(1)
    assert (f"(acquisition + AdaBN) scores {report} on the report half, below the main job's "
            f"{main[col['report half']].split(' ±')[0]} there") in results
    glioma = re.search(r"`glioma`: (\d+) of (\d+) images no model", text).groups()
    assert f"{glioma[0]} of the {glioma[1]} `Testing/` gliomas" in results
    oracle = re.search(r"oracle ceiling\): (\d\.\d+)", text).group(1)
    assert f"oracle ceiling {oracle}" in results


def _signed(xs) -> str:
    return ", ".join(f"{x:+.3f}" for x in xs)


def test_init_rules_numbers_come_from_their_study():
    """docs/results.md's paragraph on `kmedtl init`'s rules quotes the study's report, and
    the rules `init` applies are the ones the study chose on validation."""
    from kmedtl import init as kinit

    study = ROOT / "pipelines" / "study_init_rules"
    text = (study / "RESULTS.md").read_text()
    summary = _json(study / "summary.json")
    results = _page("docs/results.md")
    cells, minutes = re.search(r"- (\d+) cells, (\d+) min of training", text).groups()
    assert f"{cells} cells, {minutes} min on 2 CPU cores" in results
    tables = _tables(text)
    ham = {r[0]: r for r in tables[0][1:]}  # arm, change, seeds, val, diffs, test, diffs, ...
    assert tables[0][0][3] == "validation" and tables[0][0][5] == "test"
    pair = summary["ham"]["radiology_aug-vs-grey"]
    assert pair["verdict"].startswith("holds") and min(pair["test_diffs"]) > 0
    assert (f"colour beat grey on validation on every seed ({_signed(pair['validation_diffs'])})"
            in results)
    assert f"on the test split by {_signed(pair['test_diffs'])}" in results
    choice = summary["ham"]["augment_choice"]
    assert choice["arm"] == "photo_geometry" and choice["holds"]
    assert choice["augment"] == kinit.PHOTO_AUGMENT  # init writes the family chosen
    assert f"it scored {ham['init'][3]} on validation" in results
    assert f"without the jitter, {choice['val']}" in results
    assert f"the radiology family ({ham['radiology_aug'][3]})" in results
    assert f"(test {choice['test']})" in results
    assert f"scores {ham['grey'][5]} on the same test split" in results
    assert (f"on HAM10000 the recipe it writes scores {choice['test']} balanced accuracy on "
            f"test, a copy of the main job's {ham['grey'][5]}") in _page("README.md")
    oct_rows = {r[0]: r for r in tables[1][1:]}
    assert (f"`init`'s recipe scores {oct_rows['init'][3]} on validation and "
            f"{oct_rows['init'][5]} on test") in results
    brain = summary["brain"]["crop"]
    assert brain["val"]["verdict"].startswith("holds")
    assert kinit.choose_resize({"shortcuts": {"flagged": ["width"]}}).value == "pad"
    for part, words in (("val", "on validation"), ("internal", "on the internal test"),
                        ("external", "on `Testing/`")):
        assert f"{_signed(brain[part]['diffs'])} {words}" in results


# ------------------------------------------------------------- the real data (slow)
@pytest.mark.slow
def test_brain_tumour_audit_counts_in_the_readme(datasets_dir, tmp_path):
    """``kmedtl data audit`` on the real brain-tumour set still gives the audit counts the
    committed pooled run recorded (and docs/features.md quotes, checked above)."""
    out = tmp_path / "audit.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "kmedtl", "data", "audit", str(datasets_dir / "brain-tumor-mri"),
         "--json", str(out), "--hierarchy", "pipelines/hierarchies/brain_tumor.yaml",
         "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(out.read_text())["summary"]
    committed = _json(MAIN / "lite0" / "metrics.json")["data"]
    for key in ("duplicate_groups", "duplicate_files", "cross_split_duplicate_groups",
                "near_duplicate_groups", "cross_split_near_duplicate_groups",
                "label_conflicts"):
        assert s[key] == committed["audit"][key], (key, s[key], committed["audit"][key])
    c = committed["audit_counts"]
    assert f"read {c['read']} = used {c['used']} + skipped {c['skipped']}" in proc.stdout
    main = _json(MAIN / "training_only" / "metrics.json")
    n_test = sum(main["external"]["testing"]["by_class"].values())
    n_train = main["data"]["audit_counts"]["read"]  # the main job read Training/ only
    assert f"by split: test: {n_test}; train: {n_train}" in proc.stdout

