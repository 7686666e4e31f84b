"""Bad-input battery for the model families: architectures nemotune does not build (DeciLM Super / Ultra,
Nemotron-H hybrids, MoE), and family settings the tables do not cover, each refused in one line that names the
config.json and the supported architectures or the key, before anything is written."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from battery import BadInput, check

CONVERT = "nemotune.converters.convert"
SUPPORTED = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, NemotronForCausalLM"
DENSE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=176, vocab_size=1024)
CONFIGS = {
    "decilm_super": {"architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", **DENSE},
    "nemotron_h": {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", **DENSE},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 8, **DENSE},
    "llama_with_experts": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_local_experts": 8,
                           **DENSE},
    "mistral_sliding_window": {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                               "sliding_window": 4096, "max_position_embeddings": 32768, **DENSE},
    "qwen2_sliding_window": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True,
                             "sliding_window": 4096, **DENSE},
    "nemotron_silu": {"architectures": ["NemotronForCausalLM"], "model_type": "nemotron", "hidden_act": "silu",
                      **DENSE},
    "qwen3_attention_bias": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": True,
                             **DENSE},
    "model_type_mismatch": {"architectures": ["Qwen2ForCausalLM"], "model_type": "llama", **DENSE},
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families_bad")
    for name, config in CONFIGS.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    return root


@dataclass
class ConvertCase:
    """`nemotune convert hf-to-megatron` on the checkpoint dir CONFIGS[name] (made per run under tmp)."""
    name: str
    needles: list[str]

    def bad_input(self, root: Path) -> BadInput:
        return BadInput(self.name, [CONVERT, "hf-to-megatron", "--hf", root / self.name, "--out",
                                    root / f"{self.name}.out"],
                        [f"{root / self.name / 'config.json'}", *self.needles], guard=[root])



CASES = [
    ConvertCase("decilm_super", ["DeciLMForCausalLM", SUPPORTED, "DeciLM"]),
    # Nemotron-H converts through its own table (converters/nemotron_h.py): a config without its Mamba fields
    ConvertCase("nemotron_h", ["config.json", "missing fields", "mamba_num_heads", "mamba_head_dim"]),
    ConvertCase("qwen3_moe", ["Qwen3MoeForCausalLM", SUPPORTED, "MoE"]),
    ConvertCase("llama_with_experts", ["num_local_experts=8", "mixture-of-experts", SUPPORTED]),
    ConvertCase("mistral_sliding_window", ["sliding_window 4096", "null"]),
]
# the same refusals from the config reader in-process (each subprocess row costs seconds of megatron imports)
IN_PROCESS = {
    "qwen2_sliding_window": ["sliding-window", "null"],
    "nemotron_silu": ["hidden_act 'silu'", "NemotronForCausalLM", "'relu2'"],
    "qwen3_attention_bias": ["attention_bias", "false"],
    "model_type_mismatch": ["Qwen2ForCausalLM", "model_type 'llama'", SUPPORTED],
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_refused_in_one_line(case, dirs):
    check(case.bad_input(dirs))


@pytest.mark.parametrize("name", sorted(IN_PROCESS))
def test_config_reader_refuses_in_one_line(name, dirs):
    from nemotune.converters.formats.hf_config import ModelConfigError, load_hf_config

    with pytest.raises(ModelConfigError) as info:
        load_hf_config(dirs / name)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(dirs / name / "config.json"))
    for needle in IN_PROCESS[name]:
        assert needle in message, (needle, message)
