"""Full-parameter SFT on mistaken input: refused in one line naming the key or the checkpoint and the fix.

The run dirs are made by hand (a step dir with the trainer_state.json the Checkpointer writes, and for LoRA its
adapter/ dir): the refusals read nothing else, and no 12 s training is needed to make them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from battery import BadInput, check

pytestmark = pytest.mark.slow

MODEL = ("model.hf_path={base}", "data.output_dir={prep}", "run.tensorboard=false", "trainer.train_split=sft",
         "trainer.validation_split=eval", "trainer.sft.max_steps=2")
TRAIN = ("nemotune.recipes.lora_sft", "experiment=tiny_sft", "cluster.nproc_per_node=1", *MODEL)
BASE = "model.checkpoint={mcore}"
FRESH = "run.output_dir={root}/fresh"

CASES = [
    BadInput("peft_scheme_unknown", (*TRAIN, BASE, FRESH, "peft.peft_scheme=bogus"),
             ("peft.peft_scheme=bogus", "peft=lora", "peft=none"), guard=("{root}/fresh",)),
    BadInput("recompute_unknown", (*TRAIN, BASE, FRESH, "trainer.recompute=bogus"),
             ("trainer.recompute=bogus", "none, selective, full"), guard=("{root}/fresh",)),
    BadInput("full_sft_with_an_adapter_to_restore", (*TRAIN, BASE, FRESH, "peft.restore_from={lora_run}"),
             ("peft.restore_from={lora_run}", "peft.peft_scheme=none", "model.checkpoint"),
             guard=("{root}/fresh", "{lora_run}")),
    BadInput("lora_run_resumed_as_full_sft", (*TRAIN, BASE, "run.output_dir={lora_run}"),
             ("step0000001", "a LoRA (adapter-only) checkpoint", "peft.peft_scheme=none", "resume it with peft=lora"),
             guard=("{lora_run}",)),
    BadInput("full_sft_run_resumed_as_lora", (*TRAIN, BASE, "peft=lora", "run.output_dir={full_run}"),
             ("step0000001", "a full-parameter SFT checkpoint", "peft.peft_scheme=lora", "resume it with peft=none"),
             guard=("{full_run}",)),
    BadInput("lora_step_dir_as_the_model_to_train", (*TRAIN, "model.checkpoint={lora_step}", FRESH),
             ("{lora_step}", "adapter-only checkpoint", "nemotune export hf-peft/merge"),
             guard=("{root}/fresh", "{lora_run}")),
    BadInput("lora_step_dir_verified_as_a_model",
             ("nemotune.converters.convert", "verify", "--hf", "{base}", "--ckpt", "{lora_step}"),
             ("{lora_step}", "adapter-only checkpoint", "{lora_step}/adapter"), guard=("{lora_run}",)),
]


def _step_dir(run: Path, scheme: str) -> Path:
    step = run / "checkpoints" / "step0000001"
    (step / "dist").mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps(
        {"step": 1, "consumed_samples": 4, "epoch": 0.04, "val_loss": None, "stage": "sft", "peft_scheme": scheme,
         "world_size": 1, "max_steps": 2, "scheduler": {}, "config": {}}, indent=2))
    if scheme == "lora":
        (step / "adapter").mkdir()
    return step


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_sft")
    lora_step = _step_dir(root / "lora_run", "lora")
    _step_dir(root / "full_run", "none")
    return {"base": tiny_assets["base"], "mcore": tiny_assets["mcore"], "prep": tiny_assets["prep"], "root": root,
            "lora_run": root / "lora_run", "full_run": root / "full_run", "lora_step": lora_step}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_sft_input(case, runs):
    fmt = lambda s: str(s).format(**runs)  # noqa: E731
    check(dataclasses.replace(case, argv=[fmt(a) for a in case.argv], needles=[fmt(n) for n in case.needles],
                              guard=[Path(fmt(g)) for g in case.guard]))
