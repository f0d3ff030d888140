"""Hostile and broken model files given to ``kmedtl predict`` (issue 21, items 1, 7, 12).

A SavedModel is a program: ``tf.io.write_file`` in its serving function writes any file
the user may write.  kmedtl reads the model's protobuf (which runs nothing) and checks
every op of every graph and function against an allowlist of pure compute ops before it
loads anything (:mod:`kmedtl.export.trust`); TFLite operator codes and ONNX op types and
domains likewise.  A refused model is exit 2 with one line naming the op and the file; a
broken model, or metadata (``kmedtl.json``) that belongs to another export, is exit 3 with
one line and no traceback.

Every case runs in ONE child process (one TensorFlow import, ~8 s) under a memory and
time cap (:mod:`limits`): the child builds the hostile models, then calls
``kmedtl.cli.main`` in-process once per case, capturing its exit code, stdout, stderr and
whether a traceback escaped, and writes them as JSON; the tests below assert on them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from limits import run_capped

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RSS_MB = 1500   # the child: TensorFlow, Keras, ONNX, a few tiny models (893 MB measured)
TIMEOUT = 300   # seconds for the whole batch (13 s on a quiet 2-core machine, 65 s busy)


# ------------------------------------------------------------------ the child (builds + runs)
def _child(out_dir: Path) -> None:  # noqa: C901 - one straight script of cases
    import contextlib
    import io
    import logging
    import shutil
    import traceback

    sys.path.insert(0, str(ROOT / "tests"))
    import keras
    import numpy as np
    import tensorflow as tf
    from helpers import write_image
    from test_export_helpers import tiny_context

    from kmedtl.cli import main
    from kmedtl.data import ImageOptions
    from kmedtl.export.predictors import METADATA_FILE, ModelInfo
    from kmedtl.export.savedmodel import write_savedmodel
    from kmedtl.hierarchy import Hierarchy

    class _Current(logging.Handler):  # log records go to whatever sys.stderr is now
        def emit(self, record):
            print(self.format(record), file=sys.stderr)

    logging.getLogger().addHandler(_Current())
    secret = out_dir / "secret.txt"
    secret.write_text("s3cret-hostname\n")
    png8 = write_image(out_dir / "x8.png", np.full((8, 8), 128, np.uint8))
    png32 = write_image(out_dir / "x32.png",
                        (np.add.outer(np.arange(32), np.arange(32)) * 4).astype(np.uint8))
    flat = ModelInfo(Hierarchy(["a", "b"]), ImageOptions(size=(8, 8), channels=1))
    spec = tf.TensorSpec([None, 8, 8, 1], tf.float32, name="pixels")

    def outputs(x):
        leaf = tf.nn.softmax(tf.reduce_mean(x, axis=[1, 2]) * tf.constant([[1.0, -1.0]]))
        idx = tf.argmax(leaf, axis=-1)
        return {"leaf": leaf, "label": tf.gather(tf.constant(["a", "b"]), idx),
                "label_index": idx}

    def save(module, fn, name) -> Path:
        path = out_dir / name
        tf.saved_model.save(module, str(path), signatures={"predict_pixels": fn,
                                                           "serving_default": fn})
        (path / "assets.extra").mkdir()
        (path / "assets.extra" / METADATA_FILE).write_text(json.dumps(flat.to_dict()))
        return path

    # 1. the attack of the issue: read a file, write a shell script holding it
    pwned = out_dir / "pwned.sh"

    class ReadWrite(tf.Module):
        @tf.function(input_signature=[spec])
        def serve(self, pixels):
            data = tf.io.read_file(str(secret))
            with tf.control_dependencies([tf.io.write_file(str(pwned), "echo " + data)]):
                return outputs(tf.identity(pixels))

    m = ReadWrite()
    rw = save(m, m.serve.get_concrete_function(), "hostile_rw")

    # 2. the write hidden in a nested tf.function (its own function in the library)
    nested_target = out_dir / "nested.txt"

    class Nested(tf.Module):
        @tf.function
        def inner(self, x):
            with tf.control_dependencies([tf.io.write_file(str(nested_target), "x")]):
                return tf.identity(x)

        @tf.function(input_signature=[spec])
        def serve(self, pixels):
            return outputs(self.inner(pixels))

    m = Nested()
    nested = save(m, m.serve.get_concrete_function(), "hostile_nested")

    # 3. Python inside the graph
    class PyFn(tf.Module):
        @tf.function(input_signature=[spec])
        def serve(self, pixels):
            y = tf.numpy_function(lambda v: v, [pixels], tf.float32)
            return outputs(tf.reshape(y, tf.shape(pixels)))

    m = PyFn()
    pyfunc = save(m, m.serve.get_concrete_function(), "hostile_pyfunc")

    # 4. a checkpoint writer (SaveV2) in the serving function, not in the saver
    ckpt_target = out_dir / "ckpt"

    class Saver(tf.Module):
        @tf.function(input_signature=[spec])
        def serve(self, pixels):
            save_op = tf.raw_ops.SaveV2(prefix=str(ckpt_target), tensor_names=["p"],
                                        shape_and_slices=[""], tensors=[pixels])
            with tf.control_dependencies([save_op]):
                return outputs(tf.identity(pixels))

    m = Saver()
    savev2 = save(m, m.serve.get_concrete_function(), "hostile_savev2")

    # 5. a benign model written by kmedtl (tiny untrained CBR, every signature)
    ctx = tiny_context()
    info = ModelInfo(ctx.hierarchy, ctx.options, ctx.normalization, ctx.temperature, "tiny")
    benign = write_savedmodel(ctx, out_dir / "benign")
    (benign / "assets.extra").mkdir(exist_ok=True)
    try:
        from kmedtl.export.predictors import savedmodel_metadata
        doc = savedmodel_metadata(info, benign)
    except ImportError:  # before issue 21: no digest
        doc = info.to_dict()
    (benign / "assets.extra" / METADATA_FILE).write_text(json.dumps(doc))
    leaves = list(ctx.hierarchy.leaves)

    def variant(name, tree, digest_from=None) -> Path:
        """The benign model with the kmedtl.json of 'another export' (tree reordered)."""
        path = out_dir / name
        shutil.copytree(benign, path)
        d = ModelInfo(Hierarchy(tree), ctx.options, "unit", 1.0, "tiny").to_dict()
        if digest_from is not None:
            d["model_sha256"] = json.loads(
                (digest_from / "assets.extra" / METADATA_FILE).read_text()).get(
                "model_sha256", "0" * 64)
        (path / "assets.extra" / METADATA_FILE).write_text(json.dumps(d))
        return path

    tumour = {"glioma": ["glioma_tumor"], "meningioma": ["meningioma_tumor"],
              "pituitary": ["pituitary_tumor"]}
    swapped_tree = {"normal": ["no_tumor"], "tumor": dict(reversed(tumour.items()))}
    # another export: the same files with other weights (so another digest), leaves reversed
    other = out_dir / "other_export"
    shutil.copytree(benign, other)
    data = next((other / "variables").glob("variables.data-*"))
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\1")
    try:
        from kmedtl.export.predictors import savedmodel_metadata
        (other / "assets.extra" / METADATA_FILE).write_text(
            json.dumps(savedmodel_metadata(info, other)))
    except ImportError:
        pass
    foreign = variant("foreign_json", swapped_tree, digest_from=other)
    legacy = variant("reordered_legacy", swapped_tree)
    three = variant("three_leaves", {"normal": ["no_tumor"],
                                     "tumor": {"glioma": ["glioma_tumor"],
                                               "meningioma": ["meningioma_tumor"]}})

    # 6. broken files
    corrupt_pb = out_dir / "corrupt_pb"
    shutil.copytree(benign, corrupt_pb)
    (corrupt_pb / "saved_model.pb").write_bytes(b"\x0a\xff\xff\xff\xff\x0fnot a protobuf" * 9)
    meta = out_dir / "flat.json"
    meta.write_text(json.dumps(flat.to_dict()))
    bad_tflite = out_dir / "bad.tflite"
    bad_tflite.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\xff" * 200)
    bad_onnx = out_dir / "bad.onnx"
    bad_onnx.write_bytes(b"\x08\x07\x12\xff\xff\xff\xff garbage")
    bad_keras = out_dir / "bad.keras"
    bad_keras.write_bytes(b"PK\x03\x04 not really a zip")

    # 7. TFLite with a Flex (TensorFlow) op, ONNX with a custom domain and external data
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    code = s.OperatorCodeT()
    code.builtinCode = s.BuiltinOperator.CUSTOM
    code.deprecatedBuiltinCode = s.BuiltinOperator.CUSTOM
    code.customCode = "FlexWriteFile"
    tensor = s.TensorT()
    tensor.shape, tensor.type, tensor.buffer, tensor.name = [1], s.TensorType.STRING, 0, "x"
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 0], []
    sub = s.SubGraphT()
    sub.tensors, sub.inputs, sub.outputs, sub.operators = [tensor], [0], [], [op]
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [sub]
    model.buffers = [s.BufferT()]
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    flex = out_dir / "flex.tflite"
    flex.write_bytes(bytes(b.Output()))

    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, 8, 8, 1])
    y = helper.make_tensor_value_info("leaf", TensorProto.FLOAT, [None, 2])
    evil = helper.make_model(
        helper.make_graph([helper.make_node("Exec", ["pixels"], ["leaf"], domain="com.evil")],
                          "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.evil", 1)])
    onnx_custom = out_dir / "custom.onnx"
    onnx.save(evil, str(onnx_custom))
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2])
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../secret.txt")  # beside ext/, not in it
    ext = helper.make_model(
        helper.make_graph([helper.make_node("Add", ["pixels", "w"], ["leaf"])], "g", [x], [y],
                          initializer=[w]), opset_imports=[helper.make_opsetid("", 17)])
    onnx_external = out_dir / "ext" / "external.onnx"
    onnx_external.parent.mkdir()
    onnx.save(ext, str(onnx_external))

    # 8. a .keras whose Lambda layer carries Python bytecode
    inp = keras.Input((8, 8, 1))
    lam = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(
        keras.layers.Flatten()(keras.layers.Lambda(lambda t: t * 2.0)(inp))))
    lam_path = out_dir / "lambda.keras"
    lam.save(lam_path)

    cases = {
        "rw": ["predict", rw, png8, "--json"],
        "rw_trusted": ["predict", rw, png8, "--json", "--trust-model"],
        "nested": ["predict", nested, png8, "--json"],
        "pyfunc": ["predict", pyfunc, png8, "--json"],
        "savev2": ["predict", savev2, png8, "--json"],
        "benign": ["predict", benign, png32],
        "foreign": ["predict", foreign, png32],
        "legacy": ["predict", legacy, png32],
        "three": ["predict", three, png32],
        "corrupt_pb": ["predict", corrupt_pb, png32],
        "corrupt_tflite": ["predict", bad_tflite, png8, "--metadata", meta],
        "corrupt_onnx": ["predict", bad_onnx, png8, "--metadata", meta],
        "corrupt_keras": ["predict", bad_keras, png8, "--metadata", meta],
        "flex": ["predict", flex, png8, "--metadata", meta],
        "onnx_custom": ["predict", onnx_custom, png8, "--metadata", meta],
        "onnx_external": ["predict", onnx_external, png8, "--metadata", meta],
        "keras_lambda": ["predict", lam_path, png8, "--metadata", meta],
    }
    results = {"leaves": leaves}
    for name, argv in cases.items():
        before = {p: p.exists() for p in (pwned, nested_target, ckpt_target.with_suffix(
            ".index"))}
        out, err, tb = io.StringIO(), io.StringIO(), None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as exc:  # argparse
                rc = exc.code
            except BaseException:  # noqa: BLE001 - what `python -m kmedtl` would print
                tb, rc = traceback.format_exc(), 1
        results[name] = {"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "tb": tb,
                         "written": [str(p) for p, was in before.items()
                                     if p.exists() and not was]}
        for p in before:  # every case starts clean
            p.unlink(missing_ok=True)
    # the pieces on their own: digests (export.json's per-format ones too) and the allowlist
    from kmedtl.errors import ModelFileError
    from kmedtl.export import trust

    blob = out_dir / "m.onnx"
    blob.write_bytes(b"model bytes")
    docs = {"match": {"formats": {"onnx": {"sha256": trust.model_digest(blob)}}},
            "other": {"formats": {"onnx": {"sha256": "0" * 64}, "keras": {"path": "x"}}},
            "legacy": {"formats": {"onnx": {"path": "model.onnx"}}}}
    digests = {}
    for name, doc in docs.items():
        try:
            trust.check_digest(blob, doc, out_dir / "export.json")
            digests[name] = "ok"
        except ModelFileError as exc:
            digests[name] = str(exc)
    before = trust.model_digest(benign)
    (benign / "assets.extra" / "blessing.json").write_text("{}")  # metadata: not hashed
    digests["extra_ignored"] = trust.model_digest(benign) == before
    (benign / "fingerprint.pb").write_bytes(b"changed")
    digests["files_hashed"] = trust.model_digest(benign) != before
    results["digests"] = digests
    allowed = trust.allowed_ops()
    results["allowed"] = {op: op in allowed for op in (
        "Conv2D", "DepthwiseConv2dNative", "FusedBatchNormV3", "DecodeJpeg", "While",
        "StatefulPartitionedCall", "ReadFile", "WriteFile", "MatchingFiles", "SaveV2",
        "RestoreV2", "MergeV2Checkpoints", "PyFunc", "EagerPyFunc", "ImmutableConst",
        "InitializeTableFromTextFileV2", "RemoteCall", "CollectiveReduceV2", "Abort",
        "TFRecordDataset", "DebugIdentityV2", "WriteSummary")}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
    sys.exit(0)


# ------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile_models")
    res = run_capped([sys.executable, str(Path(__file__)), str(out)], rss_mb=RSS_MB,
                     timeout=TIMEOUT, cwd=ROOT)
    assert res.ok and res.rc == 0, res.why()
    doc = json.loads((out / "results.json").read_text())
    doc["peak_mb"], doc["dir"] = res.peak_mb, out
    assert res.peak_mb < RSS_MB
    return doc


def _refused(r: dict, *needles):
    """Exit 2, one ``kmedtl: error:`` line naming every needle, nothing predicted."""
    assert r["tb"] is None, r["tb"]
    assert r["rc"] == 2, r
    lines = [ln for ln in r["err"].splitlines() if ln.startswith("kmedtl: error:")]
    assert len(lines) == 1, r["err"]
    for needle in needles:
        assert needle in lines[0], (needle, r["err"])
    assert "--trust-model" in lines[0] and r["out"] == "", r


def _broken(r: dict, *needles):
    """Exit 3 (a broken or mismatched model), one line, no traceback, nothing predicted."""
    assert r["tb"] is None, r["tb"]
    assert r["rc"] == 3, r
    lines = [ln for ln in r["err"].splitlines() if ln.startswith("kmedtl: error:")]
    assert len(lines) == 1 and "Traceback" not in r["err"], r["err"]
    for needle in needles:
        assert needle in lines[0], (needle, r["err"])
    assert r["out"] == "", r


def test_savedmodel_that_writes_a_file_is_refused_and_writes_nothing(hostile):
    r = hostile["rw"]
    _refused(r, "hostile_rw", "saved_model.pb")
    assert "WriteFile" in r["err"] or "ReadFile" in r["err"], r["err"]
    assert r["written"] == [], r


def test_trust_model_lets_the_same_model_run(hostile):
    """--trust-model is the user's explicit word: the model runs, file writes included."""
    r = hostile["rw_trusted"]
    assert r["tb"] is None and r["rc"] == 0, r
    assert json.loads(r["out"])[0]["label"] in ("a", "b")
    assert any(p.endswith("pwned.sh") for p in r["written"]), r
    assert "s3cret-hostname" in (Path(hostile["dir"]) / "secret.txt").read_text()


