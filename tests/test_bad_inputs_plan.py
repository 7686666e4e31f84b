"""Bad inputs of `nemotune plan`: each is refused with one line naming the key or flag and the fix, exit 2."""

from __future__ import annotations

import pytest

from battery import BadInput, check

PLAN = "nemotune.recipes.plan"

CASES = [
    BadInput("unknown_model", [PLAN, "model=no_such_model"], ["model=no_such_model", "conf/model", "nemotron_nano_8b"]),
    BadInput("unknown_experiment", [PLAN, "experiment=nope"], ["experiment=nope", "nano8b_fiqa_lora"]),
    BadInput("missing_hf_path", [PLAN, "model.hf_path=/nonexistent/model"], ["model.hf_path", "config.json"]),
    BadInput("tp_does_not_divide_heads", [PLAN, "model=tiny", "parallel.tensor_model_parallel_size=3",
                                          "cluster.nproc_per_node=3"],
             ["parallel.tensor_model_parallel_size=3", "use one of [1, 2]"]),
    BadInput("pp_does_not_divide_layers", [PLAN, "experiment=nano8b_fiqa_lora", "parallel.pipeline_model_parallel_size=3",
                                           "cluster.nproc_per_node=3"],
             ["parallel.pipeline_model_parallel_size=3", "32 layers"]),
    BadInput("layout_larger_than_gpus", [PLAN, "experiment=nano8b_fiqa_lora", "parallel=tp2", "cluster.nproc_per_node=3"],
             ["TP x PP x CP = 2", "3 GPU(s)"]),
    BadInput("gpu_memory_unparsable", [PLAN, "--gpu-memory", "lots"], ["--gpu-memory=lots", "80GiB"]),
    BadInput("gpu_memory_zero", [PLAN, "--gpu-memory", "0GiB"], ["--gpu-memory=0GiB", "> 0"]),
    BadInput("gpus_zero", [PLAN, "--gpus", "0"], ["--gpus=0", ">= 1"]),
    BadInput("mfu_out_of_range", [PLAN, "--mfu", "40"], ["--mfu=40.0", "(0, 1]"]),
    BadInput("unknown_gpu_type", [PLAN, "--gpu-type", "V100"], ["--gpu-type=V100", "H100"]),
    BadInput("unknown_recompute", [PLAN, "--recompute", "some"], ["--recompute", "selective"]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case):
    check(case)
