"""Config as data: TOML loading, --set overrides, validation errors that name the field, the written config."""
import tomllib

import pytest

from ndtrain.launch.errors import UsageError
from ndtrain.launch.config import (Config, ConfigError, apply_overrides, config_hash, from_dict, load_config,
                                   model_options, parse_value, validate, write_config)


def test_defaults_validate_and_roundtrip_through_toml(tmp_path):
    cfg = validate(Config())
    write_config(cfg, tmp_path / "config.toml")
    with open(tmp_path / "config.toml", "rb") as f:
        data = tomllib.load(f)
    assert data["run"]["batch_size"] == cfg.run.batch_size and data["optim"]["betas"] == [0.9, 0.999]
    again = from_dict(data)
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_load_toml_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[run]\ntask = "digits"\nsteps = 50\n[model]\nhidden = [32]\n[optim]\nlr = 1\n')
    cfg = validate(load_config(p))
    assert cfg.run.task == "digits" and cfg.run.steps == 50 and cfg.model == {"hidden": [32]}
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int widened to float


@pytest.mark.parametrize("text, field", [
    ('[run]\nstepz = 5\n', "run.stepz"),
    ('[run]\nsteps = "many"\n', "run.steps"),
    ('[run]\nsteps = 0\n', "run.steps"),
    ('[optim]\nlr = -1.0\n', "optim.lr"),
    ('[runn]\nsteps = 1\n', "runn"),
    ('[run]\nbackend = "slurm"\n', "run.backend"),
    ('[run]\nsteps = true\n', "run.steps"),
])
def test_bad_file_names_the_field(tmp_path, text, field):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        validate(load_config(p))
    assert str(e.value).startswith(field) and isinstance(e.value, UsageError)


def test_unreadable_file_names_the_file(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[run\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_config(p)
    with pytest.raises(ConfigError, match="missing.toml"):
        load_config(tmp_path / "missing.toml")


def test_parse_value_toml_literals_then_string():
    assert parse_value("3") == 3 and parse_value("1e-3") == 1e-3 and parse_value("true") is True
    assert parse_value("[64, 64]") == [64, 64] and parse_value("relu") == "relu"
    assert parse_value('"3"') == "3" and parse_value("{a = 1}") == {"a": 1}


def test_overrides():
    cfg = Config()
    apply_overrides(cfg, ["optim.lr=0.01", "run.steps=7", "model.hidden=[8, 8]", "model.activation=tanh",
                          "optim.schedule_kwargs.warmup_steps=5", "optim.schedule_kwargs.min_lr=0.0"])
    validate(cfg)
    assert cfg.optim.lr == 0.01 and cfg.run.steps == 7
    assert cfg.model == {"hidden": [8, 8], "activation": "tanh"}
    assert cfg.optim.schedule_kwargs == {"warmup_steps": 5, "min_lr": 0.0}


@pytest.mark.parametrize("item, field", [
    ("optim.lrr=1", "optim.lrr"), ("run.steps=abc", "run.steps"), ("nosuch.x=1", "nosuch"),
    ("steps=3", "--set steps"), ("run.steps", "--set 'run.steps'"), ("optim.betas=[0.9]", "optim.betas"),
    ("run.workers=2", "run.workers"),
])
def test_bad_overrides_name_the_field(item, field):
    with pytest.raises(ConfigError) as e:
        validate(apply_overrides(Config(), [item]))
    assert str(e.value).startswith(field)


def test_hash_changes_with_any_field():
    a, b = Config(), Config()
    assert config_hash(a) == config_hash(b)
    b.optim.lr = 2e-3
    assert config_hash(a) != config_hash(b)


def test_model_options():
    defaults = {"hidden": [64], "activation": "relu", "dropout": 0.0}
    assert model_options({"hidden": [4], "dropout": 0}, defaults, "mlp") == {"hidden": [4], "activation": "relu",
                                                                             "dropout": 0.0}
    with pytest.raises(ConfigError, match="^model.depth: unknown key for model 'mlp'"):
        model_options({"depth": 3}, defaults, "mlp")
    with pytest.raises(ConfigError, match=r"^model.hidden\[1\]"):
        model_options({"hidden": [4, "x"]}, defaults, "mlp")
    with pytest.raises(ConfigError, match="^model.activation"):
        model_options({"activation": 3}, defaults, "mlp")
