"""`nemotune rl` on mistaken input: refused in one line naming the key (or file and line) and the fix, before any
process group starts or any weight is read (the run dir is never created)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from battery import BadInput, check

RL = ("nemotune.recipes.rl", "model.hf_path={base}", "model.checkpoint={mcore}", "data.output_dir={prep}",
      "run.output_dir={run}")
DPO = (*RL, "rl.algorithm=dpo")

CASES = [
    BadInput("rl_split_missing", (*RL[:3], "data.output_dir={prep_without_rl}", RL[4]),
             ("trainer.train_split=rl", "has no split 'rl'", "it has sft, eval"), guard=("{prep_without_rl}",)),
    BadInput("unknown_reward_name", (*RL, "rl.grpo.rewards=[{{name:rouge}}]"),
             ("rl.grpo.rewards[0].name=rouge", "unknown reward 'rouge'", "rouge_l")),
    BadInput("reward_module_not_importable", (*RL, "rl.grpo.rewards=[{{name:'no_such_pkg.rewards:f'}}]"),
             ("rl.grpo.rewards[0].name=no_such_pkg.rewards:f", "cannot import module 'no_such_pkg.rewards'",
              "PYTHONPATH")),
    BadInput("one_completion_per_prompt", (*RL, "rl.grpo.num_generations=1"),
             ("rl.grpo.num_generations=1", "GRPO needs >= 2", "baseline")),
    BadInput("unknown_reference_policy", (*RL, "rl.reference=sft"),
             ("rl.reference=sft", "use initial (the policy RL starts from) or base")),
    BadInput("vllm_backend_without_vllm", (*RL, "rl.grpo.rollout_backend=vllm"),
             ("rl.grpo.rollout_backend=vllm", "vllm is not installed", "pip install vllm",
              "rl.grpo.rollout_backend=megatron, which needs nothing more")),
    BadInput("unknown_rollout_backend", (*RL, "rl.grpo.rollout_backend=hf"),
             ("rl.grpo.rollout_backend=hf", "use megatron (the default) or vllm")),
    BadInput("full_sft_policy", (*RL, "peft=none"),
             ("peft.peft_scheme=none", "trains a LoRA policy", "set peft=lora")),
    BadInput("pairs_with_empty_chosen", (*DPO, "rl.dpo.pairs={empty_chosen}"),
             ("rl.dpo.pairs={empty_chosen} line 2", "empty 'chosen'"), guard=("{empty_chosen}",)),
    BadInput("pairs_with_empty_rejected", (*DPO, "rl.dpo.pairs={empty_rejected}"),
             ("rl.dpo.pairs={empty_rejected} line 1", "empty 'rejected'"), guard=("{empty_rejected}",)),
    BadInput("pairs_file_missing", (*DPO, "rl.dpo.pairs={missing}"), ("rl.dpo.pairs={missing}", "no such file")),
    BadInput("pairs_split_missing", (*DPO, "rl.dpo.pairs_split=train"),
             ("rl.dpo.pairs_split=train", "has no train.messages.jsonl", "eval, rl, sft")),
    BadInput("unknown_rl_key", (*RL, "rl.grpo.num_generation=4"),
             ("rl.grpo.num_generation", "did you mean rl.grpo.num_generations")),
    BadInput("rl_stages_under_nemotune_train", ("nemotune.recipes.lora_sft", "experiment=tiny_three_stage", *RL[1:]),
             ("stages[stage1].overrides", "Key 'rl'", "run with `nemotune rl`")),
]


@pytest.fixture(scope="module")
def inputs(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_bad")
    prep = root / "prep_without_rl"  # data prepared without the seed re-split: no rl split
    shutil.copytree(tiny_assets["prep"], prep)
    manifest = json.loads((prep / "manifest.json").read_text())
    manifest["splits"] = [s for s in manifest["splits"] if s != "rl"]
    (prep / "manifest.json").write_text(json.dumps(manifest))
    good = {"prompt": "Is cash safe?", "chosen": "Mostly, up to the insured limit.", "rejected": "Never."}
    (root / "empty_chosen.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": "  "}) + "\n")
    (root / "empty_rejected.jsonl").write_text(json.dumps({**good, "rejected": ""}) + "\n")
    return {"base": tiny_assets["base"], "mcore": tiny_assets["mcore"], "prep": tiny_assets["prep"],
            "run": root / "run", "prep_without_rl": prep, "empty_chosen": root / "empty_chosen.jsonl",
            "empty_rejected": root / "empty_rejected.jsonl", "missing": root / "no_pairs.jsonl"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_rl_input(case, inputs):
    fill = lambda s: str(s).format(**inputs)  # noqa: E731
    case = dataclasses.replace(case, argv=[fill(a) for a in case.argv], needles=[fill(n) for n in case.needles],
                               guard=[fill(g) for g in case.guard], must_not_exist=inputs["run"])
    check(case)
