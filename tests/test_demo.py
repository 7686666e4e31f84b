"""The demo (`make demo`): its experiment trains long enough to show learning, its verdicts read the eval
report's confidence intervals the right way round, it never replaces a directory it did not make, and
`--quick` runs the whole pipeline and ends with the same summary lines."""
import json
import math
import re

import pytest

from nemotune.recipes import demo
from nemotune.recipes.engine.config import compose

from conftest import run_module


def test_demo_experiment_trains_two_stages_long_enough():
    from nemotune.recipes.two_stage import stage_configs

    cfg = compose("lora_sft", [f"experiment={demo.EXPERIMENT}"])
    (name1, stage1), (name2, stage2) = stage_configs(cfg)
    assert (name1, name2) == ("stage1", "stage2")
    # stage 1: 2 epochs of the 105 sft packs in steps of 2 = 104 optimizer steps at lr 1e-2 (26 steps of 4
    # moved the held-out loss by 0.1 only)
    assert (stage1.trainer.train_split, stage1.trainer.sft.max_epochs) == ("sft", 2)
    assert stage1.trainer.global_batch_size == 2 and stage1.trainer.sft.max_steps == -1
    assert stage1.trainer.optim.lr == pytest.approx(1e-2)
    # stage 2 continues on the rl split at a lower lr so that it keeps what stage 1 learned
    assert (stage2.trainer.train_split, stage2.trainer.sft.max_epochs) == ("rl", 1)
    assert stage2.trainer.optim.lr == pytest.approx(1e-3)
    assert stage1.trainer.validation_split == stage2.trainer.validation_split == "eval"
    assert list(stage1.peft.lora.target_modules) == ["all-linear"] and stage1.peft.lora.dim == 32
    assert stage1.parallel.tensor_model_parallel_size == 2 and stage1.cluster.nproc_per_node == 2


def test_demo_base_output_layer_can_express_token_statistics(tmp_path):
    """The reason for init_std=0.1: the final RMSNorm fixes the hidden norm near sqrt(hidden) (norm weights
    are about 1), so the largest logit a hidden state can give a typical token is about
    |its output row| * sqrt(hidden)."""
    from safetensors.torch import load_file

    from nemotune.converters.tiny_model import write_tiny_llama

    def largest_reachable_logit(path):
        weights = load_file(str(path / "model.safetensors"))
        head, norm = weights["lm_head.weight"], weights["model.norm.weight"]
        return float(head.norm(dim=1).median() * math.sqrt(head.shape[1]) * norm.abs().mean())

    default = largest_reachable_logit(write_tiny_llama(tmp_path / "default", copy_tokenizer=False))
    demo_base = largest_reachable_logit(write_tiny_llama(tmp_path / "demo", copy_tokenizer=False,
                                                         **demo.BASE_MODEL_KWARGS))
    assert default < 1.5 and demo_base > 5.0  # ln(1024) = 6.93: 1.3 cannot shape a distribution
    written = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert written["hidden_size"] == 64 and written["initializer_range"] == pytest.approx(0.1)


def _stats(base, lora, low, high):
    return {"base_mean": base, "lora_mean": lora, "diff_mean": lora - base, "diff_ci_low": low,
            "diff_ci_high": high, "base_median": base, "lora_median": lora, "n": 48}


@pytest.mark.parametrize("name, stats, verdict", [
    ("rouge_l_f1", _stats(0.02, 0.09, 0.06, 0.08), "improved"),
    ("rouge_l_f1", _stats(0.09, 0.02, -0.08, -0.06), "worse"),
    ("semantic_similarity", _stats(0.08, 0.10, -0.003, 0.06), "no clear change"),
    ("semantic_similarity", _stats(0.08, 0.10, float("nan"), float("nan")), "no clear change"),
    ("length_ratio", _stats(0.17, 0.22, 0.04, 0.07), "improved"),      # shorter than the references, rose
    ("length_ratio", _stats(1.60, 1.20, -0.5, -0.3), "improved"),      # longer than the references, fell
    ("length_ratio", _stats(1.60, 2.00, 0.3, 0.5), "worse"),
    ("length_ratio", _stats(0.50, 1.80, 1.1, 1.5), "no clear change"),  # overshot: not closer to 1
], ids=lambda v: v if isinstance(v, str) else "")
def test_metric_verdict_reads_the_ci_of_lora_minus_base(name, stats, verdict):
    assert demo.metric_verdict(name, stats) == verdict


