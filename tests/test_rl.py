"""RL after SFT (`nemotune rl`): the GRPO / DPO losses against references written here, rewards, advantages, config
checks, and one 2-rank launch (tests/dist/rl_worker.py) that trains GRPO and DPO on the tiny model."""
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import run_torchrun

from nemotune.recipes.engine import rewards
from nemotune.recipes.engine.rl import dpo_loss, group_advantages, grpo_token_loss, sample_tokens, sampling_generator

DIST = Path(__file__).resolve().parent / "dist"


# ---- the GRPO loss ---------------------------------------------------------------------------------------------

def reference_grpo_loss(logits, old_logp, ref_logp, tokens, mask, rewards_per_row, group, eps, beta):
    """GRPO written out token by token (DeepSeekMath eq. 3 with the token-level normalisation of DAPO): a python
    loop over rows and tokens, no shared code with nemotune."""
    total, count = 0.0, 0
    for row in range(tokens.shape[0]):
        g0 = (row // group) * group
        members = [float(r) for r in rewards_per_row[g0:g0 + group]]
        mean = sum(members) / group
        std = math.sqrt(sum((r - mean) ** 2 for r in members) / (group - 1))
        advantage = (float(rewards_per_row[row]) - mean) / (std + 1e-4)
        for t in range(tokens.shape[1]):
            if not mask[row, t]:
                continue
            logp = torch.log_softmax(logits[row, t], dim=-1)[tokens[row, t]]
            ratio = torch.exp(logp - old_logp[row, t])
            surrogate = torch.min(ratio * advantage, torch.clamp(ratio, 1 - eps, 1 + eps) * advantage)
            kl = torch.exp(ref_logp[row, t] - logp) - (ref_logp[row, t] - logp) - 1
            total = total + (-surrogate + beta * kl)
            count += 1
    return total / count


def test_grpo_loss_gradient_matches_a_token_by_token_reference():
    gen = torch.Generator().manual_seed(7)
    rows, group, steps, vocab = 6, 3, 5, 11
    logits = torch.randn(rows, steps, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, vocab, (rows, steps), generator=gen)
    mask = torch.ones(rows, steps)
    mask[0, 3:] = 0  # completions of different lengths
    mask[4, 1:] = 0
    # old and reference log-probs away from the current ones, so the clip and the KL both act
    current = torch.log_softmax(logits.detach(), -1).gather(-1, tokens[..., None])[..., 0]
    old = current + 0.4 * torch.randn(rows, steps, generator=gen, dtype=torch.float64)
    ref = current + 0.3 * torch.randn(rows, steps, generator=gen, dtype=torch.float64)
    rewards_per_row = torch.tensor([0.1, 0.9, 0.4, 1.0, 0.0, 0.2], dtype=torch.float64)

    expected = reference_grpo_loss(logits, old, ref, tokens, mask, rewards_per_row, group, 0.2, 0.05)
    (want,) = torch.autograd.grad(expected, logits)

    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    advantages = group_advantages(rewards_per_row.view(-1, group)).view(-1)
    parts = grpo_token_loss(logp, old, ref, advantages, mask, 0.2, 0.05)
    ours = parts["loss_sum"] / parts["tokens"]
    (got,) = torch.autograd.grad(ours, logits)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert 0 < parts["clipped_sum"].item() < mask.sum().item()  # some tokens were clipped, not all
    assert got.abs().max() > 1e-3


def test_group_advantages_are_zero_mean_unit_std_per_group_and_zero_for_equal_rewards():
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]]))
    assert adv[0].mean().abs() < 1e-6 and adv[0].std().item() == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(adv[1], torch.zeros(4))


def test_dpo_loss_matches_the_paper_formula_with_label_smoothing():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    out = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    z = 0.5 * ((-3.0 + 4.0) - (-5.0 + 4.5))
    want = -0.9 * math.log(1 / (1 + math.exp(-z))) - 0.1 * math.log(1 / (1 + math.exp(z)))
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)
    assert out["margin"].item() == pytest.approx(z) and out["accuracy"].item() == 1.0
    tie = dpo_loss(pc, pr, pc, pr, beta=0.5)
    assert tie["accuracy"].item() == 0.5 and tie["loss"].item() == pytest.approx(math.log(2))


def test_sampling_is_a_function_of_seed_step_and_prompt_and_honours_top_p():
    logits = torch.tensor([[3.0, 2.9, -5.0, -5.0]] * 4000)
    draws = sample_tokens(logits, 1.0, sampling_generator(1, 2, 3))
    assert torch.equal(draws, sample_tokens(logits, 1.0, sampling_generator(1, 2, 3)))
    assert not torch.equal(draws, sample_tokens(logits, 1.0, sampling_generator(1, 3, 3)))
    assert set(draws.tolist()) > {0, 1}  # full distribution: the unlikely tokens appear now and then
    nucleus = sample_tokens(logits, 0.5, sampling_generator(1, 2, 3))
    assert set(nucleus.tolist()) == {0}  # top-p 0.5 keeps only the most likely token


