"""RL after SFT on the LoRA policy: GRPO and DPO trainers over the SupervisedTrainer's pieces.

Both trainers are SupervisedTrainers (the same optimizer, LR schedule, checkpointer, metrics logger, resume
rules and step loop); they replace only what one step does.

* The reference policy is the policy RL started from (rl.reference=initial): the peft.restore_from adapter's
  LoRA weights, kept as a frozen copy and swapped in for the reference pass (`adapter_weights`); with no starting
  adapter, or rl.reference=base, the same model with its adapters switched off (`adapter_disabled`: every LoRA
  delta scaled by 0, the base output unchanged). Either way no second copy of the base weights exists.
* Log-probabilities come from the model's own loss path (forward with `labels`: vocab-parallel under TP,
  chunked over the vocabulary), through megatron's pipeline schedule, so any TP / PP / DP layout works.
* GRPO (Shao et al. 2024, DeepSeekMath): G completions per prompt sampled from the current policy on the
  Megatron model (`Rollout`: temperature, top-p, Gumbel-max with a generator seeded by (run.seed, step,
  prompt), so every layout and a resumed run draw the same samples; decoding over megatron's KV cache), or on
  vLLM with the adapter loaded per step (rl.grpo.rollout_backend=vllm, `vllm_rollout`), rewards from `rewards.Rewards`,
  group-normalised advantages, the PPO clipped token-level loss over generated tokens only, plus
  kl_coef x the k3 estimator of KL(policy || reference) per token; the loss is the sum over every generated
  token of the global batch divided by their count.
* DPO (Rafailov et al. 2023) with label smoothing (conservative DPO): pairs through the chat template with
  answer-only masks; each micro-batch holds one pair (chosen, rejected).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nemotune.recipes.engine import batches, distributed
from nemotune.recipes.engine.trainer import SupervisedTrainer

ADV_EPS = 1e-4  # added to the group std (TRL's value): a group of equal rewards gets advantage 0


# ---- the reference policy -------------------------------------------------------------------------------------

@contextlib.contextmanager
def adapter_disabled(model_chunks):
    """The base model: every LoRA adapter's contribution scaled by 0 (out + 0 * delta == out exactly)."""
    from nemotune.recipes.engine.lora import _HookedAdapter

    adapters = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, _HookedAdapter)]
    scales = [a.scale for a in adapters]
    for a in adapters:
        a.scale = 0.0
    try:
        yield
    finally:
        for a, s in zip(adapters, scales):
            a.scale = s


def adapter_parameters(model_chunks) -> List[torch.nn.Parameter]:
    """Every LoRA parameter of this rank (its TP shard, its pipeline stage), in a fixed order."""
    from nemotune.recipes.engine.lora import _HookedAdapter

    return [p for chunk in model_chunks for m in chunk.modules() if isinstance(m, _HookedAdapter)
            for p in m.parameters()]


@contextlib.contextmanager
def adapter_weights(model_chunks, weights: Sequence[torch.Tensor]):
    """The policy with other LoRA weights (`weights`, in `adapter_parameters` order) swapped in, and its own
    restored bit for bit afterwards: the initial policy as the reference with no second model."""
    params = adapter_parameters(model_chunks)
    own = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(params, own):
                p.copy_(w)


@contextlib.contextmanager
def temperature_scaled(model_chunks, temperature: float):
    """The policy at sampling temperature T: the final norm's output divided by T, so every logit (the output
    layer has no bias) is divided by T in generation and in the loss's log-probs alike (as TRL and NeMo-RL do:
    the ratio and the KL are those of the distribution the completions were sampled from)."""
    handles = []
    if temperature != 1.0:
        for chunk in model_chunks:
            module = chunk
            while hasattr(module, "module"):
                module = module.module
            norm = getattr(getattr(module, "decoder", None), "final_layernorm", None)
            if norm is not None and getattr(module, "post_process", True):
                handles.append(norm.register_forward_hook(lambda _m, _a, out: out / temperature))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---- losses (pure functions: the tests compare them with their own reference) ---------------------------------

