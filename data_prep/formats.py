"""The prepared-data format: file layout, readers/writers, chat-format conversions. Both data_prep and the
trainer import this module; it has no heavy dependencies (numpy, pyarrow only when reading parquet).

Layout of a prepared directory <out>:
  manifest.json, splits.csv, config.json
  <split>.messages.jsonl       {"id", "messages": [{"role", "content"}, ...]} per example
  <split>.tokenized.jsonl      {"id", "input_ids", "loss_mask"} per example
  <split>/packed_{pack_size}_seed{seed}.npy  NeMo packed format: object array of dicts with
                                             input_ids, loss_mask, seq_start_id (+ .parquet, _metadata.json)
In <split>.tokenized.jsonl loss_mask is aligned with input_ids: 1 on every token the model must produce
(assistant content and its end-of-turn token). In the packed files it follows NeMo's packed convention,
label-aligned: loss_mask[i] weights the prediction of token i+1 (shifted left by one per example, False at
each example's last token), so NeMo's packed SFT dataset reads our files unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

ROLES = ("system", "user", "assistant")
NEMO_ROLE = {"user": "User", "assistant": "Assistant"}
NEMO_ROLE_BACK = {"user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
MANIFEST = "manifest.json"
SPLITS_CSV = "splits.csv"
CONFIG_JSON = "config.json"
REJECTS = "rejects.jsonl"


class DataPrepError(Exception):
    """A problem with the input data or the config, stated with where it is and how to fix it."""


# ---------------------------------------------------------------------------------------------- paths
def messages_path(out: str | Path, split: str) -> Path:
    return Path(out) / f"{split}.messages.jsonl"


def tokenized_path(out: str | Path, split: str) -> Path:
    return Path(out) / f"{split}.tokenized.jsonl"


def packed_path(out: str | Path, split: str, pack_size: int, seed: int) -> Path:
    return Path(out) / split / f"packed_{pack_size}_seed{seed}.npy"


def packed_metadata_path(out: str | Path, split: str, pack_size: int, seed: int) -> Path:
    npy = packed_path(out, split, pack_size, seed)
    return npy.with_name(npy.stem + "_metadata.json")


# ---------------------------------------------------------------------------------------------- readers
def read_manifest(out: str | Path) -> dict:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise DataPrepError(f"{path}: no manifest; prepare the data first: python -m nemotune.data_prep data.output_dir={out}")
    return json.loads(path.read_text(encoding="utf-8"))


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def load_messages(path: str | Path) -> list[dict]:
    return list(iter_jsonl(path))


def load_tokenized(path: str | Path) -> list[dict]:
    """Examples as dicts with `id` and numpy int64 `input_ids` / `loss_mask`."""
    return [{"id": row["id"], "input_ids": np.asarray(row["input_ids"], dtype=np.int64),
             "loss_mask": np.asarray(row["loss_mask"], dtype=np.int64)} for row in iter_jsonl(path)]


def load_packed(path: str | Path) -> list[dict]:
    """Packs from a NeMo packed .npy (or our .parquet): dicts of numpy arrays input_ids, loss_mask, seq_start_id."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        from nemotune.converters.formats.safe_pickle import load_npy

        rows = list(load_npy(path))  # an object array: unpickled by the restricted unpickler only
    return [{"input_ids": np.asarray(r["input_ids"], dtype=np.int64),
             "loss_mask": np.asarray(r["loss_mask"], dtype=np.int64),
             "seq_start_id": np.asarray(r["seq_start_id"], dtype=np.int64)} for r in rows]


# ---------------------------------------------------------------------------------------------- writers
def jsonl_bytes(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def write_packed(npy_path: Path, packs: list[dict], metadata: dict) -> list[Path]:
    """NeMo's packed .npy (object array of dicts), the same columns as parquet, and the metadata json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    npy_path.parent.mkdir(parents=True, exist_ok=True)
    array = np.empty(len(packs), dtype=object)
    for i, pack in enumerate(packs):
        array[i] = {key: [int(v) for v in pack[key]] for key in ("input_ids", "loss_mask", "seq_start_id")}
    np.save(npy_path, array, allow_pickle=True)
    table = pa.table({
        "input_ids": pa.array([list(map(int, p["input_ids"])) for p in packs], type=pa.list_(pa.int32())),
        "loss_mask": pa.array([list(map(int, p["loss_mask"])) for p in packs], type=pa.list_(pa.int8())),
        "seq_start_id": pa.array([list(map(int, p["seq_start_id"])) for p in packs], type=pa.list_(pa.int32())),
    })
    parquet = npy_path.with_suffix(".parquet")
    pq.write_table(table, parquet, compression="zstd")
    meta = npy_path.with_name(npy_path.stem + "_metadata.json")
    meta.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [npy_path, parquet, meta]


# ---------------------------------------------------------------------------------------------- chat formats
def to_nemo_chat(messages: list[dict]) -> dict:
    """Nemotron/OpenAI messages -> NeMo chat JSONL record (system, conversations[from/value], mask)."""
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    conversations = [{"from": NEMO_ROLE[m["role"]], "value": m["content"]} for m in messages if m["role"] != "system"]
    return {"system": system, "conversations": conversations, "mask": "User", "type": "VALUE_TO_TEXT"}


def from_nemo_chat(record: dict) -> list[dict]:
    """NeMo chat JSONL record -> messages. Raises ValueError naming the offending field."""
    if not isinstance(record.get("conversations"), list):
        raise ValueError("missing 'conversations' list")
    messages = []
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"'system' must be a string, got {type(system).__name__}")
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(record["conversations"]):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversations[{i}] needs 'from' and 'value'")
        role = NEMO_ROLE_BACK.get(str(turn["from"]).lower())
        if role is None:
            raise ValueError(f"conversations[{i}].from={turn['from']!r} is not User/Assistant")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def messages_problems(messages) -> list[str]:
    """Every schema problem of one conversation: types, roles, role order, empty/whitespace-only turns."""
    if not isinstance(messages, list) or not messages:
        return ["'messages' must be a non-empty list"]
    problems = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"messages[{i}] is a {type(message).__name__}, not an object")
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problems.append(f"messages[{i}].role={role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            problems.append(f"messages[{i}].content must be a string, got {type(content).__name__}")
        elif not content.strip():
            problems.append(f"messages[{i}] ({role}) is empty or whitespace-only")
    if problems:
        return problems
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        problems.append("a system message may only come first")
    elif not body or body[0] != "user":
        problems.append(f"role order {roles}: the conversation must start with a user turn")
    elif any(a == b for a, b in zip(body, body[1:])):
        problems.append(f"role order {roles}: user and assistant turns must alternate")
    elif body[-1] != "assistant":
        problems.append(f"role order {roles}: the conversation must end with an assistant turn")
    return problems
