"""LoRA across layouts in ONE 2-rank gloo launch (tests/dist/lora_worker.py): TP=1 vs TP=2 vs TP=2+SP vs PP=2."""
import json

import pytest

from conftest import REPO, run_torchrun

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("lora_dist")
    out = scratch / "report.json"
    run_torchrun(REPO / "tests" / "dist" / "lora_worker.py", scratch, out)
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp"])
@pytest.mark.parametrize("variant", ["canonical", "nemo"])
def test_tensor_parallel_matches_tp1(report, layout, variant):
    key = f"{layout}/{variant}"
    assert report[f"{key}/logits"] <= TOLERANCE  # same base + same full adapter -> same logits
    assert report[f"{key}/grads"] <= TOLERANCE  # relative: adapter gradients gathered to the TP=1 layout
    assert report[f"{key}/replicated_grad_spread"] == 0.0  # replicated A/B: identical grads on both TP ranks
    assert report[f"{key}/gathered"] == 0.0  # gather_adapter(TP=2) == the TP=1 adapter
    assert report[f"{key}/fresh_init"] == 0.0  # apply_lora draws the same A whatever the TP size
    assert report[f"{key}/trainable_diff"] == 0.0  # print_trainable reports the whole model


@pytest.mark.parametrize("variant", ["canonical", "nemo"])
def test_pipeline_parallel_gathers_global_layers(report, variant):
    assert report[f"pp2/{variant}/layers"] == ["0", "1"]
    assert report[f"pp2/{variant}/gathered"] == 0.0
    assert report[f"pp2/{variant}/fresh_init"] == 0.0  # seeded by global layer number
    assert report[f"pp2/{variant}/dist_ckpt_from_tp2"] == 0.0  # sharded_state_dict: saved TP=2, loaded PP=2
