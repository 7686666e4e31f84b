"""Typed configuration for every nemotune entry point, composed by Hydra from conf/.

`compose(config_name, overrides)` builds the config from the `conf` package (groups model/ data/ peft/
parallel/ trainer/ cluster/ and experiment/ overlays) on top of the dataclass schema below, so a wrong
key or type fails at composition. `validate(cfg)` then checks what types cannot (divisibility, files,
cross-field rules) and reports every problem at once, each with its key and the fix, before any process
group or model exists.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from nemotune.converters.formats.adapters import VARIANTS
from nemotune.converters.formats.hf_config import ModelConfig, ModelConfigError, load_hf_config
from nemotune.data_prep.config import DataConfig
from nemotune.launchers.config import ClusterConfig, validate_cluster


@dataclass
class RunConfig:
    name: str = "tiny"
    output_dir: str = "work/runs/${run.name}"
    seed: int = 1234
    resume_if_exists: bool = True
    # which complete checkpoint a resume starts from: latest, or previous (when the latest is damaged)
    resume_from: str = "latest"
    tensorboard: bool = True
    # multi-stage runs: run only this stage (Slurm runs each stage as a dependent job); null = all stages
    stage: Optional[str] = None


@dataclass
class LoraConfig:
    """LoRA settings: `peft.lora` of the config, the argument of `apply_lora`, the fields of adapter_config.json."""
    dim: int = 32
    alpha: float = 32.0  # effective scale alpha / dim
    dropout: float = 0.0
    # linear_qkv, linear_proj, linear_fc1, linear_fc2, HF names (q_proj, ..., down_proj) or all-linear
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    layer_selection: Optional[List[int]] = None  # 1-based global layer numbers, as in NeMo; null = all
    init_method_a: str = "kaiming"  # kaiming (uniform, a=sqrt(5), as nn.Linear / HF PEFT) or xavier
    # canonical: one adapter per HF projection (q, k, v, gate, up each with its own A): HF PEFT's layout and
    # parameter counts, exported 1:1. nemo: NeMo's fused lora_kqv_adapter / lora_hto4h_adapter (one shared A).
    variant: str = "canonical"

    @property
    def scale(self) -> float:
        return self.alpha / self.dim

    @classmethod
    def of(cls, values: Any) -> "LoraConfig":
        """From a `peft.lora` config node or an adapter_config.json dict (its other keys are ignored)."""
        if isinstance(values, DictConfig):
            values = OmegaConf.to_container(values, resolve=True)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


PEFT_SCHEMES = ("lora", "none")  # none = full-parameter SFT: every weight trains
RECOMPUTE = ("none", "selective", "full")  # megatron-core's recompute_granularity (none = keep activations)


@dataclass
class PeftConfig:
    # lora: adapters on a frozen base; none: full-parameter SFT (conf/peft/none.yaml)
    peft_scheme: str = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    # an adapter to start from: a nemotune checkpoint / adapter dir, or a Hugging Face PEFT dir
    restore_from: Optional[str] = None


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    # megatron-core's distributed optimizer (ZeRO-1 over data parallel); null = auto: on for full SFT
    # (peft=none: fp32 main weights + Adam states dominate), off for LoRA (its optimizer state is tiny)
    use_distributed_optimizer: Optional[bool] = None


@dataclass
class SftConfig:
    """NeMo-Aligner's trainer.sft contract."""
    max_epochs: int = 1
    max_steps: int = -1
    # int: every N steps; float in (0, 1]: that fraction of an epoch
    val_check_interval: float = 0.5
    save_interval: int = -1  # steps; -1 = at every validation; must be a multiple of val_check_interval
    limit_val_batches: float = 1.0  # int >= 1: that many batches; float in (0, 1]: that fraction
    gradient_clip_val: float = 1.0


OPTIMIZERS = ("adamw", "adam", "sgd")  # megatron-core's OptimizerConfig.optimizer, decoupled_weight_decay


@dataclass
class OptimConfig:
    # adamw: Adam with decoupled weight decay (megatron's default "adam"); adam: L2 weight decay added to the
    # gradient; sgd: SGD with `momentum`
    name: str = "adamw"
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    warmup_steps: int = 10
    scheduler: str = "cosine"


