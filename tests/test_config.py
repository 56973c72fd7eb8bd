"""Config loading: every shipped config validates; unknown keys and bad values are one-line errors."""

import glob
import os

import pytest

from entangle import config
from entangle.errors import ConfigError

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_shipped_config_loads(path):
    """Wherever the repository sits: a config whose data is not on this machine says so in one line, and loads
    with the user's own data."""
    try:
        cfg = config.load(path)
    except ConfigError as e:
        assert "is not there relative to this file; give your own on the command line" in str(e)
        cfg = config.load(path, ["data.train=synthetic:sentiment"])
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


@pytest.mark.parametrize("override, message", [
    ("optimizer.betas=[0.9,2.0]", "'optimizer.betas' must be in [0, 1)"),
    ("optimizer.weight_decay=-1", "'optimizer.weight_decay' must be in [0, inf)"),
    ("optimizer.eps=-1", "'optimizer.eps' must be in (0, inf)"),
    ("optimizer.momentum=-1", "'optimizer.momentum' must be in [0, 1]"),
    ("optimizer.lr=nan", "'optimizer.lr' must be in (0, inf)"),
    ("train.seed=-1", "'train.seed' must be in [0, 4294967296)"),
    ("model.lora.dropout=2", "'model.lora.dropout' must be in [0, 1)"),
    ("train.max_grad_norm=-1", "'train.max_grad_norm' must be in (0, inf) or null"),
    ("loss.params.beta=-0.1", "beta must be in (0, inf) (got -0.1)"),
    ("loss.params.beta=0", "beta must be in (0, inf) (got 0)"),
    ("train.save_every=-1", "'train.save_every' must be in [0, inf)"),
    ("train.eval_every=-1", "'train.eval_every' must be in [0, inf)"),
    ("train.epochs=-1", "'train.epochs' must be in (0, inf)"),
    ("model.lora.r=-4", "'model.lora.r' must be in [0, inf)"),
    ("train.max_nonfinite=0", "'train.max_nonfinite' must be at least 1"),
    ("eval.generate.top_p=0", "'eval.generate.top_p' must be in (0, 1]"),
    ("eval.generate.scorer=bleu", "unknown scorer 'bleu'"),
])
def test_values_that_would_silently_change_training_are_refused(override, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_every_numeric_key_has_a_declared_range_and_every_loss_hyper_parameter_too():
    from dataclasses import fields, is_dataclass

    from entangle import losses

    def numeric(cls, prefix=""):
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            if is_dataclass(default):
                yield from numeric(type(default), f"{prefix}{f.name}.")
            elif any(t in str(f.type) for t in ("int", "float")) and "Dict" not in str(f.type):
                yield f"{prefix}{f.name}"
    assert set(numeric(config.Config)) <= set(config.RANGES), set(numeric(config.Config)) - set(config.RANGES)
    for name in losses.names():
        s = losses.spec(name)
        for k, v in s.defaults.items():
            assert isinstance(v, bool) or (s.range(k) is not None and v in s.range(k)), (name, k)
    with pytest.raises(ValueError, match="needs a valid range"):
        losses.register(losses.LossSpec("unranged", loss=lambda p, weird: p.z, defaults={"weird": 1.0},
                                        uses_reference=False, length_normalized=False, citation="-"))


def test_input_paths_in_a_config_file_are_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text("")
    (tmp_path / "cfgs" / "c.yaml").write_text("data:\n  train: ../data/pairs.jsonl\n  eval: synthetic:sentiment\n")
    monkeypatch.chdir("/")
    cfg = config.load(str(tmp_path / "cfgs" / "c.yaml"), ["data.max_length=64"])
    assert cfg.data.train == str(tmp_path / "data" / "pairs.jsonl") and cfg.data.eval == "synthetic:sentiment"
    # overrides on the command line stay relative to the working directory
    assert config.load(str(tmp_path / "cfgs" / "c.yaml"), ["data.train=x.jsonl"]).data.train == "x.jsonl"


def test_own_training_data_never_meets_the_configs_built_in_eval_set(tmp_path):
    """configs/tiny-dpo.yaml evaluates on generated statements; with the user's own data.train and no data.eval,
    that set is dropped (the start-up line says there is none), never used as the user's held-out data."""
    import os

    tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny-dpo.yaml")
    own = config.load(tiny, ["data.train=my.jsonl"])
    assert own.data.train == "my.jsonl" and own.data.eval is None
    both = config.load(tiny, ["data.train=my.jsonl", "data.eval=my-test.jsonl"])
    assert both.data.eval == "my-test.jsonl"
    assert config.load(tiny).data.eval.startswith("synthetic:")


def test_a_home_path_and_an_unknown_section_read_as_users_expect():
    import os

    cfg = config.load(None, ["train.output_dir=~/runs/x", "data.train=~/pairs.jsonl"])
    assert cfg.train.output_dir == os.path.expanduser("~/runs/x") and not cfg.data.train.startswith("~")
    with pytest.raises(config.ConfigError, match="valid: data, diagnostics, eval, loss, model"):
        config.load(None, ["bogus=1"])


def test_a_config_whose_relative_data_is_elsewhere_says_what_to_change(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  train: ../nowhere/pairs.jsonl\n  eval: ../nowhere/test.jsonl\n")
    with pytest.raises(ConfigError, match=r"c.yaml: data.train=../nowhere/pairs.jsonl is not there relative to this "
                                          r"file; give your own on the command line \(data.train=PATH\)"):
        config.load(str(tmp_path / "c.yaml"))
    cfg = config.load(str(tmp_path / "c.yaml"), ["data.train=synthetic:sentiment"])   # own data: no eval set
    assert cfg.data.train == "synthetic:sentiment" and cfg.data.eval is None
