"""rl.grpo.rollout_backend=vllm without vLLM: a stub `vllm` module (LLM, SamplingParams, LoRARequest recording
their calls) drives the backend on the tiny model's HF dir. vLLM itself is exercised only where it imports."""
from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from nemotune.converters.formats import adapters as adapter_io
from nemotune.converters.formats.hf_config import load_hf_config
from nemotune.recipes.engine.rl import GRPOTrainer, Prompt
from nemotune.recipes.engine.vllm_rollout import VLLMRollout, rollout_seed, vllm_problem

G, DIM = 3, 4


class StubVLLM:
    """The three vLLM names the backend uses; every call recorded, and the adapter dir read while it exists."""

    def __init__(self):
        self.llm_kwargs, self.sampling, self.requests, self.generate_calls = [], [], [], []
        stub = self

        class LLM:
            def __init__(self, **kwargs):
                stub.llm_kwargs.append(kwargs)

            def generate(self, prompts, params, *, lora_request, use_tqdm):
                path = Path(lora_request.path)
                stub.generate_calls.append({
                    "prompts": [p["prompt_token_ids"] for p in prompts], "request": lora_request,
                    "files": sorted(f.name for f in path.iterdir()),
                    "peft_config": json.loads((path / adapter_io.ADAPTER_CONFIG).read_text()),
                    "peft_weights": load_file(str(path / adapter_io.PEFT_WEIGHTS))})
                # completion k of a prompt: its last prompt token, then 100 + k, then 7 (a stop id)
                return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=(p["prompt_token_ids"][-1], 100 + k, 7))
                                                 for k in range(sp.n)]) for p, sp in zip(prompts, params)]

        class SamplingParams:
            def __init__(self, **kwargs):
                stub.sampling.append(kwargs)
                self.n = kwargs["n"]

        class LoRARequest:
            def __init__(self, lora_name, lora_int_id, lora_path):
                self.name, self.int_id, self.path = lora_name, lora_int_id, lora_path
                stub.requests.append(self)

        self.modules = {"vllm": types.ModuleType("vllm"), "vllm.lora": types.ModuleType("vllm.lora"),
                        "vllm.lora.request": types.ModuleType("vllm.lora.request")}
        for name, module in self.modules.items():
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        self.modules["vllm"].LLM, self.modules["vllm"].SamplingParams = LLM, SamplingParams
        self.modules["vllm.lora.request"].LoRARequest = LoRARequest


@pytest.fixture
def stub_vllm(monkeypatch):
    stub = StubVLLM()
    for name, module in stub.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return stub


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from nemotune.converters.tiny_model import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("vllm_tiny") / "tiny_base", copy_tokenizer=False)


def adapter_for(hf_dir, seed):
    config = {"dim": DIM, "alpha": 8.0, "dropout": 0.0, "target_modules": ["linear_qkv", "linear_fc2"],
              "variant": "nemo", "layer_selection": None, "base_model": load_hf_config(hf_dir),
              "base_model_name_or_path": str(hf_dir)}
    return adapter_io.random_adapter(config, seed=seed), config


