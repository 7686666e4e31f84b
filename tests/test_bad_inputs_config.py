"""Bad-input battery for the configuration and the model config: each refused before any process group, model
or output exists, with one line naming the key or file and the fix."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from battery import BadInput, check

ROOT = "{root}"  # replaced by the module's tmp dir (the fixture below builds its inputs)
TRAIN = "nemotune.recipes.lora_sft"

CASES = [
    BadInput("unknown_optimizer", [TRAIN, "trainer.optim.name=lion"],
             ["trainer.optim.name=lion", "use one of adamw, adam, sgd"]),
    BadInput("unknown_lora_variant", [TRAIN, "peft.lora.variant=fused"],
             ["peft.lora.variant=fused", "use one of canonical, nemo"]),
    BadInput("unknown_lora_target", [TRAIN, "peft.lora.target_modules=[qkv]"],
             ["peft.lora.target_modules", "['qkv']", "all-linear"]),
    BadInput("hf_path_without_config_json", [TRAIN, f"model.hf_path={ROOT}/empty_dir"],
             ["model.hf_path", "no config.json", "Hugging Face checkpoint directory"], guard=[Path(ROOT)]),
    BadInput("hf_path_of_another_architecture", [TRAIN, f"model.hf_path={ROOT}/mixtral"],
             ["model.hf_path", "config.json", "unsupported architecture", "LlamaForCausalLM"], guard=[Path(ROOT)]),
    BadInput("convert_another_architecture",
             ["nemotune.converters.convert", "hf-to-megatron", "--hf", f"{ROOT}/mixtral", "--out", f"{ROOT}/out"],
             ["mixtral/config.json", "unsupported architecture"], guard=[Path(ROOT)]),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_config")
    (root / "empty_dir").mkdir()
    (root / "mixtral").mkdir()
    (root / "mixtral" / "config.json").write_text(json.dumps(
        {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 176, "vocab_size": 1024}))
    return root


def placed(case: BadInput, root: Path) -> BadInput:
    def fill(value):
        return type(value)(str(value).replace(ROOT, str(root)))

    return dataclasses.replace(case, argv=[fill(a) for a in case.argv], needles=list(case.needles),
                               guard=[fill(g) for g in case.guard])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_config_input_is_refused_in_one_line(case, root):
    check(placed(case, root))
