"""The README's Python example runs as written (on the real brain-tumour set), with only
the epoch count cut down and the cache folder moved to a temporary one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no ```python example"
    return blocks[0]


@pytest.mark.slow
def test_readme_python_example_runs(datasets_dir, tmp_path):
    code = _example()
    for needle in ("../shared/datasets", ".kmedtl_cache", "epochs=5"):
        assert needle in code, f"README example changed: {needle!r} not found; update this test"
    code = (code.replace("../shared/datasets", str(datasets_dir))
                .replace(".kmedtl_cache", str(tmp_path / "cache"))
                .replace("epochs=5", "epochs=1, steps_per_epoch=3"))
    code += "\nimport numpy as np\nassert np.allclose(probs.sum(axis=1), 1, atol=1e-4), probs\n"
    code += "print('README-OK', probs.shape)\n"
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "README-OK (32, 4)" in out.stdout, out.stdout[-2000:]