def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[prompts, G] rewards -> (r - group mean) / (group std + eps), std unbiased as in DeepSeekMath / TRL."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + ADV_EPS)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: Optional[torch.Tensor],
                    advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float, kl_coef: float) -> Dict[str, torch.Tensor]:
    """Per-token GRPO objective summed over generated tokens (`mask`), [rows, T] inputs, `advantages` [rows].

    loss_t = -min(r_t A, clip(r_t, 1 - eps, 1 + eps) A) + kl_coef * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)
    with r_t = exp(logp_t - old_t). Returns the sum (differentiable) and the sums of KL and clipped tokens."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype)[:, None]
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if ref_logp is not None and kl_coef:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_coef * kl
    else:
        kl = torch.zeros_like(logp)
    was_clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    return {"loss_sum": (per_token * mask).sum(), "tokens": mask.sum().detach(),
            "kl_sum": (kl.detach() * mask).sum(), "clipped_sum": (was_clipped.to(mask.dtype) * mask).sum()}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> Dict[str, torch.Tensor]:
    """Per-pair DPO loss on sequence log-probs, with conservative label smoothing; rewards are beta x log-ratio."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    logits = chosen_reward - rejected_reward
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    # a tie (the policy is still the reference) is a coin flip: it counts half
    accuracy = (logits > 0).to(logits.dtype) + 0.5 * (logits == 0).to(logits.dtype)
    return {"loss": loss, "margin": logits.detach(), "accuracy": accuracy.detach()}


# ---- data -----------------------------------------------------------------------------------------------------

@dataclass
class Prompt:
    ids: List[int]
    reference: str
    text: str
    messages: list  # the conversation before the reference answer


def load_prompts(messages_file: Path, tokenizer, thinking: Optional[str] = None) -> List[Prompt]:
    """Every conversation of a prepared split as a generation prompt (its final assistant turn removed, the
    chat template's generation header appended) and that turn's text as the reference answer."""
    from nemotune.data_prep import formats
    from nemotune.recipes.engine.generation import prompt_messages

    prompts = []
    for row in formats.load_messages(messages_file):
        messages = row["messages"] if isinstance(row, dict) and "messages" in row else row
        reference = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
        before = prompt_messages(messages, thinking)
        text = tokenizer.apply_chat_template(before, tokenize=False, add_generation_prompt=True)
        prompts.append(Prompt(ids=tokenizer(text, add_special_tokens=False)["input_ids"], reference=reference,
                              text=text, messages=before))
    return prompts


def _pair_prompt(row: dict) -> list:
    if "messages" in row:
        return [dict(m) for m in row["messages"]]
    return [{"role": "user", "content": row["prompt"]}]


def pair_problems(path: str) -> List[str]:
    """Every unusable row of a DPO pairs JSONL, with its line number (no tokenizer, no weights)."""
    file = Path(path)
    if not file.is_file():
        return [f"rl.dpo.pairs={path}: no such file; name a JSONL file of {{prompt|messages, chosen, rejected}} rows"]
    problems, rows = [], 0
    with file.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            rows += 1
            where = f"rl.dpo.pairs={path} line {number}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as err:
                problems.append(f"{where}: not a JSON object ({type(err).__name__}); fix or remove the line")
                continue
            if not isinstance(row, dict):
                problems.append(f"{where}: not a JSON object; each row is {{prompt|messages, chosen, rejected}}")
                continue
            prompt = row.get("messages") if "messages" in row else row.get("prompt")
            if not prompt or (isinstance(prompt, str) and not prompt.strip()):
                problems.append(f"{where}: no prompt; give a non-empty `prompt` string or `messages` list")
            elif "messages" in row and not (isinstance(prompt, list) and all(
                    isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str) for m in prompt)):
                problems.append(f"{where}: `messages` must be a list of {{role, content}} turns")
            elif "messages" in row and prompt[-1]["role"] != "user":
                problems.append(f"{where}: `messages` must end with a user turn (the answers are `chosen` and "
                                f"`rejected`); its last turn is {prompt[-1]['role']}")
            for key in ("chosen", "rejected"):
                value = row.get(key)
                if not isinstance(value, str) or not value.strip():
                    problems.append(f"{where}: empty {key!r}; every pair needs a non-empty chosen and rejected answer")
            if isinstance(row.get("chosen"), str) and row.get("chosen") == row.get("rejected") and row["chosen"].strip():
                problems.append(f"{where}: chosen and rejected are the same text; the pair prefers nothing")
    if rows == 0 and not problems:
        problems.append(f"rl.dpo.pairs={path}: the file holds no pairs")
    return problems


