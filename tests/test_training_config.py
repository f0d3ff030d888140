"""The typed ``train:`` section: defaults, and errors that name train.<field> and the
allowed values (worded like kmedtl.config's)."""

import pytest
import yaml
from test_training_helpers import TINY, write_config  # noqa: F401  (registers TINY)

from kmedtl.config import load_config
from kmedtl.errors import ConfigError
from kmedtl.training import TrainSection, load_run_config, run_config, train_section


def test_defaults_and_overrides():
    cfg = train_section({"backbone": "CBR-Tiny", "strategy": "linear_probe"}, epochs=3)
    assert isinstance(cfg, TrainSection)
    assert cfg.backbone == "cbr_tiny"  # canonical registry name
    assert (cfg.epochs, cfg.optimizer, cfg.strategy, cfg.precision) == (3, "adam",
                                                                       "linear_probe", "auto")
    assert cfg.tune.tuner == "random" and cfg.tune.strategies == ["linear_probe", "fine_tune"]


def test_bad_choice_names_field_and_allowed_values():
    with pytest.raises(ConfigError) as e:
        train_section({"optimizer": "adagrad", "schedule": "cyclic"}, label="run.yaml")
    msg = str(e.value)
    assert "run.yaml" in msg
    assert "train.optimizer" in msg and "'adam'" in msg and "'sgd'" in msg and "'adagrad'" in msg
    assert "train.schedule" in msg and "'one_cycle'" in msg


def test_unknown_field_lists_train_fields_not_top_level_sections():
    with pytest.raises(ConfigError) as e:
        train_section({"lr": 0.1})
    msg = str(e.value)
    assert "train.lr: unknown field" in msg
    assert "'learning_rate'" in msg and "'unfreeze_at'" in msg
    assert "'output_dir'" not in msg  # not Config's top-level fields


def test_nested_tune_errors_are_named():
    with pytest.raises(ConfigError) as e:
        train_section({"tune": {"tuner": "grid", "max_trials": 0, "colour": 1}})
    msg = str(e.value)
    assert "train.tune.tuner" in msg and "'hyperband'" in msg and "'bayesian'" in msg
    assert "train.tune.max_trials" in msg
    assert "train.tune.colour: unknown field" in msg and "'objective'" in msg


def test_unknown_backbone_lists_families():
    with pytest.raises(ConfigError) as e:
        train_section({"backbone": "resnet5"})
    assert "train.backbone" in str(e.value) and "resnet50" in str(e.value)


@pytest.mark.parametrize("train, needle", [
    ({"strategy": "freeze"}, "train.freeze_below"),
    ({"strategy": "gradual"}, "train.unfreeze_at"),
    ({"strategy": "gradual", "unfreeze_at": [0.5, 0.3]}, "strictly increasing"),
    ({"strategy": "full", "unfreeze_at": [0.5]}, "'gradual' only"),
    ({"strategy": "fine_tune", "epochs": 1}, "train.head_epochs"),
    ({"reduce_lr": 2, "schedule": "one_cycle"}, "train.reduce_lr"),
    ({"lr_multipliers": [1.0]}, ">= 2"),
])
def test_cross_field_rules(train, needle):
    with pytest.raises(ConfigError, match=needle):
        train_section(train)


def test_yaml_train_section_is_validated_by_the_cli_loader(tmp_path):
    from kmedtl.training.cli import build_parser

    path = write_config(tmp_path, train={"precision": "half"})
    args = build_parser().parse_args(["train", str(path)])
    with pytest.raises(ConfigError) as e:
        args.func(args)
    assert "train.precision" in str(e.value) and "'mixed_bfloat16'" in str(e.value)
    assert str(path) in str(e.value)


def test_resolved_config_round_trips(tmp_path):
    from kmedtl.training import resolved_config

    path = write_config(tmp_path, train={"strategy": "linear_probe"})
    cfg = load_run_config(path)
    out = resolved_config(cfg, cfg.hierarchy())
    text = yaml.safe_dump(out, sort_keys=False)
    again = load_run_config(yaml.safe_load(text))
    assert again.train == cfg.train
    assert again == cfg.model_copy(update={"data": again.data})  # only the tree inlined
    assert again.hierarchy() == cfg.hierarchy()


# ------------------------------------------------------------------- RunConfig
def test_run_config_validates_train_at_load_and_names_the_file(tmp_path):
    path = write_config(tmp_path, train={"optimizer": "adagrad"})
    load_config(path)  # the data layer's Config does not look at train
    with pytest.raises(ConfigError) as e:
        load_run_config(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "train.optimizer" in msg and "adagrad" in msg


def test_run_config_cross_section_rules_at_load(tmp_path):
    """Normalisation and the backbone's smallest input are checked when the file loads,
    before any audit, cache or split would run."""
    path = write_config(tmp_path, data={"normalization": "imagenet"})
    with pytest.raises(ConfigError, match=r"data.normalization: .*set data.normalization: unit"):
        load_run_config(path)
    small = write_config(tmp_path / "s", train={"backbone": "efficientnet_lite0"},
                         data={"image": {"size": 16}})
    with pytest.raises(ConfigError, match=r"data.image.size: train.backbone "
                                          r"'efficientnet_lite0' needs images of at least"):
        load_run_config(small)
    tune = write_config(tmp_path / "t", data={"image": {"size": [40, 64]}},
                        train={"tune": {"backbones": [TINY, "inceptionv3"]}})
    with pytest.raises(ConfigError,
                       match=r"train.tune.backbones 'inceptionv3' needs images of at least 75x75"):
        load_run_config(tune)


def test_derive_validates_and_never_edits_the_original(tmp_path):
    cfg = load_run_config(write_config(tmp_path, train={"strategy": "linear_probe"}))
    before = cfg.model_dump()
    v = cfg.derive(train={"epochs": 3, "tune": {"max_trials": 2}})
    assert (v.train.epochs, v.train.tune.max_trials) == (3, 2)
    assert v.train.tune.tuner == cfg.train.tune.tuner  # nested sections merged, not replaced
    assert cfg.model_dump() == before
    # pydantic's model_copy(update=) would accept this; derive runs the validators again
    with pytest.raises(ConfigError, match="head_epochs"):
        cfg.derive(train={"strategy": "fine_tune", "epochs": 1})
    with pytest.raises(ConfigError, match="head_epochs"):
        cfg.train.derive(strategy="fine_tune", epochs=1)
    whole = cfg.derive(train=train_section({"backbone": TINY, "epochs": 2}))
    assert whole.train.epochs == 2 and whole.train.strategy == "full"
    assert run_config(cfg) is cfg
    assert run_config(load_config(write_config(tmp_path / "p", train={"epochs": 4}))
                      ).train.epochs == 4
