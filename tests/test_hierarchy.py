"""The label tree: YAML of any depth, encoding with masks, probabilities, errors."""

import numpy as np
import pytest
import yaml

from kmedtl.errors import HierarchyError
from kmedtl.hierarchy import Hierarchy

FLAT = "[cat, dog, bird]"

BRAIN = """
normal: [no_tumor]
tumor:
  glioma: [glioma_tumor]
  meningioma: [meningioma_tumor]
  pituitary: [pituitary_tumor]
"""

# Depth 3 with unequal leaf depth: ``normal`` is a depth-1 leaf, ``other`` depth 2,
# the rest depth 3.  Leaves are numbered in the YAML's (depth-first) order.
DEEP = """
normal: null
disease:
  benign:
    cyst: [simple_cyst, complex_cyst]
    lipoma: null
  malignant:
    glioma: [glioma_tumor]
    lymphoma: [lymphoma]
  other: [misc]
"""


def softmax_rows(rng, n, k):
    z = rng.normal(size=(n, k))
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# ---------------------------------------------------------------------------- structure
def test_flat_list_is_depth_one():
    h = Hierarchy.from_yaml(FLAT)
    assert h.leaves == ("cat", "dog", "bird")
    assert h.depth == 1 and h.is_flat
    assert h.parents == ("root",)
    assert h.levels == (("cat", "dog", "bird"),)
    enc = h.encode(["dog", "bird", "cat"])
    np.testing.assert_array_equal(enc["leaf"], [1, 2, 0])
    np.testing.assert_array_equal(enc["level_1"], [1, 2, 0])
    np.testing.assert_array_equal(enc["node:root"], [1, 2, 0])
    assert Hierarchy.flat(["cat", "dog", "bird"]) == h


def test_two_level_tree_structure_and_raw_labels():
    h = Hierarchy.from_yaml(BRAIN)
    assert h.leaves == ("normal", "glioma", "meningioma", "pituitary")
    assert h.depth == 2
    assert h.parents == ("root", "tumor")
    assert h.levels == (("normal", "tumor"), ("glioma", "meningioma", "pituitary"))
    assert h.path("meningioma") == ("tumor", "meningioma")
    assert h.path("normal") == ("normal",)
    # Raw labels from the data and the leaf's own name both map to the leaf.
    assert h.leaf_of("glioma_tumor") == "glioma"
    assert h.leaf_of("glioma") == "glioma"
    assert "no_tumor" in h and "tumour" not in h
    assert h.output_names == {"leaf": "leaf", "levels": ["level_1", "level_2"],
                              "nodes": ["root", "tumor"]}


def test_three_levels_with_unequal_leaf_depth():
    h = Hierarchy.from_yaml(DEEP)
    assert h.depth == 3
    assert h.leaves == ("normal", "cyst", "lipoma", "glioma", "lymphoma", "other")
    assert h.parents == ("root", "disease", "benign", "malignant")
    assert h.levels == (("normal", "disease"), ("benign", "malignant", "other"),
                        ("cyst", "lipoma", "glioma", "lymphoma"))
    assert h.path("lipoma") == ("disease", "benign", "lipoma")
    assert h.path("other") == ("disease", "other")
    assert h.leaf_of("complex_cyst") == "cyst"
    assert h.leaf_of("normal") == "normal"  # null leaf: its own name is its raw label