def load_pairs(path: str, tokenizer) -> List[tuple]:
    """(chosen Sample, rejected Sample) per row: the prompt through the chat template, the answer-only mask."""
    from nemotune.data_prep import formats
    from nemotune.data_prep.templating import render_and_mask

    pairs = []
    for row in formats.iter_jsonl(path):
        prompt = _pair_prompt(row)
        two = []
        for key in ("chosen", "rejected"):
            ids, mask, _ = render_and_mask(tokenizer, prompt + [{"role": "assistant", "content": row[key]}])
            two.append(batches.sample_from_record({"input_ids": ids, "loss_mask": mask}, label_aligned=False))
        pairs.append(tuple(two))
    return pairs


def write_split_pairs(path: Path, prompts: Sequence[Prompt], answers: Sequence[str]) -> tuple:
    """DPO pairs of a split, written atomically (temp + rename): chosen = the reference answer, rejected = the
    model's own answer; a prompt whose answer is empty or equals the reference is left out. (written, left out)"""
    import os

    rows = [{"messages": p.messages, "chosen": p.reference, "rejected": a} for p, a in zip(prompts, answers)
            if a.strip() and p.reference.strip() and a.strip() != p.reference.strip()]
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.rename(path)
    return len(rows), len(prompts) - len(rows)


# ---- sampling -------------------------------------------------------------------------------------------------

