"""Read any supported source into conversations, recording the file and line of every row and every problem.

Sources: a Hugging Face dataset (`datasets.load_dataset(hf_name, hf_config)`, e.g. explodinggradients/fiqa) or
local files (jsonl/json/csv/parquet; a file or a directory of {split}.{ext}). Row formats: `fields`
(prompt/response columns, FiQA's question/ground_truths by default), Nemotron `messages`, NeMo chat
(`system`, `conversations`[from/value]), and prompt-response `input`/`output`; `auto` picks per row.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from nemotune.data_prep.config import DataConfig
from nemotune.data_prep.formats import DataPrepError, from_nemo_chat, messages_problems
from nemotune.data_prep.templating import apply_thinking_mode

LOCAL_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
SAMPLE_PREFIX = "nemotune/"


@dataclass
class Row:
    source: str  # file path or hf://name/split
    line: int  # 1-based line in a jsonl/csv file, or row number
    split: str
    record: Any = None
    error: Optional[str] = None  # set when the row could not even be parsed


@dataclass
class Example:
    id: str
    split: str
    source: str
    line: int
    messages: list[dict]
    strata_value: Any = None


@dataclass
class Problem:
    source: str
    line: int
    reason: str
    raw: Any = None

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


@dataclass
class LoadedData:
    rows: list[Row]
    inputs: list[dict]  # manifest entries: path or hf name, split, sha256, rows
    native_splits: list[str] = field(default_factory=list)
    # the source defines its own splits (several split files / HF splits): keep them unless data.resplit
    has_native_splits: bool = False


def assets_dir() -> Path:
    return Path(__file__).resolve().parent / "assets"


def resolve_path(path: str) -> Path:
    """`nemotune/<name>` -> the packaged data_prep/assets/<name>; other paths as given."""
    if path.startswith(SAMPLE_PREFIX):
        return assets_dir() / path[len(SAMPLE_PREFIX):]
    return Path(path).expanduser()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ readers
def read_jsonl(path: Path, split: str, max_line_bytes: int) -> list[Row]:
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if len(raw) > max_line_bytes:
                rows.append(Row(str(path), number, split, error=f"line is {len(raw):,} bytes, over "
                                f"data.max_line_bytes={max_line_bytes:,} (corrupt or unsplit file?)"))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                rows.append(Row(str(path), number, split, error=f"not valid UTF-8 (byte {exc.start}: "
                                f"{raw[exc.start:exc.start + 4]!r}); binary data or another encoding"))
                continue
            if not text.strip():
                continue
            if "\x00" in text:
                rows.append(Row(str(path), number, split, error="contains NUL bytes (binary data)"))
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                rows.append(Row(str(path), number, split, error=f"invalid JSON at column {exc.colno}: {exc.msg} "
                                "(truncated line?)"))
                continue
            rows.append(Row(str(path), number, split, record=record))
    return rows


def read_json(path: Path, split: str) -> list[Row]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        return [Row(str(path), 1, split, error=f"not valid UTF-8 at byte {exc.start}")]
    except json.JSONDecodeError as exc:
        return [Row(str(path), exc.lineno, split, error=f"invalid JSON at column {exc.colno}: {exc.msg}")]
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        return [Row(str(path), 1, split, error="a .json file must hold a list of records (or {\"data\": [...]})")]
    return [Row(str(path), i + 1, split, record=record) for i, record in enumerate(data)]


def read_csv(path: Path, split: str) -> list[Row]:
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            line = reader.line_num
            for record in reader:
                rows.append(Row(str(path), line + 1, split, record=dict(record)))
                line = reader.line_num
    except UnicodeDecodeError as exc:
        return [Row(str(path), 1, split, error=f"not valid UTF-8 at byte {exc.start}")]
    return rows


def read_parquet(path: Path, split: str) -> list[Row]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [Row(str(path), i + 1, split, record=record) for i, record in enumerate(table.to_pylist())]


def read_local_file(path: Path, split: str, max_line_bytes: int) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, split, max_line_bytes)
    if suffix == ".json":
        return read_json(path, split)
    if suffix == ".csv":
        return read_csv(path, split)
    if suffix == ".parquet":
        return read_parquet(path, split)
    raise DataPrepError(f"{path}: unsupported file type {suffix!r}; use one of {LOCAL_EXTENSIONS}")


def load_local(cfg: DataConfig) -> LoadedData:
    root = resolve_path(cfg.path)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in LOCAL_EXTENSIONS)
        by_split = {p.stem: p for p in files}
        if not by_split:
            raise DataPrepError(f"data.path={cfg.path}: no {'/'.join(LOCAL_EXTENSIONS)} files in {root}")
    elif root.is_file():
        by_split = {root.stem: root}
    else:
        raise DataPrepError(f"data.path={cfg.path}: {root} does not exist; fix: point data.path at a file or at a "
                            f"directory of train/validation/test files")
    has_native = len(by_split) > 1
    if cfg.splits:
        missing = [s for s in cfg.splits if s not in by_split]
        if missing:
            raise DataPrepError(f"data.splits: {missing} not found in {root} (have {sorted(by_split)})")
        by_split = {s: by_split[s] for s in cfg.splits}
    order = {name: i for i, name in enumerate(("train", "validation", "test"))}
    by_split = dict(sorted(by_split.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))
    rows, inputs = [], []
    for split, path in by_split.items():
        # rows name the file as configured (not the resolved absolute path) so outputs do not depend on where
        # the package or the data is installed
        shown = str(cfg.path if root.is_file() else Path(cfg.path) / path.name)
        split_rows = read_local_file(path, split, cfg.max_line_bytes)
        if not split_rows:
            raise DataPrepError(f"{shown}: empty input file (no records); fix: point data.path at the file that "
                                f"holds the data" + (", or remove the empty split file" if len(by_split) > 1 else ""))
        for row in split_rows:
            row.source = shown
        rows.extend(split_rows)
        inputs.append({"path": shown, "split": split, "sha256": _sha256_file(path), "rows": len(split_rows)})
    return LoadedData(rows, inputs, list(by_split), has_native)


def _dataset_cached(name: str) -> bool:
    """Whether `datasets` has a prepared copy of the hub dataset in its local cache (HF_DATASETS_CACHE)."""
    import datasets

    root = Path(datasets.config.HF_DATASETS_CACHE)
    return any(root.glob(name.replace("/", "___") + "*")) or any(root.glob(name.replace("/", "___").lower() + "*"))


def load_hf(cfg: DataConfig) -> LoadedData:
    from nemotune.data_prep.tokenizer import offline_reason

    config = f", '{cfg.hf_config}'" if cfg.hf_config else ""
    local = cfg.hf_name.rsplit("/", 1)[-1]
    fix = (f"fix: on a machine with network run `python -c \"import datasets; d = datasets.load_dataset("
           f"'{cfg.hf_name}'{config}); [d[s].to_json(f'{local}/{{s}}.jsonl') for s in d]\"`, copy {local}/ here "
           f"and set data.path={local} (the same config reads the local copy)")
    reason = None if _dataset_cached(cfg.hf_name) else offline_reason()
    if reason:
        raise DataPrepError(f"data.hf_name={cfg.hf_name}: not in the local datasets cache and {reason}; {fix}")
    import datasets

    try:
        dataset = datasets.load_dataset(cfg.hf_name, cfg.hf_config)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataPrepError(f"data.hf_name={cfg.hf_name} (config {cfg.hf_config}): load_dataset failed: {first}; "
                            f"{fix}") from exc
    split_names = list(cfg.splits or dataset.keys())
    rows, inputs = [], []
    for split in split_names:
        if split not in dataset:
            raise DataPrepError(f"data.splits: {split!r} not in {cfg.hf_name} (have {list(dataset.keys())})")
        records = dataset[split].to_list()
        source = f"hf://{cfg.hf_name}/{split}"
        rows.extend(Row(source, i + 1, split, record=r) for i, r in enumerate(records))
        canonical = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str) + "\n" for r in records)
        inputs.append({"hf": cfg.hf_name, "config": cfg.hf_config, "split": split, "rows": len(records),
                       "sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
                       "fingerprint": getattr(dataset[split], "_fingerprint", None)})
    return LoadedData(rows, inputs, split_names, len(dataset.keys()) > 1)


def load_rows(cfg: DataConfig) -> LoadedData:
    """A set data.path always wins: it is the local copy of the hub dataset (how offline users run fiqa)."""
    return load_local(cfg) if cfg.path else load_hf(cfg)


# ------------------------------------------------------------------------------------------------ to messages
def _text(record: dict, key: str, what: str) -> str:
    if key not in record:
        raise ValueError(f"missing field {key!r} ({what}); fields present: {sorted(record)[:8]}")
    value = record[key]
    if isinstance(value, list):
        if not value:
            raise ValueError(f"field {key!r} ({what}) is an empty list")
        value = value[0]  # FiQA's ground_truths: the full first answer
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} ({what}) must be a string or list of strings, got {type(value).__name__}")
    return value


def detect_format(record: dict, configured: str) -> str:
    if configured != "auto":
        return configured
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "nemo_chat"
    if "input" in record and "output" in record:
        return "input_output"
    return "fields"


def record_to_messages(record: Any, cfg: DataConfig) -> list[dict]:
    """One source record -> a validated, whitespace-trimmed conversation. Raises ValueError with the reason."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    fmt = detect_format(record, cfg.format)
    if fmt == "messages":
        messages = record.get("messages")
        if messages is None:
            raise ValueError("missing field 'messages'")
        system_from_data = True
    elif fmt == "nemo_chat":
        messages = from_nemo_chat(record)
        system_from_data = True
    elif fmt == "input_output":
        messages = [{"role": "user", "content": _text(record, "input", "prompt")},
                    {"role": "assistant", "content": _text(record, "output", "response")}]
        system_from_data = False
    else:
        messages = [{"role": "user", "content": _text(record, cfg.fields.prompt, "data.fields.prompt")},
                    {"role": "assistant", "content": _text(record, cfg.fields.response, "data.fields.response")}]
        system_from_data = False
        if cfg.fields.system and record.get(cfg.fields.system):
            messages.insert(0, {"role": "system", "content": _text(record, cfg.fields.system, "data.fields.system")})
            system_from_data = True
    problems = messages_problems(messages)
    if problems:
        raise ValueError("; ".join(problems))
    messages = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    if not system_from_data and cfg.system_prompt:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt.strip()})
    return messages