def test_from_yaml_file(tmp_path):
    f = tmp_path / "labels.yaml"
    f.write_text(BRAIN)
    assert Hierarchy.from_yaml(f) == Hierarchy.from_yaml(BRAIN)
    assert Hierarchy.from_yaml(str(f)) == Hierarchy.from_yaml(BRAIN)
    with pytest.raises(HierarchyError, match="not found"):
        Hierarchy.from_yaml(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------- encoding
def test_encode_and_masks_mark_inapplicable_targets():
    h = Hierarchy.from_yaml(DEEP)
    raw = ["normal", "misc", "simple_cyst", "lipoma", "glioma_tumor", "lymphoma"]
    enc = h.encode(raw)
    np.testing.assert_array_equal(enc["leaf"], [0, 5, 1, 2, 3, 4])
    np.testing.assert_array_equal(enc["level_1"], [0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(enc["level_2"], [-1, 2, 0, 0, 1, 1])
    np.testing.assert_array_equal(enc["level_3"], [-1, -1, 0, 1, 2, 3])
    np.testing.assert_array_equal(enc["node:root"], [0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(enc["node:disease"], [-1, 2, 0, 0, 1, 1])
    np.testing.assert_array_equal(enc["node:benign"], [-1, -1, 0, 1, -1, -1])
    np.testing.assert_array_equal(enc["node:malignant"], [-1, -1, -1, -1, 0, 1])
    assert set(enc) == {"leaf", "level_1", "level_2", "level_3", "node:root",
                        "node:disease", "node:benign", "node:malignant"}
    masks = Hierarchy.masks(enc)
    assert set(masks) == set(enc)
    np.testing.assert_array_equal(masks["level_3"], [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(masks["level_2"], [0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(masks["node:benign"], [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(masks["leaf"], np.ones(6))
    assert all(m.dtype == np.float32 for m in masks.values())
    # Every applicable node target names the child on the leaf's path.
    for i, leaf in enumerate(h.decode_leaf(enc["leaf"])):
        path = h.path(leaf)
        for parent, child in zip(("root", *path[:-1]), path):
            assert h.children(parent)[enc[f"node:{parent}"][i]] == child


def test_encode_unknown_label_message_lists_known_labels():
    h = Hierarchy.from_yaml(BRAIN)
    with pytest.raises(HierarchyError) as info:
        h.encode(["glioma_tumor", "meningioma_tumour"])
    msg = str(info.value)
    assert "'meningioma_tumour'" in msg
    for known in ("no_tumor", "glioma_tumor", "meningioma_tumor", "pituitary_tumor"):
        assert known in msg


# ---------------------------------------------------------------------------- probabilities
@pytest.mark.parametrize("spec", [FLAT, BRAIN, DEEP])
def test_leaf_probabilities_sum_to_one(spec):
    h = Hierarchy.from_yaml(spec)
    rng = np.random.default_rng(0)
    n = 7
    node_probs = {p: softmax_rows(rng, n, len(h.children(p))) for p in h.parents}
    leaf = h.leaf_probabilities(node_probs)
    assert leaf.shape == (n, len(h.leaves))
    assert np.all(leaf >= 0)
    np.testing.assert_allclose(leaf.sum(axis=1), 1.0, rtol=1e-6)


def test_leaf_probability_is_product_along_path():
    h = Hierarchy.from_yaml(BRAIN)
    node_probs = {"root": np.array([[0.2, 0.8]]), "tumor": np.array([[0.5, 0.3, 0.2]])}
    leaf = h.leaf_probabilities(node_probs)
    np.testing.assert_allclose(leaf, [[0.2, 0.8 * 0.5, 0.8 * 0.3, 0.8 * 0.2]])


def test_level_matrix_maps_leaves_to_ancestors():
    h = Hierarchy.from_yaml(DEEP)
    m1, m2, m3 = (h.level_matrix(k) for k in (1, 2, 3))
    assert m1.shape == (6, 2) and m2.shape == (6, 3) and m3.shape == (6, 4)
    # Every leaf has a depth-1 ancestor; shallower leaves have zero rows below their depth.
    np.testing.assert_array_equal(m1.sum(1), 1)
    np.testing.assert_array_equal(m2.sum(1), [0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(m3.sum(1), [0, 1, 1, 1, 1, 0])
    assert m2[h.leaves.index("lipoma"), h.levels[1].index("benign")] == 1
    assert m2[h.leaves.index("other"), h.levels[1].index("other")] == 1
    # leaf probabilities @ level matrix = the level's distribution (depth 1 sums to 1).
    rng = np.random.default_rng(1)
    probs = {p: softmax_rows(rng, 5, len(h.children(p))) for p in h.parents}
    leaf = h.leaf_probabilities(probs)
    np.testing.assert_allclose(leaf @ m1, probs["root"], rtol=1e-6)
    disease = probs["root"][:, 1:2]
    np.testing.assert_allclose(leaf @ m2, disease * probs["disease"], rtol=1e-6)


# ---------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("spec", [FLAT, BRAIN, DEEP])
def test_to_config_round_trip(spec):
    h = Hierarchy.from_yaml(spec)
    again = Hierarchy(h.to_config())
    assert again == h and hash(again) == hash(h)
    assert again.leaves == h.leaves and again.parents == h.parents
    assert again.raw_labels == h.raw_labels
    # The config is plain YAML-able data (it goes into a run's resolved config).
    via_yaml = Hierarchy.from_yaml(yaml.safe_dump(h.to_config(), sort_keys=False))
    assert via_yaml == h and via_yaml.leaves == h.leaves
    for leaf in h.leaves:
        assert via_yaml.path(leaf) == h.path(leaf)


def test_different_trees_are_not_equal():
    assert Hierarchy.from_yaml(BRAIN) != Hierarchy.from_yaml(
        BRAIN.replace("pituitary: [pituitary_tumor]", "pituitary: [pit]"))


def test_class_order_matters_for_equality():
    # Leaf order is the order of the model's outputs: the same classes in another
    # order must not compare equal (a model would silently swap its classes).
    a, b = Hierarchy(["cat", "dog"]), Hierarchy(["dog", "cat"])
    assert a.encode(["cat"])["leaf"][0] != b.encode(["cat"])["leaf"][0]
    assert a != b
    c = Hierarchy(["cat", "dog"])
    assert a == c and hash(a) == hash(c)


# ---------------------------------------------------------------------------- errors
def test_duplicate_node_name_is_refused():
    with pytest.raises(HierarchyError, match="'glioma' appears twice"):
        Hierarchy.from_yaml("glioma: [a]\ntumor:\n  glioma: [b]\n  other: [c]\n")


def test_raw_label_in_two_leaves_is_refused():
    with pytest.raises(HierarchyError, match="'x' maps to both 'a' and 'b'"):
        Hierarchy.from_yaml("a: [x, y]\nb: [x]\n")


def test_unknown_label_message_lists_known_labels():
    h = Hierarchy.from_yaml(BRAIN)
    with pytest.raises(HierarchyError) as info:
        h.leaf_of("tumour")
    msg = str(info.value)
    assert "'tumour' is not in the hierarchy" in msg
    assert "glioma_tumor" in msg and "no_tumor" in msg


@pytest.mark.parametrize("name", ["root", "leaf", "leaves", "label", "confidence"])
def test_reserved_names_are_refused(name):
    with pytest.raises(HierarchyError, match=f"'{name}' is reserved"):
        Hierarchy({name: ["a"], "other": ["b"]})


@pytest.mark.parametrize("spec", [{}, []])
def test_empty_tree_is_refused(spec):
    with pytest.raises(HierarchyError, match="empty"):
        Hierarchy(spec)


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n"])
def test_empty_yaml_is_refused(text):
    with pytest.raises(HierarchyError):
        Hierarchy.from_yaml(text)


@pytest.mark.parametrize("spec, match", [
    ({"only": ["x"]}, "at least two leaf classes"),
    ({"a": [], "b": ["y"]}, "needs at least one raw label"),
    ({"a": {}, "b": ["y"]}, "needs at least one child"),
    ({"bad name": ["x"], "b": ["y"]}, "may contain only"),
    ("a: [b, {c: d}]\nz: [q]", "must contain strings only"),
])
def test_malformed_trees_name_the_problem(spec, match):
    with pytest.raises(HierarchyError, match=match):
        Hierarchy.from_yaml(spec) if isinstance(spec, str) else Hierarchy(spec)


def test_invalid_yaml_is_a_hierarchy_error():
    with pytest.raises(HierarchyError, match="not valid YAML"):
        Hierarchy.from_yaml("a: [b\nc: d\n")
