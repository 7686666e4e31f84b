"""Peak memory and tokens/s at a real vocabulary (128,256): a LoRA step and the eval answer loss.

Setups, each in a fresh process (peak RSS is per process), one run, ratios from that run:
  train  ours (megatron-core, chunked loss)  | ours with NEMOTUNE_LOSS_IMPL=plain (megatron's loss: before)
         | transformers + peft (the usual loop: logits.float() + F.cross_entropy, as bench/train_cpu.py)
  eval   ours (nemotune eval's answer loss, chunked) | NEMOTUNE_LOSS_IMPL=plain (the previous path: whole
         logits to the CPU in fp32 + masked_next_token_loss; this is also what transformers + peft gives)

Same work everywhere:
  model  Llama architecture with the vocabulary of the real Llama 3.1 tokenizer (128,256; the one Nemotron
         Nano 8B uses), random weights, fp32, untied embedding/output. Default body: hidden 256, 16 layers,
         4 heads (2 KV), FFN 1024 = 15.7M parameters, plus 2 x 32.8M embedding/output.
  LoRA   rank 8, alpha 16, all linear layers of the body, the output layer frozen (as in the recipe).
  data   the real FiQA rows (../shared/data/fiqa) chat-templated with the real tokenizer, answer + <|eot_id|>
         masked as the loss; train: documents packed into rows of --seq tokens (positions restart per
         document; ours: per-document causal attention; transformers: the same from restarting position_ids);
         eval: batches of --eval-batch examples right-padded, as `nemotune eval` does.
  step   micro-batch of one pack: forward, answer-token loss / answer-token count, backward, AdamW on the LoRA
         parameters. Timed: --steps after one warm-up step. Threads: --threads (1 on a shared machine).
Memory: the process's peak RSS (VmHWM) during the timed part, after resetting it (/proc/self/clear_refs),
minus the RSS before it (model, data, optimizer state) = the step's own memory; also the whole-process peak.
Children run with MALLOC_MMAP_THRESHOLD_=1MiB so that freed large tensors leave the RSS at once.
Per token = step memory / tokens in a step (or an eval batch, padding included).

    python bench/memory_vocab.py                 # ~10 min on 1 thread
    python bench/memory_vocab.py --seq 2048 --steps 1 --eval-examples 8     # quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TAG = "MEMORY_VOCAB_RESULT "
SETUPS = {
    "train_ours": ("train", "ours", "chunked"),
    "train_ours_plain": ("train", "ours", "plain"),
    "train_hf_peft": ("train", "hf", "plain"),
    "eval_ours": ("eval", "hf", "chunked"),
    "eval_plain": ("eval", "hf", "plain"),
}


def model_config(args) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=args.hidden,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                head_dim=args.hidden // args.heads, intermediate_size=args.ffn, vocab_size=args.vocab,
                max_position_embeddings=max(8192, args.seq), rms_norm_eps=1e-5, rope_theta=500000.0,
                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192),
                tie_word_embeddings=False, initializer_range=0.02, hidden_act="silu", attention_bias=False,
                mlp_bias=False, torch_dtype="float32")


# ---- data ----------------------------------------------------------------------------------------------------

def fiqa_examples(tokenizer_dir: Path, fiqa: Path, limit: int) -> list:
    """Token ids and token-aligned answer mask (answer + <|eot_id|>) of FiQA rows under the chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out = []
    with fiqa.open() as f:
        for line in f:
            row = json.loads(line)
            prompt = tok.apply_chat_template([{"role": "user", "content": row["question"]}], tokenize=False,
                                             add_generation_prompt=True)
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tok(row["answer"].strip(), add_special_tokens=False)["input_ids"] + \
                [tok.convert_tokens_to_ids("<|eot_id|>")]
            out.append({"input_ids": prompt_ids + answer_ids,
                        "loss_mask": [0] * len(prompt_ids) + [1] * len(answer_ids)})
            if len(out) >= limit:
                break
    return out


def packs(examples: list, seq: int, count: int) -> list:
    """Greedy in-order packing into rows of at most `seq` tokens (documents longer than seq are skipped)."""
    from nemotune.recipes.engine.batches import Sample
    import numpy as np

    rows, ids, mask, starts = [], [], [], []
    for ex in examples:
        n = len(ex["input_ids"])
        if n > seq:
            continue
        if len(ids) + n > seq:
            rows.append((ids, mask, starts))
            ids, mask, starts = [], [], []
            if len(rows) == count:
                break
        starts.append(len(ids))
        ids += ex["input_ids"]
        # label-aligned (NeMo packed convention): position i is weighted by the mask of token i+1
        mask += ex["loss_mask"][1:] + [0]
    if ids and len(rows) < count:
        rows.append((ids, mask, starts))
    return [Sample(np.asarray(i, dtype=np.int64), np.asarray(m, dtype=np.float32), s) for i, m, s in rows]


# ---- memory --------------------------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")


# ---- train ---------------------------------------------------------------------------------------------------

