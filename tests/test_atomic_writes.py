"""Run-folder writers go through ``jsonio.atomic_write``: a failed write keeps the old file
and leaves no temporary file behind (issue 22, item 4)."""
import ast
from pathlib import Path

import pytest

from kmedtl.evaluation.calibration import save_calibration
from kmedtl.evaluation.report import write_report
from kmedtl.jsonio import atomic_write
from kmedtl.pipeline.records import Records
from kmedtl.training.callbacks import write_state

KMEDTL = Path(__file__).resolve().parents[1] / "kmedtl"


class Boom:
    """Not JSON-serialisable and not str-able: fails half-way through a dump."""

    def __str__(self):
        raise RuntimeError("boom")


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_keeps_old_file_and_removes_temp_on_failure(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        atomic_write(path, lambda fh: (fh.write("half"), (_ for _ in ()).throw(RuntimeError())))
    assert path.read_text() == "old" and _left(tmp_path) == ["a.json"]


@pytest.mark.parametrize("writer", ["records", "calibration", "state", "report"])
def test_run_folder_writers_leave_no_temp_file_on_failure(tmp_path, writer):
    if writer == "records":
        rec = Records(tmp_path)
        rec.write("train", {"status": "done"})
        target = rec.path("train")
        with pytest.raises((ValueError, RuntimeError)):
            rec.write("train", {"status": "done", "bad": float("nan")})
    elif writer == "calibration":
        target = tmp_path / "calibration.json"
        save_calibration(target, {"temperature": 1.5})
        with pytest.raises(TypeError):
            save_calibration(target, {"temperature": object()})
    elif writer == "state":
        target = tmp_path / "state.json"
        write_state(target, epoch=1)
        with pytest.raises(TypeError):
            write_state(target, epoch=object())
    else:
        target = tmp_path / "report.md"
        target.write_text("old report")
        with pytest.raises(Exception):  # noqa: B017,PT011 - whatever the renderer raises
            write_report(target, {"balanced_accuracy": Boom()})
    before = target.read_text()
    assert before and not before.startswith("half")
    assert not [n for n in _left(target.parent) if n.endswith(".tmp")], _left(target.parent)


# Writers that keep their own temp-and-rename, and why: binary payloads (numpy, Keras,
# ONNX, TFLite, weights) or PID-named temporaries for writers that run concurrently.
ALLOWED = {
    "kmedtl/data/cache.py": "PID-named temp: workers write the cache concurrently",
    "kmedtl/data/dicomweb.py": "PID+thread-named temp: parallel downloads",
    "kmedtl/data/scan.py": "PID-named temp: concurrent scans",
    "kmedtl/training/features.py": "numpy .npy, PID-named",
    "kmedtl/training/trainer.py": "numpy .npz / .keras weights",
    "kmedtl/pretrained/store.py": "converted weights; its own temp with cleanup in finally",
    "kmedtl/export/push.py": "model version folders",
    "kmedtl/jsonio.py": "atomic_write itself",
}


def test_text_writers_do_not_hand_roll_temp_files():
    """An ``os.replace`` outside the writers above is a text writer that should use
    ``jsonio.atomic_write`` (which removes its temp file when the write fails)."""
    found = []
    for path in KMEDTL.rglob("*.py"):
        rel = path.relative_to(KMEDTL.parent).as_posix()
        if rel in ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("replace", "rename")
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "os"):
                found.append(f"{rel}:{node.lineno}")
    assert not found, f"hand-rolled temp-and-rename writers; use jsonio.atomic_write: {found}"