# ---- rewards ---------------------------------------------------------------------------------------------------

def test_builtin_rewards_score_what_they_name():
    assert rewards.think_format(["<think>why</think> answer", "<think>why answer", "answer", "<think></think>x",
                                 "<think>a</think>"]) == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert rewards.length_match(["one two", "one two three four", "one", ""], ["a b"] * 4) == [1.0, 0.0, 0.5, 0.0]
    assert rewards.rouge_l(["the cat sat", "dogs run"], ["the cat sat", "the cat sat"]) == [1.0, 0.0]
    combined = rewards.Rewards([{"name": "length_match", "weight": 2.0}, {"name": "think_format", "weight": 0.5}])
    total, parts = combined.score(["<think>x</think> a b"], ["c d"])
    assert parts == {"length_match": [1.0], "think_format": [1.0]} and total == [2.5]


def test_semantic_reward_uses_the_packaged_minilm():
    same, other = rewards.semantic(["<think>hm</think> Index funds have low fees.", "The weather is nice today."],
                                   ["Index funds have low fees."] * 2)
    assert same > 0.99 and other < 0.5


def test_reward_config_problems_name_each_entry():
    problems = rewards.reward_problems([{"name": "rouge", "weight": 1.0}, {"name": "math:nope", "weight": 1.0},
                                        {"name": "json:loads", "weight": 1.0}])
    assert len(problems) == 2
    assert problems[0].startswith("rl.grpo.rewards[0].name=rouge: unknown reward 'rouge'")
    assert "module 'math' has no function 'nope'" in problems[1]


def test_rl_config_refuses_every_problem_at_once():
    from nemotune.recipes.engine.config import rl_problems
    from nemotune.recipes.rl import compose_rl

    cfg = compose_rl(["rl.grpo.num_generations=1", "rl.grpo.top_p=0", "rl.grpo.rewards=[{name:bleu}]",
                      "trainer.micro_batch_size=2", "rl.reference=sft"])
    problems = rl_problems(cfg)
    assert any(p.startswith("rl.reference=sft: use initial") for p in problems)
    assert any(p.startswith("rl.grpo.num_generations=1: GRPO needs >= 2") for p in problems)
    assert any(p.startswith("rl.grpo.top_p=0.0") for p in problems)
    assert any(p.startswith("rl.grpo.rewards[0].name=bleu") for p in problems)
    assert any(p.startswith("trainer.micro_batch_size=2") for p in problems)
    assert rl_problems(compose_rl([])) == []


def test_pair_problems_name_every_bad_line(tmp_path):
    from nemotune.recipes.engine.rl import pair_problems

    rows = [json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                        "chosen": "x", "rejected": "y"}), "not json",
            json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}),
            json.dumps({"prompt": "", "chosen": "x", "rejected": "y"}),
            json.dumps({"prompt": "q", "chosen": "fine", "rejected": "also fine"})]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    problems = pair_problems(str(path))
    assert [p.split(": ", 1)[0].rsplit(" ", 1)[-1] for p in problems] == ["1", "2", "3", "4"]
    assert "its last turn is assistant" in problems[0] and "not a JSON object" in problems[1]
    assert "the same text" in problems[2] and "no prompt" in problems[3]


# ---- training on the tiny model (one 2-rank launch) -----------------------------------------------------------

TOY_PAIRS = [{"prompt": f"Question {i}: should I keep an emergency fund?",
              "chosen": "Yes, keep three to six months of expenses in cash.",
              "rejected": "No, put everything into one stock."} for i in range(8)]


@pytest.fixture(scope="module")
def rl_runs(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in TOY_PAIRS))
    out = root / "out.json"
    run_torchrun(DIST / "rl_worker.py", out, tiny_assets["prep"], tiny_assets["mcore"], tiny_assets["base"],
                 root / "runs", pairs, env={"RL_TEST_BASE": str(tiny_assets["base"])})
    return json.loads(out.read_text())


