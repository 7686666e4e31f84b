"""Typed schema of the `data` config group (conf/data/*.yaml): DataConfig holds every default, the group files
only what differs. `PrepConfig` is the schema of conf/prep.yaml; `check_data_config` merges a composed `data`
node onto DataConfig and reports every problem at once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from nemotune.converters.formats.hf_config import ModelConfig

# System prompt of the original FiQA fine-tuning recipe (financial assistant).
FIQA_SYSTEM_PROMPT = (
    "You are a helpful financial assistant. Answer the user's question about personal finance, investing, "
    "taxes or business accurately and clearly, and say when the answer depends on their situation."
)

SOURCES = ("hf", "local")
FORMATS = ("auto", "fields", "messages", "nemo_chat", "input_output")
SYSTEM_PROMPT_MODES = ("none", "thinking_on", "thinking_off", "think", "no_think")
TASK_PROMPT_PLACEMENTS = ("user", "system")
TRUNCATIONS = ("drop", "truncate_prompt")
PACK_ALGORITHMS = ("first_fit_decreasing", "first_fit_shuffle")


@dataclass
class FieldsConfig:
    """Column names for the `fields` format (prompt/response pairs). A list-valued response uses its first item."""
    prompt: str = "question"
    response: str = "ground_truths"
    system: Optional[str] = None  # per-row system prompt column; overrides data.system_prompt when present
    id: Optional[str] = None  # column holding a stable example id; default: content hash


@dataclass
class DataConfig:
    name: str = "fiqa"
    # hf: datasets.load_dataset(hf_name, hf_config); local: a file (jsonl/json/csv/parquet) or a directory
    # of {split}.{ext} files. `nemotune/fiqa_sample` names the bundled sample.
    source: str = "hf"
    hf_name: Optional[str] = "explodinggradients/fiqa"
    hf_config: Optional[str] = "main"
    path: Optional[str] = None
    format: str = "auto"  # auto | fields | messages | nemo_chat | input_output
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    splits: Optional[list[str]] = None  # native splits to use (None: all that exist)
    resplit: bool = False  # ignore native splits and split everything by split_ratios
    split_names: list[str] = field(default_factory=lambda: ["sft", "rl", "eval"])
    split_ratios: list[float] = field(default_factory=lambda: [0.75, 0.10, 0.15])
    stratify_key: Optional[str] = "answer_length"  # answer_length | <column name> | null (plain shuffle)
    stratify_buckets: int = 4  # answer-length quantile buckets
    system_prompt: Optional[str] = FIQA_SYSTEM_PROMPT
    # none | thinking_on | thinking_off (Llama-Nemotron "detailed thinking" line) | think | no_think (Nano v2)
    system_prompt_mode: str = "none"
    # with a thinking mode the system turn is the switch line alone (the Nemotron Nano model card); the task's
    # system prompt goes to the start of the first user turn (user) or after the switch line (system)
    task_prompt_placement: str = "user"
    # the final assistant turn keeps its <think>...</think> reasoning (in the loss) even where the chat
    # template drops it; earlier turns are always rendered as the template does
    keep_final_reasoning: bool = True
    output_dir: str = "work/prep/${.name}"  # relative: resolves inside the data node or alone
    overwrite: bool = False  # replace output_dir when it holds a previous `nemotune prep` output
    max_seq_length: int = 4096
    truncation: str = "drop"  # drop | truncate_prompt
    packing: bool = True
    pack_size: int = 4096
    pack_algorithm: str = "first_fit_decreasing"
    pad_seq_to_mult: int = 1  # pad every example to a multiple of this (2*CP for context parallel)
    num_proc: int = 1
    seed: int = 1234
    max_line_bytes: int = 8_000_000  # longer input lines are rejected before JSON parsing
    validate_only: bool = False
    skip_bad: bool = False


@dataclass
class PrepConfig:
    """conf/prep.yaml: the data group, the model group (prep reads its tokenizer) and the tokenizer to use."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: Optional[str] = None