@dataclass
class TrainerConfig:
    sft: SftConfig = field(default_factory=SftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_split: str = "train"
    validation_split: str = "validation"
    save_top_k: int = 2
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; or fp32 / bf16
    # activation recompute: none, selective (core attention) or full (every layer, uniform, 1 layer per group)
    recompute: str = "none"
    log_every_n_steps: int = 1
    # stop after this many steps of this process, leaving a resumable checkpoint (tests, preemption drills)
    stop_after_steps: int = -1


@dataclass
class StageConfig:
    name: str = "stage"
    # dotted-key overrides applied on top of the root config for this stage, e.g. {"trainer.optim.lr": 5e-5}
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LoraSftConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # multi-stage runs (two_stage); empty = a single run
    stages: List[StageConfig] = field(default_factory=list)


SCHEMAS = {"lora_sft_schema": LoraSftConfig}


class ConfigError(ValueError):
    """Every problem found in a config, one per line with its key and the fix."""

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:  # one problem: one line
            super().__init__(f"invalid configuration: {self.problems[0]}")
        else:
            super().__init__(f"invalid configuration ({len(self.problems)} problems):\n"
                             + "\n".join(f"  - {p}" for p in self.problems))


def _register_schemas() -> None:
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(name=name, node=node)


GROUPS = ("model", "data", "peft", "parallel", "trainer", "cluster", "experiment")


def conf_dir() -> Path:
    import nemotune.conf

    return Path(nemotune.conf.__file__).resolve().parent


def check_overrides(overrides: List[str], *, schema: Any = LoraSftConfig, groups=GROUPS,
                    verb: str = "nemotune train") -> List[str]:
    """Unknown experiments / group options and keys that are not in the typed schema (`+trainer.lrr=5`)."""
    from nemotune.data_prep.overrides import check_overrides as check, group_options, schema_tree

    root = conf_dir()
    return check(overrides, tree=schema_tree(schema), groups={g: group_options(root, g) for g in groups},
                 verb=verb)


def compose_error(err: Exception) -> str:
    """Hydra's / OmegaConf's composition error (several lines, a cause) as one line."""
    lines: List[str] = []
    for source in (err, err.__cause__):
        for line in str(source or "").splitlines():
            line = line.strip()
            if line and not line.startswith(("full_key:", "object_type", "reference_type", "See https")) \
                    and line not in lines:
                lines.append(line)
    return "; ".join(lines) or type(err).__name__


def compose(config_name: str = "lora_sft", overrides: Optional[List[str]] = None) -> DictConfig:
    """Compose `conf/<config_name>.yaml` with Hydra overrides (`key=value`, `experiment=name`).

    Refuses (ConfigError, one line per problem) an unknown experiment or group option and any key the
    typed schema lacks, `+key=value` additions included, before Hydra runs."""
    overrides = list(overrides or [])
    if config_name == "lora_sft":
        problems = check_overrides(overrides)
        if problems:
            raise ConfigError(problems)
    _register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="nemotune.conf", version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except Exception as err:  # Hydra/OmegaConf: a bad value type, a malformed override
        raise ConfigError([compose_error(err)]) from err
    return cfg


def hydra_cli(argv: Optional[List[str]], help_text: str) -> Optional[tuple]:
    """Shared CLI front of the Hydra entry points: None after printing help, else (print_cfg, overrides)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text)
        return None
    return "--cfg" in argv, [a for a in argv if a != "--cfg"]


def experiment_names() -> List[str]:
    return sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


def world_size(cfg: DictConfig) -> int:
    """Processes this run will have: torchrun's WORLD_SIZE when launched, else what the cluster asks for."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return int(cfg.cluster.nodes) * int(cfg.cluster.nproc_per_node)


def hf_config_of(cfg: DictConfig) -> dict:
    """The model's normalized HF config: model.hf_path's config.json when set, else model.hf_config.
    Raises ModelConfigError (converters/formats/hf_config.py) naming the file and the problem."""
    if cfg.model.hf_path:
        return load_hf_config(cfg.model.hf_path, hybrid=True)
    return load_hf_config(OmegaConf.to_container(cfg.model.hf_config, resolve=True), hybrid=True)


def distributed_optimizer(cfg: DictConfig) -> bool:
    """The effective `parallel.use_distributed_optimizer`: as set, or (null, the default) on for full SFT
    (peft.peft_scheme=none) and off for LoRA."""
    value = cfg.parallel.use_distributed_optimizer
    return bool(value) if value is not None else cfg.peft.peft_scheme == "none"


def validate(cfg: DictConfig, *, check_files: bool = True, host_path=None) -> None:
    """Raise ConfigError listing every problem of `cfg`; returns None when it is runnable.

    `host_path` maps a path of the job to where this machine sees it (launch: a container job's mounts)."""
    problems: List[str] = []
    par, tr, sft = cfg.parallel, cfg.trainer, cfg.trainer.sft
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    for key, value in (("parallel.tensor_model_parallel_size", tp),
                       ("parallel.pipeline_model_parallel_size", pp),
                       ("parallel.context_parallel_size", cp),
                       ("trainer.micro_batch_size", tr.micro_batch_size),
                       ("trainer.global_batch_size", tr.global_batch_size)):
        if value < 1:
            problems.append(f"{key}={value}: must be >= 1")
    try:
        hf = hf_config_of(cfg)
    except ModelConfigError as err:
        hf = None
        problems.append(f"{'model.hf_path' if cfg.model.hf_path else 'model.hf_config'}: {err}")
    if hf and tp >= 1:
        heads, groups = hf["num_attention_heads"], hf["num_key_value_heads"]
        if heads % tp:
            problems.append(f"parallel.tensor_model_parallel_size={tp}: must divide the {heads} attention "
                            f"heads of model {cfg.model.name}; use one of {_divisors(heads)}")
        if groups % tp:
            problems.append(f"parallel.tensor_model_parallel_size={tp}: must divide the {groups} query groups "
                            f"(num_key_value_heads) of model {cfg.model.name}; use one of {_divisors(groups)}")
        if pp >= 1 and hf["num_hidden_layers"] % pp:
            problems.append(f"parallel.pipeline_model_parallel_size={pp}: must divide the "
                            f"{hf['num_hidden_layers']} layers; use one of {_divisors(hf['num_hidden_layers'])}")
        max_len = cfg.data.pack_size if cfg.data.packing else cfg.data.max_seq_length
        if max_len > hf["max_position_embeddings"]:
            key = "data.pack_size" if cfg.data.packing else "data.max_seq_length"
            problems.append(f"{key}={max_len}: longer than the model's max_position_embeddings "
                            f"({hf['max_position_embeddings']}); lower it")
    if par.sequence_parallel and tp == 1:
        problems.append("parallel.sequence_parallel=true: needs parallel.tensor_model_parallel_size > 1; "
                        "set it to false or raise TP")
    world = world_size(cfg)
    model_parallel = max(tp, 1) * max(pp, 1) * max(cp, 1)
    # a world that is not a whole number of model replicas is reported by validate_cluster below
    if world >= 1 and world % model_parallel == 0:  # world < 1 (cluster.nodes=0) is validate_cluster's
        dp = world // model_parallel
        if tr.micro_batch_size >= 1 and tr.global_batch_size % (tr.micro_batch_size * dp):
            problems.append(f"trainer.global_batch_size={tr.global_batch_size}: must be divisible by "
                            f"micro_batch_size x data-parallel size = {tr.micro_batch_size} x {dp}; "
                            f"use a multiple of {tr.micro_batch_size * dp}")
    if cfg.data.packing and tr.micro_batch_size != 1:
        problems.append(f"trainer.micro_batch_size={tr.micro_batch_size}: packed sequences need 1 "
                        "(each pack already holds many examples); set it to 1 or data.packing=false")
    if sft.max_epochs < 1 and sft.max_steps < 1:
        problems.append("trainer.sft.max_epochs / max_steps: set max_epochs >= 1 or max_steps >= 1")
    vci = sft.val_check_interval
    if vci <= 0 or (vci > 1 and vci != int(vci)):
        problems.append(f"trainer.sft.val_check_interval={vci}: an int number of steps >= 1 or a fraction "
                        "of an epoch in (0, 1]")
    if sft.save_interval > 0 and vci >= 1 and sft.save_interval % int(vci):
        problems.append(f"trainer.sft.save_interval={sft.save_interval}: must be a multiple of "
                        f"val_check_interval={int(vci)}")
    if tr.optim.name not in OPTIMIZERS:
        problems.append(f"trainer.optim.name={tr.optim.name}: not an optimizer megatron-core provides here; "
                        f"use one of {', '.join(OPTIMIZERS)}")
    if tr.optim.lr <= 0:
        problems.append(f"trainer.optim.lr={tr.optim.lr}: must be > 0")
    if tr.precision not in ("auto", "fp32", "bf16"):
        problems.append(f"trainer.precision={tr.precision}: use auto, fp32 or bf16")
    if cfg.peft.peft_scheme not in PEFT_SCHEMES:
        problems.append(f"peft.peft_scheme={cfg.peft.peft_scheme}: use lora (adapters, peft=lora) or none "
                        f"(full-parameter SFT, peft=none)")
    elif cfg.peft.peft_scheme == "none" and cfg.peft.restore_from:
        problems.append(f"peft.restore_from={cfg.peft.restore_from}: restores an adapter, and peft.peft_scheme=none "
                        f"trains no adapter; start full SFT from a model with model.checkpoint=<step dir or "
                        f"converted checkpoint>, or set peft=lora")
    if tr.recompute not in RECOMPUTE:
        problems.append(f"trainer.recompute={tr.recompute}: use one of {', '.join(RECOMPUTE)}")
    stage_names = [stage.name for stage in cfg.stages]
    if cfg.run.stage is not None and cfg.run.stage not in stage_names:
        problems.append(f"run.stage={cfg.run.stage}: not a stage of this experiment; use one of {stage_names}")
    if cfg.peft.lora.variant not in VARIANTS:
        problems.append(f"peft.lora.variant={cfg.peft.lora.variant}: use one of {', '.join(VARIANTS)}")
    if cfg.peft.lora.dim < 1:
        problems.append(f"peft.lora.dim={cfg.peft.lora.dim}: must be >= 1")
    if hf and hf["family"] == "nemotron_h":  # the hybrid model's own targets and limits
        from nemotune.recipes.engine.hybrid_training import hybrid_problems

        problems.extend(hybrid_problems(cfg))
    else:
        from nemotune.recipes.engine.lora import resolve_targets

        try:
            resolve_targets(list(cfg.peft.lora.target_modules))
        except ValueError as err:
            problems.append(f"peft.lora.target_modules: {err}")
    if check_files:
        from nemotune.data_prep.tokenizer import looks_like_path, tokenizer_problem

        seen = host_path or (lambda path: path)
        for key in ("model.hf_path", "model.checkpoint", "peft.restore_from"):
            value = OmegaConf.select(cfg, key)
            if value and not Path(seen(value)).exists():
                where = "" if seen(value) == value else f" (seen here as {seen(value)})"
                problems.append(f"{key}={value}: no such file or directory{where}; fix the path "
                                f"(base checkpoints come from `nemotune convert`)")
        tokenizer = cfg.model.tokenizer
        problem = tokenizer_problem(seen(tokenizer) if looks_like_path(tokenizer) else tokenizer) if tokenizer \
            else None
        if problem:
            problems.append(problem.replace(f"={seen(tokenizer)}:", f"={tokenizer}:", 1))
    problems.extend(validate_cluster(cfg))
    if problems:
        raise ConfigError(problems)
    from nemotune.recipes.engine.plan import memory_warning  # a warning, never a problem: the plan is a model

    warning = memory_warning(cfg)
    if warning:
        print(warning, file=sys.stderr)


PREP_KEYS = ("experiment", "data", "model", "tokenizer")


def prep_command(overrides: Sequence[str] = ()) -> str:
    """The `nemotune prep` that writes what a run with these overrides reads: the same experiment, data and
    model choices and data.* / model.* settings (prep reads nothing else)."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".", 1)[0] in PREP_KEYS]
    return " ".join(["nemotune prep", *(shlex.quote(o) for o in kept)])


def needed_splits(cfg: DictConfig) -> List[tuple]:
    """(key, split) pairs the run reads: the train and validation split of the run and of every stage."""
    needed = [("trainer.train_split", cfg.trainer.train_split),
              ("trainer.validation_split", cfg.trainer.validation_split)]
    for stage in cfg.get("stages") or []:
        for key in ("trainer.train_split", "trainer.validation_split"):
            if key in stage.overrides:
                needed.append((f"stages[{stage.name}].overrides.{key}", stage.overrides[key]))
    seen, unique = set(), []
    for key, split in needed:
        if split not in seen:
            seen.add(split)
            unique.append((key, split))
    return unique


def split_problem(out: Any, manifest: dict, key: str, split: str, prep: str) -> Optional[str]:
    """Why `split` cannot be read from the prepared dir `out` (None when it can), naming the splits it has."""
    splits = list(manifest.get("splits") or [])
    if split not in splits:
        roles = manifest.get("split_roles") or {}
        role = "train" if key.endswith("train_split") else "validation"
        suggestion = roles.get(role) if roles.get(role) in splits else (splits[0] if splits else None)
        fix = f"set {key}={suggestion}" if suggestion else f"prepare it: `{prep}`"
        return (f"{key}={split}: {out} has no split {split!r}; it has {', '.join(splits) or 'none'}; {fix} "
                f"(or prepare the splits you want with data.split_names / data.resplit)")
    return None


def prepared_data_problems(cfg: DictConfig, overrides: Sequence[str] = (), host_path=None) -> List[str]:
    """What training will read from data.output_dir, checked before any process starts: the manifest, every
    split it trains or validates on, and the packed file of each. `host_path` maps the job's path to where
    this machine sees it (a container job's mounts); the fix names the prep command to run."""
    import json

    from nemotune.data_prep import formats

    out = str(cfg.data.output_dir)
    seen = Path(host_path(out)) if host_path else Path(out)
    where = "" if str(seen) == out else f" (seen here as {seen})"
    prep = prep_command(overrides)
    if not (seen / formats.MANIFEST).is_file():
        return [f"data.output_dir={out}: no prepared data (no {formats.MANIFEST}{where}); run `{prep}` first"]
    try:
        manifest = json.loads((seen / formats.MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [f"data.output_dir={out}: unreadable {formats.MANIFEST} ({err}); rerun `{prep}`"]
    problems = []
    for key, split in needed_splits(cfg):
        problem = split_problem(out, manifest, key, split, prep)
        if problem:
            problems.append(problem)
        elif cfg.data.packing:
            packed = formats.packed_path(seen, split, cfg.data.pack_size, cfg.data.seed)
            if not packed.is_file():
                problems.append(f"data.pack_size={cfg.data.pack_size}: {out} has no {split} packs for pack_size "
                                f"{cfg.data.pack_size} / data.seed={cfg.data.seed} ({packed.name}); use the "
                                f"values it was prepared with or rerun `{prep}`")
        elif not formats.tokenized_path(seen, split).is_file():
            problems.append(f"{key}={split}: {out} lists split {split!r} but has no "
                            f"{formats.tokenized_path(out, split).name}; rerun `{prep}`")
    return problems


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def apply_overrides(cfg: DictConfig, overrides: Dict[str, Any]) -> DictConfig:
    """A copy of `cfg` with dotted-key overrides (a stage's settings) merged in, types checked."""
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={_dot(v)}" for k, v in overrides.items()]))
    return merged


def _dot(value: Any) -> str:
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value)
    return "null" if value is None else str(value)


# ---- RL after SFT (`nemotune rl`, recipes/rl.py): GRPO and DPO on the same LoRA policy ------------------------

# sft: a supervised stage of a multi-stage `nemotune rl` experiment (the SFT trainer, e.g. before GRPO)
RL_ALGORITHMS = ("grpo", "dpo", "sft")


@dataclass
class RewardSpec:
    # a built-in reward (nemotune.recipes.engine.rewards.BUILTIN) or a user function `package.module:function`
    name: str = "rouge_l"
    weight: float = 1.0


@dataclass
class GRPOConfig:
    num_generations: int = 4  # G completions per prompt: the group whose mean and std normalise the advantage
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    clip_eps: float = 0.2  # PPO clip range of the probability ratio
    kl_coef: float = 0.04  # weight of the KL to the reference (the same model with the adapter off); 0 = none
    steps_per_rollout: int = 1  # optimisation steps on each rollout batch (> 1: the ratio leaves 1 and clips)
    thinking: Optional[str] = None  # on / off: Nemotron's "detailed thinking on|off" system prompt; null = as prepared
    rewards: List[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    # megatron: sampled on the Megatron policy itself (any TP / PP, CPU or GPU); vllm: on a vLLM engine on rank 0
    # (GPU, `pip install vllm`, model.hf_path) with the current adapter loaded per step (engine/vllm_rollout.py)
    rollout_backend: str = "megatron"


@dataclass
class DPOConfig:
    # JSONL rows: `prompt` (text) or `messages` (chat turns before the answer), `chosen`, `rejected`
    pairs: Optional[str] = None
    # or pairs built from a prepared split: chosen = its reference answer, rejected = the starting policy's greedy
    # answer (generated once, stored in the run dir as dpo_pairs_<split>.jsonl and reused on resume)
    pairs_split: Optional[str] = None
    max_new_tokens: int = 256  # of the greedy answers of pairs_split
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO (Mitchell 2023): the probability the label is flipped


@dataclass
class RLConfig:
    algorithm: str = "grpo"
    # the KL (GRPO) / log-ratio (DPO) reference: `initial` = the policy RL starts from (the peft.restore_from adapter,
    # kept as a frozen copy of the LoRA weights only; the base when RL starts from a fresh adapter); `base` = the
    # adapter switched off (kl_coef then also pulls the policy back towards the base, away from its SFT)
    reference: str = "initial"
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


@dataclass
class RLRunConfig(LoraSftConfig):
    """`nemotune rl`: the SFT schema (the same model, LoRA, optimizer, checkpoints) plus `rl`; prompts come from
    trainer.train_split (the prepared `rl` split) and the answer-token loss is validated on trainer.validation_split."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(train_split="rl", validation_split="eval"))
    rl: RLConfig = field(default_factory=RLConfig)


SCHEMAS["rl_schema"] = RLRunConfig


def rl_problems(cfg: DictConfig, *, check_files: bool = True) -> List[str]:
    """Every problem of the `rl` section (and what RL needs of the rest), before any process group or weights."""
    problems: List[str] = []
    rl = cfg.rl
    if rl.algorithm not in RL_ALGORITHMS:
        problems.append(f"rl.algorithm={rl.algorithm}: use one of {', '.join(RL_ALGORITHMS)}")
    if rl.algorithm == "sft":  # a supervised stage: validate() covers it
        return problems
    if rl.get("reference", "initial") not in ("initial", "base"):
        problems.append(f"rl.reference={rl.reference}: use initial (the policy RL starts from) or base (the adapter "
                        "switched off)")
    if cfg.peft.peft_scheme != "lora":
        problems.append(f"peft.peft_scheme={cfg.peft.peft_scheme}: `nemotune rl` trains a LoRA policy (its reference "
                        "is the same model with the adapter switched off); set peft=lora, starting from a full-SFT "
                        "model with model.checkpoint=<its step dir>")
    if cfg.parallel.sequence_parallel:
        problems.append("parallel.sequence_parallel=true: not supported by `nemotune rl` yet; set it to false")
    if cfg.trainer.micro_batch_size != 1:
        problems.append(f"trainer.micro_batch_size={cfg.trainer.micro_batch_size}: RL micro-batches hold one "
                        "prompt's group (GRPO) or one pair (DPO); set it to 1 (trainer.global_batch_size counts "
                        "prompts or pairs per step)")
    if cfg.data.packing:
        problems.append("data.packing=true: RL reads prompts and validation examples unpacked; set data.packing=false")
    if rl.algorithm == "grpo":
        g = rl.grpo
        if g.num_generations < 2:
            problems.append(f"rl.grpo.num_generations={g.num_generations}: GRPO needs >= 2 completions per prompt "
                            "(the group's mean is the baseline of each advantage); set it to 2 or more")
        if g.max_new_tokens < 1:
            problems.append(f"rl.grpo.max_new_tokens={g.max_new_tokens}: must be >= 1")
        if g.temperature <= 0:
            problems.append(f"rl.grpo.temperature={g.temperature}: must be > 0 (sampling explores the group)")
        if not 0 < g.top_p <= 1:
            problems.append(f"rl.grpo.top_p={g.top_p}: must be in (0, 1]")
        if g.clip_eps <= 0:
            problems.append(f"rl.grpo.clip_eps={g.clip_eps}: must be > 0")
        if g.kl_coef < 0:
            problems.append(f"rl.grpo.kl_coef={g.kl_coef}: must be >= 0")
        if g.steps_per_rollout < 1:
            problems.append(f"rl.grpo.steps_per_rollout={g.steps_per_rollout}: must be >= 1")
        if g.thinking not in (None, "on", "off"):
            problems.append(f"rl.grpo.thinking={g.thinking}: use on, off or null")
        backend = g.get("rollout_backend", "megatron")
        if backend not in ("megatron", "vllm"):
            problems.append(f"rl.grpo.rollout_backend={backend}: use megatron (the default) or vllm")
        elif backend == "vllm":
            from nemotune.recipes.engine.vllm_rollout import vllm_problem

            problem = vllm_problem(cfg.model.hf_path)
            if problem:
                problems.append(problem)
        from nemotune.recipes.engine.rewards import reward_problems

        problems += reward_problems(OmegaConf.to_container(g.rewards, resolve=True))
    elif rl.algorithm == "dpo":
        d = rl.dpo
        if d.beta <= 0:
            problems.append(f"rl.dpo.beta={d.beta}: must be > 0")
        if not 0 <= d.label_smoothing < 0.5:
            problems.append(f"rl.dpo.label_smoothing={d.label_smoothing}: must be in [0, 0.5)")
        if d.pairs and d.pairs_split:
            problems.append(f"rl.dpo.pairs={d.pairs} and rl.dpo.pairs_split={d.pairs_split}: set one of them")
        elif not d.pairs and not d.pairs_split:
            problems.append("rl.dpo.pairs: not set; name a JSONL file of {prompt|messages, chosen, rejected} rows, "
                            "or set rl.dpo.pairs_split=<prepared split> to pair its answers with the model's own")
        if d.pairs_split and d.max_new_tokens < 1:
            problems.append(f"rl.dpo.max_new_tokens={d.max_new_tokens}: must be >= 1")
        if d.pairs and check_files:
            from nemotune.recipes.engine.rl import pair_problems

            problems += pair_problems(d.pairs)
    return problems


def rl_data_problems(cfg: DictConfig, overrides: Sequence[str] = ()) -> List[str]:
    """The prepared data RL reads: the split's manifest entry and tokenized file (prepared_data_problems) and,
    for GRPO, the split's chat messages (the prompts and the reference answers)."""
    from nemotune.data_prep import formats

    if cfg.rl.algorithm == "dpo":  # pairs come from rl.dpo.pairs: only the validation split is read
        cfg = OmegaConf.merge(cfg, {"trainer": {"train_split": cfg.trainer.validation_split}})
    problems = prepared_data_problems(cfg, overrides)
    stages = [apply_overrides(cfg, dict(s.overrides)) for s in cfg.stages] if cfg.stages else [cfg]
    for split in dict.fromkeys(s.trainer.train_split for s in stages if s.rl.algorithm == "grpo"):
        path = formats.messages_path(cfg.data.output_dir, split)
        if not problems and not path.is_file():
            problems.append(f"trainer.train_split={split}: {cfg.data.output_dir} has no {path.name} "
                            f"(the prompts); rerun `{prep_command(overrides)}`")
    for split in dict.fromkeys(s.rl.dpo.pairs_split for s in stages if s.rl.algorithm == "dpo" and s.rl.dpo.pairs_split):
        path = formats.messages_path(cfg.data.output_dir, split)
        if not problems and not path.is_file():
            have = sorted(p.name.split(".")[0] for p in Path(cfg.data.output_dir).glob("*.messages.jsonl"))
            problems.append(f"rl.dpo.pairs_split={split}: {cfg.data.output_dir} has no {path.name}; it has the "
                            f"splits {', '.join(have) or 'none'}; use one of them or rerun `{prep_command(overrides)}`")
    return problems