class LoraStep:
    """One LoRA training step's common half: AdamW (lr 1e-4) over the trainable parameters of `model`."""

    def train_adapters_of(self, model, pad_id: int) -> None:
        import torch

        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.pad_id = pad_id
        self.model.train()


class OursTrain(LoraStep):
    def __init__(self, hf: dict, pad_id: int):
        import torch

        from nemotune.recipes.engine import distributed
        from nemotune.recipes.engine.config import LoraConfig
        from nemotune.recipes.engine.lora import apply_lora
        from nemotune.recipes.engine.model import build_gpt_model

        distributed.init_distributed(1, 1, seed=0)
        torch.manual_seed(0)
        model = build_gpt_model(hf, device="cpu", calculate_per_token_loss=True)
        apply_lora(model, LoraConfig(dim=8, alpha=16, dropout=0.0))
        self.train_adapters_of(model, pad_id)

    def step(self, sample) -> float:
        from nemotune.recipes.engine import batches
        from nemotune.recipes.engine.trainer import RotaryPositions

        batch = batches.collate([sample], self.pad_id)
        weights = batch["loss_weights"]
        mask = batches.DocumentMask(batch["document_lengths"], batch["tokens"].shape[1])
        self.optimizer.zero_grad(set_to_none=True)
        with RotaryPositions(self.model, batch["position_ids"]):
            per_token = self.model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"],
                                   loss_mask=weights)
        loss = (per_token * weights).sum() / weights.sum()
        loss.backward()
        self.optimizer.step()
        return float(loss)


class HFPeftTrain(LoraStep):
    def __init__(self, hf: dict, pad_id: int):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")})
        config._attn_implementation = "sdpa"
        base = LlamaForCausalLM(config)
        self.train_adapters_of(get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                               target_modules="all-linear", task_type="CAUSAL_LM")),
                               pad_id)

    def step(self, sample) -> float:
        import torch.nn.functional as F

        from nemotune.recipes.engine import batches

        batch = batches.collate([sample], self.pad_id)
        weights = batch["loss_weights"]
        self.optimizer.zero_grad(set_to_none=True)
        # attention_mask=None + restarting position_ids: transformers builds the per-document causal mask
        logits = self.model(input_ids=batch["tokens"], position_ids=batch["position_ids"], use_cache=False).logits
        per_token = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
        loss = (per_token * weights.flatten()).sum() / weights.sum()
        loss.backward()
        self.optimizer.step()
        return float(loss)


def run_train(args, side: str) -> dict:
    tokenizer_dir, fiqa = Path(args.tokenizer), Path(args.fiqa)
    examples = fiqa_examples(tokenizer_dir, fiqa, limit=10 ** 6)
    rows = packs(examples, args.seq, args.steps + 1)
    if len(rows) < args.steps + 1:
        raise SystemExit(f"only {len(rows)} packs of {args.seq} tokens from {fiqa}; lower --steps or --seq")
    hf = model_config(args)
    pad_id = 128004  # <|finetune_right_pad_id|>
    runner = OursTrain(hf, pad_id) if side == "ours" else HFPeftTrain(hf, pad_id)
    first_loss = runner.step(rows[0])  # warm-up (allocator, optimizer state)
    before = rss_bytes()
    reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    for row in rows[1:]:
        runner.step(row)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(len(r.input_ids) for r in rows[1:])
    answer = sum(float(r.loss_mask.sum()) for r in rows[1:])
    return {"tokens": tokens, "answer_tokens": answer, "wall_s": wall, "cpu_s": cpu,
            "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "rss_before": before,
            "peak_step_bytes": hwm_bytes() - before, "peak_process_bytes": hwm_bytes(),
            "tokens_per_step": tokens / args.steps, "warmup_loss": first_loss,
            "trainable": sum(p.numel() for p in runner.params)}


# ---- eval ----------------------------------------------------------------------------------------------------