@dataclass
class PrepExperimentConfig(PrepConfig):
    """conf/prep_experiment.yaml: prep for a training experiment. The training groups are open here (their
    typed schema is the trainer's): experiments override them, prep reads only data, model and tokenizer."""
    run: dict[str, Any] = field(default_factory=dict)
    peft: dict[str, Any] = field(default_factory=dict)
    parallel: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    cluster: dict[str, Any] = field(default_factory=dict)
    stages: list[Any] = field(default_factory=list)


def check_data_config(data: Any) -> DataConfig:
    """Merge a composed `data` node onto DataConfig (type-checks keys) and collect every value problem."""
    from omegaconf import OmegaConf

    from nemotune.data_prep.formats import DataPrepError

    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), data)
    except Exception as exc:  # omegaconf raises ConfigKeyError/ValidationError naming the key
        lines = [line.strip() for line in str(exc).splitlines()
                 if line.strip() and not line.strip().startswith(("object_type", "reference_type"))]
        lines = [f"key data.{line[len('full_key: '):]}" if line.startswith("full_key: ") else line for line in lines]
        raise DataPrepError(f"invalid data config: {'; '.join(lines)}; fix: see `nemotune prep --cfg` for the keys "
                            f"and their values") from exc
    cfg: DataConfig = OmegaConf.to_object(merged)
    problems = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"data.{key}: {message}")

    need(cfg.source in SOURCES, "source", f"{cfg.source!r} is not one of {SOURCES}")
    need(cfg.format in FORMATS, "format", f"{cfg.format!r} is not one of {FORMATS}")
    need(cfg.system_prompt_mode in SYSTEM_PROMPT_MODES, "system_prompt_mode",
         f"{cfg.system_prompt_mode!r} is not one of {SYSTEM_PROMPT_MODES}")
    need(cfg.task_prompt_placement in TASK_PROMPT_PLACEMENTS, "task_prompt_placement",
         f"{cfg.task_prompt_placement!r} is not one of {TASK_PROMPT_PLACEMENTS}")
    need(cfg.truncation in TRUNCATIONS, "truncation", f"{cfg.truncation!r} is not one of {TRUNCATIONS}")
    need(cfg.pack_algorithm in PACK_ALGORITHMS, "pack_algorithm",
         f"{cfg.pack_algorithm!r} is not one of {PACK_ALGORITHMS}")
    need(cfg.source != "local" or bool(cfg.path), "path", "source=local needs data.path (a file or directory)")
    need(cfg.source != "hf" or bool(cfg.hf_name or cfg.path), "hf_name", "source=hf needs data.hf_name")
    need(len(cfg.split_names) == len(cfg.split_ratios), "split_ratios",
         f"{len(cfg.split_ratios)} ratios for {len(cfg.split_names)} split_names; give one ratio per name")
    need(all(r >= 0 for r in cfg.split_ratios) and abs(sum(cfg.split_ratios) - 1.0) < 1e-6, "split_ratios",
         f"{list(cfg.split_ratios)} must be non-negative and sum to 1")
    need(len(set(cfg.split_names)) == len(cfg.split_names), "split_names", "names must be distinct")
    need(cfg.stratify_buckets >= 1, "stratify_buckets", "must be >= 1")
    need(cfg.max_seq_length >= 16, "max_seq_length", f"{cfg.max_seq_length} is too small (>= 16)")
    need(cfg.pack_size >= cfg.max_seq_length or not cfg.packing, "pack_size",
         f"{cfg.pack_size} < max_seq_length {cfg.max_seq_length}: an example could never fit a pack; "
         f"raise data.pack_size or lower data.max_seq_length")
    need(cfg.pad_seq_to_mult >= 1, "pad_seq_to_mult", "must be >= 1")
    need(cfg.pack_size % cfg.pad_seq_to_mult == 0, "pack_size",
         f"{cfg.pack_size} is not a multiple of pad_seq_to_mult={cfg.pad_seq_to_mult}")
    need(cfg.num_proc >= 1, "num_proc", "must be >= 1")
    need(bool(cfg.fields.prompt) and bool(cfg.fields.response), "fields", "fields.prompt and fields.response are required")
    if problems:
        raise DataPrepError(f"invalid data config: {problems[0]}" if len(problems) == 1 else
                            "invalid data config:\n  " + "\n  ".join(problems))
    return cfg
