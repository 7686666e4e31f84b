"""GRPO rollouts on vLLM (rl.grpo.rollout_backend=vllm, GPU only): the current adapter loaded per step.

One `vllm.LLM` over the HF base model (model.hf_path), created once on global rank 0 with LoRA enabled. Each
step rank 0 writes the trainer's consolidated adapter (the TP=1 tensors a checkpoint saves) as an HF PEFT dir
into a fresh temp dir of the run dir, samples every prompt of the global batch through vLLM with that adapter,
removes the dir, and broadcasts the completions' token ids to every rank, which then go through the same
rewards, log-prob passes and loss as the Megatron backend's (log-probs stay on the Megatron model).

vLLM's LoRA API (https://docs.vllm.ai/en/latest/models/lora.html): `LLM(model=..., enable_lora=True,
max_lora_rank=...)`, then `llm.generate(prompts, sampling_params, lora_request=LoRARequest(name, int_id, path))`,
where `int_id` is globally unique per adapter (vLLM caches loaded adapters by it, so a new id per step makes it
load the new weights). Prompts go in as token ids (`{"prompt_token_ids": [...]}`, vLLM's TokensPrompt) and each
`RequestOutput.outputs[i].token_ids` is one of the `SamplingParams.n` completions.

vLLM draws its own samples (seeded per prompt and step by `SamplingParams.seed`): the same run on another
layout or vLLM version need not draw the same completions, unlike the Megatron backend's layout-independent
Gumbel-max; it reports no per-token entropy (rl/entropy is NaN).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import numpy as np

# vLLM shares the GPU with the Megatron policy it samples for: its weights and KV cache get this fraction
GPU_MEMORY_FRACTION = 0.3


def rollout_seed(seed: int, step: int, prompt_index: int) -> int:
    """vLLM's sampling seed of one prompt at one step: a function of (run.seed, step, prompt), so a resumed run
    asks for the same samples."""
    return int(np.random.SeedSequence([seed, step, prompt_index]).generate_state(1)[0] & 0x7FFFFFFF)


class VLLMRollout:
    """The vLLM engine of one process and its per-step adapter. `generate` runs where the engine lives (rank 0)."""

    def __init__(self, *, hf_path: str, max_lora_rank: int, work_dir: Path, seed: int, max_model_len: int,
                 stop_ids: Sequence[int] = (), dtype: str = "auto", gpu_memory_utilization: float = GPU_MEMORY_FRACTION):
        self.hf_path, self.max_lora_rank, self.work_dir = str(hf_path), int(max_lora_rank), Path(work_dir)
        self.seed, self.max_model_len, self.stop_ids = int(seed), int(max_model_len), [int(t) for t in stop_ids]
        self.dtype, self.gpu_memory_utilization = dtype, gpu_memory_utilization
        self._llm = None
        self.last_lora_id = 0

    @property
    def llm(self):
        if self._llm is None:  # created once, on first use: weights load only where rollouts run
            from vllm import LLM

            self._llm = LLM(model=self.hf_path, enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=1,
                            seed=self.seed, dtype=self.dtype, max_model_len=self.max_model_len,
                            gpu_memory_utilization=self.gpu_memory_utilization)
        return self._llm

    def generate(self, prompts: Sequence[Sequence[int]], prompt_indices: Sequence[int], step: int,
                 adapter_state: Mapping, adapter_config: Mapping, *, num_generations: int, temperature: float,
                 top_p: float, max_new_tokens: int) -> List[dict]:
        """G completions of every prompt (token ids) under the policy base + `adapter_state`, as the Megatron
        backend's rollout returns them: [{"completions": [[ids] x G], "entropy_sum": nan}] in prompt order."""
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        from nemotune.converters.formats.adapters import save_adapter

        if step <= self.last_lora_id:
            raise ValueError(f"vLLM rollout: step {step} after step {self.last_lora_id}; each step loads a new adapter")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".vllm-adapter-step{step}-", dir=self.work_dir))
        try:
            adapter_dir = save_adapter(tmp / "adapter", adapter_state, adapter_config)
            params = [SamplingParams(n=num_generations, temperature=temperature, top_p=top_p,
                                     max_tokens=max_new_tokens, seed=rollout_seed(self.seed, step, int(i)),
                                     stop_token_ids=self.stop_ids or None)
                      for i in prompt_indices]
            # the int id must be unique per adapter and >= 1: the step number grows with every rollout
            request = LoRARequest(f"policy_step{step}", step, str(adapter_dir))
            outputs = self.llm.generate([{"prompt_token_ids": list(map(int, p))} for p in prompts], params,
                                        lora_request=request, use_tqdm=False)
            self.last_lora_id = step
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return [{"completions": [list(map(int, c.token_ids)) for c in out.outputs], "entropy_sum": float("nan")}
                for out in outputs]


def vllm_problem(hf_path: Optional[str]) -> Optional[str]:
    """Why rl.grpo.rollout_backend=vllm cannot run here (one line), or None."""
    import importlib.util

    from nemotune.recipes.engine.megatron_cpu import on_gpu

    try:
        missing = importlib.util.find_spec("vllm") is None
    except (ImportError, ValueError):  # a broken install, or a module without a spec
        missing = True
    if missing:
        return ("rl.grpo.rollout_backend=vllm: vllm is not installed; `pip install vllm` on a GPU machine, or use "
                "the default rl.grpo.rollout_backend=megatron, which needs nothing more")
    if not hf_path:
        return ("rl.grpo.rollout_backend=vllm: model.hf_path is not set; vLLM loads the base model from its HF "
                "dir: set model.hf_path=<HF model dir>")
    if not on_gpu():
        return ("rl.grpo.rollout_backend=vllm: no GPU here; vLLM rollouts need CUDA, use the default "
                "rl.grpo.rollout_backend=megatron on the CPU")
    return None
