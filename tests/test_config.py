"""Typed YAML config: errors name the field and the allowed values."""

import pytest

from kmedtl.config import dataset_path, load_config
from kmedtl.errors import ConfigError, DatasetNotFoundError


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_valid_config_resolves_relative_paths_and_builds_objects(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "h.yaml").write_text("normal: [no_tumor]\ntumor: {glioma: [glioma_tumor]}\n")
    cfg = load_config(_write(tmp_path, "data:\n  root: data\n  hierarchy: h.yaml\n"
                                       "  image: {size: 64, channels: 3}\n"
                                       "  dicom: {window: [40, 80], frames: all}\n"))
    assert cfg.data.root == str(tmp_path / "data")
    opts = cfg.image_options()
    assert opts.size == (64, 64) and opts.channels == 3 and opts.window == (40.0, 80.0)
    assert cfg.hierarchy().leaves == ("normal", "glioma")


def test_bad_enum_names_field_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "data:\n  root: x\n  dicom: {window: lungs}\n"))
    msg = str(e.value)
    assert "c.yaml" in msg and "data.dicom.window" in msg
    assert "'lung'" in msg and "'brain'" in msg and "'lungs'" in msg


def test_unknown_field_lists_allowed_fields(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "data:\n  root: x\n  colour: 3\n"))
    assert "data.colour" in str(e.value) and "cache_dir" in str(e.value)


def test_several_errors_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "data: {root: x, image: {channels: 2}}\n"
                                     "split: {method: loo, test: 1.5}\n"))
    msg = str(e.value)
    for field in ("data.image.channels", "split.method", "split.test"):
        assert field in msg


def test_missing_environment_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("KMEDTL_DATASETS", raising=False)
    with pytest.raises(ConfigError, match="KMEDTL_DATASETS is not set"):
        load_config(_write(tmp_path, "data: {root: '${KMEDTL_DATASETS}/brain-tumor-mri'}\n"))


def test_environment_variable_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("KMEDTL_DATASETS", str(tmp_path))
    cfg = load_config(_write(tmp_path, "data: {root: '${KMEDTL_DATASETS}/x'}\n"))
    assert cfg.data.root == str(tmp_path / "x")


def test_source_requires_its_path(tmp_path):
    with pytest.raises(ConfigError, match="data.manifest is required"):
        load_config(_write(tmp_path, "data: {source: manifest}\n"))


def test_bad_hierarchy_is_reported_as_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.hierarchy"):
        load_config(_write(tmp_path, "data: {root: x, hierarchy: {a: [], b: null}}\n"))


def test_dataset_path_messages(tmp_path, monkeypatch):
    monkeypatch.delenv("KMEDTL_DATASETS", raising=False)
    with pytest.raises(DatasetNotFoundError, match="KMEDTL_DATASETS is not set"):
        dataset_path("brain-tumor-mri")
    monkeypatch.setenv("KMEDTL_DATASETS", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="brain-tumor-mri"):
        dataset_path("brain-tumor-mri")
