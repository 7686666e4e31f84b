"""Chat-template an example with the model's own tokenizer and build its answer-only loss mask.

The conversation is rendered with `tokenizer.apply_chat_template(..., tokenize=False)` and tokenized with
character offsets; a token is in the loss when it lies inside an assistant message's content, and so is the
special token that closes that turn (<|eot_id|> for Llama 3). Header tokens never are. Every example is then
checked by decoding: the masked-in tokens of each assistant turn decode to exactly that turn's content.
"""
from __future__ import annotations

from dataclasses import dataclass, field

OK = "ok"
TOO_LONG = "too_long"  # truncation=drop and the example is longer than max_seq_length
PROMPT_TOO_LONG = "prompt_too_long"  # the prompt alone leaves no room for an answer
ANSWER_TOO_LONG = "answer_too_long"  # truncate_prompt cannot help: the answers alone exceed max_seq_length
ALL_MASKED = "all_masked"  # no token would carry loss


class MaskError(ValueError):
    """The chat template/tokenizer do not let assistant content be isolated token-exactly."""


@dataclass
class Encoded:
    status: str
    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    prompt_tokens: int = 0  # tokens before the last assistant turn's content
    truncated_tokens: int = 0  # prompt tokens removed by truncate_prompt
    length: int = 0  # untruncated length


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    return ids


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def render_and_mask(tokenizer, messages: list[dict], special_ids: set[int] | None = None):
    """(input_ids, loss_mask, prompt_tokens) of a conversation; raises MaskError when the mask cannot be exact."""
    special_ids = _special_ids(tokenizer) if special_ids is None else special_ids
    # Llama/Nemotron templates trim each content; trimming first lets the content be found verbatim
    messages = [{**m, "content": m["content"].strip()} for m in messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    spans, cursor = [], 0
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            # the answer starts after the generation header: render the prefix so a header word can never
            # be mistaken for the content
            prefix = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
            if text.startswith(prefix):
                cursor = max(cursor, len(prefix))
        start = text.find(message["content"], cursor)
        if start < 0:
            raise MaskError(f"{message['role']} content not found verbatim in the rendered chat template "
                            f"(the template rewrites content?)")
        cursor = start + len(message["content"])
        if message["role"] == "assistant":
            spans.append((start, cursor, message["content"]))
    mask = [0] * len(ids)
    token = 0
    first_answer_token = len(ids)
    for span_start, span_end, content in spans:
        while token < len(ids) and offsets[token][1] <= span_start:
            token += 1
        first = token
        while token < len(ids) and offsets[token][0] < span_end:
            if offsets[token][0] < span_start or offsets[token][1] > span_end:
                raise MaskError(f"token {token} straddles an assistant content boundary")
            mask[token] = 1
            token += 1
        if _decode(tokenizer, ids[first:token]) != content:  # the decode check of every example
            raise MaskError("decoded masked-in tokens differ from the assistant content")
        # the turn's closing special token (e.g. <|eot_id|>) is what the model must learn to emit to stop
        if token < len(ids) and ids[token] in special_ids:
            mask[token] = 1
            token += 1
        first_answer_token = first
    return ids, mask, first_answer_token


def encode(tokenizer, messages: list[dict], max_seq_length: int, truncation: str = "drop",
           special_ids: set[int] | None = None) -> Encoded:
    """Tokenize + mask one conversation and apply the truncation policy (drop | truncate_prompt)."""
    special_ids = _special_ids(tokenizer) if special_ids is None else special_ids
    ids, mask, prompt_tokens = render_and_mask(tokenizer, messages, special_ids)
    length = len(ids)
    if length > max_seq_length and truncation == "truncate_prompt":
        ids, mask, prompt_tokens, removed, status = _truncate_prompt(tokenizer, messages, max_seq_length,
                                                                     special_ids, length)
        if status != OK:
            return Encoded(status, prompt_tokens=prompt_tokens, length=length)
        result = Encoded(OK, ids, mask, prompt_tokens, removed, length)
    elif length > max_seq_length:
        status = PROMPT_TOO_LONG if prompt_tokens >= max_seq_length else TOO_LONG
        return Encoded(status, prompt_tokens=prompt_tokens, length=length)
    else:
        result = Encoded(OK, ids, mask, prompt_tokens, 0, length)
    if not any(result.loss_mask):
        return Encoded(ALL_MASKED, prompt_tokens=prompt_tokens, length=length)
    return result


def _truncate_prompt(tokenizer, messages, max_seq_length, special_ids, length):
    """Shorten the last user turn (keeping its beginning) until the conversation fits; answers stay whole."""
    user_index = max(i for i, m in enumerate(messages) if m["role"] == "user")
    user_ids = tokenizer(messages[user_index]["content"], add_special_tokens=False)["input_ids"]
    overflow = length - max_seq_length
    for _ in range(4):  # re-tokenizing the cut text can shift a boundary token or two
        keep = len(user_ids) - overflow
        if keep < 1:
            return [], [], 0, 0, ANSWER_TOO_LONG
        cut = _decode(tokenizer, user_ids[:keep]).strip()
        if not cut:
            return [], [], 0, 0, ANSWER_TOO_LONG
        trimmed = [dict(m) for m in messages]
        trimmed[user_index]["content"] = cut
        ids, mask, prompt_tokens = render_and_mask(tokenizer, trimmed, special_ids)
        if len(ids) <= max_seq_length:
            return ids, mask, prompt_tokens, length - len(ids), OK
        overflow += len(ids) - max_seq_length
    return [], [], 0, 0, ANSWER_TOO_LONG


def prompt_length(tokenizer, messages: list[dict]) -> int:
    """Tokens of everything before the last assistant answer, generation header included."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    rendered = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def masked_segments(input_ids, loss_mask) -> list[list[int]]:
    """Contiguous runs of masked-in token ids (one per assistant turn, eot included)."""
    runs, current = [], []
    for token, bit in zip(input_ids, loss_mask):
        if bit:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs
