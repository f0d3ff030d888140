"""Untrusted model files: what kmedtl checks before it loads one (issue 21).

A SavedModel is a program.  ``tf.io.write_file``, ``tf.io.read_file``, ``tf.py_function``
and their kind run with the user's rights when its serving function is called, and
``tf.saved_model.load`` already runs functions (resource initialisers, restore functions).
So before ``kmedtl predict`` (or :func:`kmedtl.export.load_predictor`) loads a SavedModel,
TFLite or ONNX file that kmedtl did not just write, :func:`check_model` reads the file as
data -- the SavedModel protobuf through ``saved_model_pb2`` (parsing runs nothing), the
TFLite flatbuffer through its schema, the ONNX protobuf with ``onnx.load`` without its
external data -- and refuses it (:class:`~kmedtl.errors.UntrustedModelError`, exit 2, one
line naming the op and the file) unless every op is on an allowlist of pure compute ops:

- **SavedModel**: every node of every MetaGraph's ``graph_def`` and of every function in
  its function library (nested ``tf.function``\\ s, ``If``/``While`` branches and unused
  functions included) must be an op that TensorFlow defines in one of the compute
  modules of :data:`COMPUTE_OP_MODULES` (array, math, nn, image, string, control flow,
  variables, ...), minus :data:`DENIED` (ops in those modules that touch files, other
  machines or the process), or a call of a function of the library (itself checked).
  Deny by default: file ops (``ReadFile``, ``WriteFile``, ``MatchingFiles``, readers),
  ``Save*``/``Restore*``/``MergeV2Checkpoints``, ``PyFunc``/``EagerPyFunc``
  (``tf.py_function``, ``tf.numpy_function``), summaries and debug dumps, ``tf.data``
  datasets, collective/RPC/send-receive ops, and any op kmedtl does not recognise
  (custom op libraries, ops newer than the installed TensorFlow).  ``PrintV2`` is allowed
  only to stdout/stderr/the log, never to a ``file://`` stream.  The one exception: the
  checkpoint ops (:data:`SAVER_OPS`) inside the ``__inference__traced_save_N`` /
  ``__inference__traced_restore_N`` functions that only the MetaGraph's ``saver_def``
  calls (every TF2 SavedModel has them; TensorFlow 2's loader never runs them, it
  restores variables itself).  The same op in a function that a signature, a concrete
  function or a restore/initialiser function can reach is refused.
- **TFLite**: every operator code must be a builtin operator of the installed schema;
  custom ops -- ``Flex*`` (full TensorFlow ops, ``FlexWriteFile`` included) or others --
  are refused.
- **ONNX**: every node (subgraphs of ``If``/``Loop``/``Scan`` included) must be a known
  op of the standard domains (``""``/``ai.onnx``, ``ai.onnx.ml``); custom domains and
  model-local functions are refused, and so is external data stored outside the model's
  folder (``location: /etc/hostname``).
- **Keras** ``.keras`` files are loaded with ``safe_mode=True``
  (:func:`kmedtl.run_folder.load_model`): a ``Lambda`` layer holding Python bytecode is
  refused (exit 2); ``--trust-model`` loads it with ``safe_mode=False``.

Models this process has just written (``kmedtl export`` measuring parity on its own
files: :func:`mark_written`) are not checked again.

``--trust-model`` (``load_predictor(..., trust_model=True)``) skips these checks: the
model then runs with the user's rights and may read and write any file they can, start
processes or open connections.  Give it only for a model from someone you trust.

Integrity, checked whatever the trust (:func:`check_digest`): ``kmedtl export`` records
the SHA-256 of each model it writes (``model_sha256`` in the SavedModel's
``assets.extra/kmedtl.json``, ``formats.<name>.sha256`` in ``export.json``); a model whose
files do not hash to the digest its metadata records stops with
:class:`~kmedtl.errors.ModelFileError` (exit 3), as does a model that cannot be parsed.
A SavedModel folder's digest covers every file except ``assets.extra/`` (the metadata
that sits beside the model).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import struct
from pathlib import Path

import tensorflow as tf  # the kmedtl.export package loads it anyway
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import saved_model_pb2

try:  # the TFLite flatbuffer schema (generated pure Python) as TensorFlow ships it
    from tensorflow.lite.python import schema_py_generated as _TF_TFLITE_SCHEMA
except ImportError:  # a TensorFlow without tf.lite: LiteRT's copy is used
    _TF_TFLITE_SCHEMA = None

from kmedtl.errors import ModelFileError, UntrustedModelError

log = logging.getLogger("kmedtl.export")

#: The modules of ``tf.raw_ops`` whose ops are pure computation on tensors (and variables),
#: minus :data:`DENIED`.  Left out on purpose: io, dataset, experimental_dataset, script
#: (PyFunc), summary, debug, checkpoint, filesystem, collective, nccl, sendrecv, tpu, xla,
#: decode_proto/encode_proto (a descriptor file), boosted_trees, sdca, user ops.
COMPUTE_OP_MODULES = (
    "array", "audio", "batch", "bitwise", "candidate_sampling", "clustering",
    "composite_tensor", "control_flow", "count", "ctc", "cudnn_rnn", "data_flow",
    "functional", "image", "linalg", "list", "logging", "lookup", "manip", "map", "math",
    "nn", "optional", "parsing", "ragged_array", "ragged_conversion", "ragged_math",
    "random", "random_index_shuffle", "resource_variable", "rnn", "set", "sparse",
    "special_math", "spectral", "state", "stateful_random", "stateless_random",
    "stateless_random_v2", "string", "training", "uniform_quant", "sparse_csr_matrix",
)
#: Ops of those modules that reach outside the computation, with why.
DENIED = {
    "Abort": "aborts the process",
    "ImmutableConst": "maps a file into memory",
    "InitializeTableFromTextFile": "reads a file",
    "InitializeTableFromTextFileV2": "reads a file",
    "RecordInput": "reads files",
    "FixedUnigramCandidateSampler": "reads a vocabulary file",
    "RemoteCall": "runs a function on another device or machine",
}
#: Checkpoint ops allowed only inside the saver's own functions (see the module docstring).
SAVER_OPS = frozenset({"SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename"})
_SAVER_FUNCTION = re.compile(r"__inference__traced_(save|restore)_\d+")
#: ``PrintV2`` output streams that are not files.
PRINT_STREAMS = frozenset({"stderr", "stdout", "log(info)", "log(warning)", "log(error)"})
#: ONNX domains whose standard ops are allowed.
ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
#: Refuse a TFLite file listing more operator codes than this (a hostile length field).
MAX_TFLITE_OPCODES = 4096

_PYTHON = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})
_FILE = re.compile(r"File|Reader|Save|Restore|Checkpoint|Summary|Writer|Dump|Debug|"
                   r"Snapshot|Record|Load")
_NETWORK = re.compile(r"Collective|Nccl|Send|Recv|Rpc|DataService|RegisterDataset|"
                      r"Remote|Tpu|TPU|Xla|_Host")
_TRUST_HINT = ("a model is a program, so kmedtl loads only pure compute ops; if you trust "
               "whoever made this model, pass --trust-model (it then runs with your rights)")


def _why(op: str) -> str:
    if op in DENIED:
        return DENIED[op]
    if op in _PYTHON:
        return "runs Python code"
    if "Dataset" in op or "Iterator" in op:
        return "builds a tf.data pipeline (which can read files)"
    if _FILE.search(op):
        return "reads or writes files"
    if _NETWORK.search(op):
        return "talks to other processes or machines"
    return "is not on kmedtl's allowlist of pure compute ops"


@functools.lru_cache(maxsize=1)
def allowed_ops() -> frozenset:
    """The op names a SavedModel may use: the installed TensorFlow's ops of
    :data:`COMPUTE_OP_MODULES`, minus :data:`DENIED`."""
    suffixes = tuple(f".gen_{m}_ops" for m in COMPUTE_OP_MODULES)
    out = set()
    for name in dir(tf.raw_ops):
        if name.startswith("_"):
            continue
        module = getattr(getattr(tf.raw_ops, name), "__module__", "") or ""
        if module.endswith(suffixes):
            out.add(name)
    return frozenset(out - set(DENIED))


#: Model files this process has written (:func:`mark_written`): path -> file stamp.
_WRITTEN: dict[str, tuple] = {}


def _stamp(path) -> tuple:
    p = Path(path)
    st = (p / "saved_model.pb" if p.is_dir() else p).stat()
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def mark_written(path):
    """Record that this process has just written the model at ``path`` (``kmedtl
    export`` before it measures parity on it), so loading it skips :func:`check_model`;
    returns ``path``.  A file replaced since (another size, time or inode) is checked."""
    _WRITTEN[os.path.realpath(path)] = _stamp(path)
    return path


def written_here(path) -> bool:
    """Whether this process wrote the model at ``path`` (:func:`mark_written`) and it is
    unchanged since."""
    try:
        return _WRITTEN.get(os.path.realpath(path)) == _stamp(path)
    except OSError:
        return False


def model_kind(path) -> str:
    """``"savedmodel"``, ``"tflite"``, ``"onnx"`` or ``"keras"`` (else ``""``)."""
    path = Path(path)
    if path.is_dir():
        return "savedmodel"
    return {".tflite": "tflite", ".onnx": "onnx", ".keras": "keras"}.get(
        path.suffix.lower(), "")


def check_model(path) -> None:
    """Refuse (:class:`UntrustedModelError`) a model file whose ops are not all pure
    compute; :class:`ModelFileError` when it cannot be parsed.  Runs nothing."""
    kind = model_kind(path)
    if kind == "savedmodel":
        check_savedmodel(path)
    elif kind == "tflite":
        check_tflite(path)
    elif kind == "onnx":
        check_onnx(path)


def _refuse(path, found: list[tuple[str, str, str]]) -> None:
    """One line naming what was found (``"op WriteFile"``; up to 3), where the first is,
    and why it is refused."""
    if not found:
        return
    whats = list(dict.fromkeys(what for what, _, _ in found))
    what, where, why = found[0]
    more = f" (also {', '.join(whats[1:3])}{' ...' if len(whats) > 3 else ''})" \
        if len(whats) > 1 else ""
    raise UntrustedModelError(f"{path}: refused to load this model: {what} in {where} "
                              f"{why}{more}; {_TRUST_HINT}")


# ------------------------------------------------------------------------- SavedModel
def read_savedmodel(path):
    """The ``SavedModel`` protobuf of a SavedModel folder (parsed, nothing run)."""
    pb = Path(path) / "saved_model.pb"
    try:
        return saved_model_pb2.SavedModel.FromString(pb.read_bytes())
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{pb}: not a readable SavedModel protobuf ({_short(exc)}); the "
                             "model is damaged or was not written by TensorFlow: re-export "
                             "it (kmedtl export RUN_DIR)") from None
    except OSError as exc:
        raise ModelFileError(f"{pb}: cannot be read ({_short(exc)})") from None


def _node_name(tensor_name: str) -> str:
    return tensor_name.split(":")[0].lstrip("^")


def _attr_functions(attr_map) -> set[str]:
    """Names of the functions an op's attributes refer to (``f``, ``then_branch``,
    ``body``, ``branches`` ..., whatever the attribute's name)."""
    out = set()
    for value in attr_map.values():
        if value.HasField("func"):
            out.add(value.func.name)
            out |= _attr_functions(value.func.attr)
        if value.HasField("list"):
            for fn in value.list.func:
                out.add(fn.name)
                out |= _attr_functions(fn.attr)
    return out


