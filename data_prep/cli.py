"""`python -m nemotune.data_prep [--validate-only] [--skip-bad] [hydra overrides...]` (also `nemotune prep ...`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
Configuration is composed with Hydra from conf/prep.yaml (groups: model=, data=); any key can be overridden:

  python -m nemotune.data_prep                                   # bundled FiQA sample + tiny tokenizer -> work/prep/fiqa_sample
  python -m nemotune.data_prep data=fiqa model=nemotron_nano_8b  # the real FiQA from the HF hub, the model's tokenizer
  python -m nemotune.data_prep data=fiqa data.path=/data/fiqa    # a local copy of FiQA ({train,validation,test}.jsonl)
  python -m nemotune.data_prep data=fiqa_sample data.source=local data.path=my.jsonl \\
      data.fields.prompt=question data.fields.response=answer data.name=mine   # any file, field mapping
  python -m nemotune.data_prep data.format=messages data.path=chat.jsonl   # Nemotron {"messages": [...]} JSONL
  python -m nemotune.data_prep data.format=nemo_chat data.path=chat.jsonl  # NeMo {"system","conversations","mask"}
  python -m nemotune.data_prep data.system_prompt_mode=thinking_off        # Nemotron "detailed thinking off" line
  python -m nemotune.data_prep data.pack_size=8192 data.max_seq_length=8192 data.pad_seq_to_mult=4 data.num_proc=2
  python -m nemotune.data_prep tokenizer=/models/llama31/             # tokenizer dir (default: the model's own)
  python -m nemotune.data_prep --validate-only data.path=raw.jsonl    # list every problem with file:line, write nothing

Outputs (data.output_dir, default work/prep/<data.name>): manifest.json, splits.csv, config.json,
<split>.messages.jsonl, <split>.tokenized.jsonl, <split>/packed_<pack_size>_seed<seed>.npy (+ .parquet, metadata).
Everything is written to a temp dir and renamed at the end: an error leaves no partial output.
"""


def default_config_dir() -> Path:
    import nemotune.conf as conf

    return Path(conf.__file__).resolve().parent


def compose(overrides: list[str], config_dir: str | Path | None = None, config_name: str = "prep"):
    """The composed, resolved prep config (OmegaConf DictConfig)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from nemotune.data_prep.formats import DataPrepError

    from hydra.core.config_store import ConfigStore

    from nemotune.data_prep.config import PrepConfig

    ConfigStore.instance().store(name="prep_schema", node=PrepConfig)
    directory = Path(config_dir).resolve() if config_dir else default_config_dir()
    try:
        with initialize_config_dir(config_dir=str(directory), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except Exception as exc:  # Hydra/OmegaConf name the offending key or group in their message
        raise DataPrepError(f"config ({directory}/{config_name}.yaml + overrides {list(overrides)}): {exc}\n"
                            f"fix: see `python -m nemotune.data_prep --help` and `--cfg` for the composed keys") from exc
    return cfg


def tokenizer_name(cfg) -> str:
    """`tokenizer=` when given, else the model's own (model.tokenizer, model.hf_path's files, model.hub_id)."""
    if cfg.get("tokenizer"):
        return str(cfg.tokenizer)
    from nemotune.data_prep.tokenizer import model_tokenizer

    return model_tokenizer(cfg.get("model") or {})[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nemotune.data_prep",
        description="Turn a dataset into what training reads: chat JSONL -> chat-templated tokens with answer-only "
                    "loss masks -> packed sequences, deterministically, with a manifest of hashes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validate-only", action="store_true",
                        help="check schema, role order, empty/whitespace turns, duplicates, non-UTF-8, over-long "
                             "prompts; list every problem with file:line; write nothing; exit 1 on problems")
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
        result = run(data, tokenizer_name(cfg), validate_only=args.validate_only or data.validate_only,
                     skip_bad=args.skip_bad or data.skip_bad, quiet=args.quiet)
    except DataPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if (args.validate_only or data.validate_only) and result.problems:
        return 1
    return 0
