"""The prep pipeline: source -> validated conversations -> splits -> chat-templated tokens + answer-only masks ->
packed sequences, all written atomically with a manifest that hashes every input and output."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from nemotune.converters.formats.outputs import output_target
from nemotune.data_prep import formats, packing, templating
from nemotune.data_prep.config import DataConfig
from nemotune.data_prep.formats import DataPrepError
from nemotune.data_prep.sources import Example, Problem, load_rows, to_examples
from nemotune.data_prep.splitting import length_buckets, stratified_split
from nemotune.data_prep.tokenizer import load_tokenizer, tokenizer_fingerprint

FORMAT_VERSION = 1
CHUNK = 32
MAX_LISTED_PROBLEMS = 50
# Keys that change how prep runs but never what it writes: left out of config.json/manifest so outputs are
# byte-identical across num_proc and output locations.
EXECUTION_ONLY_KEYS = ("num_proc", "output_dir", "validate_only", "skip_bad")
# NeMo's packed convention, which the trainer reads: a pack's loss_mask is shifted against its input_ids.
LOSS_MASK_ALIGNMENT = ("label (loss_mask[i] weights the label at position i, i.e. predicting input_ids[i+1]; "
                       "each document's last position is 0; <split>.tokenized.jsonl keeps the token-aligned "
                       "mask: loss_mask[i] weights input_ids[i])")


@dataclass
class PrepResult:
    out_dir: Optional[Path]
    problems: list[Problem]
    manifest: Optional[dict] = None
    summary: list[dict] = field(default_factory=list)


def _progress(iterable, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="ex", disable=None, leave=False, file=sys.stderr)


# ------------------------------------------------------------------------------------------------ tokenize
_WORKER: dict = {}


def _init_worker(tokenizer_name: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = load_tokenizer(tokenizer_name)
    _WORKER.update(tokenizer=tokenizer, special=templating._special_ids(tokenizer))


def _encode_chunk(args) -> list:
    conversations, max_seq_length, truncation, keep_final_reasoning = args
    tokenizer, special = _WORKER["tokenizer"], _WORKER["special"]
    results = []
    for messages in conversations:
        try:
            results.append(templating.encode(tokenizer, messages, max_seq_length, truncation, special,
                                             keep_final_reasoning))
        except templating.MaskError as exc:
            results.append(exc)
    return results


def tokenize_all(examples: list[Example], tokenizer, tokenizer_name: str, cfg: DataConfig) -> list:
    """Encoded (or MaskError) per example, in input order; identical for any num_proc."""
    chunks = [([e.messages for e in examples[i:i + CHUNK]], cfg.max_seq_length, cfg.truncation,
               cfg.keep_final_reasoning)
              for i in range(0, len(examples), CHUNK)]
    results: list = []
    bar = _progress(None, len(examples), f"tokenize (num_proc={cfg.num_proc})")
    if cfg.num_proc <= 1 or len(chunks) <= 1:
        _WORKER.update(tokenizer=tokenizer, special=templating._special_ids(tokenizer))
        for chunk in chunks:
            results.extend(_encode_chunk(chunk))
            bar.update(len(chunk[0]))
    else:
        import multiprocessing

        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with context.Pool(cfg.num_proc, initializer=_init_worker, initargs=(tokenizer_name,)) as pool:
            for chunk, encoded in zip(chunks, pool.imap(_encode_chunk, chunks)):
                results.extend(encoded)
                bar.update(len(chunk[0]))
    bar.close()
    return results


# ------------------------------------------------------------------------------------------------ helpers
def _answer_words(example: Example) -> int:
    return len(example.messages[-1]["content"].split())


def assign_splits(examples: list[Example], loaded, cfg: DataConfig) -> list[str]:
    if loaded.has_native_splits and not cfg.resplit:
        return list(loaded.native_splits)
    if cfg.stratify_key == "answer_length":
        strata = length_buckets([_answer_words(e) for e in examples], cfg.stratify_buckets)
    elif cfg.stratify_key:
        strata = [repr(e.strata_value) for e in examples]
    else:
        strata = [0] * len(examples)
    assignment = stratified_split([e.id for e in examples], strata, cfg.split_names, cfg.split_ratios, cfg.seed)
    for example in examples:
        example.split = assignment[example.id]
    return list(cfg.split_names)


def split_roles(splits: list[str]) -> dict:
    """Which split the trainer uses for training / validation / test."""
    aliases = {"train": ("train", "sft", "training"), "validation": ("validation", "valid", "val", "dev", "rl"),
               "test": ("test", "eval", "evaluation")}
    roles = {}
    for role, names in aliases.items():
        roles[role] = next((s for s in splits if s in names), None)
    if roles["train"] is None and splits:
        roles["train"] = splits[0]
    return roles


def _stats(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {"count": len(values), "min": ordered[0], "mean": round(statistics.fmean(values), 2),
            "median": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "max": ordered[-1], "sum": sum(values)}


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _problem_report(problems: list[Problem], header: str) -> str:
    lines = [f"{header}: {len(problems)} problem(s)"]
    lines += [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)


def prep_config_dict(cfg: DataConfig, tokenizer_name: str) -> dict:
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_ONLY_KEYS}
    return {"data": data, "tokenizer": tokenizer_name, "format_version": FORMAT_VERSION}


# ------------------------------------------------------------------------------------------------ run
def run(cfg: DataConfig, tokenizer_name: str, *, validate_only: bool = False, skip_bad: bool = False,
        quiet: bool = False, tokenizer_key: str = "model.tokenizer") -> PrepResult:
    """Prepare `cfg` with the tokenizer `tokenizer_name` into cfg.output_dir (atomically), or just validate."""
    if not validate_only:
        _check_output(cfg, tokenizer_name)
    # the tokenizer is checked before a long read: an offline hub id fails at once, naming the download
    tokenizer = load_tokenizer(tokenizer_name, tokenizer_key)
    loaded = load_rows(cfg)
    examples, problems = to_examples(loaded, cfg)
    if validate_only:
        problems += _length_problems(examples, tokenizer, tokenizer_name, cfg)
        # the listing is the point of --validate-only: printed even with quiet (which drops the summary table)
        print(_problem_report(problems, "validation") if problems else
              f"validation: {len(examples)} examples from {len(loaded.inputs)} input(s), no problems")
        return PrepResult(None, problems)
    if problems and not skip_bad:
        raise DataPrepError(_problem_report(problems, "input data") +
                            "\nfix: correct those lines, or rerun with --skip-bad to write them to rejects.jsonl")
    splits = assign_splits(examples, loaded, cfg)
    encoded = tokenize_all(examples, tokenizer, tokenizer_name, cfg)
    rejects = [{"source": p.source, "line": p.line, "reason": p.reason,
                "record": p.raw if isinstance(p.raw, (dict, list, str)) else None} for p in problems]
    for example, result in zip(examples, encoded):
        if isinstance(result, templating.MaskError):
            if not skip_bad:
                raise DataPrepError(f"{example.source}:{example.line}: cannot build the answer-only loss mask: "
                                    f"{result}\nfix: check the tokenizer's chat template, or --skip-bad")
            rejects.append({"source": example.source, "line": example.line, "reason": f"mask: {result}",
                            "record": {"messages": example.messages}})
    out = Path(cfg.output_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    manifest = {"format_version": FORMAT_VERSION, "created_by": "nemotune data_prep",
                "inputs": loaded.inputs, "splits": splits, "split_roles": split_roles(splits),
                "tokenizer": tokenizer_fingerprint(tokenizer), "prep_config": prep_config_dict(cfg, tokenizer_name),
                "counts": {}, "length_stats": {}, "packing": {}, "dropped": {}}
    summary = []
    with output_target(out, verb=VERB, overwrite=cfg.overwrite, inputs=_inputs(cfg, tokenizer_name),
                       overwrite_hint=OVERWRITE_HINT, error=DataPrepError) as tmp:
        split_rows = []
        for example in examples:
            split_rows.append(f"{example.id},{example.split},{example.source},{example.line}\n")
        (tmp / formats.SPLITS_CSV).write_text("id,split,source,line\n" + "".join(split_rows), encoding="utf-8")
        (tmp / formats.CONFIG_JSON).write_text(
            json.dumps(prep_config_dict(cfg, tokenizer_name), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for split in splits:
            summary.append(_write_split(tmp, split, examples, encoded, cfg, pad_id, manifest, problems))
        if skip_bad:
            (tmp / formats.REJECTS).write_bytes(formats.jsonl_bytes(rejects))
        manifest["counts"]["rejected"] = len(rejects)
        manifest["outputs"] = {str(p.relative_to(tmp)): _sha256_file(p)
                               for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / formats.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if not quiet:
        print_summary(summary, out, len(rejects), skip_bad)
    return PrepResult(out, problems, manifest, summary)


VERB = "prep"
OVERWRITE_HINT = "data.overwrite=true"
EXECUTION_ONLY_KEYS = (*EXECUTION_ONLY_KEYS, "overwrite")  # whether to replace an output, not what it holds


def _inputs(cfg: DataConfig, tokenizer_name: str) -> list:
    """Local paths prep reads: the output may be none of them, nor inside or around one."""
    return [cfg.path, tokenizer_name if Path(tokenizer_name).exists() else None]


def _check_output(cfg: DataConfig, tokenizer_name: str) -> None:
    """Refuse the output dir before anything is read (the same checks run again when writing)."""
    from nemotune.converters.formats.outputs import OutputError, preflight

    try:
        preflight(Path(cfg.output_dir), verb=VERB, inputs=_inputs(cfg, tokenizer_name), overwrite=cfg.overwrite,
                  overwrite_hint=OVERWRITE_HINT)
    except OutputError as err:
        raise DataPrepError(str(err)) from None


def _write_split(tmp: Path, split: str, examples, encoded, cfg: DataConfig, pad_id: int, manifest: dict,
                 problems: list[Problem]) -> dict:
    members = [(e, r) for e, r in zip(examples, encoded) if e.split == split]
    kept = [(e, r) for e, r in members if isinstance(r, templating.Encoded) and r.status == templating.OK]
    dropped = [(e, r) for e, r in members if isinstance(r, templating.Encoded) and r.status != templating.OK]
    formats.messages_path(tmp, split).write_bytes(formats.jsonl_bytes(
        {"id": e.id, "messages": e.messages} for e, _ in kept))
    formats.tokenized_path(tmp, split).write_bytes(formats.jsonl_bytes(
        {"id": e.id, "input_ids": r.input_ids, "loss_mask": r.loss_mask} for e, r in kept))
    reasons: dict[str, int] = {}
    for _, r in dropped:
        reasons[r.status] = reasons.get(r.status, 0) + 1
    manifest["dropped"][split] = [{"id": e.id, "source": e.source, "line": e.line, "reason": r.status,
                                   "tokens": r.length} for e, r in dropped[:1000]]
    lengths = [len(r.input_ids) for _, r in kept]
    manifest["counts"][split] = {"examples_in": len(members), "examples": len(kept), "dropped": reasons,
                                 "truncated": sum(1 for _, r in kept if r.truncated_tokens)}
    manifest["length_stats"][split] = {
        "tokens": _stats(lengths), "prompt_tokens": _stats([r.prompt_tokens for _, r in kept]),
        "answer_tokens": _stats([sum(r.loss_mask) for _, r in kept]),
        "answer_words": _stats([_answer_words(e) for e, _ in kept])}
    row = {"split": split, "in": len(members), "kept": len(kept), "dropped": reasons,
           "tokens": sum(lengths), "packs": None, "efficiency": None}
    if cfg.packing and kept:
        padded = [packing.pad_to_multiple(r.input_ids, r.loss_mask, cfg.pad_seq_to_mult, pad_id) for _, r in kept]
        items = [{"input_ids": ids, "loss_mask": mask} for ids, mask in padded]
        padded_lengths = [len(ids) for ids, _ in padded]
        bins = packing.pack_bins(padded_lengths, cfg.pack_size, cfg.pack_algorithm, cfg.seed)
        packs = packing.build_packs(items, bins)
        meta = packing.packing_stats(padded_lengths, bins, cfg.pack_size, real_lengths=lengths)
        meta.update(algorithm=cfg.pack_algorithm, seed=cfg.seed, pad_seq_to_mult=cfg.pad_seq_to_mult, pad_id=pad_id,
                    split=split, loss_mask_alignment=LOSS_MASK_ALIGNMENT)
        formats.write_packed(formats.packed_path(tmp, split, cfg.pack_size, cfg.seed), packs, meta)
        manifest["packing"][split] = meta
        row.update(packs=meta["n_packs"], efficiency=meta["packing_efficiency"])
    return row


DROP_EXPLANATIONS = {
    templating.TOO_LONG: "{length} tokens, over data.max_seq_length={max}: prep drops it (raise data.max_seq_length, "
                         "or data.truncation=truncate_prompt to shorten its prompt)",
    templating.PROMPT_TOO_LONG: "prompt is {prompt} tokens: no room for an answer at data.max_seq_length={max}, "
                                "prep drops it (raise it, or data.truncation=truncate_prompt)",
    templating.ANSWER_TOO_LONG: "{length} tokens and the answers alone exceed data.max_seq_length={max}: prep drops "
                                "it even with truncate_prompt (raise data.max_seq_length)",
    templating.ALL_MASKED: "no answer token is left to train on: prep drops it",
}


def _length_problems(examples: list[Example], tokenizer, tokenizer_name: str, cfg: DataConfig) -> list[Problem]:
    """Every example the real prep would drop or fail on: the same chat template, encoding and truncation
    policy (tokenize_all), so --validate-only and prep agree; needs the tokenizer files, no weights."""
    problems = []
    for example, result in zip(examples, tokenize_all(examples, tokenizer, tokenizer_name, cfg)):
        if isinstance(result, templating.MaskError):
            problems.append(Problem(example.source, example.line, f"cannot build the answer-only loss mask: {result}"))
        elif result.status != templating.OK:
            reason = DROP_EXPLANATIONS.get(result.status, "prep drops it ({status})")
            problems.append(Problem(example.source, example.line, reason.format(
                length=result.length, prompt=result.prompt_tokens, max=cfg.max_seq_length, status=result.status)))
    return problems


def print_summary(summary: list[dict], out: Path, n_rejects: int, skip_bad: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"data_prep -> {out}")
    for column in ("split", "in", "kept", "dropped", "tokens", "packs", "pack efficiency"):
        table.add_column(column, justify="left" if column in ("split", "dropped") else "right")
    for row in summary:
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(row["dropped"].items())) or "0"
        table.add_row(row["split"], str(row["in"]), str(row["kept"]), dropped, f"{row['tokens']:,}",
                      "-" if row["packs"] is None else str(row["packs"]),
                      "-" if row["efficiency"] is None else f"{100 * row['efficiency']:.2f}%")
    console = Console(file=sys.stdout, width=120)
    console.print(table)
    if skip_bad:
        console.print(f"rejected {n_rejects} input row(s): {out / formats.REJECTS}")
    console.print(f"manifest: {out / formats.MANIFEST}")