def _calls(node, library) -> set[str]:
    out = _attr_functions(node.attr)
    if node.op in library:
        out.add(node.op)
    return out


def _reach(roots, calls) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in calls:
            continue
        seen.add(name)
        todo.extend(calls[name])
    return seen


def _object_graph_functions(meta_graph) -> set[str]:
    graph = meta_graph.object_graph_def
    out = set(graph.concrete_functions)
    for node in graph.nodes:
        kind = node.WhichOneof("kind")
        if kind == "function":
            out.update(node.function.concrete_functions)
        elif kind == "bare_concrete_function":
            out.add(node.bare_concrete_function.concrete_function_name)
    return out


def _check_node(node, where, allowed, library, found) -> None:
    op = node.op
    if op in library:  # a call of a library function, checked on its own
        return
    if op not in allowed:
        found.append((f"op {op}", where, _why(op)))
    elif op == "PrintV2":
        stream = node.attr["output_stream"].s.decode(errors="replace")
        if stream not in PRINT_STREAMS:
            found.append((f"op {op}", where, f"prints to {stream!r}, which writes a file"))


def savedmodel_findings(proto) -> list[tuple[str, str, str]]:
    """``[("op NAME", where, why)]`` for every op of the SavedModel that is not allowed."""
    allowed = allowed_ops()
    found: list = []
    tf2 = len(proto.meta_graphs) == 1 and proto.meta_graphs[0].HasField("object_graph_def")
    for i, mg in enumerate(proto.meta_graphs):
        library = {f.signature.name: f for f in mg.graph_def.library.function}
        calls = {name: set().union(*(_calls(n, library) for n in f.node_def))
                 for name, f in library.items()}
        saver_nodes = set()
        if tf2 and mg.HasField("saver_def"):  # TF1 loaders run the saver: no exemption
            saver_nodes = {_node_name(mg.saver_def.save_tensor_name),
                           _node_name(mg.saver_def.restore_op_name)}
        saver_roots, other_roots = set(), _object_graph_functions(mg)
        for node in mg.graph_def.node:
            (saver_roots if node.name in saver_nodes else other_roots).update(
                _calls(node, library))
        saver_only = _reach(saver_roots, calls) - _reach(other_roots, calls)
        graph = "the graph" if len(proto.meta_graphs) == 1 else f"MetaGraph {i}"
        for node in mg.graph_def.node:
            _check_node(node, f"{graph} (node {node.name})", allowed, library, found)
        for name, fn in library.items():
            ok = allowed | SAVER_OPS if name in saver_only and _SAVER_FUNCTION.fullmatch(
                name) else allowed
            for node in fn.node_def:
                _check_node(node, f"function {name}", ok, library, found)
    return found


