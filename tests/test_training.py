"""LoRA SFT on megatron-core, end to end on CPU: layout parity, resume, packing, two-stage, bad input."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_module, run_torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parity(tiny_assets, tmp_path_factory):
    """One 2-rank launch trains every layout, resumes TP=2 at TP=1, compares packing and runs two stages."""
    root = tmp_path_factory.mktemp("parity")
    out = root / "results.json"
    run_torchrun(REPO / "tests" / "dist" / "train_parity.py", out, tiny_assets["prep"], tiny_assets["mcore"],
                 tiny_assets["base"], root / "runs", timeout=900)
    return json.loads(out.read_text()), root / "runs"


def test_same_losses_for_every_parallel_layout(parity):
    results, _ = parity
    reference = results["layouts"]["dp2"]
    assert sorted(results["layouts"]) == sorted(["dp2", "dp2_distopt", "tp2", "tp2_sp", "pp2"])
    assert list(reference) == ["1", "2", "3", "4"]
    for layout, losses in results["layouts"].items():
        for step, loss in reference.items():
            assert abs(losses[step] - loss) <= 1e-5, (layout, step, losses[step], loss)
    assert reference["4"] < reference["1"] - 0.01  # it learns on the bundled sample


def test_tp2_x_pp2_on_four_ranks_gives_the_same_losses(parity, tiny_assets, tmp_path):
    out = tmp_path / "tp2_pp2.json"
    run_torchrun(REPO / "tests" / "dist" / "train_parity.py", out, tiny_assets["prep"], tiny_assets["mcore"],
                 tiny_assets["base"], tmp_path / "runs", "tp2_pp2", nproc=4, timeout=900)
    losses = json.loads(out.read_text())["layouts"]["tp2_pp2"]
    for step, loss in parity[0]["layouts"]["dp2"].items():
        assert abs(losses[step] - loss) <= 1e-5, (step, losses[step], loss)


def test_checkpoint_saved_at_tp2_resumes_at_tp1(parity):
    results, runs = parity
    resumed, uninterrupted = results["tp2_resumed_at_tp1"], results["layouts"]["tp2"]
    assert list(resumed) == ["3", "4"]  # resumed after step 2: nothing recomputed, nothing skipped
    for step in ("3", "4"):
        assert abs(resumed[step] - uninterrupted[step]) <= 1e-5
    state = json.loads((runs / "tp2_resumed_at_tp1" / "checkpoints" / "step0000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["consumed_samples"] == 16 and state["world_size"] == 2


def test_packed_batch_loss_equals_unpacked(parity):
    results, _ = parity
    for layout in ("dp2", "pp2"):
        packing = results["packing"][layout]
        assert packing["documents"] >= 2
        assert abs(packing["packed"] - packing["unpacked"]) <= 1e-6, (layout, packing)


def test_two_stage_continues_from_stage_one_adapter(parity):
    results, runs = parity
    two = results["two_stage"]
    assert list(two["stage1"]) == ["1", "2", "3"] and len(two["stage2"]) >= 1
    assert abs(two["stage2"]["1"] - two["stage1_adapter_on_stage2_batch1"]) <= 1e-5
    for adapter in two["adapters"]:
        assert (runs.parent / adapter).exists() or os.path.exists(adapter)
    stages = json.loads((runs / "two_stage" / "stages.json").read_text())
    assert [s["stage"] for s in stages] == ["stage1", "stage2"]
    assert stages[1]["global_step_offset"] == 3
    rows = [json.loads(l) for l in (runs / "two_stage" / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["global_step"] == 4 and rows[0]["stage"] == "stage2"


def _train_args(assets, run_dir, *extra):
    return ["experiment=tiny_lora", f"model.hf_path={assets['base']}", f"model.checkpoint={assets['mcore']}",
            f"data.output_dir={assets['prep']}", f"run.output_dir={run_dir}", "run.tensorboard=false",
            "trainer.train_split=sft", "trainer.validation_split=eval", "trainer.sft.max_steps=6",
            "trainer.sft.val_check_interval=2", "trainer.sft.limit_val_batches=1", "trainer.save_top_k=1", *extra]


def _losses(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = (row["train/loss"], row["train/consumed_samples"])
    return out


def test_sigkill_at_a_random_step_then_resume_reproduces_the_run(tiny_assets, tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    run_module("nemotune.recipes.lora_sft", *_train_args(tiny_assets, reference_dir))
    # a fixed, printed seed: a failure replays with the same kill step (NEMOTUNE_KILL_SEED=<seed> to try others)
    seed = int(os.environ.get("NEMOTUNE_KILL_SEED", "1234"))
    kill_after = random.Random(seed).randint(3, 5)
    print(f"SIGKILL after step {kill_after} (NEMOTUNE_KILL_SEED={seed})")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "nemotune.recipes.lora_sft", *_train_args(tiny_assets, killed_dir)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = killed_dir / "metrics.jsonl"
        if metrics.exists() and sum('"train/loss"' in l for l in metrics.read_text().splitlines()) >= kill_after:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run finished before it could be killed at step {kill_after}"
    run_module("nemotune.recipes.lora_sft", *_train_args(tiny_assets, killed_dir))
    reference, resumed = _losses(reference_dir), _losses(killed_dir)
    assert sorted(resumed) == list(range(1, 7))
    for step, (loss, consumed) in reference.items():
        assert resumed[step][0] == pytest.approx(loss, abs=1e-5), step
        assert resumed[step][1] == consumed == step * 4  # no sample skipped or repeated
    final = json.loads((killed_dir / "checkpoints" / "step0000006" / "trainer_state.json").read_text())
    assert final["consumed_samples"] == 24 and final["step"] == 6
    kept = sorted(p.name for p in (killed_dir / "checkpoints").iterdir())
    assert "step0000006" in kept and len(kept) <= 2  # top-1 by val_loss plus the last


def test_data_from_another_tokenizer_is_refused(tiny_assets, tmp_path):
    prep = tmp_path / "prep"
    shutil.copytree(tiny_assets["prep"], prep)
    manifest = json.loads((prep / "manifest.json").read_text())
    manifest["tokenizer"]["tokenizer_json_sha256"] = "0" * 64
    (prep / "manifest.json").write_text(json.dumps(manifest))
    result = run_module("nemotune.recipes.lora_sft", *_train_args(tiny_assets, tmp_path / "run", f"data.output_dir={prep}"),
                        check=False)
    assert result.returncode == 2
    assert "tokenized by another tokenizer" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_adapter_of_another_shape_is_refused_before_training(tiny_assets, tmp_path):
    first = tmp_path / "first"
    run_module("nemotune.recipes.lora_sft", *_train_args(tiny_assets, first, "trainer.sft.max_steps=2"))
    result = run_module("nemotune.recipes.lora_sft", *_train_args(tiny_assets, tmp_path / "second", f"peft.restore_from={first}",
                                                         "peft.lora.dim=4"), check=False)
    assert result.returncode == 2
    assert "shape" in result.stderr and "linear_in.weight" in result.stderr
    assert not (tmp_path / "second" / "metrics.jsonl").exists()


def test_adapters_trained_under_tp2_and_pp2_serve_with_the_same_logits(parity, tiny_assets, tmp_path):
    """The consolidated adapter of a TP=2 and of a PP=2 run -> HF PEFT and merged HF: transformers gives the
    logits our Megatron model gives with the adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nemotune.converters.formats.adapters import export_hf_peft, merge_adapter
    from nemotune.converters.checkpoint import verify

    _, runs = parity
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(3))
    for layout in ("tp2", "pp2"):
        adapter = runs / layout / "checkpoints" / "step0000004" / "adapter"
        peft_dir = export_hf_peft(adapter, tmp_path / f"{layout}_peft")
        assert verify(tiny_assets["base"], tiny_assets["mcore"], adapter=adapter, peft_dir=peft_dir) <= 1e-5
        merged = merge_adapter(tiny_assets["base"], adapter, tmp_path / f"{layout}_merged")
        base = AutoModelForCausalLM.from_pretrained(str(tiny_assets["base"]), dtype=torch.float32).eval()
        with torch.no_grad():
            base_logits = base(ids).logits
            served = PeftModel.from_pretrained(base, str(peft_dir)).eval()(ids).logits
            merged_logits = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()(ids).logits
        torch.testing.assert_close(merged_logits, served, rtol=0, atol=1e-5)
        assert (served - base_logits).abs().max() > 1e-4  # the trained adapter changes the model
        # the checkpoint's adapter/ is itself an HF PEFT adapter: peft reads it as is
        fresh = AutoModelForCausalLM.from_pretrained(str(tiny_assets["base"]), dtype=torch.float32).eval()
        with torch.no_grad():
            direct = PeftModel.from_pretrained(fresh, str(adapter)).eval()(ids).logits
        torch.testing.assert_close(direct, served, rtol=0, atol=1e-6)