def test_op_in_a_nested_function_is_caught(hostile):
    r = hostile["nested"]
    _refused(r, "WriteFile", "hostile_nested", "inner")
    assert r["written"] == []


def test_python_function_in_the_graph_is_refused(hostile):
    r = hostile["pyfunc"]
    _refused(r, "PyFunc", "hostile_pyfunc")


def test_checkpoint_writer_outside_the_saver_is_refused(hostile):
    r = hostile["savev2"]
    _refused(r, "SaveV2", "hostile_savev2")
    assert r["written"] == []


def test_benign_model_written_by_kmedtl_passes(hostile):
    r = hostile["benign"]
    assert r["tb"] is None and r["rc"] == 0, r
    assert "x32.png: " in r["out"] and "level 2:" in r["out"], r


def _no_contradiction(r, leaves):
    """The issue's symptom: a headline naming one leaf ("pituitary") while the printed
    leaf probabilities put the maximum on another ("glioma 0.871").  Nothing may be
    printed at all: no headline, no probabilities."""
    assert not any(leaf in r["out"] for leaf in leaves), r["out"]


def test_kmedtl_json_from_another_export_is_exit_3(hostile):
    r = hostile["foreign"]
    _broken(r, "foreign_json", "kmedtl.json", "digest")
    _no_contradiction(r, hostile["leaves"])


