"""The real Llama-3.1 tokenizer (128,256 tokens, Llama-Nemotron v1 chat template) on the 648 real FiQA rows:
exact rendered text of Nemotron's thinking switch, answer-only masks checked by decoding, reasoning traces,
token-length statistics and packing. Both assets lie beside the checkout (../shared/data) and are never
copied into the project; the tests skip when they are absent. Reasoning with a template that drops it is
also tested without them, with a small inline template."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from test_data_prep_support import REAL_FIQA_OVERRIDES, prep_config_dir, run_prep

from nemotune.data_prep import formats, packing, templating
from nemotune.data_prep.config import FIQA_SYSTEM_PROMPT
from nemotune.data_prep.tokenizer import load_tokenizer

LLAMA3 = SHARED_DATA / "llama3_tokenizer"
FIQA = SHARED_DATA / "fiqa" / "test.jsonl"
needs_llama3 = pytest.mark.skipif(not (LLAMA3 / "tokenizer.json").is_file() or not FIQA.is_file(),
                                  reason=f"real tokenizer / FiQA rows absent ({LLAMA3}, {FIQA}: ../shared/data "
                                         f"lies beside the checkout)")
EOT = "<|eot_id|>"
REASONING = "<think>\nThe user asks about {topic}. Check the tax rules first, then the fees.\n</think>\n\n"


def header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def llama3():
    if not (LLAMA3 / "tokenizer.json").is_file():
        pytest.skip(f"real tokenizer absent: {LLAMA3}")
    return load_tokenizer(str(LLAMA3))


@pytest.fixture(scope="module")
def fiqa_rows():
    if not FIQA.is_file():
        pytest.skip(f"real FiQA rows absent: {FIQA}")
    return [json.loads(line) for line in FIQA.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The 648 rows prepared by `nemotune prep` with the real tokenizer, for each thinking mode."""
    if not (LLAMA3 / "tokenizer.json").is_file() or not FIQA.is_file():
        pytest.skip(f"real tokenizer / FiQA rows absent under {SHARED_DATA}")
    root = tmp_path_factory.mktemp("real_prep")
    conf = prep_config_dir(root)
    outs = {}
    for mode in ("none", "thinking_on", "thinking_off"):
        outs[mode] = root / mode
        assert run_prep(conf, outs[mode], *REAL_FIQA_OVERRIDES, f"tokenizer={LLAMA3}",
                        "data.max_seq_length=4096", "data.pack_size=4096", f"data.system_prompt_mode={mode}") == 0
    return outs


def prepared_rows(out: Path) -> list[tuple[list[dict], list[int], list[int]]]:
    """(messages, input_ids, loss_mask) of every kept example of every split."""
    manifest = formats.read_manifest(out)
    rows = []
    for split in manifest["splits"]:
        messages = {r["id"]: r["messages"] for r in formats.load_messages(formats.messages_path(out, split))}
        for row in formats.load_tokenized(formats.tokenized_path(out, split)):
            rows.append((messages[row["id"]], row["input_ids"].tolist(), row["loss_mask"].tolist()))
    return rows


# ------------------------------------------------------------------------------------------ the asset itself
@needs_llama3
def test_shared_tokenizer_is_the_llama3_one(llama3):
    assert len(llama3) == 128_256
    assert llama3("Hello world", add_special_tokens=False)["input_ids"] == [9906, 1917]
    assert llama3.convert_tokens_to_ids(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOT]) == \
        [128000, 128006, 128007, 128009]


# ------------------------------------------------------------------------------------------ thinking switch
@needs_llama3
def test_thinking_on_system_turn_is_the_switch_line_alone_and_the_task_prompt_leads_the_user_turn(
        prepared, fiqa_rows, llama3):
    """The Nemotron Nano model card: system prompt exactly "detailed thinking on|off", instructions in the user
    prompt. Checked on the rendered text of every prepared row."""
    questions = {r["question"].strip() for r in fiqa_rows}
    for mode, line in (("thinking_on", "detailed thinking on"), ("thinking_off", "detailed thinking off")):
        rows = prepared_rows(prepared[mode])
        assert len(rows) == 648
        for messages, ids, _ in rows:
            task, question = messages[1]["content"].split("\n\n", 1)
            assert task == FIQA_SYSTEM_PROMPT and question in questions
            expected = (f"<|begin_of_text|>{header('system')}{line}{EOT}"
                        f"{header('user')}{FIQA_SYSTEM_PROMPT}\n\n{question}{EOT}"
                        f"{header('assistant')}{messages[2]['content']}{EOT}")
            assert llama3.decode(ids, skip_special_tokens=False) == expected
    messages, ids, _ = prepared_rows(prepared["none"])[0]
    assert llama3.decode(ids, skip_special_tokens=False).startswith(
        f"<|begin_of_text|>{header('system')}{FIQA_SYSTEM_PROMPT}{EOT}{header('user')}")