def check_savedmodel(path) -> None:
    """Refuse a SavedModel folder with a disallowed op (see the module docstring)."""
    proto = read_savedmodel(path)
    found = savedmodel_findings(proto)
    for i, (what, where, why) in enumerate(found):
        found[i] = (what, f"{where} of saved_model.pb", why)
    _refuse(path, found)


def savedmodel_leaves(path, leaves) -> list[str] | None:
    """The leaf names the SavedModel's graph gathers its ``label`` output from: a string
    constant holding exactly the names of ``leaves``, in the graph's order (``None`` when
    there is none).  A kmedtl.json whose leaf order differs names the probabilities
    wrongly (the label comes from the graph, the names from the metadata)."""
    want = sorted(map(str, leaves))
    found = None
    for mg in read_savedmodel(path).meta_graphs:
        nodes = list(mg.graph_def.node)
        for fn in mg.graph_def.library.function:
            nodes.extend(fn.node_def)
        for node in nodes:
            if node.op != "Const" or node.attr["dtype"].type != 7:  # DT_STRING
                continue
            t = node.attr["value"].tensor
            if len(t.string_val) != len(want) or [d.size for d in t.tensor_shape.dim] != \
                    [len(want)]:
                continue
            names = [v.decode(errors="replace") for v in t.string_val]
            if sorted(names) == want:
                if names == list(map(str, leaves)):
                    return names
                found = names
    return found


