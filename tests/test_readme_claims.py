"""The README's cheap numbers are re-derived here from the command it names.

The brain-tumour audit counts (``kmedtl data audit`` on the real set) and the class mix of
its Training and Testing folders are quoted in README.md; if the code or the data changes
them, this test fails and the README must be updated with the new output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_brain_tumour_audit_counts_in_the_readme(datasets_dir, tmp_path):
    out = tmp_path / "audit.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "kmedtl", "data", "audit", str(datasets_dir / "brain-tumor-mri"),
         "--json", str(out), "--hierarchy", "pipelines/hierarchies/brain_tumor.yaml",
         "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(out.read_text())["summary"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    claims = [
        f"**{s['duplicate_groups']} byte-identical groups ({s['duplicate_files']} files), "
        f"{s['cross_split_duplicate_groups']} of them across Training/Testing**",
        f"{s['near_duplicate_groups']} near-duplicate groups (re-encoded copies; "
        f"{s['cross_split_near_duplicate_groups']} across splits) and "
        f"{s['label_conflicts']} groups whose copies carry different labels",
    ]
    for claim in claims:
        assert claim in readme, claim
    assert "read 3265 = used 3264 + skipped 1" in proc.stdout
    assert "by split: test: 394; train: 2870" in proc.stdout
    assert "Testing's 394 images but 14% of Training's 2,870" in readme
