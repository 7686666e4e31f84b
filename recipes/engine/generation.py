"""Generation and answer-token loss through the serving format (HF base model + exported HF PEFT adapter).

The same prompts go to the base model and to base + each adapter: one model is loaded with every adapter
(PEFT's named adapters, one active at a time), and the base system runs inside ``PeftModel.disable_adapter()``
so all systems share every weight except the LoRA deltas.

Backends:
* ``hf`` (default, CPU or GPU): ``transformers`` + ``peft``, batched greedy decoding with left padding.
* ``vllm`` (GPU): ``vllm.LLM(enable_lora=True)`` with a ``LoRARequest`` for the adapter; the base system is the
  same engine without the request.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

THINKING_CHOICES = ("on", "off", None)
BACKENDS = ("hf", "vllm")
PEFT_PREFIX = "base_model.model."


class EvalInputError(ValueError):
    """Inputs that cannot be evaluated together (adapter vs base shape/tokenizer, empty split, ...)."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    batch_size: int = 8
    # Nemotron's reasoning switch: the system prompt "detailed thinking on|off"; None keeps the prompt as prepared.
    thinking: str | None = None
    do_sample: bool = False  # greedy by default: reproducible comparisons
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0
    progress: bool = True


# --------------------------------------------------------------------------------------------- prompts
def thinking_system_prompt(thinking: str) -> str:
    return f"detailed thinking {thinking}"


def prompt_messages(messages: Sequence[dict], thinking: str | None = None) -> list[dict]:
    """The conversation without its final assistant turn (the reference), with the thinking switch applied.

    thinking="on"/"off" sets the system prompt to "detailed thinking on|off" (Nemotron's convention): an
    existing "detailed thinking ..." system prompt is replaced, any other system text is kept after it.
    """
    if thinking not in THINKING_CHOICES:
        raise ValueError(f"thinking must be one of {THINKING_CHOICES}, got {thinking!r}")
    msgs = [dict(m) for m in messages]
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if thinking is None:
        return msgs
    switch = thinking_system_prompt(thinking)
    if msgs and msgs[0]["role"] == "system":
        rest = msgs[0]["content"]
        if rest.strip().startswith("detailed thinking"):
            rest = rest.strip().split("\n", 1)[1].lstrip() if "\n" in rest.strip() else ""
        # The same layout as data_prep's system_prompt_mode=thinking_on|off: the switch line, then the rest.
        msgs[0] = {"role": "system", "content": switch + ("\n" + rest if rest else "")}
    else:
        msgs.insert(0, {"role": "system", "content": switch})
    return msgs


def strip_thinking(text: str) -> str:
    """The final answer of a reasoning model: drop a leading <think>...</think> block (an unfinished one
    means no answer was produced within max_new_tokens)."""
    stripped = text.lstrip()
    if stripped.startswith("<think>"):
        end = stripped.find("</think>")
        return "" if end < 0 else stripped[end + len("</think>") :].strip()
    return text


def render_prompts(tokenizer, conversations: Sequence[Sequence[dict]]) -> list[str]:
    """Chat-template each conversation (ending with the assistant header, ready to generate)."""
    return [
        tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True) for c in conversations
    ]


def _batches(items: Sequence, size: int) -> Iterable[tuple[int, Sequence]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, leave=False)


# --------------------------------------------------------------------------------------------- adapter checks
def read_adapter_config(adapter_dir: str | Path) -> dict:
    adapter_dir = Path(adapter_dir)
    cfg = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not cfg.is_file() or not weights.is_file():
        raise EvalInputError(
            f"{adapter_dir} is not an HF PEFT adapter dir (needs adapter_config.json + adapter_model.safetensors). "
            "Fix: export the trained adapter first: python -m nemotune.converters.export hf-peft --adapter "
            "<ckpt>/adapter --out <dir>"
        )
    return json.loads(cfg.read_text())


