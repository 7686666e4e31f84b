"""Memory and time of one training step per GPU, before a job queues: pure arithmetic, nothing is built.

The model follows what this trainer runs (megatron-core GPTModel, LoRA adapters from
nemotune.recipes.engine.lora, megatron DDP + optimizer from nemotune.recipes.lora_sft.wrap_for_training)
and counts, on the most-loaded pipeline stage:

  frozen weights     base parameters that get no gradient (bf16 on GPU, fp32 on CPU); sharded by TP, split by PP
  trainable params   LoRA adapters (column-parallel base: A replicated, B split by TP; row-parallel: A split,
                     B replicated), or every parameter for a full fine-tune (peft none)
  grads              megatron DDP keeps fp32 main grads (grad_reduce_in_fp32) for every trainable parameter
  optimizer states   Adam: 2 fp32 moments + an fp32 master copy when the params are bf16; divided by DP with
                     the distributed optimizer
  activations        tensors saved for backward, per layer per token (Korthikanti et al. 2022, "Reducing
                     activation recomputation in large transformer models", adapted below), times the
                     micro-batches in flight (1F1B: stage s holds min(PP - s, m) of them)
  logits / loss      [tokens x vocab/TP] logits: megatron's vocab-parallel cross-entropy turns the fp32 logits
                     into the softmax in place and reuses it as the gradient, so fp32 logits cost 4 bytes per
                     element; bf16 logits add the transient bf16 copy (2 + 4 bytes). A chunked loss
                     (nemotune.recipes.engine.loss, where present: `chunked_loss_default`) holds only
                     `loss_chunk_tokens` rows at a time.
  comm buffers       megatron's sequence-parallel all-gather buffer (one [s, b, h] tensor) and the pipeline's
                     send / receive tensors; DDP reduces the grad buffer in place (no copy)
  runtime            GPU: CUDA context, cuBLAS / NCCL workspaces and allocator slack (an assumption: no GPU
                     measurement yet); CPU: the Python + torch + megatron process itself and glibc's heap
                     retention, both calibrated by bench/plan_accuracy.py (constants below)

Activations per layer per token (elements; h hidden, q = heads x head_dim, kv = groups x head_dim, f ffn,
r LoRA dim, t = TP; "n" = h / t under sequence parallelism, h otherwise):
  RMSNorm inputs (the residual stream)                  2 n
  inputs of the linears, saved only where a weight is trained: a frozen megatron linear
  (LinearWithFrozenWeight) saves its weight only, a LoRA adapter's A saves its input (under sequence
  parallelism the column-parallel adapters gather it first, so h, not h / t)
      linear_qkv h (or n), linear_proj q / t, linear_fc1 h (or n), linear_fc2 f / t
  attention: SDPA / flash saves q, k, v and its output (no s^2 score matrix): (2q + 2kv) / t on GPU; the CPU
      path (SdpaCoreAttention) repeats k, v to every head first: 4q / t
  SwiGLU: fc1 output (gate, up), silu(gate) and megatron's `up + glu_linear_offset` copy   4 f / t
  squared ReLU (Nemotron, no gate): relu's output, which pow(., 2) saves as its input too    f / t
  LoRA hidden activations                                 r per adapter
Recompute: `full` keeps each layer's input (n) and rebuilds one layer at a time; `selective` recomputes the
core attention (its output and, on CPU, the repeated k, v are not kept).
Step time: the FLOPs of nemotune.recipes.engine.flops (LoRA: forward + activation gradients; full fine-tune:
3x forward) at an assumed MFU against the device's dense bf16 peak, plus the 1F1B bubble (PP - 1) / m.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Sequence

from nemotune.recipes.engine import flops

GiB = 2**30
RECOMPUTE = ("none", "selective", "full")
# CUDA context (~0.5 GiB on H100), cuBLAS workspaces, NCCL communicators: not measurable on this CPU machine
GPU_RUNTIME_BYTES = int(1.5 * GiB)
# caching-allocator fragmentation on top of what is allocated
GPU_ALLOCATOR_SLACK = 0.05
# the Python + torch + megatron-core trainer process on CPU, measured by bench/plan_accuracy.py: 0.357 GiB RSS
# after the imports, torch.distributed and megatron's parallel state (every run), + ~0.02 GiB of model-build
# overhead (measured RSS growth over the predicted weights), see bench/RESULTS.md
CPU_RUNTIME_BYTES = int(0.38 * GiB)
# glibc malloc keeps freed blocks under its dynamic mmap threshold (raised up to 32 MiB once a large tensor is
# freed) in the heap, so a CPU step's peak RSS exceeds its live tensors by a fraction of the activations:
# fitted on bench/plan_accuracy.py's runs (0.75-1.0; with MALLOC_MMAP_THRESHOLD_=65536 it vanishes)
CPU_HEAP_RETENTION = 0.8
# a chunked linear + cross-entropy (nemotune.recipes.engine.loss where present) holds this many fp32 logits
# elements at a time (its DEFAULT_CHUNK_ELEMENTS): loss_chunk_tokens = this // (vocab / TP) unless set
LOSS_CHUNK_ELEMENTS = 2 ** 25


def chunked_loss_default() -> bool:
    """What the trainer does: chunked when nemotune.recipes.engine.loss exists and NEMOTUNE_LOSS_IMPL is not
    `plain`; megatron's vocab_parallel_cross_entropy (the whole [tokens x vocab/TP] logits) otherwise."""
    try:
        from nemotune.recipes.engine import loss
    except ImportError:
        return False
    try:
        return loss.loss_impl() != "plain"
    except (AttributeError, ValueError):
        return False

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": GiB, "B": 1, "K": 1e3, "KB": 1e3, "KI": 2**10, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MI": 2**20,
          "MIB": 2**20, "G": 1e9, "GB": 1e9, "GI": GiB, "GIB": GiB, "T": 1e12, "TB": 1e12, "TI": 2**40,
          "TIB": 2**40}


