"""Output layer + cross-entropy without materialising [tokens x vocab] logits.

At a real vocabulary (Llama 3: 128,256 tokens) the logits of a packed 4,096-token row are 2 GiB in fp32, and
the plain loss path keeps several such tensors alive (the logits, their softmax for the backward, the
gradient). `linear_cross_entropy` computes the same per-token loss in chunks of tokens: each chunk's logits
exist only while that chunk is processed.

Gradients: the per-token loss of row t depends only on hidden row t, so d loss_t / d h_t = (p_t - y_t) W is
computed in the forward pass (one [tokens x hidden] tensor) when the output weight is frozen (LoRA), and the
backward only scales it by the incoming gradient: two matmuls over the vocabulary per token, as in the plain
path. When the weight is trainable the backward recomputes each chunk's logits from the saved log-sum-exp.

Tensor parallelism: the output layer is vocab-parallel (each rank holds rows [start, start + V/tp) of the
weight). The max, the target logit and the sum of exponentials are reduced over the tensor-parallel group per
chunk, exactly as megatron's `vocab_parallel_cross_entropy` does for the whole tensor.

`install(model)` routes a megatron GPTModel's loss (forward with `labels`) through this function; positions
whose `loss_mask` is 0 are skipped and get loss 0 (they carry no weight in the trainer's answer-token loss).
`NEMOTUNE_LOSS_IMPL`: `auto` (default) is chunked except for a trainable output layer on a GPU with megatron's
fused cross-entropy configured (`cross_entropy_loss_fusion`), which keeps megatron's path; `chunked` always;
`plain` megatron's own path (the before/after comparison of bench/memory_vocab.py).

`hf_answer_token_loss` is the same idea for `nemotune eval` on a Hugging Face (+ PEFT) model: the decoder body
runs once and the output head + cross-entropy run in chunks on the answer positions only.
"""

from __future__ import annotations

import os
import types
from typing import Optional

import torch

IMPLS = ("auto", "chunked", "plain")
ENV_IMPL = "NEMOTUNE_LOSS_IMPL"
# logits elements per chunk: 2**25 fp32 = 128 MiB (261 tokens at a 128,256 vocabulary)
DEFAULT_CHUNK_ELEMENTS = 2 ** 25


def loss_impl() -> str:
    """`NEMOTUNE_LOSS_IMPL`: auto (default), chunked, or plain (megatron's own loss path, for comparisons)."""
    impl = os.environ.get(ENV_IMPL, "auto").strip().lower() or "auto"
    if impl not in IMPLS:
        raise ValueError(f"environment variable {ENV_IMPL}={impl!r} is not one of {', '.join(IMPLS)}; "
                         "unset it (auto) or set one of those")
    return impl