def _summary(rouge, loss_lora):
    return {"bootstrap": {"confidence": 0.95}, "metrics": {"rouge_l_f1": rouge},
            "loss": {"hf": {"base": {"loss": 7.27}, "lora": {"loss": loss_lora}}}}


def test_verdict_lines_say_plainly_whether_fine_tuning_worked():
    worked = demo.verdict_lines(_summary(_stats(0.017, 0.090, 0.065, 0.081), 5.93))
    assert worked[0] == ("ROUGE-L F1: base 0.0170 -> LoRA 0.0900, LoRA - base +0.0730, 95% CI [0.0650, 0.0810]: "
                         "improved")
    assert worked[1] == "held-out answer-token loss (hf): base 7.2700 -> LoRA 5.9300 (lower)"
    assert worked[-1].startswith("fine-tuning worked: the held-out answer loss fell and ROUGE-L F1 improved")
    flat = demo.verdict_lines(_summary(_stats(0.017, 0.020, -0.01, 0.02), 5.93))
    assert flat[-1].startswith("fine-tuning did NOT clearly work: no generation metric improved")
    higher = demo.verdict_lines(_summary(_stats(0.017, 0.090, 0.065, 0.081), 7.30))
    assert "(NOT lower)" in higher[1] and higher[-1].endswith("the held-out answer loss did not fall")


def test_example_lines_show_the_first_prediction_on_one_line_each(tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    rows = [{"prompt": "Should I refinance?", "reference": "It helps to\nseparate " + "x" * 300,
             "base": "new stock\x07ank", "lora": "and you have the"}, {"prompt": "second"}]
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = demo.example_lines(predictions, width=20)
    assert lines == ["  question   'Should I refinance?'", "  reference  'It helps to separate'",
                     "  base       'new stock\\x07ank'", "  LoRA       'and you have the'"]


def test_work_dir_of_a_previous_demo_is_replaced_and_any_other_is_refused(tmp_path):
    previous = tmp_path / "previous"
    (previous / "runs").mkdir(parents=True)
    (previous / demo.MARKER).write_text("")
    (previous / "runs" / "old.txt").write_text("old")
    assert demo._prepare_work(previous) is None
    assert sorted(p.name for p in previous.iterdir()) == [demo.MARKER]
    before_marker = tmp_path / "before_marker"  # what demos left before they wrote the marker
    (before_marker / "eval").mkdir(parents=True)
    assert demo._prepare_work(before_marker) is None and not (before_marker / "eval").exists()
    users = tmp_path / "users"
    (users / "prep").mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    refusal = demo._prepare_work(users)
    assert "'notes.txt' is not the demo's" in refusal and "nothing was changed" in refusal
    assert (users / "notes.txt").read_text() == "mine" and (users / "prep").is_dir()
    assert not (users / demo.MARKER).exists()


LOSS_LINE = re.compile(r"held-out answer-token loss \((hf|megatron)\): base ([\d.]+) -> LoRA ([\d.]+) \((lower|NOT lower)\)")


@pytest.mark.slow
def test_quick_demo_runs_every_step_and_ends_with_the_verdicts(tmp_path):
    work = tmp_path / "demo"
    out = run_module("nemotune.recipes.demo", "--quick", "--work", work, timeout=1200).stdout
    summary = json.loads((work / "eval" / "summary.json").read_text())
    stages = json.loads((work / "runs" / "stages.json").read_text())
    assert [(s["stage"], s["steps"]) for s in stages] == [("stage1", demo.QUICK_TRAIN_STEPS), ("stage2", 7)]
    assert summary["n_examples"] == demo.QUICK_EVAL_LIMIT
    assert (work / "export" / "lora.nemo").is_file() and (work / "export" / "peft" / "adapter_config.json").is_file()
    tail = out[out.index("nemotune demo: done"):]
    for line in demo.verdict_lines(summary) + demo.example_lines(work / "eval" / "predictions.jsonl"):
        assert line in tail
    losses = {engine: (float(base), float(lora)) for engine, base, lora, _ in LOSS_LINE.findall(tail)}
    assert set(losses) == {"hf", "megatron"}
    for base, lora in losses.values():  # even 12 steps move the held-out loss (7.24 -> 6.77 when written)
        assert 7.0 < base < 7.5 and lora < base - 0.2
    assert re.search(r"ROUGE-L F1: .*: improved", tail)
    assert tail.rstrip().splitlines()[-1].startswith("fine-tuning worked")