def parse_memory(text: str) -> int:
    """Bytes of a size like 80GiB, 80GB, 81920MiB or 80 (GiB); ValueError otherwise."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 80GiB, 80GB or 81920MiB")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    if number <= 0:
        raise ValueError(f"{text!r} must be > 0")
    return int(number * _UNITS[unit])


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    sp: bool = False
    distributed_optimizer: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def __str__(self) -> str:
        text = f"TP{self.tp} PP{self.pp} DP{self.dp}"
        text += f" CP{self.cp}" if self.cp > 1 else ""
        text += " SP" if self.sp else ""
        return text + (" distopt" if self.distributed_optimizer else "")


@dataclass(frozen=True)
class Lora:
    dim: int
    targets: Sequence[str] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    variant: str = "canonical"
    layer_selection: Optional[Sequence[int]] = None  # 1-based global layers; None = all


@dataclass(frozen=True)
class PlanInput:
    hf: Mapping
    layout: Layout
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    lora: Optional[Lora]  # None = full fine-tune
    device: str = "gpu"  # gpu | cpu
    precision: str = "bf16"  # bf16 | fp32 (params and activations)
    recompute: str = "none"
    chunked_loss: bool = field(default_factory=chunked_loss_default)
    loss_chunk_tokens: Optional[int] = None  # None = LOSS_CHUNK_ELEMENTS // (vocab / TP)
    document_tokens: Optional[int] = None  # tokens per document for the attention FLOPs; None = seq_length
    mfu: float = 0.4
    peak_tflops: Optional[float] = flops.PEAK_BF16_TFLOPS["H100"]
    runtime_bytes: Optional[int] = None  # None = the device's default above


@dataclass
class Plan:
    input: PlanInput
    stage: int  # the most-loaded pipeline stage (0-based)
    parts: Dict[str, int]  # bytes per GPU on that stage
    trainable_parameters: int  # whole model
    total_parameters: int
    step_flops: float
    tokens_per_step: int
    step_time_s: Optional[float]
    tokens_per_s_per_gpu: Optional[float]
    notes: List[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    def fits(self, device_bytes: int) -> bool:
        return self.total_bytes <= device_bytes


# ---- parameters ------------------------------------------------------------------------------------

def _dims(hf: Mapping) -> tuple:
    h, heads, groups = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    head_dim = hf.get("head_dim") or h // heads
    return h, heads * head_dim, groups * head_dim, hf["intermediate_size"], hf["vocab_size"]


def _gated(hf: Mapping) -> bool:
    """SwiGLU (gate + up in linear_fc1) or a plain MLP (Nemotron's squared ReLU: up only), per the family."""
    return bool(flops.family_config(hf)["gated_mlp"])


def linear_shapes(hf: Mapping) -> Dict[str, tuple]:
    """(in, out) of each linear of a layer, Megatron names."""
    h, q, kv, f, _ = _dims(hf)
    fc1_out = 2 * f if _gated(hf) else f
    return {"linear_qkv": (h, q + 2 * kv), "linear_proj": (q, h), "linear_fc1": (h, fc1_out), "linear_fc2": (f, h)}


def lora_layer_parameters(hf: Mapping, lora: Lora, tp: int = 1) -> int:
    """LoRA parameters of one layer held by one TP rank (tp=1: the whole layer's, as count_lora_parameters)."""
    h, q, kv, f, _ = _dims(hf)
    up_matrices = 2 if _gated(hf) else 1
    r, total = lora.dim, 0
    for target in lora.targets:
        if target == "linear_qkv":
            a_matrices = 3 if lora.variant == "canonical" else 1  # q, k, v each own an A (canonical)
            total += a_matrices * h * r + r * (q + 2 * kv) // tp
        elif target == "linear_fc1":
            a_matrices = up_matrices if lora.variant == "canonical" else 1  # gate, up (up alone without a gate)
            total += a_matrices * h * r + r * up_matrices * f // tp
        elif target == "linear_proj":
            total += q * r // tp + r * h
        elif target == "linear_fc2":
            total += f * r // tp + r * h
        else:
            raise ValueError(f"unknown LoRA target {target!r}")
    return total


def _adapters_per_layer(lora: Lora, gated: bool = True) -> int:
    canonical = lora.variant == "canonical"
    per = {"linear_qkv": 3 if canonical else 1, "linear_fc1": (2 if gated else 1) if canonical else 1,
           "linear_proj": 1, "linear_fc2": 1}
    return sum(per[t] for t in lora.targets)


def base_parameters(hf: Mapping, tp: int = 1) -> Dict[str, int]:
    """Per TP rank: one layer, the embedding, the output layer, the final norm. Per family: a LayerNorm (Nemotron's
    LayerNorm1P) has a bias besides its weight, q/k/v biases (Qwen2) are split by TP like their linear, the
    per-head q/k norms (Qwen3) are one head_dim vector each, replicated."""
    hf = flops.family_config(hf)
    h, q, kv, f, v = _dims(hf)
    norm = 2 * h if hf["norm"] == "LayerNorm1P" else h
    layer = (sum(i * o for i, o in linear_shapes(hf).values()) // tp + 2 * norm
             + ((q + 2 * kv) // tp if hf["qkv_bias"] else 0)
             + (2 * (q // hf["num_attention_heads"]) if hf["qk_norm"] else 0))
    return {"layer": layer, "embedding": v * h // tp, "output": v * h // tp, "final_norm": norm}


def _stage_layers(hf: Mapping, pp: int, stage: int) -> List[int]:
    per = hf["num_hidden_layers"] // pp
    return list(range(stage * per + 1, (stage + 1) * per + 1))


def lora_parameters(hf: Mapping, lora: Lora) -> int:
    """Whole-model LoRA parameters (equals nemotune.recipes.engine.lora.count_lora_parameters)."""
    layers = lora.layer_selection or range(1, hf["num_hidden_layers"] + 1)
    return len(list(layers)) * lora_layer_parameters(hf, lora)


def total_parameters(hf: Mapping) -> int:
    p = base_parameters(hf)
    tied = hf.get("tie_word_embeddings", False)
    return hf["num_hidden_layers"] * p["layer"] + p["embedding"] + (0 if tied else p["output"]) + p["final_norm"]


# ---- activations -----------------------------------------------------------------------------------

def activation_elements_per_token(hf: Mapping, inp: PlanInput) -> float:
    """Elements saved for backward by one layer per token (of the micro-batch), on one TP rank."""
    h, q, kv, f, _ = _dims(hf)
    t, sp, lora = inp.layout.tp, inp.layout.sp, inp.lora
    n = h / t if sp else h
    targets = set(lora.targets) if lora else set(linear_shapes(hf))
    trained = {name: lora is None or name in targets for name in linear_shapes(hf)}
    # a LoRA adapter on a column-parallel base gathers the sequence itself under SP: it saves the full input
    column_input = (lambda name: (n if lora is None else h)) if sp else (lambda name: h)
    attention_in = (4 * q / t) if inp.device == "cpu" else (2 * q + 2 * kv) / t  # q, k, v + output
    # linear_proj's input: on CPU a reshaped copy of the attention output; on GPU the output itself
    proj_input = q / t if trained["linear_proj"] and inp.device == "cpu" else 0
    linears = ((column_input("linear_qkv") if trained["linear_qkv"] else 0) + proj_input
               + (column_input("linear_fc1") if trained["linear_fc1"] else 0)
               + (f / t if trained["linear_fc2"] else 0))
    gated = _gated(hf)
    lora_hidden = _adapters_per_layer(lora, gated) * lora.dim if lora else 0
    mlp_act = (4 if gated else 1) * f / t
    full = 2 * n + linears + attention_in + mlp_act + lora_hidden
    if inp.recompute == "selective":
        full -= (q / t + (2 * q - 2 * kv) / t) if inp.device == "cpu" else q / t
    return full


def activation_bytes(hf: Mapping, inp: PlanInput, layers: int, in_flight: int) -> int:
    """Bytes of activations on a stage of `layers` layers holding `in_flight` micro-batches."""
    abytes = 2 if inp.precision == "bf16" else 4
    tokens = inp.micro_batch_size * inp.seq_length / inp.layout.cp
    per_layer = activation_elements_per_token(hf, inp) * tokens * abytes
    if inp.recompute == "full":
        n = hf["hidden_size"] / (inp.layout.tp if inp.layout.sp else 1)
        kept = n * tokens * abytes * layers * in_flight
        return int(kept + per_layer)  # one layer rebuilt at a time during backward
    return int(per_layer * layers * in_flight)


def logits_bytes(hf: Mapping, inp: PlanInput) -> int:
    vocab = hf["vocab_size"] / inp.layout.tp
    tokens = inp.micro_batch_size * inp.seq_length / inp.layout.cp
    hidden_rows = tokens
    per_element = 4 if inp.precision == "fp32" else 2 + 4  # fp32 softmax in place; bf16 adds its own copy
    if inp.chunked_loss:
        tokens = min(tokens, inp.loss_chunk_tokens or max(1, int(LOSS_CHUNK_ELEMENTS // vocab)))
    if inp.chunked_loss and hidden_rows > tokens:
        # the chunk being computed and the previous chunk's fp32 probabilities, still referenced by the loop
        # of nemotune.recipes.engine.loss when the next chunk's logits are allocated (measured: +128 MiB)
        per_element += 4
    # final-norm output (h) and its gradient alongside
    return int(tokens * vocab * per_element + 2 * hidden_rows * hf["hidden_size"] * (2 if inp.precision == "bf16" else 4))


# ---- the plan --------------------------------------------------------------------------------------

def check_layout(hf: Mapping, layout: Layout, micro_batch_size: int = 1, global_batch_size: int = 1,
                 seq_length: int = 1) -> List[str]:
    """Problems (key + fix) of a layout for this model; empty when valid."""
    problems = []
    heads, groups, layers = hf["num_attention_heads"], hf["num_key_value_heads"], hf["num_hidden_layers"]
    if heads % layout.tp or groups % layout.tp:
        ok = [d for d in range(1, groups + 1) if groups % d == 0 and heads % d == 0]
        problems.append(f"parallel.tensor_model_parallel_size={layout.tp}: must divide the {heads} attention heads "
                        f"and {groups} query groups; use one of {ok}")
    if layers % layout.pp:
        ok = [d for d in range(1, layers + 1) if layers % d == 0]
        problems.append(f"parallel.pipeline_model_parallel_size={layout.pp}: must divide the {layers} layers; "
                        f"use one of {ok}")
    if layout.sp and layout.tp == 1:
        problems.append("parallel.sequence_parallel=true: needs parallel.tensor_model_parallel_size > 1")
    if global_batch_size % (micro_batch_size * layout.dp):
        problems.append(f"trainer.global_batch_size={global_batch_size}: must be divisible by micro_batch_size x "
                        f"data-parallel size = {micro_batch_size} x {layout.dp}; use a multiple of "
                        f"{micro_batch_size * layout.dp}")
    if seq_length % (layout.cp * (layout.tp if layout.sp else 1)):
        problems.append(f"sequence length {seq_length}: must be a multiple of CP x TP (sequence parallel)")
    return problems


def stage_parts(inp: PlanInput, stage: int) -> Dict[str, int]:
    hf, lay = inp.hf, inp.layout
    pbytes = 2 if inp.precision == "bf16" else 4
    base = base_parameters(hf, lay.tp)
    layers = _stage_layers(hf, lay.pp, stage)
    first, last = stage == 0, stage == lay.pp - 1
    base_count = len(layers) * base["layer"] + (base["embedding"] if first else 0)
    if last:
        base_count += base["final_norm"]
        if not (hf.get("tie_word_embeddings", False) and first):
            base_count += base["output"]
    if inp.lora is None:
        trainable, frozen = base_count, 0
    else:
        selected = set(inp.lora.layer_selection or layers)
        trainable = sum(1 for layer in layers if layer in selected) * lora_layer_parameters(hf, inp.lora, lay.tp)
        frozen = base_count
    micro_batches = inp.global_batch_size // (inp.micro_batch_size * lay.dp)
    in_flight = max(1, min(lay.pp - stage, micro_batches))
    optimizer_bytes = (8 + (4 if inp.precision == "bf16" else 0)) * trainable
    if lay.distributed_optimizer:
        optimizer_bytes = math.ceil(optimizer_bytes / lay.dp)
    abytes = 2 if inp.precision == "bf16" else 4
    tokens = inp.micro_batch_size * inp.seq_length / lay.cp
    comm = 0
    if lay.sp:
        comm += int(tokens * hf["hidden_size"] * abytes)  # megatron's all-gather buffer
    if lay.pp > 1:
        n = hf["hidden_size"] / (lay.tp if lay.sp else 1)
        comm += int(2 * tokens * n * abytes)  # one tensor sent, one received
    parts = {
        "frozen weights": frozen * pbytes,
        "trainable params": trainable * pbytes,
        "grads (fp32 main)": trainable * 4,
        "optimizer states": optimizer_bytes,
        "activations": activation_bytes(hf, inp, len(layers), in_flight),
        "logits / loss": logits_bytes(hf, inp) if last else 0,
        "comm buffers": comm,
    }
    dynamic = sum(parts.values())
    if inp.device == "gpu":
        runtime = inp.runtime_bytes if inp.runtime_bytes is not None else GPU_RUNTIME_BYTES
        parts["runtime (CUDA ctx, workspaces, allocator slack)"] = int(runtime + GPU_ALLOCATOR_SLACK * dynamic)
    else:
        runtime = inp.runtime_bytes if inp.runtime_bytes is not None else CPU_RUNTIME_BYTES
        parts["allocator retention (glibc heap, fitted)"] = int(CPU_HEAP_RETENTION * parts["activations"])
        parts["runtime (python + torch + megatron process)"] = runtime
    return parts


def step_flops(inp: PlanInput) -> tuple:
    """(FLOPs of one global batch, its tokens): flops.lora_step_flops, or 3x forward for a full fine-tune."""
    doc = min(inp.document_tokens or inp.seq_length, inp.seq_length)
    per_sequence = [doc] * (inp.seq_length // doc) + ([inp.seq_length % doc] if inp.seq_length % doc else [])
    docs = per_sequence * inp.global_batch_size
    tokens = inp.seq_length * inp.global_batch_size
    if inp.lora is not None:
        total = flops.lora_step_flops(inp.hf, docs)
    else:
        total = 3 * flops.dense_forward_flops_per_token(inp.hf) * tokens + 3 * flops.attention_forward_flops(inp.hf, docs)
    if inp.recompute == "full":
        total += flops.dense_forward_flops_per_token(inp.hf) * tokens + flops.attention_forward_flops(inp.hf, docs)
    return total, tokens


def plan(inp: PlanInput) -> Plan:
    from nemotune.converters.formats.hf_config import load_hf_config

    hf = load_hf_config(inp.hf)
    inp = replace(inp, hf=hf)
    if inp.recompute not in RECOMPUTE:
        raise ValueError(f"recompute {inp.recompute!r}: use one of {list(RECOMPUTE)}")
    problems = check_layout(hf, inp.layout, inp.micro_batch_size, inp.global_batch_size, inp.seq_length)
    if problems:
        raise ValueError(problems[0])
    stages = [stage_parts(inp, s) for s in range(inp.layout.pp)]
    stage = max(range(len(stages)), key=lambda s: sum(stages[s].values()))
    total_flops, tokens = step_flops(inp)
    time_s = tokens_s = None
    notes = []
    if inp.peak_tflops and inp.mfu > 0:
        micro_batches = inp.global_batch_size // (inp.micro_batch_size * inp.layout.dp)
        bubble = (inp.layout.pp - 1) / micro_batches
        time_s = total_flops / (inp.layout.gpus * inp.mfu * inp.peak_tflops * 1e12) * (1 + bubble)
        tokens_s = tokens / time_s / inp.layout.gpus
        if bubble:
            notes.append(f"1F1B bubble (PP-1)/m = {bubble:.2f} of the step")
    trainable = lora_parameters(hf, inp.lora) if inp.lora else total_parameters(hf)
    return Plan(input=inp, stage=stage, parts=stages[stage], trainable_parameters=trainable,
                total_parameters=total_parameters(hf) + (trainable if inp.lora else 0), step_flops=total_flops, tokens_per_step=tokens,
                step_time_s=time_s, tokens_per_s_per_gpu=tokens_s, notes=notes)


def layouts(hf: Mapping, gpus: int, *, gpus_per_node: int = 8, cp: int = 1,
            distributed_optimizer: bool = False) -> List[Layout]:
    """Every TP x PP x DP (x CP) = gpus valid for the model's heads and layers; TP within a node, SP on with TP."""
    out = []
    for tp in range(1, min(gpus, gpus_per_node) + 1):
        for pp in range(1, gpus + 1):
            if gpus % (tp * pp * cp):
                continue
            layout = Layout(tp=tp, pp=pp, dp=gpus // (tp * pp * cp), cp=cp, sp=tp > 1,
                            distributed_optimizer=distributed_optimizer)
            # the model's own constraints only (heads, groups, layers); batch and sequence come later
            if not check_layout(hf, layout, 1, layout.dp, layout.cp * layout.tp):
                out.append(layout)
    return out


def rank_layouts(inp: PlanInput, gpus: int, device_bytes: int, gpus_per_node: int = 8) -> tuple:
    """(fitting plans best first by tokens/s/GPU, then less model parallelism; plans that do not fit; skipped)."""
    fit, over, skipped = [], [], []
    for layout in layouts(inp.hf, gpus, gpus_per_node=gpus_per_node, cp=inp.layout.cp,
                          distributed_optimizer=inp.layout.distributed_optimizer):
        candidate = replace(inp, layout=layout)
        problems = check_layout(inp.hf, layout, inp.micro_batch_size, inp.global_batch_size, inp.seq_length)
        if problems:
            skipped.append((layout, problems[0]))
            continue
        p = plan(candidate)
        (fit if p.fits(device_bytes) else over).append(p)
    key = lambda p: (-(p.tokens_per_s_per_gpu or 0), p.input.layout.tp * p.input.layout.pp, p.total_bytes)  # noqa: E731
    return sorted(fit, key=key), sorted(over, key=lambda p: p.total_bytes), skipped


def format_plan(p: Plan, device_bytes: Optional[int] = None) -> str:
    inp = p.input
    what = (f"LoRA dim {inp.lora.dim} on {','.join(inp.lora.targets)} ({inp.lora.variant})" if inp.lora
            else "full fine-tune")
    lines = [f"{inp.layout} | micro-batch {inp.micro_batch_size} x seq {inp.seq_length}, global batch "
             f"{inp.global_batch_size} | {what} | {inp.precision} on {inp.device} | recompute {inp.recompute}"
             f" | loss {'chunked' if inp.chunked_loss else 'whole logits'}",
             f"parameters: {p.trainable_parameters:,} trainable / {p.total_parameters:,}",
             f"memory per GPU (pipeline stage {p.stage} of {inp.layout.pp}, the most loaded):"]
    for name, value in p.parts.items():
        lines.append(f"  {name:<50} {value / GiB:9.3f} GiB")
    total = f"  {'total':<50} {p.total_bytes / GiB:9.3f} GiB"
    if device_bytes:
        total += f"  of {device_bytes / GiB:.1f} GiB: {'fits' if p.fits(device_bytes) else 'DOES NOT FIT'}"
    lines.append(total)
    if p.step_time_s is not None:
        lines.append(f"step: {p.step_flops:.3e} FLOPs for {p.tokens_per_step:,} tokens -> {p.step_time_s:.4g} s at "
                     f"MFU {inp.mfu:.2f} of {inp.peak_tflops:g} TFLOP/s = {p.tokens_per_s_per_gpu:,.0f} tokens/s/GPU")
    else:
        lines.append(f"step: {p.step_flops:.3e} FLOPs for {p.tokens_per_step:,} tokens (no device peak: no time)")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def format_ranking(fit: List[Plan], over: List[Plan], gpus: int, device_bytes: int) -> str:
    lines = [f"layouts of {gpus} GPU(s) with {device_bytes / GiB:.1f} GiB each, best first "
             f"(tokens/s/GPU at the assumed MFU; ties: less model parallelism):",
             f"  {'layout':<26} {'GiB/GPU':>9} {'tokens/s/GPU':>13} {'step s':>8}"]
    for p in fit:
        lines.append(f"  {str(p.input.layout):<26} {p.total_bytes / GiB:9.2f} {p.tokens_per_s_per_gpu or 0:13,.0f} "
                     f"{p.step_time_s or 0:8.3f}")
    if not fit:
        lines.append("  (none fits)")
    for p in over:
        lines.append(f"  {str(p.input.layout):<26} {p.total_bytes / GiB:9.2f}   does not fit")
    return "\n".join(lines)


# ---- from a composed training config ------------------------------------------------------------------

def input_from_config(cfg, *, device: str = "gpu", world: Optional[int] = None, **overrides) -> PlanInput:
    """The PlanInput of a composed `nemotune train` config (raises ValueError / ModelConfigError)."""
    from omegaconf import OmegaConf

    from nemotune.converters.formats.hf_config import load_hf_config
    from nemotune.recipes.engine.config import distributed_optimizer
    from nemotune.recipes.engine.lora import resolve_targets

    hf = load_hf_config(cfg.model.hf_path) if cfg.model.hf_path else \
        load_hf_config(OmegaConf.to_container(cfg.model.hf_config, resolve=True))
    par = cfg.parallel
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
    world = world or int(cfg.cluster.nodes) * int(cfg.cluster.nproc_per_node)
    layout = Layout(tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
                    dp=max(1, world // model_parallel), cp=par.context_parallel_size, sp=bool(par.sequence_parallel),
                    distributed_optimizer=distributed_optimizer(cfg))
    lora = None
    if cfg.peft.peft_scheme not in (None, "none"):
        lc = cfg.peft.lora
        lora = Lora(dim=int(lc.dim), targets=tuple(resolve_targets(list(lc.target_modules))), variant=lc.variant,
                    layer_selection=tuple(lc.layer_selection) if lc.layer_selection else None)
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "bf16" if device == "gpu" else "fp32"
    seq = cfg.data.pack_size if cfg.data.packing else cfg.data.max_seq_length
    kwargs = dict(hf=hf, layout=layout, micro_batch_size=int(cfg.trainer.micro_batch_size),
                  global_batch_size=int(cfg.trainer.global_batch_size), seq_length=int(seq), lora=lora,
                  device=device, precision=precision, recompute=str(cfg.trainer.recompute),
                  peak_tflops=None if device == "cpu" else
                  flops.PEAK_BF16_TFLOPS["H100"])
    kwargs.update(overrides)
    return PlanInput(**kwargs)


def device_memory_bytes() -> Optional[int]:
    """Memory of this process's CUDA device; None without one."""
    try:
        import torch

        from nemotune.recipes.engine.megatron_cpu import on_gpu

        if not on_gpu():
            return None
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    except Exception:  # noqa: BLE001 - no usable device, no figure
        return None


def memory_warning(cfg, device_bytes: Optional[int] = None) -> Optional[str]:
    """A warning line when the planned per-GPU memory of `cfg` exceeds the device (default: this CUDA device)."""
    import os

    if os.environ.get("RANK", "0") != "0":  # one warning per job, not one per rank
        return None
    device_bytes = device_bytes or device_memory_bytes()
    if not device_bytes:
        return None
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None  # torchrun's, as validate()
    try:
        p = plan(input_from_config(cfg, device="gpu", world=world))
    except (ValueError, KeyError, TypeError):
        return None  # validate() reports the config's own problems
    if p.fits(device_bytes):
        return None
    return (f"WARNING: `nemotune plan` predicts {p.total_bytes / GiB:.1f} GiB per GPU for {p.input.layout}, more than "
            f"the device's {device_bytes / GiB:.1f} GiB; raise TP/PP, use the distributed optimizer, shorten the "
            f"sequence or see `nemotune plan --gpus N --gpu-memory SIZE` for the layouts that fit")