# ------------------------------------------------------------------------------ TFLite
def _tflite_schema():
    """The flatbuffer schema of the runtime that will load the file (LiteRT), else
    TensorFlow's copy."""
    try:
        from ai_edge_litert import schema_py_generated as schema  # lazy: kmedtl[export]
    except ImportError:
        if _TF_TFLITE_SCHEMA is None:
            raise ModelFileError("no TFLite schema: pip install ai-edge-litert") from None
        schema = _TF_TFLITE_SCHEMA
    return schema


def check_tflite(path) -> None:
    """Refuse a TFLite file with a custom (``Flex*`` or other) or unknown operator."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot be read ({_short(exc)})") from None
    broken = (f"{path}: not a readable TFLite flatbuffer; the file is damaged or not a "
              "TFLite model: re-export it (kmedtl export RUN_DIR --formats tflite)")
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ModelFileError(broken)
    schema = _tflite_schema()
    names = {v: k for k, v in vars(schema.BuiltinOperator).items()
             if not k.startswith("_") and isinstance(v, int)}
    found = []
    try:
        model = schema.Model.GetRootAs(data, 0)
        n = model.OperatorCodesLength()
        if n > MAX_TFLITE_OPCODES or n * 4 > len(data):
            raise ModelFileError(f"{broken} ({n} operator codes)")
        for i in range(n):
            code = model.OperatorCodes(i)
            op = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if op == schema.BuiltinOperator.CUSTOM:
                custom = (code.CustomCode() or b"").decode(errors="replace")[:80]
                why = ("is a TensorFlow op run by the Flex delegate (any TensorFlow op, file "
                       "ops included)" if custom.startswith("Flex") else
                       "is a custom op (native code kmedtl does not know)")
                found.append((f"op {custom or '(unnamed custom op)'}", "the operator codes",
                              why))
            elif op not in names or names[op] == "DELEGATE":
                found.append((f"op {names.get(op, f'#{op}')}", "the operator codes",
                              "is not a builtin operator of this LiteRT"))
    except ModelFileError:
        raise
    except (struct.error, IndexError, ValueError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{broken} ({_short(exc)})") from None
    _refuse(path, found)


# -------------------------------------------------------------------------------- ONNX
def _onnx_graphs(graph):
    """``graph`` and every subgraph in its nodes' attributes, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _onnx_graphs(attr.g)
            for g in attr.graphs:
                yield from _onnx_graphs(g)


