"""`nemotune prep [--validate-only] [--skip-bad] [hydra overrides...]` (also `python -m nemotune.data_prep ...`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
Configuration is composed with Hydra from conf/prep.yaml (groups: model=, data=); any key can be overridden:

  nemotune prep                                   # bundled FiQA sample + tiny tokenizer -> work/prep/fiqa_sample
  nemotune prep experiment=tiny_two_stage         # the data (and tokenizer) a training experiment reads, written
                                                  # to its data.output_dir (here work/prep/fiqa_sample_resplit)
  nemotune prep data=fiqa model=nemotron_nano_8b  # the real FiQA from the HF hub, the model's tokenizer
  nemotune prep data=fiqa data.path=/data/fiqa    # a local copy of FiQA ({train,validation,test}.jsonl)
  nemotune prep data=fiqa_sample data.source=local data.path=my.jsonl \\
      data.fields.prompt=question data.fields.response=answer data.name=mine   # any file, field mapping
  nemotune prep data.format=messages data.path=chat.jsonl   # Nemotron {"messages": [...]} JSONL
  nemotune prep data.format=nemo_chat data.path=chat.jsonl  # NeMo {"system","conversations","mask"}
  nemotune prep data.system_prompt_mode=thinking_off        # Nemotron "detailed thinking off" line
  nemotune prep data.pack_size=8192 data.max_seq_length=8192 data.pad_seq_to_mult=4 data.num_proc=2
  nemotune prep tokenizer=/models/llama31/             # tokenizer dir (default: the model's own)
  nemotune prep --validate-only data.path=raw.jsonl    # list every problem with file:line, write nothing

Outputs (data.output_dir, default work/prep/<data.name>): manifest.json, splits.csv, config.json,
<split>.messages.jsonl, <split>.tokenized.jsonl, <split>/packed_<pack_size>_seed<seed>.npy (+ .parquet, metadata).
Everything is written to a temp dir and renamed at the end: an error leaves no partial output.
Also runs as `python -m nemotune.data_prep`. Exit codes: 0 done, 1 --validate-only found problems, 2 refused
(bad config or input; one message naming the key, file or line).
"""

# Top-level keys an experiment brings along that prep never reads: a setting there would be silently lost.
NOT_READ_BY_PREP = ("run", "peft", "parallel", "trainer", "cluster", "stages")
PREP_GROUPS = ("model", "data", "experiment")


def default_config_dir() -> Path:
    import nemotune.conf as conf

    return Path(conf.__file__).resolve().parent


def uses_experiment(overrides: list[str]) -> bool:
    return any(o.split("=", 1)[0].lstrip("+") == "experiment" for o in overrides)


def check_prep_overrides(overrides: list[str], directory: Path) -> list[str]:
    """Unknown experiments / group options and keys prep does not have (`+data.pack_sise=1`), before Hydra."""
    from nemotune.data_prep.config import PrepConfig
    from nemotune.data_prep.overrides import check_overrides, group_options, schema_tree

    tree = schema_tree(PrepConfig)
    groups = {g: group_options(directory, g) for g in PREP_GROUPS if (directory / g).is_dir()}
    reason = ("`nemotune prep` reads only data.*, model.* and tokenizer; set this key on the training command "
              "(nemotune train / launch) instead")
    return check_overrides(overrides, tree=tree, groups=groups, verb="nemotune prep",
                           ignored={key: reason for key in NOT_READ_BY_PREP})


def compose(overrides: list[str], config_dir: str | Path | None = None, config_name: str = "prep"):
    """The composed prep config (OmegaConf DictConfig) with data, model and tokenizer resolved.

    With `experiment=<name>` the experiment overlay of the training config (conf/experiment/) chooses the
    model, the data and data.output_dir (conf/prep_experiment.yaml), so prep writes what training reads."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from nemotune.data_prep.formats import DataPrepError

    from nemotune.data_prep.config import PrepConfig, PrepExperimentConfig

    ConfigStore.instance().store(name="prep_schema", node=PrepConfig)
    ConfigStore.instance().store(name="prep_experiment_schema", node=PrepExperimentConfig)
    directory = Path(config_dir).resolve() if config_dir else default_config_dir()
    problems = check_prep_overrides(list(overrides), directory)
    if problems:
        raise DataPrepError("; ".join(problems) if len(problems) == 1 else
                            f"{len(problems)} problems:\n  " + "\n  ".join(problems))
    if config_name == "prep" and uses_experiment(list(overrides)):
        config_name = "prep_experiment"
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(directory), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        # experiments bring run/cluster/... whose interpolations prep has no values for: resolve what prep reads
        cfg = OmegaConf.masked_copy(cfg, [k for k in ("data", "model", "tokenizer") if k in cfg])
        OmegaConf.resolve(cfg)
    except Exception as exc:  # Hydra/OmegaConf name the offending key or group in their message
        lines = [line.strip() for source in (exc, exc.__cause__) for line in str(source or "").splitlines()
                 if line.strip() and not line.strip().startswith(("full_key:", "object_type", "reference_type"))]
        raise DataPrepError(f"config {directory}/{config_name}.yaml + {list(overrides)}: {'; '.join(lines)}; "
                            f"fix: see `nemotune prep --help`, `--cfg` prints the composed keys") from exc
    return cfg


def tokenizer_choice(cfg) -> tuple[str, str]:
    """(tokenizer, the key that chose it): `tokenizer=` when given, else the model's own (model.tokenizer,
    model.hf_path's files, model.hub_id)."""
    if cfg.get("tokenizer"):
        return str(cfg.tokenizer), "tokenizer"
    from nemotune.data_prep.tokenizer import model_tokenizer

    return model_tokenizer(cfg.get("model") or {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nemotune prep",
        description="Turn a dataset into what training reads: chat JSONL -> chat-templated tokens with answer-only "
                    "loss masks -> packed sequences, deterministically, with a manifest of hashes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validate-only", action="store_true",
                        help="check everything the real prep checks (schema, role order, empty/whitespace turns, "
                             "duplicates, non-UTF-8, and with the tokenizer, no weights: every example prep would "
                             "drop for length); list each with file:line; write nothing; exit 1 on problems")
    parser.add_argument("--skip-bad", action="store_true",
                        help="instead of failing on bad rows, write them with the reason to <out>/rejects.jsonl")
    parser.add_argument("--config-dir", default=None, help="config root (default: the installed conf/)")
    parser.add_argument("--config-name", default="prep", help="top config file name (default: prep)")
    parser.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    parser.add_argument("--quiet", action="store_true", help="no summary table")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=fiqa data.pack_size=8192")
    args = parser.parse_args(argv)

    from omegaconf import OmegaConf

    from nemotune.data_prep.config import check_data_config
    from nemotune.data_prep.formats import DataPrepError
    from nemotune.data_prep.pipeline import run

    try:
        cfg = compose(args.overrides, args.config_dir, args.config_name)
        if args.cfg:
            print(OmegaConf.to_yaml(cfg))
            return 0
        data = check_data_config(cfg.data)
        name, key = tokenizer_choice(cfg)
        result = run(data, name, validate_only=args.validate_only or data.validate_only,
                     skip_bad=args.skip_bad or data.skip_bad, quiet=args.quiet, tokenizer_key=key)
    except DataPrepError as exc:
        print(f"nemotune prep: error: {exc}", file=sys.stderr)
        return 2
    if (args.validate_only or data.validate_only) and result.problems:
        return 1
    return 0
