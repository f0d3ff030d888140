"""Function-level imports are kept only where they keep a heavy dependency out of a module
(issue 12).  Tool-free: ``ast`` only, nothing is imported.

The rule
--------
An ``import`` inside a function (or method, or lambda) is allowed only when both hold:

1. **It defers something heavy that the importer may go without.**  The imported module,
   run at module level, needs a *heavy dependency* that the importing module does not
   already load at module level, and the importer is one that must work without it:

   - the optional extras (``tf2onnx``, ``onnxruntime``, LiteRT, ``tensorflow_serving``/
     ``grpc``, ``tensorflow_io``, Apache Beam, ``dicomweb_client``/``requests``, ``torch``,
     ``jax``): any module may defer them;
   - ``keras`` and ``tensorflow``: only the :data:`LIGHT` modules, which the pure-data
     commands (``kmedtl data``, ``kmedtl weights``, ``--help``) run on without either
     (``tests/test_reliability_cli.py`` checks it at run time);
   - ``tensorflow``: also the :data:`JAX_PATH` modules, which train, evaluate and reload
     models on a ``KERAS_BACKEND=jax`` machine without TensorFlow
     (``tests/test_jax_backend.py``).

   Importing ``keras_tuner`` loads Keras and TensorFlow, so it follows their rules.
2. **It says so**: ``# lazy: <why>`` on the import's first line or the line above it.

Everything else -- the standard library, required dependencies (NumPy, scikit-learn,
SciPy, pydicom, Pillow, Matplotlib, PyYAML, h5py ...) and kmedtl's own modules that load
nothing heavier than their importer -- is imported at the top of the module, where a
reader (and ``tests/test_import_graph.py``) sees it.

"Needs at module level" follows the import for real: a module's module-level imports, the
package ``__init__`` files that run before it, and, transitively, theirs.

``importlib.import_module`` hides an import from both tests, so it is allowed only in the
places listed in :data:`IMPORT_MODULE_CALLS`, each with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_import_graph import PACKAGE_ROOT, _modules, _write, from_module

#: Third-party roots that are heavy, with what importing each of them loads.
HEAVY: dict[str, frozenset[str]] = {
    "tensorflow": frozenset({"tensorflow"}),
    "keras": frozenset({"keras"}),
    "keras_tuner": frozenset({"keras_tuner", "keras", "tensorflow"}),
    "tensorboard": frozenset({"tensorboard"}),
    "tf2onnx": frozenset({"tf2onnx", "tensorflow"}),
    "onnxruntime": frozenset({"onnxruntime"}),
    "onnx": frozenset({"onnx"}),  # with tf2onnx (kmedtl[export]): kmedtl.export.trust
    "ai_edge_litert": frozenset({"ai_edge_litert"}),
    "tensorflow_serving": frozenset({"tensorflow_serving", "tensorflow"}),
    "grpc": frozenset({"grpc"}),
    "tensorflow_io": frozenset({"tensorflow_io", "tensorflow"}),
    "apache_beam": frozenset({"apache_beam"}),
    "dask": frozenset({"dask"}),  # Beam's DaskRunner (kmedtl[beam] brings apache-beam[dask])
    "dicomweb_client": frozenset({"dicomweb_client", "requests"}),
    "requests": frozenset({"requests"}),
    "dicomanonymizer": frozenset({"dicomanonymizer"}),  # the DICOMweb store's PS3.15 table
    "torch": frozenset({"torch"}),
    "jax": frozenset({"jax"}),
}

#: Extras that any module may import lazily (not in ``install_requires``).
OPTIONAL = frozenset({"tf2onnx", "onnx", "onnxruntime", "ai_edge_litert", "tensorflow_serving",
                      "grpc", "tensorflow_io", "apache_beam", "dask", "dicomweb_client", "requests",
                      "dicomanonymizer", "torch", "jax"})
#: Modules (and packages, with everything in them) that load neither Keras nor TensorFlow.
LIGHT = ("kmedtl", "kmedtl.cli", "kmedtl.config", "kmedtl.schema", "kmedtl.errors",
         "kmedtl.jsonio", "kmedtl.hierarchy", "kmedtl.data.", "kmedtl.pretrained.")
#: Packages that run without TensorFlow under ``KERAS_BACKEND=jax``.
JAX_PATH = ("kmedtl.models.", "kmedtl.training.", "kmedtl.evaluation.", "kmedtl.run_folder")


#: LIGHT modules that do load one of them, by nature; the light modules reach them only
#: through a ``# lazy:`` import.
LIGHT_EXCEPTIONS = {
    "kmedtl.data.pipeline": ["tensorflow"],  # the tf.data input pipeline
}
#: JAX_PATH modules that do need TensorFlow: KerasTuner imports it.
JAX_PATH_EXCEPTIONS = ["kmedtl.training.tuning"]


def _in(name: str, prefixes) -> bool:
    return any(name == p.rstrip(".") or (p.endswith(".") and name.startswith(p))
               for p in prefixes)


def may_defer(importer: str) -> frozenset[str]:
    """The heavy dependencies ``importer`` is allowed to import lazily."""
    allowed = set(OPTIONAL)
    if _in(importer, LIGHT):
        allowed |= {"keras", "tensorflow", "keras_tuner", "tensorboard"}
    if _in(importer, JAX_PATH):
        allowed |= {"tensorflow"}
    return frozenset(allowed)


#: (module, reason) for every allowed ``importlib.import_module`` call.
IMPORT_MODULE_CALLS = {
    "kmedtl.cli": "registers a stage's subcommands only when the command line names it",
    "kmedtl.pretrained.store": "the weights wheel named by the catalog (an optional extra)",
    "kmedtl.training.tuning": "checks that tensorboard imports, to fail before any trial",
}

MARK = "# lazy:"


def _is_function(node) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))


def _imports(tree: ast.Module):
    """(import node, at_module_level) for every import statement in ``tree``."""
    found = []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            walk(child, in_function or _is_function(child))

    walk(tree, False)
    return found


#: Third-party submodules that load another (optional) package: counted as that package.
VIA = {"apache_beam.runners.dask": "dask"}


def _third_party(name: str) -> str:
    for prefix, package in VIA.items():
        if name == prefix or name.startswith(prefix + "."):
            return package
    return name.split(".")[0]


def _targets(node, src: str, is_pkg: bool, modules) -> list[str]:
    """Module names an import statement loads: kmedtl modules by full name, anything
    else by its top-level package name (or the package it loads, :data:`VIA`)."""
    if isinstance(node, ast.Import):
        return [a.name if a.name.startswith("kmedtl") else _third_party(a.name)
                for a in node.names]
    module = from_module(node, src, is_pkg)
    if not module.startswith("kmedtl"):
        return [_third_party(module)]
    out = []
    for alias in node.names:
        sub = f"{module}.{alias.name}"
        out.append(sub if sub in modules else module)
    return out


class Graph:
    def __init__(self, root: Path = PACKAGE_ROOT):
        self.modules = _modules(root)
        self.trees = {name: ast.parse(path.read_text(), str(path))
                      for name, (path, _) in self.modules.items()}
        self.lines = {name: path.read_text().splitlines()
                      for name, (path, _) in self.modules.items()}
        self.top_level: dict[str, set[str]] = {}
        for name, tree in self.trees.items():
            is_pkg = self.modules[name][1]
            deps = set()
            for node, in_function in _imports(tree):
                if not in_function:
                    deps.update(_targets(node, name, is_pkg, self.modules))
            deps.discard(name)
            self.top_level[name] = deps
        self._heavy: dict[str, frozenset[str]] = {}

    def parents(self, name: str) -> list[str]:
        """The package faces that run before ``name`` (``kmedtl.a`` for ``kmedtl.a.b``)."""
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))]

    def heavy(self, name: str) -> frozenset[str]:
        """Heavy dependencies loaded by importing ``name`` (a kmedtl module or a
        third-party top-level package)."""
        if not name.startswith("kmedtl"):
            return HEAVY.get(name, frozenset())
        if name in self._heavy:
            return self._heavy[name]
        self._heavy[name] = frozenset()  # cycle guard (there are none: see the graph test)
        found: set[str] = set()
        for dep in [*self.parents(name), *self.top_level[name]]:
            found |= self.heavy(dep)
        self._heavy[name] = frozenset(found)
        return self._heavy[name]

    def function_level(self):
        """(module, line number, target, what it defers, commented) per function-level
        import target."""
        seen = set()
        for name, tree in self.trees.items():
            is_pkg = self.modules[name][1]
            lines = self.lines[name]
            for node, in_function in _imports(tree):
                if not in_function:
                    continue
                here = lines[node.lineno - 1]
                above = lines[node.lineno - 2] if node.lineno > 1 else ""
                commented = MARK in here or above.strip().startswith(MARK)
                for target in _targets(node, name, is_pkg, self.modules):
                    if target == name or (name, node.lineno, target) in seen:
                        continue
                    seen.add((name, node.lineno, target))
                    deferred = (self.heavy(target) - self.heavy(name)) & may_defer(name)
                    yield name, node.lineno, target, deferred, commented

    def import_module_calls(self):
        for name, tree in self.trees.items():
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "import_module"):
                    yield name, node.lineno


@pytest.fixture(scope="module")
def graph():
    return Graph()


def test_function_level_imports_defer_something_heavy(graph):
    pointless = [f"{m}:{line} imports {t} (defers nothing heavy: move it to the top)"
                 for m, line, t, deferred, _ in graph.function_level() if not deferred]
    assert not pointless, "\n".join(pointless)


def test_function_level_imports_say_why(graph):
    silent = [f"{m}:{line} imports {t} without a '{MARK} ...' comment"
              for m, line, t, deferred, commented in graph.function_level()
              if deferred and not commented]
    assert not silent, "\n".join(silent)


def test_import_module_only_where_listed(graph):
    calls = sorted({m for m, _ in graph.import_module_calls()})
    assert calls == sorted(IMPORT_MODULE_CALLS), calls


def test_light_modules_stay_light(graph):
    """The modules the pure-data commands run on load neither Keras nor TensorFlow at
    module level (test_reliability_cli.py checks the commands at run time)."""
    heavy = {name: sorted(graph.heavy(name) & {"keras", "tensorflow"})
             for name in graph.modules if _in(name, LIGHT)}
    assert {n: h for n, h in heavy.items() if h} == LIGHT_EXCEPTIONS


def test_jax_path_needs_no_tensorflow(graph):
    heavy = [n for n in graph.modules if _in(n, JAX_PATH) and "tensorflow" in graph.heavy(n)]
    assert sorted(heavy) == sorted(JAX_PATH_EXCEPTIONS)


def test_the_rule_on_a_small_package(tmp_path):
    root = _write(tmp_path, {
        "kmedtl/__init__.py": "",
        "kmedtl/light.py": "import json\n",
        "kmedtl/heavy.py": "import tensorflow as tf\n",
        "kmedtl/face/__init__.py": "import keras\n",
        "kmedtl/face/part.py": "",
        "kmedtl/data/__init__.py": "",
        "kmedtl/data/user.py": (                                 # a LIGHT module
            "import numpy\n"
            "def a():\n    import json\n"                       # stdlib: pointless
            "def b():\n    from kmedtl import light\n"          # light module: pointless
            "def c():\n    from kmedtl.heavy import tf  # lazy: TF-free module\n"
            "def d():\n    # lazy: keras only when used\n    from kmedtl.face import part\n"
            "def e():\n    import tf2onnx\n"),                   # heavy, no comment
        "kmedtl/data/tfuser.py": "import tensorflow\ndef f():\n    from kmedtl import heavy\n",
        "kmedtl/export.py": "def f():\n    from kmedtl import heavy  # lazy: TF\n",
        "kmedtl/models/__init__.py": "",
        "kmedtl/models/m.py": "import keras\ndef f():\n    from kmedtl import heavy  # lazy\n",
    }).with_name("kmedtl")
    g = Graph(root)
    rows = {(m, t): (sorted(d), c) for m, _, t, d, c in g.function_level()}
    assert rows[("kmedtl.data.user", "json")] == ([], False)
    assert rows[("kmedtl.data.user", "kmedtl.light")] == ([], False)
    assert rows[("kmedtl.data.user", "kmedtl.heavy")] == (["tensorflow"], True)
    # a submodule of a package whose __init__ loads Keras defers Keras
    assert rows[("kmedtl.data.user", "kmedtl.face.part")] == (["keras"], True)
    assert rows[("kmedtl.data.user", "tf2onnx")] == (["tensorflow", "tf2onnx"], False)
    # the importer already loads TensorFlow: deferring a TF module defers nothing
    assert rows[("kmedtl.data.tfuser", "kmedtl.heavy")] == ([], False)
    # outside LIGHT and JAX_PATH, TensorFlow is not a reason to import lazily ...
    assert rows[("kmedtl.export", "kmedtl.heavy")] == ([], True)
    # ... on the JAX path it is
    assert rows[("kmedtl.models.m", "kmedtl.heavy")] == (["tensorflow"], False)
    assert g.heavy("kmedtl.face.part") == {"keras"}  # its package __init__ runs first
