"""Bad inputs to `nemotune export`: each refused in one line naming the path and the command that fits, nothing
written. An adapter-only (LoRA) checkpoint is no full model and a full-model checkpoint is no adapter; an adapter
dir in nemotune's older schema must be complete; an export never replaces what it did not write.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
from battery import BadInput, check

from nemotune.converters.formats import adapters as adapter_io
from nemotune.converters.tiny_model import tiny_hf_config

EXPORT = "nemotune.converters.export"

CASES = [
    BadInput("full_export_of_a_lora_checkpoint",
             (EXPORT, "hf", "--checkpoint", "{lora_step}", "--out", "{root}/out_hf"),
             ("{lora_step}", "adapter-only checkpoint", "nemotune export hf-peft --adapter {lora_step}/adapter")),
    BadInput("full_nemo_export_of_an_adapter_dir",
             (EXPORT, "nemo", "--checkpoint", "{lora_step}/adapter", "--out", "{root}/out.nemo"),
             ("{lora_step}/adapter", "adapter-only checkpoint", "nemotune export merge")),
    BadInput("adapter_export_of_a_full_checkpoint",
             (EXPORT, "hf-peft", "--adapter", "{full_step}", "--out", "{root}/out_peft"),
             ("{full_step}", "full-model checkpoint", "nemotune export hf --checkpoint {full_step}")),
    BadInput("lora_nemo_export_of_a_megatron_dir",
             (EXPORT, "nemo", "--adapter", "{megatron}", "--out", "{root}/out_lora.nemo"),
             ("{megatron}", "full-model checkpoint", "nemotune export nemo --checkpoint {megatron}")),
    BadInput("adapter_of_the_older_schema_without_its_weights",
             (EXPORT, "hf-peft", "--adapter", "{old_adapter}", "--out", "{root}/out_peft"),
             ("{old_adapter}/adapter_config.json", "'peft_type'", "adapter_weights.safetensors")),
    BadInput("tokenizer_dir_without_tokenizer_files",
             (EXPORT, "hf-peft", "--adapter", "{lora_step}", "--tokenizer", "{megatron}", "--out",
              "{root}/out_peft"),
             ("--tokenizer {megatron}", "no tokenizer files")),
    BadInput("output_exists_and_is_not_an_export",
             (EXPORT, "hf", "--checkpoint", "{megatron}", "--out", "{user_dir}"),
             ("{user_dir} already exists", "not an output of nemotune export")),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A LoRA training checkpoint (adapter/ + trainer_state peft_scheme lora), a full-SFT one (dist/ + hf/), a
    Megatron dir, an adapter dir of the older schema with its weights file missing, a folder of the user's."""
    root = tmp_path_factory.mktemp("bad_export")
    hf = tiny_hf_config()
    config = {"dim": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["linear_qkv"], "variant": "canonical",
              "layer_selection": None, "base_model": hf, "base_model_name_or_path": None}
    lora_step = root / "lora_run" / "step0000002"
    adapter_io.save_adapter(lora_step / "adapter", adapter_io.random_adapter(config), config)
    (lora_step / "dist").mkdir()
    (lora_step / "trainer_state.json").write_text(json.dumps({"step": 2, "peft_scheme": "lora"}))
    full_step = root / "sft_run" / "step0000002"
    (full_step / "dist").mkdir(parents=True)
    (full_step / "hf").mkdir()
    (full_step / "hf" / "config.json").write_text(json.dumps(hf))
    (full_step / "trainer_state.json").write_text(json.dumps({"step": 2, "peft_scheme": "none"}))
    megatron = root / "mcore"
    (megatron / "weights").mkdir(parents=True)
    (megatron / "config.json").write_text(json.dumps(hf))
    old = root / "old_adapter"
    old.mkdir()
    (old / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "variant"}))
    user_dir = root / "user_dir"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("the user's own file\n")
    return {"root": root, "lora_step": lora_step, "full_step": full_step, "megatron": megatron,
            "old_adapter": old, "user_dir": user_dir}


def bind(case: BadInput, assets: dict) -> BadInput:
    return dataclasses.replace(case, argv=[str(a).format(**assets) for a in case.argv],
                               needles=[str(n).format(**assets) for n in case.needles], guard=[assets["root"]])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case, assets):
    check(bind(case, assets))