def chunk_tokens(vocab_local: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // max(1, vocab_local))


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(tensor, op=op, group=group)
    return tensor


def _chunk_stats(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group):
    """In place on `logits` (fp32 [c, Vl]): exp(logits - max). Returns (exp, sum of exp, log-sum-exp, target
    logit, local target index, target-on-this-rank mask), sums and max reduced over the tensor-parallel group."""
    vocab_local = logits.shape[1]
    row_max = _all_reduce(logits.max(dim=1).values, torch.distributed.ReduceOp.MAX, group)
    logits.sub_(row_max[:, None])
    local = labels - vocab_start
    on_rank = (local >= 0) & (local < vocab_local)
    index = torch.where(on_rank, local, torch.zeros_like(local))
    target = logits.gather(1, index[:, None]).squeeze(1) * on_rank
    exp = logits.exp_()
    sums = _all_reduce(torch.stack([exp.sum(dim=1), target]), torch.distributed.ReduceOp.SUM, group)
    lse = sums[0].log() + row_max
    return exp, sums[0], lse, sums[1] + row_max, index, on_rank


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, need_hidden_grad, need_weight_grad, vocab_start, group, chunk):
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
        # frozen weight: the whole gradient w.r.t. hidden is known now (see the module docstring)
        eager_grad = need_hidden_grad and not need_weight_grad
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if eager_grad else None
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            logits = (hidden[start:end] @ weight.t()).float()
            exp, sum_exp, lse, target, index, on_rank = _chunk_stats(logits, labels[start:end], vocab_start, group)
            loss[start:end] = lse - target
            lse_all[start:end] = lse
            if eager_grad:
                probs = exp.div_(sum_exp[:, None])
                probs[torch.arange(end - start, device=probs.device), index] -= on_rank.to(probs.dtype)
                grad_hidden[start:end] = probs.to(weight.dtype) @ weight
            del logits, exp
        ctx.eager_grad, ctx.hidden_dtype = eager_grad, hidden.dtype
        ctx.need = (need_hidden_grad, need_weight_grad)
        ctx.vocab_start, ctx.group, ctx.chunk = vocab_start, group, chunk
        if eager_grad:
            ctx.save_for_backward(grad_hidden)
        else:
            ctx.save_for_backward(hidden, weight, labels, lse_all)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        need_hidden, need_weight = ctx.need
        if ctx.eager_grad:
            (grad_hidden,) = ctx.saved_tensors
            return (grad_hidden * grad_loss.float()[:, None]).to(ctx.hidden_dtype), \
                None, None, None, None, None, None, None
        hidden, weight, labels, lse_all = ctx.saved_tensors
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        vocab_local = weight.shape[0]
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(hidden.shape[0], start + ctx.chunk)
            h = hidden[start:end]
            probs = (h @ weight.t()).float().sub_(lse_all[start:end, None]).exp_()
            local = labels[start:end] - ctx.vocab_start
            on_rank = (local >= 0) & (local < vocab_local)
            index = torch.where(on_rank, local, torch.zeros_like(local))
            probs[torch.arange(end - start, device=probs.device), index] -= on_rank.to(probs.dtype)
            probs.mul_(grad_loss[start:end, None].float())
            if need_hidden:
                grad_hidden[start:end] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight += probs.t().to(hidden.dtype).matmul(h).float()
            del probs
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         loss_mask: Optional[torch.Tensor] = None, vocab_start: int = 0, group=None,
                         chunk: Optional[int] = None) -> torch.Tensor:
    """Per-token cross-entropy of `hidden @ weight.T` (fp32 maths, [N] result) without [N x V] logits.

    hidden [N, H]; weight [V_local, H] (this rank's vocabulary rows starting at `vocab_start`; `group` is the
    tensor-parallel group over which the vocabulary is split, None for a whole vocabulary); labels [N] global
    token ids. Rows where `loss_mask` is 0 are not computed and get loss 0 and no gradient.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not fit [N, H] x [V, H]")
    labels = labels.reshape(-1)
    chunk = chunk or chunk_tokens(weight.shape[0])
    grad = torch.is_grad_enabled()
    need_hidden, need_weight = grad and hidden.requires_grad, grad and weight.requires_grad
    if loss_mask is None:
        return _LinearCrossEntropy.apply(hidden, weight, labels, need_hidden, need_weight, vocab_start, group,
                                         chunk)
    rows = loss_mask.reshape(-1).nonzero().squeeze(1)
    picked = _LinearCrossEntropy.apply(hidden.index_select(0, rows), weight, labels.index_select(0, rows),
                                       need_hidden, need_weight, vocab_start, group, chunk)
    loss = torch.zeros(hidden.shape[0], dtype=picked.dtype, device=picked.device)
    return loss.index_put((rows,), picked)


# ---- megatron GPTModel ---------------------------------------------------------------------------------------

def _chunked_applies(model, kwargs: dict) -> bool:
    """The chunked path replaces exactly megatron's `output_layer` + `compute_language_model_loss`; anything
    else in `_postprocess` (multi-token prediction, inference, a hooked or biased output layer) keeps
    megatron's own path."""
    impl = loss_impl()
    if impl == "plain" or kwargs.get("labels") is None or not model.post_process:
        return False
    if kwargs.get("mtp_in_postprocess") or getattr(model.config, "mtp_num_layers", None):
        return False
    if kwargs.get("inference_context") is not None or kwargs.get("inference_params") is not None:
        return False
    layer = model.output_layer
    if layer._forward_hooks or layer._forward_pre_hooks or getattr(layer, "bias", None) is not None:
        return False
    if impl == "auto":
        weight = _output_weight(model)
        # a trainable output layer on a GPU: megatron's (fused, if configured) loss is as lean and faster
        if weight.is_cuda and weight.requires_grad and getattr(model.config, "cross_entropy_loss_fusion", False):
            return False
    return True


