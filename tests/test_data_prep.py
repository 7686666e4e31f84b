"""data_prep on the bundled FiQA-schema sample + tiny tokenizer, and on the real FiQA rows beside the checkout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_data_prep_support import REAL_FIQA_OVERRIDES, needs_shared_fiqa, run_prep, tree_bytes

from nemotune.data_prep import formats, make_sample, make_tiny_tokenizer, sources, templating
from nemotune.data_prep.tokenizer import load_tokenizer, tiny_tokenizer_dir, tokenizer_fingerprint


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("nemotune/tiny")


@pytest.fixture(scope="module")
def sample_out(prep_conf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "sample"
    assert run_prep(prep_conf_dir, out) == 0
    return out


def check_masks(out: Path, split: str, tokenizer) -> int:
    """Every tokenized example: ids == apply_chat_template ids, and each masked-in run decodes to exactly one
    assistant turn's content followed by <|eot_id|>; nothing else carries loss."""
    messages = {row["id"]: row["messages"] for row in formats.load_messages(formats.messages_path(out, split))}
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    rows = formats.load_tokenized(formats.tokenized_path(out, split))
    for row in rows:
        conversation = messages[row["id"]]
        expected_ids = tokenizer.apply_chat_template(conversation, tokenize=True)["input_ids"]
        assert row["input_ids"].tolist() == expected_ids
        runs = templating.masked_segments(row["input_ids"], row["loss_mask"])
        answers = [m["content"] for m in conversation if m["role"] == "assistant"]
        assert len(runs) == len(answers)
        for run, answer in zip(runs, answers):
            assert run[-1] == eot
            assert tokenizer.decode(run[:-1], skip_special_tokens=False) == answer
    return len(rows)


