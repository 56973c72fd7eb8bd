"""Config loading: every shipped config validates; unknown keys and bad values are one-line errors."""

import glob
import os

import pytest

from entangle import config
from entangle.errors import ConfigError

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_shipped_config_loads(path):
    cfg = config.load(path)
    assert cfg.loss.name and cfg.model.name


def test_overrides_apply_and_defaults_hold():
    cfg = config.load(None, ["train.max_steps=7", "loss.name=simpo", "loss.params.beta=2.5"])
    assert cfg.train.max_steps == 7 and cfg.loss.params.beta == 2.5 and cfg.train.batch_size == 4
    assert config.reference_type(cfg) == "none"
    assert config.reference_type(config.load(None, [])) == "frozen"


@pytest.mark.parametrize("override, message", [
    ("train.batchsize=3", "unknown config key 'train.batchsize'; did you mean 'train.batch_size'?"),
    ("trian.max_steps=3", "unknown config key 'trian'"),
    ("train.max_steps=many", "config key 'train.max_steps'"),
    ("reference.type=moving", "valid: auto, frozen, precomputed, none"),
    ("loss.name=dpoo", "unknown loss 'dpoo'; valid names:"),
    ("loss.params.gamma=1", "valid: beta, label_smoothing"),
    ("tracking.report_to=[comet]", "valid: tensorboard, wandb, mlflow"),
    ("train.batch_size=0", "at least 1"),
    ("nonsense", "must look like key=value"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_reference_must_match_the_loss():
    with pytest.raises(ConfigError, match="uses no reference"):
        config.load(None, ["loss.name=simpo", "reference.type=frozen"])
    with pytest.raises(ConfigError, match="needs a reference"):
        config.load(None, ["loss.name=dpo", "reference.type=none"])


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  batch_size: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(str(p))
    p.write_text("model:\n  nmae: tiny\n")
    with pytest.raises(ConfigError, match="did you mean 'model.name'"):
        config.load(str(p))
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(str(tmp_path / "missing.yaml"))