def test_reordered_leaves_without_a_digest_are_caught_by_the_baked_labels(hostile):
    r = hostile["legacy"]
    _broken(r, "reordered_legacy", "leaf order", "pituitary")
    _no_contradiction(r, hostile["leaves"])


def test_leaf_count_mismatch_is_exit_3(hostile):
    _broken(hostile["three"], "three_leaves", "3 leaves", "4")


@pytest.mark.parametrize("case,needle", [("corrupt_pb", "saved_model.pb"),
                                         ("corrupt_tflite", "bad.tflite"),
                                         ("corrupt_onnx", "bad.onnx"),
                                         ("corrupt_keras", "bad.keras")])
def test_corrupt_model_file_is_exit_3_without_traceback(hostile, case, needle):
    _broken(hostile[case], needle)


def test_tflite_flex_op_is_refused(hostile):
    _refused(hostile["flex"], "FlexWriteFile", "flex.tflite")


def test_onnx_custom_domain_is_refused(hostile):
    _refused(hostile["onnx_custom"], "com.evil", "Exec", "custom.onnx")


def test_onnx_external_data_outside_the_model_folder_is_refused(hostile):
    _refused(hostile["onnx_external"], "external data", "../secret.txt",
             "outside the model's folder", "external.onnx")


def test_keras_lambda_is_refused_by_safe_mode(hostile):
    _refused(hostile["keras_lambda"], "lambda.keras", "Lambda", "safe_mode")


def test_digest_checks_of_export_json(hostile):
    d = hostile["digests"]
    assert d["match"] == "ok" and d["legacy"] == "ok", d
    assert "export.json" in d["other"] and "digest" in d["other"] and "m.onnx" in d["other"]
    assert d["extra_ignored"] and d["files_hashed"], d


def test_allowlist_keeps_compute_and_denies_the_rest(hostile):
    allowed = hostile["allowed"]
    compute = ("Conv2D", "DepthwiseConv2dNative", "FusedBatchNormV3", "DecodeJpeg", "While",
               "StatefulPartitionedCall")
    assert all(allowed[op] for op in compute), allowed
    assert not any(v for op, v in allowed.items() if op not in compute), allowed


def test_peak_memory_of_the_batch(hostile):
    assert hostile["peak_mb"] < RSS_MB


def test_exit_codes_are_documented():
    import kmedtl.cli as cli

    doc = cli.__doc__
    for code in ("0", "1", "2", "3"):
        assert f"``{code}``" in doc, code
    assert "--trust-model" in doc