# ------------------------------------------------------------------------------------------------ assets
def test_sample_regenerates_byte_identical_with_fiqa_schema_and_length_spread(tmp_path):
    make_sample.write(tmp_path)
    words, total = [], 0
    for split, size in make_sample.SPLIT_SIZES.items():
        packaged = make_sample.SAMPLE_DIR / f"{split}.jsonl"
        assert (tmp_path / f"{split}.jsonl").read_bytes() == packaged.read_bytes()
        rows = [json.loads(line) for line in packaged.read_text(encoding="utf-8").splitlines()]
        assert len(rows) == size
        for row in rows:
            assert set(row) == {"question", "ground_truths"}
            assert isinstance(row["question"], str) and row["question"].strip()
            assert isinstance(row["ground_truths"], list) and all(isinstance(a, str) for a in row["ground_truths"])
            words.append(len(row["ground_truths"][0].split()))
        total += len(rows)
    assert total >= 300
    words.sort()
    assert 130 <= words[len(words) // 2] <= 180  # FiQA: median ~150-160 words
    assert 0.18 <= sum(w < 100 for w in words) / len(words) <= 0.32  # FiQA: ~25% under 100 words
    assert words[-1] > 800


def test_tiny_tokenizer_rebuilds_identically_and_templates_like_llama31(tmp_path, tiny):
    make_tiny_tokenizer.write(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tiny_tokenizer_dir() / name).read_bytes()
    assert len(tiny) == 1024
    for token in make_tiny_tokenizer.SPECIAL_TOKENS:
        assert tiny.convert_tokens_to_ids(token) < len(make_tiny_tokenizer.SPECIAL_TOKENS)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is an ETF?"},
                {"role": "assistant", "content": "An exchange-traded fund."}]
    assert tiny.apply_chat_template(messages, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is an ETF?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nAn exchange-traded fund.<|eot_id|>")
    prompt = tiny.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    text = "Roth IRA contributions: $7,000 in 2024."
    assert tiny.decode(tiny(text, add_special_tokens=False)["input_ids"]) == text


# ------------------------------------------------------------------------------------------------ pipeline
def test_outputs_byte_identical_across_runs_and_num_proc(prep_conf_dir, sample_out, tmp_path):
    again, parallel = tmp_path / "again", tmp_path / "parallel"
    assert run_prep(prep_conf_dir, again) == 0
    assert run_prep(prep_conf_dir, parallel, "data.num_proc=2") == 0
    reference = tree_bytes(sample_out)
    assert {"splits.csv", "config.json", "manifest.json", "train/packed_1024_seed1234.npy"} <= set(reference)
    assert tree_bytes(again) == reference
    assert tree_bytes(parallel) == reference


def test_every_masked_in_run_decodes_to_the_assistant_text(sample_out, tiny):
    manifest = formats.read_manifest(sample_out)
    checked = sum(check_masks(sample_out, split, tiny) for split in manifest["splits"])
    assert checked == sum(manifest["counts"][s]["examples"] for s in manifest["splits"]) > 300


def test_manifest_records_lineage_and_matches_the_files(sample_out, tiny):
    manifest = formats.read_manifest(sample_out)
    assert manifest["splits"] == ["train", "validation", "test"]
    assert manifest["tokenizer"] == tokenizer_fingerprint(tiny)
    assert [i["rows"] for i in manifest["inputs"]] == [264, 36, 60]
    for relative, digest in manifest["outputs"].items():
        import hashlib

        assert hashlib.sha256((sample_out / relative).read_bytes()).hexdigest() == digest
    counts = manifest["counts"]["train"]
    assert counts["examples"] + sum(counts["dropped"].values()) == counts["examples_in"] == 264
    assert manifest["length_stats"]["train"]["tokens"]["max"] <= 1024
    meta = json.loads(formats.packed_metadata_path(sample_out, "train", 1024, 1234).read_text())
    assert meta == manifest["packing"]["train"] and meta["n_packs"] > 0


def test_packed_files_hold_every_example_once_and_whole(sample_out):
    tokenized = formats.load_tokenized(formats.tokenized_path(sample_out, "train"))
    npy = formats.packed_path(sample_out, "train", 1024, 1234)
    raw = np.load(npy, allow_pickle=True)
    assert raw.dtype == object and set(raw[0]) == {"input_ids", "loss_mask", "seq_start_id"}
    packs = formats.load_packed(npy)
    from_parquet = formats.load_packed(npy.with_suffix(".parquet"))
    documents = []
    for pack, same in zip(packs, from_parquet):
        assert all(np.array_equal(pack[k], same[k]) for k in pack)
        assert len(pack["input_ids"]) == len(pack["loss_mask"]) <= 1024
        bounds = list(pack["seq_start_id"]) + [len(pack["input_ids"])]
        for start, end in zip(bounds, bounds[1:]):
            documents.append((tuple(pack["input_ids"][start:end]), tuple(pack["loss_mask"][start:end])))
    # packs carry NeMo's label-aligned mask: each example's token mask shifted left by one, 0 at its end
    expected = [(tuple(r["input_ids"]), tuple(r["loss_mask"][1:]) + (0,)) for r in tokenized]
    assert sorted(documents) == sorted(expected)


def test_pad_seq_to_mult_pads_each_document_without_loss(prep_conf_dir, tmp_path):
    out = tmp_path / "padded"
    assert run_prep(prep_conf_dir, out, "data.pad_seq_to_mult=8", "data.splits=[validation]") == 0
    packs = formats.load_packed(formats.packed_path(out, "validation", 1024, 1234))
    tokenized = formats.load_tokenized(formats.tokenized_path(out, "validation"))
    real = sum(len(r["input_ids"]) for r in tokenized)
    assert all(start % 8 == 0 for p in packs for start in p["seq_start_id"])
    assert all(len(p["input_ids"]) % 8 == 0 for p in packs)
    assert sum(int(p["loss_mask"].sum()) for p in packs) == sum(int(r["loss_mask"].sum()) for r in tokenized)
    meta = json.loads(formats.packed_metadata_path(out, "validation", 1024, 1234).read_text())
    assert meta["real_tokens"] == real and meta["pad_seq_to_mult"] == 8


def test_stratified_resplit_within_one_example_per_bucket(prep_conf_dir, tmp_path):
    from nemotune.data_prep.splitting import length_buckets

    out = tmp_path / "resplit"
    assert run_prep(prep_conf_dir, out, "data.resplit=true") == 0
    manifest = formats.read_manifest(out)
    assert manifest["splits"] == ["sft", "rl", "eval"]
    assert manifest["split_roles"] == {"train": "sft", "validation": "rl", "test": "eval"}
    lines = (out / "splits.csv").read_text().splitlines()[1:]
    split_of = {line.split(",")[0]: line.split(",")[1] for line in lines}
    assert len(split_of) == 360
    ids = list(split_of)
    all_words = []
    for line in lines:
        source, number = line.split(",")[2], int(line.split(",")[3])
        split_name = Path(source).stem
        row = json.loads((make_sample.SAMPLE_DIR / f"{split_name}.jsonl").read_text().splitlines()[number - 1])
        all_words.append(len(row["ground_truths"][0].split()))
    buckets = length_buckets(all_words, 4)
    for bucket in set(buckets):
        members = [ids[i] for i, b in enumerate(buckets) if b == bucket]
        for name, ratio in zip(["sft", "rl", "eval"], [0.75, 0.10, 0.15]):
            count = sum(split_of[m] == name for m in members)
            assert abs(count - ratio * len(members)) <= 1, (bucket, name, count, len(members))


def test_split_assignment_ignores_input_order():
    from nemotune.data_prep.splitting import stratified_split

    ids = [f"id{i:03d}" for i in range(200)]
    strata = [i % 3 for i in range(200)]
    forward = stratified_split(ids, strata, ["a", "b", "c"], [0.75, 0.1, 0.15], seed=7)
    backward = stratified_split(ids[::-1], strata[::-1], ["a", "b", "c"], [0.75, 0.1, 0.15], seed=7)
    other_seed = stratified_split(ids, strata, ["a", "b", "c"], [0.75, 0.1, 0.15], seed=8)
    assert forward == backward and forward != other_seed


def test_nemo_chat_and_messages_formats_round_trip(prep_conf_dir, sample_out, tmp_path):
    rows = formats.load_messages(formats.messages_path(sample_out, "validation"))
    nemo = [formats.to_nemo_chat(r["messages"]) for r in rows]
    assert [formats.from_nemo_chat(n) for n in nemo] == [r["messages"] for r in rows]
    assert nemo[0]["conversations"][0]["from"] == "User" and nemo[0]["mask"] == "User"
    (tmp_path / "nemo.jsonl").write_bytes(formats.jsonl_bytes(nemo))
    (tmp_path / "chat.jsonl").write_bytes(formats.jsonl_bytes({"messages": r["messages"]} for r in rows))
    for name, fmt in (("nemo.jsonl", "nemo_chat"), ("chat.jsonl", "messages"), ("chat.jsonl", "auto")):
        out = tmp_path / f"out_{fmt}"
        assert run_prep(prep_conf_dir, out, "data.source=local", f"data.path={tmp_path / name}", f"data.format={fmt}") == 0
        assert formats.read_manifest(out)["splits"] == ["sft", "rl", "eval"]
        produced = {r["id"]: r for s in ("sft", "rl", "eval")
                    for r in formats.iter_jsonl(formats.tokenized_path(out, s))}
        expected = {r["id"]: r for r in formats.iter_jsonl(formats.tokenized_path(sample_out, "validation"))}
        assert produced == expected


def test_manifest_tokenizer_hashes_change_with_the_tokenizer(prep_conf_dir, sample_out, tmp_path, tiny):
    changed_template = tmp_path / "tok_template"
    shutil.copytree(tiny_tokenizer_dir(), changed_template)
    config = json.loads((changed_template / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<|end_header_id|>\n\n", "<|end_header_id|>\n")
    (changed_template / "tokenizer_config.json").write_text(json.dumps(config))
    changed_vocab = tmp_path / "tok_vocab"
    shutil.copytree(tiny_tokenizer_dir(), changed_vocab)
    data = json.loads((changed_vocab / "tokenizer.json").read_text())
    data["model"]["merges"] = data["model"]["merges"][:-1]  # a different (smaller) merge table
    (changed_vocab / "tokenizer.json").write_text(json.dumps(data))
    base = formats.read_manifest(sample_out)["tokenizer"]
    for directory, key in ((changed_template, "chat_template_sha256"), (changed_vocab, "tokenizer_json_sha256")):
        out = tmp_path / f"out_{directory.name}"
        assert run_prep(prep_conf_dir, out, f"tokenizer={directory}", "data.splits=[validation]") == 0
        fingerprint = formats.read_manifest(out)["tokenizer"]
        assert fingerprint[key] != base[key]
        assert fingerprint == tokenizer_fingerprint(load_tokenizer(str(directory)))
        assert formats.read_manifest(out)["outputs"] != formats.read_manifest(sample_out)["outputs"]


def test_thinking_mode_adds_the_nemotron_system_line(prep_conf_dir, tmp_path):
    from nemotune.data_prep.config import FIQA_SYSTEM_PROMPT

    for mode, line in (("thinking_on", "detailed thinking on"), ("thinking_off", "detailed thinking off")):
        out = tmp_path / mode
        assert run_prep(prep_conf_dir, out, f"data.system_prompt_mode={mode}", "data.splits=[validation]") == 0
        system, user, _ = formats.load_messages(formats.messages_path(out, "validation"))[0]["messages"]
        # the model card's layout: the switch line alone, the task's system prompt leading the user turn
        assert system == {"role": "system", "content": line}
        assert user["content"].startswith(FIQA_SYSTEM_PROMPT + "\n\n")
    out = tmp_path / "placement_system"
    assert run_prep(prep_conf_dir, out, "data.system_prompt_mode=thinking_on", "data.task_prompt_placement=system",
                    "data.splits=[validation]") == 0
    system = formats.load_messages(formats.messages_path(out, "validation"))[0]["messages"][0]
    assert system["content"] == f"detailed thinking on\n{FIQA_SYSTEM_PROMPT}"
    out = tmp_path / "none"
    assert run_prep(prep_conf_dir, out, "data.system_prompt_mode=none", "data.system_prompt=null",
                    "data.splits=[validation]") == 0
    assert formats.load_messages(formats.messages_path(out, "validation"))[0]["messages"][0]["role"] == "user"


def test_truncation_policies(tiny):
    messages = [{"role": "user", "content": "Tell me about index funds and taxes. " * 8},
                {"role": "assistant", "content": "Index funds are cheap and tax-efficient."}]
    full = templating.encode(tiny, messages, 4096)
    assert full.status == templating.OK and full.length == 122 and full.prompt_tokens == 104
    assert templating.encode(tiny, messages, 110).status == templating.TOO_LONG
    assert templating.encode(tiny, messages, 100).status == templating.PROMPT_TOO_LONG
    cut = templating.encode(tiny, messages, 60, truncation="truncate_prompt")
    assert cut.status == templating.OK and len(cut.input_ids) <= 60 and cut.truncated_tokens >= 62
    [run] = templating.masked_segments(cut.input_ids, cut.loss_mask)
    assert tiny.decode(run[:-1]) == messages[1]["content"]
    long_answer = [messages[0], {"role": "assistant", "content": "Diversify. " * 200}]
    assert templating.encode(tiny, long_answer, 100, "truncate_prompt").status == templating.ANSWER_TOO_LONG


def test_multi_turn_masks_every_assistant_turn_and_no_header(tiny):
    messages = [{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "assistant"},
                {"role": "user", "content": "And bonds?"}, {"role": "assistant", "content": "Bonds are loans."}]
    ids, mask, _ = templating.render_and_mask(tiny, messages)
    runs = templating.masked_segments(ids, mask)
    assert [tiny.decode(r) for r in runs] == ["assistant<|eot_id|>", "Bonds are loans.<|eot_id|>"]


def test_prep_reports_dropped_examples(sample_out):
    manifest = formats.read_manifest(sample_out)
    dropped = sum(sum(c["dropped"].values()) for s, c in manifest["counts"].items() if s in manifest["splits"])
    assert dropped == sum(len(v) for v in manifest["dropped"].values()) > 0
    assert all(d["tokens"] > 1024 and d["reason"] == "too_long" for v in manifest["dropped"].values() for d in v)


def test_help_explains_the_cli(capsys):
    from nemotune.data_prep import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--validate-only" in text and "--skip-bad" in text and "data.fields.prompt" in text


# ------------------------------------------------------------------------------------------------ real rows
@needs_shared_fiqa
def test_real_fiqa_rows_prep_cleanly_through_field_mapping(prep_conf_dir, tmp_path, tiny):
    out = tmp_path / "real"
    assert run_prep(prep_conf_dir, out, *REAL_FIQA_OVERRIDES, "data.max_seq_length=4096", "data.pack_size=4096",
                    flags=("--validate-only",)) == 0
    assert not out.exists()
    assert run_prep(prep_conf_dir, out, *REAL_FIQA_OVERRIDES, "data.max_seq_length=4096", "data.pack_size=4096") == 0
    manifest = formats.read_manifest(out)
    assert manifest["inputs"][0]["rows"] == 648 and manifest["counts"]["rejected"] == 0
    kept = sum(manifest["counts"][s]["examples"] for s in manifest["splits"])
    dropped = sum(sum(manifest["counts"][s]["dropped"].values()) for s in manifest["splits"])
    assert kept + dropped == 648 and dropped <= 2
    sizes = [manifest["counts"][s]["examples_in"] for s in ("sft", "rl", "eval")]
    # within 1 per length bucket (4 buckets) of 0.75 / 0.10 / 0.15 of 648
    assert all(abs(n - r * 648) <= 4 for n, r in zip(sizes, (0.75, 0.10, 0.15))), sizes
    assert sum(check_masks(out, s, tiny) for s in manifest["splits"]) == kept


def test_hub_source_keeps_native_splits_and_first_ground_truth(monkeypatch, tmp_path, tiny):
    """data=fiqa goes through datasets.load_dataset("explodinggradients/fiqa", "main"); the hub is unreachable
    in tests, so load_dataset returns the bundled sample as a DatasetDict."""
    import datasets

    from nemotune.data_prep.config import DataConfig
    from nemotune.data_prep.pipeline import run

    def fake_load_dataset(name, config):
        assert (name, config) == ("explodinggradients/fiqa", "main")
        return datasets.DatasetDict({split: datasets.Dataset.from_json(str(make_sample.SAMPLE_DIR / f"{split}.jsonl"))
                                     for split in ("train", "validation", "test")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(sources, "_dataset_cached", lambda name: True)  # past the offline check
    cfg = DataConfig(output_dir=str(tmp_path / "hub"), max_seq_length=1024, pack_size=1024)
    result = run(cfg, "nemotune/tiny", quiet=True)
    manifest = result.manifest
    assert manifest["splits"] == ["train", "validation", "test"]
    assert [i["rows"] for i in manifest["inputs"]] == [264, 36, 60]
    assert all(i["hf"] == "explodinggradients/fiqa" for i in manifest["inputs"])
    answers = {json.loads(l)["question"]: json.loads(l)["ground_truths"][0]
               for l in (make_sample.SAMPLE_DIR / "train.jsonl").read_text().splitlines()}
    rows = formats.load_messages(formats.messages_path(tmp_path / "hub", "train"))
    assert len(rows) == manifest["counts"]["train"]["examples"] > 200
    for row in rows:
        system, user, assistant = row["messages"]
        assert system["role"] == "system" and assistant["content"] == answers[user["content"]].strip()