def adapter_shape_problems(model, adapter_dir: str | Path) -> list[str]:
    """Every LoRA tensor whose shape does not fit the base model (checked from the safetensors header only)."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
    problems = []
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            shape = list(f.get_slice(key).get_shape())
            if not key.startswith(PEFT_PREFIX) or ".lora_" not in key:
                continue
            module_name, _, kind = key[len(PEFT_PREFIX) :].rpartition(".lora_")
            module = modules.get(module_name)
            if module is None:
                problems.append(f"{key}: the base model has no module {module_name!r}")
                continue
            in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
            if kind == "A.weight" and in_f is not None and shape[1] != in_f:
                problems.append(f"{key}: shape {shape} expects in_features={shape[1]}, base has {in_f}")
            if kind == "B.weight" and out_f is not None and shape[0] != out_f:
                problems.append(f"{key}: shape {shape} expects out_features={shape[0]}, base has {out_f}")
    return problems


def check_adapter_fits(model, adapter_dir: str | Path, base_dir: str | Path) -> None:
    problems = adapter_shape_problems(model, adapter_dir)
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else "")
        base_ref = read_adapter_config(adapter_dir).get("base_model_name_or_path")
        raise EvalInputError(
            f"adapter {adapter_dir} does not fit base model {base_dir} (the adapter was trained on "
            f"{base_ref or 'another base'}):\n  {shown}\nFix: evaluate the adapter against the base model it "
            "was trained on (model.hf_path of the training run)."
        )


def check_tokenizer_fits(tokenizer, vocab_size: int, where: str) -> None:
    if len(tokenizer) > vocab_size:
        raise EvalInputError(
            f"tokenizer has {len(tokenizer)} tokens but the base model {where} has vocab_size={vocab_size}: "
            "they do not belong together. Fix: use the tokenizer of the base model (eval.tokenizer=null reads "
            "it from the base model dir)."
        )


# --------------------------------------------------------------------------------------------- loading
def load_tokenizer(name_or_path: str | Path):
    """The project's tokenizer loader (handles `nemotune/tiny`), left padding for batched generation."""
    from nemotune.data_prep.tokenizer import load_tokenizer as _load

    tok = _load(str(name_or_path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _torch_dtype(dtype: str | None, device: str):
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[dtype]


def _default_device(device: str | None) -> str:
    from nemotune.recipes.engine.megatron_cpu import accelerator

    return device or accelerator()


def adapter_systems(adapters) -> dict:
    """{system name: adapter dir}: one dir is the system "lora"; a mapping names each system (e.g. sft, rl)."""
    if isinstance(adapters, (str, Path)):
        return {"lora": Path(adapters)}
    return {str(name): Path(path) for name, path in dict(adapters).items()}


class HFSystems:
    """Base model + one or more PEFT adapters, loaded once (the base weights shared); ``generate`` /
    ``answer_loss`` for the system "base" (every adapter off) or any adapter's system name."""

    def __init__(self, base_dir: str | Path, adapters, *, tokenizer=None, device: str | None = None,
                 dtype: str | None = None):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.adapters = adapter_systems(adapters)
        self.base_dir = Path(base_dir)
        self.adapter_dir = next(iter(self.adapters.values()))
        if not (self.base_dir / "config.json").is_file():
            raise EvalInputError(f"base model dir {self.base_dir} has no config.json (an HF checkpoint dir is "
                                 "needed; convert a Megatron checkpoint with python -m nemotune.converters.convert)")
        for adapter_dir in self.adapters.values():
            read_adapter_config(adapter_dir)
        self.device = _default_device(device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.base_dir)
        self.tokenizer.padding_side = "left"
        base = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=_torch_dtype(dtype, self.device))
        check_tokenizer_fits(self.tokenizer, base.config.vocab_size, str(self.base_dir))
        for adapter_dir in self.adapters.values():
            check_adapter_fits(base, adapter_dir, self.base_dir)
        (first, first_dir), *rest = self.adapters.items()
        self.model = PeftModel.from_pretrained(base, str(first_dir), adapter_name=first, is_trainable=False)
        for name, adapter_dir in rest:
            self.model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
        self.model.to(self.device).eval()
        self.vocab_size = base.config.vocab_size
        self._torch = torch

    def _context(self, system: str):
        import contextlib

        if system == "base":
            return self.model.disable_adapter()
        if system in self.adapters:
            self.model.set_adapter(system)
            return contextlib.nullcontext()
        raise ValueError(f"system must be 'base' or one of {list(self.adapters)}, got {system!r}")

    def generate(self, prompts: Sequence[str], system: str, settings: GenerationSettings) -> list[str]:
        torch = self._torch
        tok = self.tokenizer
        eos = [t for t in {tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")} if isinstance(t, int) and t >= 0]
        outputs: list[str] = []
        with self._context(system), torch.inference_mode(), _progress(len(prompts), f"generate {system}",
                                                                      settings.progress) as bar:
            for _, chunk in _batches(prompts, settings.batch_size):
                # The chat template already carries the BOS token: do not add a second one.
                enc = tok(list(chunk), return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                              pad_token_id=tok.pad_token_id, eos_token_id=eos or None)
                if settings.do_sample:
                    torch.manual_seed(settings.seed)
                    kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
                else:  # the model's generation_config may carry sampling defaults; greedy means greedy
                    kwargs.update(temperature=None, top_p=None, top_k=None)
                out = self.model.generate(**enc, **kwargs)
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                outputs += [t.strip() for t in tok.batch_decode(new_tokens, skip_special_tokens=True)]
                bar.update(len(chunk))
        return outputs

    def answer_loss(self, examples: Sequence[dict], system: str, *, batch_size: int = 8,
                    progress: bool = True) -> dict:
        """Token-weighted mean cross-entropy on answer tokens (loss_mask) and its perplexity."""
        from nemotune.recipes.engine.loss import hf_answer_token_loss, loss_impl

        plain = loss_impl() == "plain"
        torch = self._torch
        total, count = 0.0, 0
        pad = self.tokenizer.pad_token_id or 0
        with self._context(system), torch.inference_mode(), _progress(len(examples), f"loss {system}",
                                                                      progress) as bar:
            for _, chunk in _batches(examples, batch_size):
                ids, mask, attn = _right_pad(chunk, pad)
                too_big = int(ids.max()) if ids.numel() else 0
                if too_big >= self.vocab_size:
                    raise EvalInputError(f"tokenized data holds token id {too_big} but the base model's vocab_size "
                                         f"is {self.vocab_size}: the data was prepared with another tokenizer. "
                                         "Fix: prepare the data with the base model's tokenizer.")
                if plain:  # NEMOTUNE_LOSS_IMPL=plain: the whole batch's fp32 logits on the CPU (comparisons)
                    logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits
                    s, c = masked_next_token_loss(logits.float().cpu(), ids, mask)
                else:  # chunked on the device: never the whole batch's [tokens x vocab] fp32 logits
                    s, c = hf_answer_token_loss(self.model, ids, attn, mask)
                total += s
                count += c
                bar.update(len(chunk))
        loss = total / count if count else float("nan")
        return {"loss": loss, "perplexity": math.exp(loss) if count else float("nan"), "tokens": count}


def _right_pad(examples: Sequence[dict], pad_id: int):
    import torch

    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    attn = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        mask[row, :n] = torch.as_tensor(e["loss_mask"], dtype=torch.long)
        attn[row, :n] = 1
    return ids, mask, attn


def masked_next_token_loss(logits, input_ids, loss_mask) -> tuple[float, int]:
    """(sum of cross-entropy, number of tokens) predicting token i+1 from position i, weighted by loss_mask[i+1]
    (the data_prep convention: loss_mask is aligned with input_ids). The reference on full logits;
    `HFSystems.answer_loss` computes the same with nemotune.recipes.engine.loss.hf_answer_token_loss."""
    import torch.nn.functional as F

    target = input_ids[:, 1:]
    weight = loss_mask[:, 1:].to(logits.dtype)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return float((ce * weight.reshape(-1)).sum()), int(weight.sum())


# --------------------------------------------------------------------------------------------- vLLM backend
class VLLMSystems:
    """vLLM engine with LoRA enabled; the LoRA system passes a LoRARequest, the base system none."""

    def __init__(self, base_dir: str | Path, adapters, *, max_lora_rank: int | None = None,
                 dtype: str | None = None, **engine_kwargs):
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError as err:
            raise RuntimeError(
                "eval.backend=vllm needs the vllm package (GPU only), which is not importable here: "
                f"{err}. Fix: pip install vllm on a GPU machine, or use eval.backend=hf (works on CPU)."
            ) from err
        self.adapters = adapter_systems(adapters)
        ranks = [int(read_adapter_config(d).get("r", 8)) for d in self.adapters.values()]
        rank = max_lora_rank or max(8, *ranks)
        self.llm = LLM(model=str(base_dir), enable_lora=True, max_lora_rank=rank, dtype=dtype or "auto",
                       max_loras=len(self.adapters), **engine_kwargs)
        self.lora_requests = {name: LoRARequest(f"nemotune-{name}", i, str(d))
                              for i, (name, d) in enumerate(self.adapters.items(), 1)}
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: Sequence[str], system: str, settings: GenerationSettings) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature if settings.do_sample else 0.0,
            top_p=settings.top_p if settings.do_sample else 1.0,
            seed=settings.seed,
        )
        if system != "base" and system not in self.lora_requests:
            raise ValueError(f"system must be 'base' or one of {list(self.lora_requests)}, got {system!r}")
        request = self.lora_requests.get(system)
        # The chat template already carries BOS: pass token ids so vLLM does not add a second one.
        token_prompts = [{"prompt_token_ids": self.tokenizer(p, add_special_tokens=False)["input_ids"]}
                         for p in prompts]
        outs = self.llm.generate(token_prompts, params, lora_request=request, use_tqdm=settings.progress)
        return [o.outputs[0].text.strip() for o in outs]


def load_systems(backend: str, base_dir, adapters, *, tokenizer=None, device=None, dtype=None):
    """`adapters`: one HF PEFT dir (the system "lora") or {system name: dir}."""
    if backend == "hf":
        return HFSystems(base_dir, adapters, tokenizer=tokenizer, device=device, dtype=dtype)
    if backend == "vllm":
        return VLLMSystems(base_dir, adapters, dtype=dtype)
    raise ValueError(f"eval.backend must be one of {BACKENDS}, got {backend!r}")


def generate_all(systems, conversations: Sequence[Sequence[dict]], settings: GenerationSettings) -> dict[str, list[str]]:
    """Answers of the base model and of base + each adapter for the same chat-templated prompts."""
    prompts = render_prompts(systems.tokenizer, [prompt_messages(c, settings.thinking) for c in conversations])
    return {system: systems.generate(prompts, system, settings) for system in ("base", *systems.adapters)}


def generate_both(systems, conversations: Sequence[Sequence[dict]], settings: GenerationSettings) -> dict[str, list[str]]:
    """Greedy answers of the base model and of base + adapter for the same chat-templated prompts."""
    return generate_all(systems, conversations, settings)