def test_grpo_raises_the_mean_reward(rl_runs):
    steps = rl_runs["grpo"]["dp2"]
    rewards_by_step = [steps[str(s)]["rl/reward_mean"] for s in range(1, len(steps) + 1)]
    first, last = sum(rewards_by_step[:2]) / 2, sum(rewards_by_step[-3:]) / 3
    assert 0.3 < first < 0.65, rewards_by_step  # the random policy: about half its tokens are rewarded
    assert last > first + 0.2, rewards_by_step
    assert steps["1"]["rl/kl"] == 0.0 and steps[str(len(steps))]["rl/kl"] > 0  # the adapter moved off the base
    for key in ("rl/reward/rl_rewards:aligned_tokens_mean", "rl/entropy", "rl/clip_fraction", "rl/response_length",
                "rl/rollout_time", "rl/train_time", "rl/rollout_tokens_per_sec"):
        assert key in steps["1"], key


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_grpo_layouts_give_the_tp1_losses_and_rewards(rl_runs, layout):
    base, other = rl_runs["grpo"]["dp2"], rl_runs["grpo"][layout]
    assert sorted(other, key=int) == ["1", "2", "3"]
    for step in other:
        for key in ("train/loss", "rl/reward_mean", "rl/kl", "rl/entropy"):
            assert other[step][key] == pytest.approx(base[step][key], abs=1e-5), (layout, step, key)


@pytest.mark.parametrize("layout", ["dp2", "tp2", "pp2"])
def test_kv_cache_generation_equals_rerunning_the_sequence(rl_runs, layout):
    """TP=1 (dp2), TP=2 and PP=2: the prompt (17 tokens) runs once and each new token is one position over
    megatron's KV cache, with the tokens and logits (<= 1e-5) of re-running the whole sequence per token."""
    for mode, rows in (("greedy", 1), ("sampled", 3)):
        check = rl_runs["kv_cache"][layout][mode]
        assert check["cached_widths"] == [17] + [1] * 9, (layout, mode)
        assert check["widths"] == list(range(17, 27)), (layout, mode)
        assert check["cached_tokens"] == check["tokens"] and len(check["tokens"]) == rows, (layout, mode)
        assert all(len(t) == 10 for t in check["tokens"])
        assert check["logit_steps"] == 10 and check["max_logit_diff"] <= 1e-5, (layout, mode, check)
    sampled = rl_runs["kv_cache"][layout]["sampled"]["tokens"]
    assert len({tuple(t) for t in sampled}) > 1  # the rows differ: each row's cache is its own


def test_reference_is_the_starting_adapter_or_the_base_as_configured(rl_runs):
    """A policy started from an adapter and then moved: rl.reference=initial scores with the starting adapter
    (not the base, not the current policy), rl.reference=base with the adapter off; neither pass changes the
    policy."""
    initial, base = rl_runs["initial_reference"]["initial"], rl_runs["initial_reference"]["base"]
    assert initial["vs_start"] <= 1e-6 and initial["vs_base"] > 1e-3 and initial["vs_current"] > 1e-3
    assert base["vs_base"] <= 1e-6 and base["vs_start"] > 1e-3 and base["vs_current"] > 1e-3
    assert initial["current_kept"] == 0.0 and base["current_kept"] == 0.0


def test_grpo_stopped_and_rerun_resumes_with_the_same_rewards(rl_runs):
    # the TP=2 run stopped after step 2 (checkpoint) and its rerun continued at step 3: nothing logged twice
    assert rl_runs["tp2_logged_steps"] == [1, 2, 3]


