"""Each default once: the dataclasses in recipes/engine/config.py (and DataConfig, ClusterConfig) hold every
default, a group file in conf/ states only what its choice changes, and `trainer.optim.name` is honoured."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from nemotune.data_prep.config import DataConfig
from nemotune.launchers.config import ClusterConfig
from nemotune.recipes.engine.config import (ConfigError, ModelConfig, ParallelConfig, PeftConfig, TrainerConfig,
                                            compose, validate)

CONF = Path(__file__).resolve().parents[1] / "conf"
SCHEMAS = {"model": ModelConfig, "data": DataConfig, "peft": PeftConfig, "parallel": ParallelConfig,
           "trainer": TrainerConfig, "cluster": ClusterConfig}
IDENTITY_KEYS = {"name", "kind", "peft_scheme"}  # what a group file is, stated even where it is the default


def restated(values: dict, defaults: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in values.items():
        if key == "defaults" or key not in defaults:
            continue
        default = defaults[key]
        if isinstance(value, dict) and isinstance(default, dict) and default:
            found += restated(value, default, f"{prefix}{key}.")
        elif value == default and key not in IDENTITY_KEYS:
            found.append(f"{prefix}{key}: {value!r}")
    return found


@pytest.mark.parametrize("path", sorted(p for group in SCHEMAS for p in (CONF / group).glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_group_files_state_no_dataclass_default(path):
    values = OmegaConf.to_container(OmegaConf.load(path)) or {}
    defaults = OmegaConf.to_container(OmegaConf.structured(SCHEMAS[path.parent.name]))
    assert restated(values, defaults) == [], f"{path}: drop the keys equal to the dataclass default"


def test_validation_interval_has_one_default():
    # the tiny experiments and the demo validate twice an epoch; the dataclass is where that is said
    assert compose("lora_sft").trainer.sft.val_check_interval == 0.5
    assert compose("lora_sft", ["experiment=tiny_tp2"]).trainer.sft.val_check_interval == 0.5


@pytest.mark.parametrize("name, optimizer, decoupled", [("adamw", "adam", True), ("adam", "adam", False),
                                                        ("sgd", "sgd", False)])
def test_optimizer_name_is_honoured(name, optimizer, decoupled):
    from nemotune.recipes.engine.builders import optimizer_config

    cfg = compose("lora_sft", [f"trainer.optim.name={name}", "trainer.optim.momentum=0.5"])
    config = optimizer_config(cfg, SimpleNamespace(bf16=False, params_dtype=torch.float32))
    assert (config.optimizer, config.decoupled_weight_decay) == (optimizer, decoupled)
    if name == "sgd":
        assert config.sgd_momentum == 0.5


def test_unknown_optimizer_is_refused_with_key_and_fix():
    with pytest.raises(ConfigError) as err:
        validate(compose("lora_sft", ["trainer.optim.name=lion"]), check_files=False)
    assert err.value.problems == ["trainer.optim.name=lion: not an optimizer megatron-core provides here; "
                                  "use one of adamw, adam, sgd"]