def example_id(record: Any, messages: list[dict], cfg: DataConfig) -> str:
    """A stable id: the configured id column, else a hash of the non-system turns (so duplicates collide)."""
    if cfg.fields.id and isinstance(record, dict) and record.get(cfg.fields.id) is not None:
        return str(record[cfg.fields.id])
    turns = [[m["role"], m["content"]] for m in messages if m["role"] != "system"]
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def to_examples(loaded: LoadedData, cfg: DataConfig) -> tuple[list[Example], list[Problem]]:
    examples, problems, seen = [], [], {}
    for row in loaded.rows:
        if row.error:
            problems.append(Problem(row.source, row.line, row.error))
            continue
        try:
            messages = record_to_messages(row.record, cfg)
        except ValueError as exc:
            problems.append(Problem(row.source, row.line, str(exc), row.record))
            continue
        eid = example_id(row.record, messages, cfg)  # before the thinking switch moves any system text
        messages = apply_thinking_mode(messages, cfg.system_prompt_mode, cfg.task_prompt_placement)
        if eid in seen:
            first = seen[eid]
            problems.append(Problem(row.source, row.line, f"duplicate of {first.source}:{first.line} (id {eid})",
                                    row.record))
            continue
        strata = None
        if cfg.stratify_key and cfg.stratify_key != "answer_length" and isinstance(row.record, dict):
            strata = row.record.get(cfg.stratify_key)
        example = Example(eid, row.split, row.source, row.line, messages, strata)
        seen[eid] = example
        examples.append(example)
    return examples, problems