def run_eval(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemotune.recipes.engine.generation import _right_pad, masked_next_token_loss
    from nemotune.recipes.engine.loss import hf_answer_token_loss, loss_impl

    examples = fiqa_examples(Path(args.tokenizer), Path(args.fiqa), limit=args.eval_examples + args.eval_batch)
    hf = model_config(args)
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")})
    config._attn_implementation = "sdpa"
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.eval()
    plain = loss_impl() == "plain"

    def batch_loss(chunk):
        ids, mask, attn = _right_pad(chunk, 128004)
        if plain:  # what HFSystems.answer_loss did: the whole logits, fp32, on the CPU
            logits = model(input_ids=ids, attention_mask=attn).logits
            return masked_next_token_loss(logits.float().cpu(), ids, mask), ids.numel()
        return hf_answer_token_loss(model, ids, attn, mask), ids.numel()

    b = args.eval_batch
    with torch.inference_mode():
        batch_loss(examples[:b])  # warm-up
        timed = examples[b:b + args.eval_examples]
        before = rss_bytes()
        reset_peak()
        start, cpu = time.perf_counter(), time.process_time()
        total = count = tokens = 0
        for k in range(0, len(timed), b):
            (s, c), n = batch_loss(timed[k:k + b])
            total, count, tokens = total + s, count + c, tokens + n
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    batches = -(-len(timed) // b)
    return {"tokens": tokens, "answer_tokens": count, "loss": total / count, "wall_s": wall, "cpu_s": cpu,
            "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "rss_before": before,
            "peak_step_bytes": hwm_bytes() - before, "peak_process_bytes": hwm_bytes(),
            "tokens_per_step": tokens / batches, "examples": len(timed)}


# ---- driver --------------------------------------------------------------------------------------------------

def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    kind, side, impl = SETUPS[args.setup]
    os.environ["NEMOTUNE_LOSS_IMPL"] = impl
    result = run_train(args, side) if kind == "train" else run_eval(args)
    result["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(TAG + json.dumps({"setup": args.setup, **result}), flush=True)


def gib(b: float) -> str:
    return f"{b / 2 ** 30:6.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=str(SHARED / "llama3_tokenizer"))
    parser.add_argument("--fiqa", default=str(SHARED / "fiqa" / "test.jsonl"))
    parser.add_argument("--vocab", type=int, default=0, help="default: the tokenizer's vocabulary size")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=4096, help="packed row length of the LoRA step")
    parser.add_argument("--steps", type=int, default=2, help="timed LoRA steps (one pack each)")
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--eval-examples", type=int, default=16, help="timed eval examples")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=list(SETUPS), help="run these setups only")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--setup", choices=list(SETUPS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, path in (("--tokenizer", args.tokenizer), ("--fiqa", args.fiqa)):
        if not Path(path).exists():
            print(f"memory_vocab: {name} {path} does not exist (../shared/data lies beside the checkout); "
                  f"pass {name} <path>", file=sys.stderr)
            return 2
    if not args.vocab:
        from transformers import AutoTokenizer

        args.vocab = len(AutoTokenizer.from_pretrained(args.tokenizer))
    if args.setup:
        child(args)
        return 0
    command = "python bench/memory_vocab.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    if "--only" in passthrough:
        passthrough = passthrough[:passthrough.index("--only")]
    results = {}
    for name in args.only or list(SETUPS):
        # a fixed mmap threshold: glibc returns every large tensor to the OS when freed, so the RSS before a
        # timed step holds no freed warm-up buffers and the measured peak is the step's own
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore",
               "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--vocab", str(args.vocab),
               "--setup", name]
        print(f"[{name}] ...", flush=True)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        lines = [l for l in proc.stdout.splitlines() if l.startswith(TAG)]
        if proc.returncode != 0 or not lines:
            print(f"memory_vocab: setup {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(lines[-1][len(TAG):])
        r = results[name]
        print(f"[{name}] step memory {gib(r['peak_step_bytes'])} GiB, process peak {gib(r['peak_process_bytes'])} "
              f"GiB, {r['tokens_per_s']:.1f} tokens/s, {r['tokens_per_cpu_s']:.1f} tokens/CPU-s", flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    report(results, args, command, load)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "uptime": load, "results": results}, indent=2))
    return 0


def report(results: dict, args, command: str, load: str) -> None:
    print(f"\nvocab {args.vocab}, hidden {args.hidden} x {args.layers} layers, seq {args.seq}, {args.threads} "
          f"thread(s); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; uptime: {load}")
    print(f"{'setup':<18} {'tokens/step':>11} {'step GiB':>9} {'process GiB':>12} {'bytes/token':>12} "
          f"{'tokens/s':>9} {'tokens/CPU-s':>13}")
    for name, r in results.items():
        print(f"{name:<18} {r['tokens_per_step']:11.0f} {gib(r['peak_step_bytes']):>9} "
              f"{gib(r['peak_process_bytes']):>12} {r['peak_step_bytes'] / r['tokens_per_step']:12,.0f} "
              f"{r['tokens_per_s']:9.1f} {r['tokens_per_cpu_s']:13.1f}")

    def ratio(a, b, what):
        if a in results and b in results:
            ra, rb = results[a], results[b]
            mem = (rb["peak_step_bytes"] / rb["tokens_per_step"]) / (ra["peak_step_bytes"] / ra["tokens_per_step"])
            print(f"{a} vs {b}: step memory per token {mem:.2f}x lower, tokens/s x{ra['tokens_per_s'] / rb['tokens_per_s']:.2f}"
                  f", tokens/CPU-s x{ra['tokens_per_cpu_s'] / rb['tokens_per_cpu_s']:.2f} ({what})")

    ratio("train_ours", "train_hf_peft", "goal: >= 2x lower memory, speed >= 1")
    ratio("train_ours", "train_ours_plain", "after vs before")
    ratio("eval_ours", "eval_plain", "after vs before / transformers + peft logits")
    print(f"reproduce: {command}")


if __name__ == "__main__":
    sys.exit(main())