def _output_weight(model) -> torch.Tensor:
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def chunked_language_model_loss(model, hidden_states: torch.Tensor, labels: torch.Tensor,
                                loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[b, s] per-token loss of a GPTModel's output layer on decoder output [s(/tp), b, h], as
    `compute_language_model_loss(labels, output_layer(hidden_states))` gives, chunked."""
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        gather_from_sequence_parallel_region)

    layer = model.output_layer
    group = getattr(layer, "tp_group", None)
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    if layer.sequence_parallel:  # the output layer all-gathers the sequence and reduce-scatters the grad
        hidden_states = gather_from_sequence_parallel_region(hidden_states, group=group)
    else:  # identity forward, all-reduce of the input gradient across the vocabulary shards
        hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=group)
    weight = _output_weight(model)
    seq, batch, width = hidden_states.shape
    rank = torch.distributed.get_rank(group) if group is not None and torch.distributed.is_initialized() else 0
    mask = None if loss_mask is None else loss_mask.transpose(0, 1).reshape(-1)
    loss = linear_cross_entropy(hidden_states.reshape(seq * batch, width), weight,
                                labels.transpose(0, 1).reshape(-1), loss_mask=mask,
                                vocab_start=rank * weight.shape[0], group=group)
    return loss.view(seq, batch).transpose(0, 1).contiguous()


def install(model) -> None:
    """Route a megatron GPTModel's training/validation loss (forward with `labels`) through the chunked path.

    Idempotent; `NEMOTUNE_LOSS_IMPL=plain` (read at each forward) restores megatron's own loss path.
    """
    loss_impl()  # a mistyped NEMOTUNE_LOSS_IMPL is refused when the model is built, not at the first step
    if getattr(model, "_chunked_loss_installed", False) or not hasattr(model, "_postprocess"):
        return
    original = model._postprocess

    def _postprocess(self, **kwargs):
        if not _chunked_applies(self, kwargs):
            return original(**kwargs)
        return chunked_language_model_loss(self, kwargs["hidden_states"], kwargs["labels"],
                                           kwargs.get("loss_mask"))

    model._postprocess = types.MethodType(_postprocess, model)
    model._chunked_loss_installed = True


# ---- Hugging Face causal LMs (eval) --------------------------------------------------------------------------

def hf_body_and_head(model):
    """(decoder body returning hidden states, output head) of an HF causal LM, through a PEFT wrapper.

    The head is the module `get_output_embeddings()` returns: a LoRA-wrapped lm_head keeps its adapter."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    body = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, base.base_model_prefix)
    if head is None or body is None:
        raise ValueError(f"{type(base).__name__} exposes no decoder body / output embeddings for the chunked loss")
    return body, head


def hf_answer_token_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                         *, chunk: Optional[int] = None) -> tuple[float, int]:
    """(sum of cross-entropy, token count) of an HF causal LM on the answer tokens, on the model's device.

    Position i predicts token i+1 with weight loss_mask[i+1] (data_prep's token-aligned mask), as
    `generation.masked_next_token_loss` on full logits; here the body runs once and the head + cross-entropy
    run only on answer positions, a chunk of tokens at a time, so no [batch x seq x vocab] tensor exists."""
    import torch.nn.functional as F

    body, head = hf_body_and_head(model)
    device = next(head.parameters()).device
    hidden = body(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
    weight = loss_mask[:, 1:].to(device)
    answer = weight > 0
    rows = hidden[:, :-1][answer]
    targets = input_ids[:, 1:].to(device)[answer]
    weights = weight[answer].float()
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    chunk = chunk or chunk_tokens(vocab)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, rows.shape[0], chunk):
        logits = head(rows[start:start + chunk]).float()
        ce = F.cross_entropy(logits, targets[start:start + chunk], reduction="none")
        total += (ce * weights[start:start + chunk]).sum().double()
        del logits, ce
    return float(total), int(weight.sum())