@needs_llama3
def test_task_prompt_placement_system_keeps_the_old_layout(llama3):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Roth or traditional IRA?"},
                {"role": "assistant", "content": "It depends on your tax rate now and later."}]
    placed = templating.apply_thinking_mode(messages, "thinking_off", "system")
    assert llama3.apply_chat_template(placed, tokenize=False) == (
        f"<|begin_of_text|>{header('system')}detailed thinking off\nBe brief.{EOT}"
        f"{header('user')}Roth or traditional IRA?{EOT}"
        f"{header('assistant')}It depends on your tax rate now and later.{EOT}")
    # a switch line already in the data is replaced, never repeated
    again = templating.apply_thinking_mode([{"role": "system", "content": "detailed thinking off\nBe brief."},
                                            *messages[1:]], "thinking_on")
    assert again[0] == {"role": "system", "content": "detailed thinking on"}
    assert again[1]["content"] == "Be brief.\n\nRoth or traditional IRA?"


# ------------------------------------------------------------------------------------------ masks on 648 rows
@needs_llama3
@pytest.mark.parametrize("mode", ["none", "thinking_on"])
def test_every_real_row_masks_exactly_its_answer_and_eot(prepared, llama3, mode):
    rows = prepared_rows(prepared[mode])
    assert len(rows) == 648
    for messages, ids, mask in rows:
        assert ids == llama3.apply_chat_template(messages, tokenize=True)["input_ids"]
        [run] = templating.masked_segments(ids, mask)
        assert llama3.decode(run, skip_special_tokens=False) == messages[-1]["content"] + EOT
        assert run[-1] == 128009


@needs_llama3
def test_real_token_length_statistics(prepared):
    """Measured once on these 648 rows (median / max / totals); thinking_on adds exactly 4 tokens per example
    (the switch line replaces nothing: the task prompt moves to the user turn behind a blank line)."""
    lengths = {}
    for mode in ("none", "thinking_on"):
        rows = prepared_rows(prepared[mode])
        lengths[mode] = sorted(len(ids) for _, ids, _ in rows)
        answers = [sum(mask) for _, _, mask in rows]
        assert sum(answers) == 165_662 and statistics.median(answers) == 198 and max(answers) == 1_944
    none = lengths["none"]
    assert (none[0], statistics.median(none), none[-1], sum(none)) == (79, 260, 2_012, 206_674)
    assert [b - a for a, b in zip(none, lengths["thinking_on"])] == [4] * 648
    manifest = formats.read_manifest(prepared["none"])
    assert sum(s["tokens"]["sum"] for s in manifest["length_stats"].values()) == 206_674
    assert max(s["tokens"]["max"] for s in manifest["length_stats"].values()) == 2_012


@needs_llama3
def test_packing_efficiency_with_the_real_tokenizer_at_4096(prepared):
    """98.94% (51 packs) with the 128k tokenizer; the tiny tokenizer's 99.45% does not carry over."""
    lengths = [len(ids) for _, ids, _ in prepared_rows(prepared["none"])]
    bins = packing.first_fit_decreasing(lengths, 4096)
    stats = packing.packing_stats(lengths, bins, 4096)
    assert stats["n_packs"] == 51 and stats["packing_efficiency"] == pytest.approx(0.9894, abs=5e-5)
    assert all(sum(lengths[i] for i in b) <= 4096 for b in bins)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))


# ------------------------------------------------------------------------------------------ reasoning traces
@needs_llama3
def test_final_reasoning_is_kept_and_masked_with_the_nemotron_template(llama3, fiqa_rows):
    row = fiqa_rows[0]
    content = REASONING.format(topic="this") + row["answer"].strip()
    messages = [{"role": "system", "content": "detailed thinking on"},
                {"role": "user", "content": row["question"].strip()}, {"role": "assistant", "content": content}]
    # the template alone drops the reasoning: that is why keeping it needs our rendering
    assert "<think>" not in llama3.apply_chat_template(messages, tokenize=False)
    kept = templating.encode(llama3, messages, 8192)
    prompt = llama3.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert llama3.decode(kept.input_ids, skip_special_tokens=False) == prompt + content + EOT
    [run] = templating.masked_segments(kept.input_ids, kept.loss_mask)
    assert llama3.decode(run, skip_special_tokens=False) == content + EOT
    assert kept.prompt_tokens == len(llama3(prompt, add_special_tokens=False)["input_ids"])
    dropped = templating.encode(llama3, messages, 8192, keep_final_reasoning=False)
    assert dropped.input_ids == llama3.apply_chat_template(messages, tokenize=True)["input_ids"]
    [run] = templating.masked_segments(dropped.input_ids, dropped.loss_mask)
    assert llama3.decode(run, skip_special_tokens=False) == row["answer"].strip() + EOT


