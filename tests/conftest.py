"""Fixtures shared by every test file.

- ``pydicom_files``: every file shipped with ``pydicom`` (``pydicom/data/test_files``) and
  ``pydicom-data`` (module ``data_store``, folder ``data``), found on disk; never
  ``get_testdata_files``, which tries to download.
- ``datasets_dir``: the real datasets root from ``$KMEDTL_DATASETS`` (must hold
  ``brain-tumor-mri``); skips when absent, fails under CI (``CI=true`` or ``CI=1``).
- ``tiny_images``: a folder-per-class tree of a few small PNG/JPEG files in ``tmp_path``.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Converted pretrained weights go to a per-session cache, never the user's ~/.cache/kmedtl.
if not os.environ.get("KMEDTL_HOME"):
    import tempfile

    os.environ["KMEDTL_HOME"] = tempfile.mkdtemp(prefix="kmedtl-home-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from helpers import pydicom_test_files, smooth_image, write_image  # noqa: E402

BRAIN_TUMOR = "brain-tumor-mri"


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


@pytest.fixture(scope="session")
def pydicom_files() -> list[Path]:
    """Paths of every real test file in the pydicom and pydicom-data wheels."""
    files = pydicom_test_files()
    if not files:
        pytest.fail("no pydicom test files found; is pydicom installed?")
    return files


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """``$KMEDTL_DATASETS`` (containing ``brain-tumor-mri``): skip if missing, fail under CI."""
    value = os.environ.get("KMEDTL_DATASETS", "")
    problem = None
    if not value:
        problem = "KMEDTL_DATASETS is not set"
    elif not (Path(value) / BRAIN_TUMOR).is_dir():
        problem = f"KMEDTL_DATASETS={value} has no {BRAIN_TUMOR} folder"
    if problem:
        message = (f"{problem}; point it at the datasets folder, e.g. "
                   "export KMEDTL_DATASETS=$PWD/../shared/datasets")
        if _under_ci():
            pytest.fail(f"real datasets are required under CI: {message}")
        pytest.skip(message)
    return Path(value)


@pytest.fixture
def tiny_images(tmp_path) -> Path:
    """``<tmp>/tiny/{no_tumor,glioma_tumor}/`` with three small images each.

    Each class holds a grayscale PNG, an RGB PNG and a JPEG (64x64, smooth content,
    distinct per file), so the tree indexes with ``index_folder`` as 6 samples.
    """
    root = tmp_path / "tiny"
    for c, label in enumerate(("no_tumor", "glioma_tumor")):
        write_image(root / label / "gray.png", smooth_image(10 * c + 1))
        write_image(root / label / "rgb.png", smooth_image(10 * c + 2, channels=3))
        write_image(root / label / "photo.jpg", smooth_image(10 * c + 3), quality=90)
    return root


def _op_determinism_enabled() -> bool:
    import sys

    if "tensorflow" not in sys.modules:
        return False
    from tensorflow.python.framework.config import is_op_determinism_enabled

    return is_op_determinism_enabled()


def _restore_op_determinism(before: bool) -> None:
    if not before and _op_determinism_enabled():
        # not exported under tf.config.experimental in TF 2.21, only enable_ is
        from tensorflow.python.framework.config import disable_op_determinism

        disable_op_determinism()


@pytest.fixture(autouse=True)
def _no_leaked_op_determinism():
    """``train.deterministic: true`` switches TensorFlow's op determinism on for the whole
    process (TF has no scoped switch), and Keras then silently turns XLA off.  Undo it after
    the test that asked for it, so later tests see the default."""
    before = _op_determinism_enabled()
    yield
    _restore_op_determinism(before)


@pytest.fixture(autouse=True, scope="module")
def _no_leaked_op_determinism_from_module_fixtures():
    """The same for module-scoped fixtures (set up before any function-scoped fixture)."""
    before = _op_determinism_enabled()
    yield
    _restore_op_determinism(before)
