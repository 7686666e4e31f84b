"""Full-parameter SFT (peft=none) on CPU: layout parity, the distributed optimizer's per-rank state, resume
after a lost checkpoint, after a real SIGKILL and across TP, LoRA resume with the distributed optimizer, the
checkpoint's contents, a mixed two-stage run."""
import json
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import REPO, run_module, run_torchrun

pytestmark = pytest.mark.slow

STEPS = 4


def _one_process_args(assets, run_dir):
    """The worker's run (tests/dist/sft_parity.py COMMON) in one process: TP = PP = DP = 1."""
    return ["experiment=tiny_sft", "cluster.nproc_per_node=1", f"model.hf_path={assets['base']}",
            f"model.checkpoint={assets['mcore']}", f"data.output_dir={assets['prep']}", f"run.output_dir={run_dir}",
            "run.tensorboard=false", "trainer.global_batch_size=4", f"trainer.sft.max_steps={STEPS}",
            "trainer.sft.val_check_interval=2", "trainer.optim.lr=1e-3", "trainer.optim.warmup_steps=1",
            "trainer.sft.limit_val_batches=2", "trainer.train_split=sft", "trainer.validation_split=eval"]


@pytest.fixture(scope="module")
def sft(tiny_assets, tmp_path_factory):
    """One process, then one 2-rank launch that trains every layout, stops and reruns, resumes TP=2 at TP=1 and
    runs a mixed two-stage experiment."""
    root = tmp_path_factory.mktemp("sft")
    single = run_module("nemotune.recipes.lora_sft", *_one_process_args(tiny_assets, root / "one_process"))
    out = root / "results.json"
    run_torchrun(REPO / "tests" / "dist" / "sft_parity.py", out, tiny_assets["prep"], tiny_assets["mcore"],
                 tiny_assets["base"], root / "runs", timeout=900)
    return {"results": json.loads(out.read_text()), "runs": root / "runs", "one_process": root / "one_process",
            "single_stdout": single.stdout}


def _steps(run_dir: Path) -> dict:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[str(row["step"])] = [row["train/loss"], row["train/consumed_samples"]]
    return out


def test_every_layout_gives_the_one_process_losses_and_the_loss_falls(sft):
    reference = _steps(sft["one_process"])
    assert list(reference) == ["1", "2", "3", "4"]
    layouts = sft["results"]["layouts"]
    assert sorted(layouts) == sorted(["dp2", "dp2_distopt", "tp2", "tp2_sp", "pp2", "tp2_sp_recompute_full",
                                      "dp2_recompute_selective"])
    for layout, steps in layouts.items():
        for step, (loss, consumed) in reference.items():
            assert abs(steps[step][0] - loss) <= 1e-5, (layout, step, steps[step][0], loss)
            assert steps[step][1] == consumed == int(step) * 4
    assert reference["4"][0] < reference["1"][0] - 0.05  # every weight learns on the bundled sample
    assert "full-parameter SFT (peft=none), distributed optimizer on, recompute none" in sft["single_stdout"]


def _optimizer_bytes_per_rank(step_dir: Path) -> dict:
    """Bytes of the optimizer's tensors each rank wrote (torch DCP names its files __<rank>_<n>.distcp)."""
    from nemotune.converters.formats.safe_pickle import check_dcp_metadata

    metadata = check_dcp_metadata(step_dir / "dist" / ".metadata")
    per_rank = defaultdict(int)
    for index, info in metadata.storage_data.items():
        if index.fqn.startswith("optimizer."):
            per_rank[int(str(info.relative_path).split("_")[2])] += int(info.length)
    return dict(per_rank)


def test_distributed_optimizer_holds_half_the_state_per_rank_at_dp2(sft):
    measured = sft["results"]["optimizer_state_bytes"]
    whole = 2 * 4 * measured["parameters"]  # Adam's exp_avg + exp_avg_sq in fp32 for every weight
    print(f"optimizer state bytes per rank at DP=2: distributed {measured['dp2_distopt']}, "
          f"not distributed {measured['dp2']}; whole state {whole}")
    assert measured["dp2"] == [whole, whole]  # each replica holds all of it (= DP=1's state)
    for size in measured["dp2_distopt"]:
        assert 0.49 <= size / whole <= 0.51, (size, whole)
    assert sum(measured["dp2_distopt"]) >= whole  # every weight's state is held by some rank
    # its checkpoint holds the same whole state as DP=1's, fully reshardable (written by DP rank 0)
    last = f"step{STEPS:07d}"
    dp1 = _optimizer_bytes_per_rank(sft["one_process"] / "checkpoints" / last)
    dp2 = _optimizer_bytes_per_rank(sft["runs"] / "dp2_distopt" / "checkpoints" / last)
    print(f"optimizer bytes in the checkpoint files per writing rank: DP=1 {dp1}, DP=2 distributed {dp2}")
    assert sum(dp2.values()) == sum(dp1.values())