@needs_llama3
def test_earlier_turn_reasoning_follows_the_template(llama3):
    messages = [{"role": "system", "content": "detailed thinking on"},
                {"role": "user", "content": "Is a 401k match free money?"},
                {"role": "assistant", "content": REASONING.format(topic="matches") + "Yes, up to the match limit."},
                {"role": "user", "content": "And vesting?"},
                {"role": "assistant", "content": REASONING.format(topic="vesting") + "Unvested match can be lost."}]
    encoded = templating.encode(llama3, messages, 8192)
    text = llama3.decode(encoded.input_ids, skip_special_tokens=False)
    assert text.count("<think>") == 1 and "matches" not in text and "vesting. Check" in text
    first, last = templating.masked_segments(encoded.input_ids, encoded.loss_mask)
    assert llama3.decode(first, skip_special_tokens=False) == "Yes, up to the match limit." + EOT
    assert llama3.decode(last, skip_special_tokens=False) == messages[-1]["content"] + EOT


@needs_llama3
def test_reasoning_data_prepares_end_to_end(tmp_path, llama3, fiqa_rows):
    """`nemotune prep` on Nemotron messages JSONL with <think> traces (failed before with "assistant content
    not found verbatim"): the kept reasoning is in the loss; data.keep_final_reasoning=false drops it."""
    data = tmp_path / "reasoning.jsonl"
    rows = []
    for i, row in enumerate(fiqa_rows[:40]):
        rows.append({"messages": [{"role": "system", "content": "detailed thinking on"},
                                  {"role": "user", "content": row["question"]},
                                  {"role": "assistant", "content": REASONING.format(topic=i) + row["answer"]}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    conf = prep_config_dir(tmp_path)
    base = ["data.source=local", f"data.path={data}", "data.format=messages", "data.name=reasoning",
            f"tokenizer={LLAMA3}", "data.splits=null"]
    for keep in (True, False):
        out = tmp_path / f"keep_{keep}"
        assert run_prep(conf, out, *base, f"data.keep_final_reasoning={str(keep).lower()}") == 0
        prepared_messages = prepared_rows(out)
        assert len(prepared_messages) == 40
        for messages, ids, mask in prepared_messages:
            [run] = templating.masked_segments(ids, mask)
            answer = messages[-1]["content"]
            expected = answer if keep else answer.split("</think>")[-1].strip()
            assert llama3.decode(run, skip_special_tokens=False) == expected + EOT
            assert ("<think>" in llama3.decode(ids, skip_special_tokens=False)) is keep


# a template that drops reasoning the way Llama-Nemotron's does, to test the rendering without ../shared
STRIPPING_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'assistant' and '</think>' in "
    "message['content'] %}{%- set content = message['content'].split('</think>')[-1].lstrip() %}{%- else %}"
    "{%- set content = message['content'] %}{%- endif %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + content | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")


def test_reasoning_kept_with_a_stripping_template_on_the_tiny_tokenizer():
    tokenizer = load_tokenizer("nemotune/tiny")
    plain = [{"role": "user", "content": "Should I pay off debt?"},
             {"role": "assistant", "content": "<think>\nrates\n</think>\n\nPay the highest rate first."}]
    # the tiny template keeps content as is: the text is the template's own, unchanged
    assert templating.encode(tokenizer, plain, 1024).input_ids == \
        tokenizer.apply_chat_template(plain, tokenize=True)["input_ids"]
    tokenizer.chat_template = STRIPPING_TEMPLATE
    kept = templating.encode(tokenizer, plain, 1024)
    [run] = templating.masked_segments(kept.input_ids, kept.loss_mask)
    assert tokenizer.decode(run, skip_special_tokens=False) == plain[1]["content"] + EOT
    dropped = templating.encode(tokenizer, plain, 1024, keep_final_reasoning=False)
    [run] = templating.masked_segments(dropped.input_ids, dropped.loss_mask)
    assert tokenizer.decode(run, skip_special_tokens=False) == "Pay the highest rate first." + EOT


def test_a_template_that_rewrites_the_final_answer_is_refused():
    tokenizer = load_tokenizer("nemotune/tiny")
    tokenizer.chat_template = STRIPPING_TEMPLATE.replace("content | trim", "content | trim | upper")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think>Hello"}]
    with pytest.raises(templating.MaskError, match="rewrites the final assistant content"):
        templating.encode(tokenizer, messages, 1024)