def test_vllm_backend_loads_each_steps_adapter_and_returns_its_token_ids(stub_vllm, tiny_hf, tmp_path):
    run_dir = tmp_path / "run"
    backend = VLLMRollout(hf_path=tiny_hf, max_lora_rank=DIM, work_dir=run_dir, seed=1234, max_model_len=96,
                          stop_ids=[7, 2])
    prompts, indices = [[11, 12, 13], [21, 22]], [5, 9]
    loaded = []
    for step, seed in ((1, 0), (2, 1)):
        state, config = adapter_for(tiny_hf, seed)
        loaded.append(adapter_io.to_peft(state, config)[0])
        outs = backend.generate(prompts, indices, step, state, config, num_generations=G, temperature=0.7,
                                top_p=0.9, max_new_tokens=16)
        # the returned token ids, in the Megatron backend's rollout structure
        assert outs == [{"completions": [[p[-1], 100 + k, 7] for k in range(G)], "entropy_sum": pytest.approx(
            float("nan"), nan_ok=True)} for p in prompts]
    # one engine, created once, with LoRA enabled at the adapter's rank on the HF base
    assert len(stub_vllm.llm_kwargs) == 1
    kwargs = stub_vllm.llm_kwargs[0]
    assert (kwargs["model"], kwargs["enable_lora"], kwargs["max_lora_rank"]) == (str(tiny_hf), True, DIM)
    assert kwargs["max_model_len"] == 96 and kwargs["seed"] == 1234
    # one LoRARequest per step, ids increasing, each on a valid HF PEFT dir that is gone afterwards
    assert [r.int_id for r in stub_vllm.requests] == [1, 2]
    assert len({r.path for r in stub_vllm.requests}) == 2
    for call in stub_vllm.generate_calls:
        assert adapter_io.ADAPTER_CONFIG in call["files"] and adapter_io.PEFT_WEIGHTS in call["files"]
        peft = call["peft_config"]
        assert (peft["peft_type"], peft["task_type"], peft["r"], peft["lora_alpha"]) == ("LORA", "CAUSAL_LM", DIM, 8.0)
        assert set(peft["target_modules"]) == {"q_proj", "k_proj", "v_proj", "down_proj"}
        assert call["prompts"] == prompts
        assert Path(call["request"].path).is_relative_to(run_dir)
    assert list(run_dir.iterdir()) == []  # the per-step temp dirs removed after use
    # each step's request carries that step's adapter (the two differ)
    for call, expected in zip(stub_vllm.generate_calls, loaded):
        assert call["peft_weights"].keys() == expected.keys()
        assert all(torch.equal(call["peft_weights"][k], expected[k]) for k in expected)
    first = stub_vllm.generate_calls[0]["peft_weights"]
    assert not all(torch.equal(first[k], v) for k, v in stub_vllm.generate_calls[1]["peft_weights"].items())
    # SamplingParams: n=G, the sampling settings, a seed per (step, prompt), the stop ids
    assert len(stub_vllm.sampling) == 4
    for params in stub_vllm.sampling:
        assert (params["n"], params["temperature"], params["top_p"], params["max_tokens"]) == (G, 0.7, 0.9, 16)
        assert params["stop_token_ids"] == [7, 2]
    assert [p["seed"] for p in stub_vllm.sampling] == [rollout_seed(1234, s, i) for s in (1, 2) for i in indices]
    assert len({p["seed"] for p in stub_vllm.sampling}) == 4
    # a step that does not advance would reuse a cached adapter id: refused
    with pytest.raises(ValueError, match="step 2 after step 2"):
        backend.generate(prompts, indices, 2, *adapter_for(tiny_hf, 0), num_generations=G, temperature=1.0,
                         top_p=1.0, max_new_tokens=4)


def test_vllm_completions_reach_the_grpo_samples(stub_vllm, tiny_hf, tmp_path):
    """GRPOTrainer.vllm_rollouts maps rank 0's completions to prompt indices; _group_samples masks them."""
    state, config = adapter_for(tiny_hf, 0)
    prompts = [Prompt(ids=[1, 2, 3 + i], reference="r", text="t", messages=[]) for i in range(4)]
    trainer = SimpleNamespace(
        grpo=SimpleNamespace(num_generations=2, temperature=1.0, top_p=1.0, max_new_tokens=8), prompts=prompts,
        consolidated_adapter=lambda: state, checkpointer=SimpleNamespace(adapter_config=config),
        vllm=VLLMRollout(hf_path=tiny_hf, max_lora_rank=DIM, work_dir=tmp_path, seed=0, max_model_len=32))
    sampled = GRPOTrainer.vllm_rollouts(trainer, [3, 1], step=5)
    assert sorted(sampled) == [1, 3]
    assert sampled[3]["completions"] == [[6, 100, 7], [6, 101, 7]]
    assert stub_vllm.requests[0].int_id == 5
    samples = GRPOTrainer._group_samples(None, prompts[3], sampled[3]["completions"])
    assert samples[1].input_ids.tolist() == [1, 2, 6, 6, 101, 7]
    # the loss covers exactly the generated tokens (position i predicts token i + 1)
    assert samples[1].loss_mask.tolist() == [0, 0, 1, 1, 1, 0]
    # a vLLM failure on rank 0 becomes one error every rank raises (none waits on the broadcast forever)
    trainer.vllm.generate = lambda *a, **k: (_ for _ in ()).throw(OSError("CUDA out of memory"))
    with pytest.raises(RuntimeError, match="vLLM rollout of step 6 failed on rank 0: OSError: CUDA out of memory"):
        GRPOTrainer.vllm_rollouts(trainer, [3], step=6)


def test_vllm_backend_refusals(stub_vllm, monkeypatch):
    assert "model.hf_path is not set" in vllm_problem(None)
    if not torch.cuda.is_available():
        assert "no GPU here" in vllm_problem("/models/base")
    monkeypatch.setitem(sys.modules, "vllm", None)  # an import of vllm fails
    problem = vllm_problem("/models/base")
    assert "pip install vllm" in problem and "rl.grpo.rollout_backend=megatron" in problem