def sample_tokens(logits: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row by Gumbel-max on the (temperature-scaled) nucleus-filtered logits ([rows, V], CPU
    generator): the noise does not depend on the layout that computed the logits."""
    logits = logits.float().cpu()
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64).clamp_(1e-20, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(uniform))
    return torch.argmax(logits.double() + gumbel, dim=-1)


def sampling_generator(seed: int, step: int, prompt_index: int) -> torch.Generator:
    """The sampling RNG of one prompt at one step: a function of (run.seed, step, prompt), so a resumed run and
    every TP / PP / DP layout draw exactly the same noise."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, prompt_index]).generate_state(1)[0]))


# ---- trainers -------------------------------------------------------------------------------------------------

class _RLTrainer(SupervisedTrainer):
    """What GRPO and DPO share: a schedule run with a per-micro-batch loss, the log-prob passes, generation."""

    def __init__(self, *, tokenizer, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        # the reference: the adapter RL starts from (peft.restore_from, before any resume loads a later one),
        # frozen as a copy of the LoRA weights; without a starting adapter (or rl.reference=base) the base
        reference = self.cfg.rl.get("reference", "initial") if "rl" in self.cfg else "base"
        self.initial_adapter = [p.detach().clone() for p in adapter_parameters(self.model)] \
            if reference == "initial" and self.cfg.peft.get("restore_from") else None
        eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")}
        self.stop_ids = sorted(t for t in eos if isinstance(t, int) and 0 <= t < len(tokenizer))

    def _rl_forward_step(self, loss_fn, logits_only, data_iterator, model):
        batch = next(data_iterator)
        device = distributed.device()
        tokens, positions = batch["tokens"].to(device), batch["position_ids"].to(device)
        if logits_only:
            context = batch.get("inference_context")
            # megatron's inference path gathers the vocab-parallel logits itself (it refuses not to)
            kwargs = {} if context is None else {"inference_context": context, "runtime_gather_output": True}
            return model(tokens, positions, None, **kwargs), lambda out: _logits_output(out)
        labels, weights = batch["labels"].to(device), batch["loss_weights"].to(device)
        per_token_loss = model(tokens, positions, None, labels=labels, loss_mask=weights)
        return per_token_loss, lambda out: loss_fn(batch, out)

    def _rl_schedule(self, micro_batches: List[dict], forward_only: bool, loss_fn=None, logits_only=False):
        """megatron's schedule over `micro_batches`; returns the last stage's per-micro-batch outputs (other
        stages get an empty list)."""
        from functools import partial

        from megatron.core.pipeline_parallel import get_forward_backward_func

        seq = micro_batches[0]["tokens"].shape[1]
        return get_forward_backward_func()(
            forward_step_func=partial(self._rl_forward_step, loss_fn, logits_only), data_iterator=iter(micro_batches),
            model=self.model, num_microbatches=len(micro_batches), seq_length=seq,
            micro_batch_size=micro_batches[0]["tokens"].shape[0], forward_only=forward_only)

    def _token_logps(self, micro_batches: List[dict], *, reference: bool) -> List[Optional[torch.Tensor]]:
        """Per-token log-probs of each micro-batch's labels (last stage; None elsewhere), of the reference policy
        (`reference_policy`) or the current one."""
        def collect(batch, per_token_loss):
            logp = -per_token_loss.detach().float()
            return logp.sum() * 0, torch.ones((), dtype=torch.int), {"logp": logp}

        was_training = self.model[0].training
        for chunk in self.model:
            chunk.eval()
        with torch.no_grad(), (self.reference_policy() if reference else contextlib.nullcontext()):
            outs = self._rl_schedule(micro_batches, True, collect)
        if was_training:
            for chunk in self.model:
                chunk.train()
        return [o["logp"] for o in outs] if outs else [None] * len(micro_batches)

    def reference_policy(self):
        """The reference (rl.reference): the starting adapter's weights swapped in, or the adapter off."""
        if self.initial_adapter is not None:
            return adapter_weights(self.model, self.initial_adapter)
        return adapter_disabled(self.model)

    def _update(self, micro_batches: List[dict], loss_fn):
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outs = self._rl_schedule(micro_batches, False, loss_fn)
        update_ok, grad_norm, _ = self.optimizer.step()
        return outs, update_ok, grad_norm

    def _sum_over_world(self, values: List[float]) -> List[float]:
        total = torch.tensor(values, dtype=torch.float64, device=distributed.device())
        torch.distributed.all_reduce(total)
        return total.tolist()

    def _dp_sum(self, values: List[float]) -> List[float]:
        from megatron.core import parallel_state

        total = torch.tensor(values, dtype=torch.float64, device=distributed.device())
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return total.tolist()

    # ---- generation on the Megatron model (any TP / PP layout) ----
    @torch.no_grad()
    def _next_token_logits(self, tokens: torch.Tensor, context=None, offset: int = 0) -> Optional[torch.Tensor]:
        """Logits of the token after `tokens` ([rows, V], last stage; None elsewhere). With a KV cache
        (`context`), `tokens` are only the positions from `offset` on; the cache holds the ones before."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device).expand_as(tokens)
        batch = {"tokens": tokens, "position_ids": positions, "inference_context": context}
        outs = self._rl_schedule([batch], True, logits_only=True)
        if not outs:
            return None
        last = outs[0]["logits"][:, -1, :].contiguous()  # [rows, V / TP], or [rows, V] already with the cache
        return (last if context is not None else gather_from_tensor_model_parallel_region(last)).float()

    @torch.no_grad()
    def generate(self, prompt_ids: List[int], rows: int, max_new_tokens: int, choose, kv_cache: bool = True) -> dict:
        """`rows` completions of one prompt: `choose(logits [rows, V]) -> token ids` on the last pipeline stage,
        broadcast to the others. Returns the token ids (each up to and including its stop token) and the sum
        of the per-token entropies of the distributions they were drawn from (last stage; 0 elsewhere).

        With `kv_cache` (and megatron's static inference context importable) the prompt runs once and each new
        token is one position over megatron's KV cache, on every stage of any TP / PP layout; otherwise each
        new token re-runs the whole sequence. Both give the same tokens (logits equal to 1e-5, tested)."""
        from megatron.core import parallel_state

        device = distributed.device()
        tokens = torch.tensor([list(prompt_ids)] * rows, dtype=torch.long, device=device)
        done = torch.zeros(rows, dtype=torch.bool)
        lengths = torch.zeros(rows, dtype=torch.long)
        entropy_sum = 0.0
        stop = torch.tensor(self.stop_ids, dtype=torch.long)
        context = static_inference_context(rows, len(prompt_ids) + max_new_tokens) if kv_cache else None
        modes = [chunk.training for chunk in self.model]
        if context is not None:  # megatron reads and fills the cache only in eval mode
            for chunk in self.model:
                chunk.eval()
        try:
            feed = tokens
            for _ in range(max_new_tokens):
                if context is None:
                    logits = self._next_token_logits(tokens)
                else:
                    logits = self._next_token_logits(feed, context, context.sequence_len_offset)
                    context.sequence_len_offset += feed.shape[1]
                if logits is not None:
                    next_tokens = choose(logits)
                    logp = torch.log_softmax(logits.float().cpu(), dim=-1)
                    entropy_sum += float((-(logp.exp() * logp).sum(-1) * (~done)).sum())
                else:
                    next_tokens = torch.zeros(rows, dtype=torch.long)
                if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                    next_tokens = next_tokens.to(device)
                    torch.distributed.broadcast(next_tokens,
                                                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                                group=parallel_state.get_pipeline_model_parallel_group())
                next_tokens = next_tokens.cpu()
                lengths += (~done).long()
                done |= torch.isin(next_tokens, stop)
                feed = next_tokens.to(device)[:, None]
                tokens = torch.cat([tokens, feed], dim=1)
                if bool(done.all()):
                    break
        finally:
            for chunk, mode in zip(self.model, modes):
                chunk.train(mode)
        start = len(prompt_ids)
        return {"completions": [tokens[i, start:start + int(lengths[i])].tolist() for i in range(rows)],
                "entropy_sum": entropy_sum}

    def greedy_answers(self, prompts: Sequence[Prompt], max_new_tokens: int) -> List[str]:
        """The current policy's greedy answer to every prompt (each data-parallel rank answers its share)."""
        from megatron.core import parallel_state

        for chunk in self.model:
            chunk.eval()
        mine = np.array_split(np.arange(len(prompts)), self.dp_size)[self.dp_rank]
        answers = {}
        for i in mine:
            out = self.generate(prompts[int(i)].ids, 1, max_new_tokens, lambda logits: logits.argmax(-1).cpu())
            answers[int(i)] = self.tokenizer.decode(out["completions"][0], skip_special_tokens=True).strip()
        gathered = [None] * self.dp_size
        torch.distributed.all_gather_object(gathered, answers, group=parallel_state.get_data_parallel_group())
        for chunk in self.model:
            chunk.train()
        merged = {k: v for part in gathered for k, v in part.items()}
        return [merged[i] for i in range(len(prompts))]

    def _collate(self, samples: Sequence[batches.Sample]) -> dict:
        return batches.collate(list(samples), self.pad_id, pad_to=self.seq_length if self.pipeline else 0)


def static_inference_context(rows: int, max_length: int):
    """megatron's KV cache for `rows` sequences of up to `max_length` tokens (StaticInferenceContext, formerly
    InferenceParams), or None where this megatron-core has neither (generation then re-runs the sequence)."""
    try:
        from megatron.core.inference.contexts import StaticInferenceContext
    except ImportError:
        try:
            from megatron.core.inference_params import InferenceParams as StaticInferenceContext
        except ImportError:
            return None
    return StaticInferenceContext(rows, max_length)


def _logits_output(logits):
    return logits.sum() * 0, torch.ones((), dtype=torch.int), {"logits": logits.detach()}


def _last_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage()


class GRPOTrainer(_RLTrainer):
    """`train_samples` are the prompts' answer-token samples (their count and order drive the step plan);
    `prompts` the generation prompts in the same order."""

    def __init__(self, *, prompts: Sequence[Prompt], rewards, grpo, **kwargs):
        super().__init__(**kwargs)
        self.prompts, self.rewards, self.grpo = list(prompts), rewards, grpo
        self.vllm = None
        if grpo.get("rollout_backend", "megatron") == "vllm" and distributed.is_rank_zero():
            from nemotune.recipes.engine.vllm_rollout import VLLMRollout

            self.vllm = VLLMRollout(hf_path=self.cfg.model.hf_path, max_lora_rank=self.cfg.peft.lora.dim,
                                    work_dir=self.run_dir, seed=self.cfg.run.seed, max_model_len=self.seq_length,
                                    stop_ids=self.stop_ids)

    # ---- rollout ----
    def vllm_rollouts(self, indices: Sequence[int], step: int) -> Dict[int, dict]:
        """Every prompt of the global batch sampled on rank 0's vLLM engine with the current adapter (collective:
        the adapter is gathered from every rank, the completions broadcast to every rank)."""
        g = self.grpo
        adapter = self.consolidated_adapter()  # the TP=1 adapter, on global rank 0
        result = [None]
        if self.vllm is not None:
            try:
                outs = self.vllm.generate([self.prompts[int(i)].ids for i in indices], [int(i) for i in indices],
                                          step, adapter, self.checkpointer.adapter_config,
                                          num_generations=g.num_generations, temperature=g.temperature,
                                          top_p=g.top_p, max_new_tokens=g.max_new_tokens)
                result = [dict(zip((int(i) for i in indices), outs))]
            except Exception as err:  # every rank waits on the broadcast below: tell them, then fail alike
                result = [f"vLLM rollout of step {step} failed on rank 0: {type(err).__name__}: {err}"]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list(result, src=0)
        if isinstance(result[0], str):
            raise RuntimeError(result[0])
        return result[0]

    def rollout(self, prompt_index: int, step: int) -> dict:
        """G completions of one prompt sampled from the current policy (temperature applied by the caller)."""
        g = self.grpo
        generator = sampling_generator(self.cfg.run.seed, step, prompt_index)
        return self.generate(self.prompts[prompt_index].ids, g.num_generations, g.max_new_tokens,
                             lambda logits: sample_tokens(logits, g.top_p, generator))

    def _group_samples(self, prompt: Prompt, completions: List[List[int]]) -> List[batches.Sample]:
        """Prompt + completion rows whose label-aligned mask covers exactly the generated tokens."""
        samples = []
        for ids in completions:
            full = np.asarray(prompt.ids + ids, dtype=np.int64)
            mask = np.zeros(len(full), dtype=np.float32)
            mask[len(prompt.ids) - 1:len(full) - 1] = 1.0  # position i predicts token i + 1
            samples.append(batches.Sample(full, mask, [0]))
        return samples

    # ---- one step ----
    def train_step(self, indices: np.ndarray) -> dict:
        start = time.perf_counter()
        g, step = self.grpo, self.state.step + 1
        mine = batches.data_parallel_slice(indices, self.dp_rank, self.dp_size)
        micro_batches, reward_rows, part_rows, lengths, generated, entropy_sum = [], [], {}, [], 0, 0.0
        self._generation_time = 0.0
        sampled = None
        if g.get("rollout_backend", "megatron") == "vllm":
            sampled = self.vllm_rollouts(indices, step)
            self._generation_time = time.perf_counter() - start
        for prompt_index in mine:
            prompt_index = int(prompt_index)
            generation_start = time.perf_counter()
            if sampled is not None:
                out = sampled[prompt_index]
            else:
                with temperature_scaled(self.model, g.temperature):
                    out = self.rollout(prompt_index, step)
            self._generation_time += time.perf_counter() - generation_start
            prompt = self.prompts[prompt_index]
            texts = [self.tokenizer.decode(c, skip_special_tokens=True).strip() for c in out["completions"]]
            total, parts = self.rewards.score(texts, [prompt.reference] * len(texts), prompts=[prompt.text] * len(texts),
                                              completion_ids=out["completions"])
            reward_rows.append(total)
            for name, values in parts.items():
                part_rows.setdefault(name, []).extend(values)
            lengths += [len(c) for c in out["completions"]]
            generated += sum(len(c) for c in out["completions"])
            entropy_sum += out["entropy_sum"]
            batch = self._collate(self._group_samples(prompt, out["completions"]))
            batch["advantages"] = group_advantages(torch.tensor([total], dtype=torch.float64))[0].float()
            micro_batches.append(batch)
        rollout_time = time.perf_counter() - start
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's updates use
        train_start = time.perf_counter()
        with temperature_scaled(self.model, g.temperature):
            first_stats, sums, grad_norm, any_update = self._optimise(micro_batches)
        if any_update:
            self.scheduler.step(increment=1)
        train_time = time.perf_counter() - train_start
        return self._metrics(start, lr, rollout_time, train_time, first_stats, sums, grad_norm, reward_rows, part_rows,
                             lengths, generated, entropy_sum)

    def _optimise(self, micro_batches: List[dict]):
        """Reference and old log-probs, then steps_per_rollout updates; (first update's stats, summed stats,
        grad norm, whether any update applied), stats = world sums of [loss, tokens, KL, clipped tokens]."""
        g = self.grpo
        if g.kl_coef:
            for batch, ref in zip(micro_batches, self._token_logps(micro_batches, reference=True)):
                batch["ref_logp"] = ref
        if g.steps_per_rollout > 1:
            for batch, old in zip(micro_batches, self._token_logps(micro_batches, reference=False)):
                batch["old_logp"] = old

        def loss_fn(batch, per_token_loss):
            logp = -per_token_loss.float()
            old = batch.get("old_logp")
            ref = batch.get("ref_logp")
            device = logp.device
            parts = grpo_token_loss(logp, logp.detach() if old is None else old.to(device),
                                    None if ref is None else ref.to(device), batch["advantages"].to(device),
                                    batch["loss_weights"].to(device), g.clip_eps, g.kl_coef)
            stats = torch.stack([parts["loss_sum"].detach(), parts["tokens"], parts["kl_sum"], parts["clipped_sum"]])
            return parts["loss_sum"], parts["tokens"].to(torch.int), {"grpo": stats}

        first_stats, sums, grad_norm, any_update = None, torch.zeros(4, dtype=torch.float64), None, False
        for _ in range(g.steps_per_rollout):
            outs, update_ok, grad_norm = self._update(micro_batches, loss_fn)
            any_update = any_update or update_ok
            local = torch.zeros(4, dtype=torch.float64)
            for o in outs:
                local += o["grpo"].detach().to("cpu", torch.float64)
            reduced = torch.tensor(self._sum_over_world(local.tolist()), dtype=torch.float64)
            first_stats = reduced if first_stats is None else first_stats
            sums += reduced
        return first_stats, sums, grad_norm, any_update

    def _metrics(self, start, lr, rollout_time, train_time, first_stats, sums, grad_norm, reward_rows, part_rows,
                 lengths, generated, entropy_sum) -> dict:
        # rewards and lengths: every DP replica's prompts once
        rewards = [r for row in reward_rows for r in row]
        n = len(rewards)
        reward_stats = self._dp_sum([n, sum(rewards), sum(r * r for r in rewards), generated, 0.0, sum(lengths)])
        # the entropy is known on the last pipeline stage (its TP ranks hold copies: the ratio cancels them)
        entropy_total, entropy_tokens = self._sum_over_world([entropy_sum, float(generated) if _last_stage() else 0.0])
        names = self.rewards.names
        per_name = self._dp_sum([v for name in names for v in (sum(part_rows[name]),
                                                                sum(x * x for x in part_rows[name]))])
        n_all = reward_stats[0]
        metrics = {
            "train/loss": first_stats[0].item() / max(first_stats[1].item(), 1.0),
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/step_time": time.perf_counter() - start,
            "rl/reward_mean": reward_stats[1] / n_all,
            "rl/reward_std": _std(reward_stats[1], reward_stats[2], n_all),
            "rl/kl": sums[2].item() / max(sums[1].item(), 1.0),
            "rl/clip_fraction": sums[3].item() / max(sums[1].item(), 1.0),
            "rl/entropy": entropy_total / max(entropy_tokens, 1.0),
            "rl/response_length": reward_stats[5] / n_all,
            "rl/rollout_time": rollout_time,
            "rl/train_time": train_time,
            "rl/generation_time": self._generation_time,  # of the rollout time, the rest scores the rewards
            "rl/rollout_tokens_per_sec": reward_stats[3] / max(self._generation_time, 1e-9),
        }
        for i, name in enumerate(names):
            s, s2 = per_name[2 * i], per_name[2 * i + 1]
            metrics[f"rl/reward/{name}_mean"] = s / n_all
            metrics[f"rl/reward/{name}_std"] = _std(s, s2, n_all)
        return metrics

    def step_line(self, metrics: dict) -> str:
        return ("step {:>5d}/{:<5d} | loss {:+.6f} | reward {:.4f} +- {:.4f} | kl {:.5f} | clip {:.3f} | "
                "entropy {:.3f} | len {:6.1f} | rollout {:6.2f} s ({:7.1f} tok/s) | train {:6.2f} s | lr {:.2e}").format(
            self.state.step, self.max_steps, metrics["train/loss"], metrics["rl/reward_mean"],
            metrics["rl/reward_std"], metrics["rl/kl"], metrics["rl/clip_fraction"], metrics["rl/entropy"],
            metrics["rl/response_length"], metrics["rl/rollout_time"], metrics["rl/rollout_tokens_per_sec"],
            metrics["rl/train_time"], metrics["train/lr"])


class DPOTrainer(_RLTrainer):
    """`train_samples` are (chosen, rejected) Sample pairs; one pair per micro-batch."""

    def __init__(self, *, dpo, **kwargs):
        super().__init__(**kwargs)
        self.dpo = dpo

    def train_step(self, indices: np.ndarray) -> dict:
        start = time.perf_counter()
        d = self.dpo
        mine = batches.data_parallel_slice(indices, self.dp_rank, self.dp_size)
        micro_batches = [self._collate(list(self.train_samples[int(i)])) for i in mine]
        for batch, ref in zip(micro_batches, self._token_logps(micro_batches, reference=True)):
            batch["ref_logp"] = ref

        def loss_fn(batch, per_token_loss):
            weights = batch["loss_weights"].to(per_token_loss.device)
            policy = -(per_token_loss.float() * weights).sum(-1)
            ref = (batch["ref_logp"].to(weights.device) * weights).sum(-1)
            out = dpo_loss(policy[0:1], policy[1:2], ref[0:1], ref[1:2], d.beta, d.label_smoothing)
            loss = out["loss"].sum()
            stats = torch.stack([loss.detach(), torch.ones(()), out["accuracy"].sum(), out["margin"].sum(),
                                 policy[0].detach(), policy[1].detach()]).double()
            return loss, torch.ones((), dtype=torch.int), {"dpo": stats}

        lr = self.optimizer.param_groups[0]["lr"]
        outs, update_ok, grad_norm = self._update(micro_batches, loss_fn)
        if update_ok:
            self.scheduler.step(increment=1)
        local = torch.zeros(6, dtype=torch.float64)
        for o in outs:
            local += o["dpo"].detach().to("cpu", torch.float64)
        loss, pairs, correct, margin, chosen, rejected = self._sum_over_world(local.tolist())
        pairs = max(pairs, 1.0)  # TP copies of the last stage count each pair several times: ratios cancel it
        return {"train/loss": loss / pairs, "train/lr": lr,
                "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "train/step_time": time.perf_counter() - start, "dpo/accuracy": correct / pairs,
                "dpo/reward_margin": margin / pairs, "dpo/chosen_logp": chosen / pairs,
                "dpo/rejected_logp": rejected / pairs}

    def step_line(self, metrics: dict) -> str:
        return ("step {:>5d}/{:<5d} | loss {:.6f} | accuracy {:.3f} | margin {:+.4f} | logp chosen {:.3f} "
                "rejected {:.3f} | {:7.1f} ms/step | lr {:.2e}").format(
            self.state.step, self.max_steps, metrics["train/loss"], metrics["dpo/accuracy"],
            metrics["dpo/reward_margin"], metrics["dpo/chosen_logp"], metrics["dpo/rejected_logp"],
            metrics["train/step_time"] * 1e3, metrics["train/lr"])


def _std(total: float, squares: float, n: float) -> float:
    if n < 2:
        return 0.0
    mean = total / n
    return float(max(squares / n - mean * mean, 0.0) ** 0.5)