def test_grpo_killed_mid_run_and_rerun_reproduces_rewards_and_losses(rl_runs, tiny_assets, tmp_path):
    """The 8-step GRPO run of the 2-rank launch, alone in one process, checkpointing every 2 steps: SIGKILL once
    step 2 is saved, rerun the same command: every step's loss, reward and KL equal the uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, run_module

    run = tmp_path / "run"
    args = [*rl_runs["grpo_dp2_overrides"], f"run.output_dir={run}", "trainer.sft.val_check_interval=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(DIST),
           "RL_TEST_BASE": str(tiny_assets["base"])}
    proc = subprocess.Popen([sys.executable, "-m", "nemotune.recipes.rl", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    def saved_step_2():  # a complete checkpoint at step 2 or later (older ones may be rotated away)
        return any(p.name >= "step0000002" for p in (run / "checkpoints").glob("step*"))

    while not saved_step_2() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert proc.returncode == -signal.SIGKILL and max(logged) < 8, logged  # killed mid-run, not after it
    rerun = run_module("nemotune.recipes.rl", *args, env={"PYTHONPATH": str(DIST),
                                                          "RL_TEST_BASE": str(tiny_assets["base"])})
    assert "resumed from" in rerun.stdout
    resumed, uninterrupted = {}, rl_runs["grpo"]["dp2"]
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            resumed[str(row["step"])] = row
    assert sorted(resumed, key=int) == [str(s) for s in range(1, 9)]
    for step, row in resumed.items():
        for key in ("train/loss", "rl/reward_mean", "rl/kl"):
            assert row[key] == pytest.approx(uninterrupted[step][key], abs=1e-5), (step, key)


def test_dpo_drives_preference_accuracy_up_alike_at_tp1_and_pp2(rl_runs):
    steps = rl_runs["dpo"]["dp2"]
    accuracy = [steps[str(s)]["dpo/accuracy"] for s in range(1, len(steps) + 1)]
    assert accuracy[0] == 0.5  # the policy starts as the reference: every pair is a tie
    assert accuracy[-1] > 0.9, accuracy
    assert steps[str(len(steps))]["dpo/reward_margin"] > 0
    pp2 = rl_runs["dpo"]["pp2"]
    assert sorted(pp2) == sorted(steps)
    for step in steps:
        for key in ("train/loss", "dpo/accuracy", "dpo/reward_margin", "dpo/chosen_logp"):
            assert pp2[step][key] == pytest.approx(steps[step][key], abs=1e-5), (step, key)


def test_dpo_pairs_from_a_split_pair_each_reference_with_the_models_own_answer(rl_runs, tiny_assets):
    from nemotune.data_prep import formats

    split = formats.load_messages(formats.messages_path(tiny_assets["prep"], "rl"))
    references = {row["messages"][-1]["content"] for row in split}
    pairs = rl_runs["dpo_split"]["pairs"]
    assert len(pairs) == len(split)  # no answer of the random model is empty or equal to its reference
    assert all(p["chosen"] in references and p["rejected"].strip() and p["rejected"] != p["chosen"] for p in pairs)
    assert all(p["messages"][-1]["role"] == "user" for p in pairs)
    assert rl_runs["dpo_split"]["metrics"]["1"]["dpo/accuracy"] == 0.5


def test_adapter_off_reference_equals_the_base_model(rl_runs):
    assert rl_runs["reference"]["adapter_off_vs_base"] == 0.0
    assert rl_runs["reference"]["adapter_on_vs_base"] > 1e-3  # the trained adapter does change the log-probs


def test_rl_verb_help_and_validate_only_load_no_weights(tiny_assets, tmp_path, capsys):
    from conftest import run_module

    from nemotune.recipes.cli import main

    assert main(["rl", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: nemotune rl ")
    run = tmp_path / "run"
    result = run_module("nemotune.recipes.rl", "--validate-only", f"model.hf_path={tiny_assets['base']}",
                        f"model.checkpoint={tiny_assets['mcore']}", f"data.output_dir={tiny_assets['prep']}",
                        f"run.output_dir={run}", "rl.grpo.rewards=[{name:rouge_l},{name:think_format,weight:0.5}]")
    assert "configuration, rewards and data are valid (grpo" in result.stdout
    assert not run.exists()


def test_three_stage_seed_recipe_runs_sft_sft_grpo(rl_runs):
    three = rl_runs["three_stage"]
    assert three["finished"] == [True, True, True] and three["steps"] == [1, 1, 1]
    assert [Path(a).parts[-4] for a in three["adapters"]] == ["stage1", "stage2", "stage3"]
    for adapter in three["adapters"]:
        assert (Path(adapter) / "adapter_config.json").is_file()


def test_the_rl_adapter_exports_like_an_sft_one(rl_runs, tmp_path):
    from safetensors import safe_open

    from nemotune.converters.export import main as export

    grpo_adapter = rl_runs["three_stage"]["adapters"][-1]
    assert export(["hf-peft", "--adapter", grpo_adapter, "--out", str(tmp_path / "peft")]) == 0
    assert export(["nemo", "--adapter", grpo_adapter, "--out", str(tmp_path / "lora.nemo")]) == 0
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert (tmp_path / "lora.nemo").stat().st_size > 0


def test_three_stage_launches_as_dependent_slurm_jobs_of_nemotune_rl(tiny_assets):
    from conftest import run_module

    out = run_module("nemotune.recipes.launch", "--config-name", "rl", "experiment=tiny_three_stage", "cluster=slurm",
                     "cluster.module=nemotune.recipes.rl", "cluster.partition=p", "cluster.nproc_per_node=1",
                     "cluster.gpus_per_node=1", f"model.hf_path={tiny_assets['base']}",
                     f"model.checkpoint={tiny_assets['mcore']}", f"data.output_dir={tiny_assets['prep']}",
                     "--dry-run").stdout
    assert "--dependency=afterok:<job id of nemotune-tiny_three_stage-stage1>" in out
    assert "--dependency=afterok:<job id of nemotune-tiny_three_stage-stage2>" in out
    for stage in ("stage1", "stage2", "stage3"):
        assert "-m nemotune.recipes.rl" in out and f"run.stage={stage}" in out