def _onnx_tensors(graph):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def check_onnx(path) -> None:
    """Refuse an ONNX model with a custom domain, a model-local function, an unknown op or
    external data outside its folder."""
    import onnx  # lazy: an optional extra (kmedtl[export])

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf errors are many
        raise ModelFileError(f"{path}: not a readable ONNX model ({_short(exc)}); the file "
                             "is damaged or not ONNX: re-export it (kmedtl export RUN_DIR "
                             "--formats onnx)") from None
    found = []
    for fn in model.functions:
        found.append((f"function {fn.domain}:{fn.name}", "the model's local functions",
                      "is a model-local function (custom ops kmedtl does not know)"))
    folder = path.parent.resolve()
    for graph in _onnx_graphs(model.graph):
        where = f"graph {graph.name or '(unnamed)'}"
        for node in graph.node:
            domain = node.domain or ""
            name = f"{domain}:{node.op_type}" if domain else node.op_type
            if domain not in ONNX_DOMAINS:
                found.append((f"op {name}", where, f"is in the custom domain {domain!r}"))
            elif not onnx.defs.has(node.op_type, "" if domain == "ai.onnx" else domain):
                found.append((f"op {name}", where, "is not an ONNX standard op"))
        for t in _onnx_tensors(graph):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if not loc or os.path.isabs(loc):
                found.append((f"tensor {t.name}", where, f"reads external data from "
                              f"{loc!r}, not a file name relative to the model's folder"))
            elif ".." in Path(loc).parts or folder not in (folder / loc).resolve().parents:
                found.append((f"tensor {t.name}", where, f"reads external data from "
                              f"{loc!r}, outside the model's folder"))
    _refuse(path, found)


# ---------------------------------------------------------------------------- integrity
def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def model_digest(path) -> str:
    """SHA-256 of a model file, or of a SavedModel folder: every regular file's relative
    path and contents in sorted order, leaving out ``assets.extra/`` (metadata)."""
    path = Path(path)
    h = hashlib.sha256()
    if not path.is_dir():
        _hash_file(h, path)
        return h.hexdigest()
    files = []
    for root, dirs, names in os.walk(path):
        rel_root = Path(root).relative_to(path)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d != "assets.extra"]
        files += [Path(root) / n for n in names if (Path(root) / n).is_file()]
    for f in sorted(files, key=lambda p: p.relative_to(path).as_posix()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        _hash_file(h, f)
        h.update(b"\0")
    return h.hexdigest()


def recorded_digests(doc: dict) -> list[str]:
    """The model digests a metadata document records: ``model_sha256`` (kmedtl.json) or
    every ``formats.<name>.sha256`` (export.json)."""
    out = [doc["model_sha256"]] if isinstance(doc.get("model_sha256"), str) else []
    for entry in (doc.get("formats") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
            out.append(entry["sha256"])
    return out


def check_digest(path, doc: dict, source) -> None:
    """:class:`ModelFileError` when ``doc`` (the metadata read from ``source``) records
    digests and none is the model's; a metadata document without any is accepted with a
    warning (exports older than issue 21)."""
    want = recorded_digests(doc)
    name = Path(str(source)).name
    if not want:
        log.warning("%s records no digest of the model (an export older than this kmedtl), "
                    "so it cannot be checked against %s; re-export the run to record one",
                    source, path)
        return
    got = model_digest(path)
    if got in want:
        return
    if "model_sha256" in doc:
        raise ModelFileError(
            f"{path}: {source} belongs to another model: the model files' digest "
            f"sha256:{got[:16]} is not the sha256:{doc['model_sha256'][:16]} recorded in "
            f"{name} (a {name} copied from another export or version?); restore the {name} "
            "written with this model, or re-export the run")
    raise ModelFileError(
        f"{path}: {source} does not describe this model file: its digest "
        f"sha256:{got[:16]} is none of the {len(want)} recorded in {name} (a file from "
        "another export?); pass the metadata written with it (--metadata), or re-export")


def _short(exc, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text
    return text if len(text) <= limit else text[:limit] + " ..."


short_error = _short
