"""Bad inputs around tokenizer lineage and chat templating: each refused in one line naming the key and the fix.

Training must use the model's own tokenizer (model.hf_path's files unless model.tokenizer names another),
refuse data prepared by another tokenizer and a tokenizer with more ids than the embedding table, and a
tokenizer that only the hub has must fail at once offline, saying what to download.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest
from battery import BadInput, check
from battery import run as run_command
from test_data_prep_support import prep_config_dir, run_prep

from nemotune.converters.tiny_model import write_tiny_llama
from nemotune.data_prep.tokenizer import tiny_tokenizer_dir

NANO = "nvidia/Llama-3.1-Nemotron-Nano-8B-v1"
TRAIN = ("nemotune.recipes.lora_sft", "experiment=tiny_lora", "data.output_dir={prep}", "run.output_dir={run}",
         "run.tensorboard=false", "trainer.train_split=sft", "trainer.validation_split=eval")
PREP = ("nemotune.data_prep", "--quiet", "data=fiqa_sample", "data.output_dir={out}")

CASES = [
    # the reported defect: a model dir with its own tokenizer, model.tokenizer left at its default
    BadInput("hf_path_tokenizer_differs_from_the_data", (*TRAIN, "model.hf_path={other_model}"),
             ("tokenized by another tokenizer", "model.hf_path=", "chat_template_sha256")),
    BadInput("tokenizer_larger_than_the_embedding_table", (*TRAIN, "model.hf_path={small_vocab_model}"),
             ("model.hf_path=", "1024 ids", "vocab_size=512")),
    BadInput("tokenizer_dir_missing", (*TRAIN, "model.tokenizer={missing}"),
             ("model.tokenizer=", "no such tokenizer directory")),
    BadInput("hub_tokenizer_offline_train", (*TRAIN, f"model.hub_id={NANO}"),
             ("model.hub_id=" + NANO, f"hf download {NANO}", "set model.hf_path=Llama-3.1-Nemotron-Nano-8B-v1")),
    BadInput("hub_tokenizer_offline_prep", (*PREP, "model=nemotron_nano_8b"),
             (f"hf download {NANO}", "set model.hf_path=Llama-3.1-Nemotron-Nano-8B-v1"), exit_code=2),
    BadInput("task_prompt_placement_unknown", (*PREP, "data.task_prompt_placement=middle"),
             ("data.task_prompt_placement", "'middle'"), exit_code=2),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_template")
    prep = root / "prep"
    assert run_prep(prep_config_dir(root), prep, "data.resplit=true") == 0
    # a model dir whose own tokenizer has another chat template than the one the data was made with
    other = write_tiny_llama(root / "other_model")
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("'<|eot_id|>'", "'<|eot_id|>\\n'")
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    small = write_tiny_llama(root / "small_vocab_model", vocab=512)
    assert (small / "tokenizer.json").read_bytes() == (tiny_tokenizer_dir() / "tokenizer.json").read_bytes()
    return {"root": root, "prep": prep, "run": root / "run", "out": root / "prep_out", "other_model": other,
            "small_vocab_model": small, "missing": root / "no_such_tokenizer"}


def bind(case: BadInput, assets: dict) -> BadInput:
    return dataclasses.replace(case, argv=[str(a).format(**assets) for a in case.argv], guard=[assets["root"]])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case, assets):
    check(bind(case, assets))


def test_unreachable_hub_fails_at_once_without_hf_hub_offline(assets):
    """No HF_HUB_OFFLINE and a hub endpoint that refuses connections: refused in seconds, not after retries."""
    case = bind(next(c for c in CASES if c.name == "hub_tokenizer_offline_train"), assets)
    start = time.monotonic()
    result = run_command(case.argv, env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 2 and f"hf download {NANO}" in result.stderr
    assert time.monotonic() - start < 60  # the whole process (imports included); the hub check is milliseconds


def test_model_own_tokenizer_trains_on_its_own_data(assets, tmp_path):
    """The positive side: data prepared with model.hf_path's tokenizer is accepted by training with the same
    model.hf_path (the lineage check passes; the run stops at max_steps=1)."""
    model = tmp_path / "model"
    shutil.copytree(assets["other_model"], model)
    prep = tmp_path / "prep"
    assert run_prep(prep_config_dir(tmp_path), prep, "data.resplit=true", f"model.hf_path={model}") == 0
    assert json.loads((prep / "manifest.json").read_text())["tokenizer"]["name"] == str(model)
    result = run_command([*(a.format(prep=prep, run=tmp_path / "run") for a in TRAIN), f"model.hf_path={model}",
                          "trainer.sft.max_steps=1"])
    assert result.returncode == 0, result.stderr[-2000:]
