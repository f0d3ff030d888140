"""kmedtl.study: the real-data study that reproduces the seed papers' comparisons.

``python -m kmedtl.study pipelines/study_X.yaml [more.yaml ...] [--out runs/study]
[--resume] [--max-minutes M] [--results PATH]`` runs a grid of comparison arms x N images
per class x seeds on one duplicate-free split of the brain-tumour MRI set, saves one JSON
row per finished cell (a rerun with ``--resume`` skips them), and writes ``RESULTS.md``
(tables mean +- sd over seeds, paired tests, "expected vs found").

Parts: :mod:`~kmedtl.study.config` (the YAML), :mod:`~kmedtl.study.data` (split, dedupe,
nested subsets, pretraining pool), :mod:`~kmedtl.study.training` (one cell; same-domain
pretraining), :mod:`~kmedtl.study.stats` (CIs, paired tests), :mod:`~kmedtl.study.runner`
(grid, resume, budget) and :mod:`~kmedtl.study.report` (``RESULTS.md``).
"""

from kmedtl.study.cli import main
from kmedtl.study.config import StudyConfig, load_study

__all__ = ["StudyConfig", "load_study", "main"]