def test_a_run_stopped_whose_last_checkpoint_is_lost_reruns_to_the_same_losses(sft):
    stopped = sft["results"]["stopped_and_rerun"]
    assert list(stopped["before_rerun"]) == ["1", "2", "3"]
    reference = sft["results"]["layouts"]["dp2_distopt"]
    assert list(stopped["steps"]) == ["1", "2", "3", "4"]
    for step, (loss, consumed) in reference.items():
        assert abs(stopped["steps"][step][0] - loss) <= 1e-5, step
        assert stopped["steps"][step][1] == consumed
    state = json.loads((Path(stopped["last_checkpoint"]) / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["consumed_samples"] == 16 and state["peft_scheme"] == "none"


def test_lora_with_the_distributed_optimizer_stopped_and_rerun_reproduces_the_losses(sft):
    case = sft["results"]["lora_distributed_optimizer_resume"]
    print(f"seconds per case of the launch: {sft['results']['seconds']}")
    assert case["distributed_optimizer"] is True
    assert list(case["before_rerun"]) == ["1", "2"]
    uninterrupted, resumed = case["uninterrupted"], case["stopped"]
    assert list(uninterrupted) == list(resumed) == ["1", "2", "3", "4"]
    for step, (loss, consumed) in uninterrupted.items():
        assert abs(resumed[step][0] - loss) <= 1e-5, step
        assert resumed[step][1] == consumed == int(step) * 4
    assert uninterrupted["4"][0] < uninterrupted["1"][0]


def test_full_sft_dp2_killed_at_a_random_step_then_rerun_reproduces_every_loss(sft, tiny_assets, tmp_path):
    """The launch's dp2_distopt run (peft=none, distributed optimizer, DP=2) as its own 2-process torchrun: SIGKILL
    the whole process group once a random step is logged (a save may be under way), rerun the same command:
    every step's loss and consumed_samples equal the uninterrupted run's."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "killed"
    args = [a if not a.startswith("cluster.nproc_per_node=") else "cluster.nproc_per_node=2"
            for a in _one_process_args(tiny_assets, run_dir)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "localhost:0", "--max_restarts", "0", "-m", "nemotune.recipes.lora_sft", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # a fixed, printed seed: a failure replays with the same kill step (NEMOTUNE_KILL_SEED=<seed> to try others)
    seed = int(os.environ.get("NEMOTUNE_KILL_SEED", "1234"))
    kill_after = random.Random(seed).randint(2, STEPS - 1)
    print(f"SIGKILL after step {kill_after} (NEMOTUNE_KILL_SEED={seed})")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and sum('"train/loss"' in line for line in metrics.read_text().splitlines()) >= kill_after:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run finished before it could be killed at step {kill_after}"
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    resumed, uninterrupted = _steps(run_dir), sft["results"]["layouts"]["dp2_distopt"]
    assert list(resumed) == [str(s) for s in range(1, STEPS + 1)]
    for step, (loss, consumed) in uninterrupted.items():
        assert abs(resumed[step][0] - loss) <= 1e-5, step
        assert resumed[step][1] == consumed == int(step) * 4
    state = json.loads((run_dir / "checkpoints" / f"step{STEPS:07d}" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["consumed_samples"] == 4 * STEPS and state["peft_scheme"] == "none"


def test_a_tp2_checkpoint_resumes_at_tp1(sft):
    resumed, uninterrupted = sft["results"]["tp2_resumed_at_tp1"], sft["results"]["layouts"]["tp2"]
    assert list(resumed) == ["3", "4"]
    for step in ("3", "4"):
        assert abs(resumed[step][0] - uninterrupted[step][0]) <= 1e-5
        assert resumed[step][1] == uninterrupted[step][1]


def test_full_sft_checkpoint_holds_the_model_the_hf_dir_and_no_adapter(sft, tiny_assets):
    from nemotune.converters.formats.checkpoint import open_megatron_checkpoint
    from nemotune.converters.formats.safe_pickle import check_dcp_metadata

    step = sft["runs"] / "tp2" / "checkpoints" / f"step{STEPS:07d}"
    assert not (step / "adapter").exists()
    keys = set(check_dcp_metadata(step / "dist" / ".metadata").state_dict_metadata)
    assert "model.decoder.layers.self_attention.linear_qkv.weight" in keys
    assert "model.embedding.word_embeddings.weight" in keys
    assert any(k.startswith("optimizer.state.exp_avg.model.decoder.") for k in keys)
    hf = step / "hf"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (hf / name).is_file(), name
    assert json.loads((hf / "config.json").read_text()) == json.loads((tiny_assets["base"] / "config.json").read_text())
    from transformers import AutoTokenizer

    trained_with = AutoTokenizer.from_pretrained(str(tiny_assets["base"])).chat_template
    assert AutoTokenizer.from_pretrained(str(hf)).chat_template == trained_with and trained_with
    with open_megatron_checkpoint(step) as (config, weights, prefix, aux):
        assert (weights, prefix, aux) == (step / "dist", "model.", hf)
        assert config["num_hidden_layers"] == json.loads((hf / "config.json").read_text())["num_hidden_layers"]


def test_mixed_two_stage_lora_starts_from_the_full_sft_model(sft):
    mixed = sft["results"]["mixed_two_stage"]
    assert list(mixed["stage2"]) == ["1", "2"]
    # LoRA's B starts at zero: stage 2's first loss is stage 1's model (read from its step dir) on that batch
    assert abs(mixed["stage2"]["1"][0] - mixed["stage1_model_on_stage2_batch1"]) <= 1e-5
    stage2_step = Path(mixed["stage2_adapter"]).parent
    state = json.loads((stage2_step / "trainer_state.json").read_text())
    assert state["peft_scheme"] == "lora"
    assert state["base_model"]["path"] == mixed["stage1_checkpoint"]
    for name in ("config.json", "tokenizer.json"):  # a LoRA checkpoint gets hf/ too, its adapter the tokenizer
        assert (stage2_step / "hf" / name).is_file() and (stage2_step / "adapter" / "tokenizer.json").is_file()


def test_a_lora_step_dir_is_refused_as_a_model_in_one_line(sft):
    from nemotune.converters.formats.checkpoint import ConversionError, open_megatron_checkpoint

    lora_step = Path(sft["results"]["mixed_two_stage"]["stage2_adapter"]).parent
    with pytest.raises(ConversionError) as err:
        with open_megatron_checkpoint(lora_step):
            pass
    message = str(err.value)
    assert "\n" not in message and "adapter-only checkpoint" in message and "nemotune export hf-peft/merge" in message


def test_stages_may_go_from_full_sft_to_lora_but_not_back():
    from nemotune.recipes.engine.config import ConfigError, compose
    from nemotune.recipes.two_stage import stage_configs

    cfg = compose("lora_sft", ["experiment=tiny_sft_two_stage"])
    assert [c.peft.peft_scheme for _, c in stage_configs(cfg)] == ["none", "lora"]
    cfg.stages[0].overrides["peft.peft_scheme"] = "lora"
    cfg.stages[1].overrides["peft.peft_scheme"] = "none"
    with pytest.raises(ConfigError) as err:
        stage_configs(cfg)
    assert "stages[stage2]" in str(err.value) and "nemotune export merge" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_trained_full_sft_step_exports_to_hf_and_nemo_with_the_template_prep_used(sft, tiny_assets, tmp_path):
    """The trained step dir itself (not a converted base): export hf loads in transformers with Megatron's logits,
    carries the chat template prep formatted the data with, and its weights are the trained ones; export nemo
    round-trips to the same tensors bit for bit."""
    import hashlib
    import tarfile

    import torch
    import yaml
    from safetensors.torch import load_file

    from nemotune.converters.checkpoint import verify
    from nemotune.converters.convert import main as convert_main
    from nemotune.converters.export import main as export_main
    from nemotune.recipes.engine.checkpointing import complete_checkpoints

    step = complete_checkpoints(sft["one_process"] / "checkpoints")[-1]
    hf_out = tmp_path / "hf"
    assert export_main(["hf", "--checkpoint", str(step), "--out", str(hf_out), "--no-progress"]) == 0
    assert verify(hf_out, step) <= 1e-5
    template = (hf_out / "chat_template.jinja").read_text()
    manifest = json.loads((Path(tiny_assets["prep"]) / "manifest.json").read_text())
    assert hashlib.sha256(template.encode()).hexdigest() == manifest["tokenizer"]["chat_template_sha256"]
    exported = {}
    for shard in hf_out.glob("model*.safetensors"):
        exported.update(load_file(str(shard)))
    base = {}
    for shard in Path(tiny_assets["base"]).glob("model*.safetensors"):
        base.update(load_file(str(shard)))
    assert exported.keys() == base.keys()
    assert not torch.equal(exported["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])

    nemo = tmp_path / "sft.nemo"
    assert export_main(["nemo", "--checkpoint", str(step), "--out", str(nemo)]) == 0
    with tarfile.open(nemo) as archive:
        config = yaml.safe_load(archive.extractfile("./model_config.yaml").read())
    assert config["tokenizer"]["chat_template"] == template and config["data"]["chat"] is True
    back = tmp_path / "back"
    assert convert_main(["nemo-to-hf", "--nemo", str(nemo), "--out", str(back), "--no-progress"]) == 0
    ours = load_file(str(back / "model.safetensors"))
    assert ours.keys() == exported.keys() and all(torch.equal(ours[k], exported[k]) for k in ours)
