"""Bad-input battery for Nemotron-H: unsupported hybrid layouts, an incomplete checkpoint, the verbs that do not
apply to the hybrid model and what training refuses for it (packed data, LoRA on Mamba out_proj) are refused in one
line naming the file, key or verb, writing nothing."""

from __future__ import annotations

import json

import pytest
import torch

from battery import BadInput, check

TINY = dict(architectures=["NemotronHForCausalLM"], model_type="nemotron_h", vocab_size=96, hidden_size=32,
            hybrid_override_pattern="M*M-", num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=48, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, chunk_size=4)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("nemotronh_bad")
    for name, config in (("moe", {**TINY, "hybrid_override_pattern": "M*ME"}), ("incomplete", TINY)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    save_file({"backbone.embeddings.weight": torch.zeros(96, 32)}, str(root / "incomplete" / "model.safetensors"))
    (root / "moe" / "model.safetensors").write_bytes(b"")
    return root


def _cases(root):
    convert = "nemotune.converters.convert"
    return [
        BadInput("moe-pattern", [convert, "hf-to-megatron", "--hf", root / "moe", "--out", root / "out_moe"],
                 [str(root / "moe" / "config.json"), "MoE layers"], guard=[root]),
        BadInput("missing-tensors", [convert, "hf-to-megatron", "--hf", root / "incomplete", "--out",
                                     root / "out_incomplete"],
                 [str(root / "incomplete"), "lacks", "model.layers.0.norm.weight"],
                 guard=[root]),
        BadInput("train-packed", ["nemotune.recipes.lora_sft", "experiment=tiny_lora", "model=nemotron_nano_9b_v2"],
                 ["data.packing=true", "Mamba-2", "data.packing=false"]),
        BadInput("train-out-proj-lora", ["nemotune.recipes.lora_sft", "experiment=tiny_lora", "model=nemotron_nano_9b_v2",
                                         "data.packing=false", "peft.lora.target_modules=[in_proj,out_proj]"],
                 ["peft.lora.target_modules", "out_proj", "no HF PEFT export"]),
        BadInput("plan-hybrid", ["nemotune.recipes.plan", "experiment=tiny_lora", "model=nemotron_nano_9b_v2"],
                 ["model.hf_config", "Nemotron-H", "`nemotune train`"]),
        BadInput("hf-to-nemo", [convert, "hf-to-nemo", "--hf", root / "incomplete", "--out", root / "x.nemo"],
                 ["hf-to-nemo: not available for Nemotron-H"], guard=[root]),
    ]


# the rows need the module's input folder: parametrized by name, built from it
CASE_NAMES = [case.name for case in _cases(__import__("pathlib").Path("/nonexistent"))]


@pytest.mark.parametrize("name", CASE_NAMES, ids=lambda name: name)
def test_bad_input(name, inputs):
    check({case.name: case for case in _cases(inputs)}[name])
