"""Chat-template an example with the model's own tokenizer and build its answer-only loss mask.

The conversation is rendered with `tokenizer.apply_chat_template(..., tokenize=False)` and tokenized with
character offsets; a token is in the loss when it lies inside an assistant message's content, and so is the
special token that closes that turn (<|eot_id|> for Llama 3). Header tokens never are. Every example is then
checked by decoding: the masked-in tokens of each assistant turn decode to exactly that turn's content (as
the template renders it).

Reasoning traces: templates such as Llama-Nemotron's drop everything up to `</think>` from assistant turns,
which is right for earlier turns of a conversation (the model never sees its old reasoning at inference) but
would delete what the final, trained turn is meant to teach. With keep_final_reasoning the final assistant
turn is rendered by the template around a placeholder, and its whole content, reasoning included, is put in
the placeholder's place: exactly the text the template would produce for a content it did not rewrite.
"""
from __future__ import annotations

from dataclasses import dataclass, field

OK = "ok"
TOO_LONG = "too_long"  # truncation=drop and the example is longer than max_seq_length
PROMPT_TOO_LONG = "prompt_too_long"  # the prompt alone leaves no room for an answer
ANSWER_TOO_LONG = "answer_too_long"  # truncate_prompt cannot help: the answers alone exceed max_seq_length
ALL_MASKED = "all_masked"  # no token would carry loss


# Nemotron's reasoning switch: the model card sets the system prompt to exactly this line (Llama-Nemotron v1:
# "detailed thinking on|off"; Nemotron Nano v2, a hybrid: "/think" or "/no_think").
THINKING_LINES = {"thinking_on": "detailed thinking on", "thinking_off": "detailed thinking off",
                  "think": "/think", "no_think": "/no_think"}
TASK_PROMPT_PLACEMENTS = ("user", "system")
# Stands in for the final assistant content while the template renders the turn around it: letters only, so
# no template trims, escapes or splits it, in mixed case, so a template that changes case is caught.
_PLACEHOLDER = "NemotuneFinalAssistantContentPlaceholder"


def apply_thinking_mode(messages: list[dict], mode: str, task_prompt_placement: str = "user") -> list[dict]:
    """Set Nemotron's reasoning switch: the system turn becomes exactly "detailed thinking on|off".

    The Llama-3.1-Nemotron-Nano-8B-v1 model card sets the system prompt to the switch line alone and puts
    every instruction in the user prompt, so by default (task_prompt_placement="user") the task's own system
    prompt moves to the start of the first user turn, separated by a blank line; "system" keeps it in the
    system turn after the switch line. An existing "detailed thinking ..." first line is replaced, not
    repeated. mode "none" leaves the conversation unchanged.
    """
    switch = THINKING_LINES.get(mode)
    if switch is None:
        return messages
    messages = [dict(m) for m in messages]
    task = ""
    if messages and messages[0]["role"] == "system":
        task = messages.pop(0)["content"].strip()
        first, _, rest = task.partition("\n")
        if first.strip().startswith("detailed thinking") or first.strip() in ("/think", "/no_think"):
            task = rest.strip()
    if task and task_prompt_placement == "system":
        return [{"role": "system", "content": f"{switch}\n{task}"}] + messages
    if task:
        user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if user is None:
            messages.insert(0, {"role": "user", "content": task})
        else:
            messages[user] = {**messages[user], "content": f"{task}\n\n{messages[user]['content']}"}
    return [{"role": "system", "content": switch}] + messages


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


def _generation_prefix(tokenizer, messages: list[dict], index: int, cache: dict) -> str:
    """The text before assistant turn `index`'s content: the conversation so far plus the generation prompt."""
    if index not in cache:
        cache[index] = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
    return cache[index]


def _render(tokenizer, messages: list[dict], keep_final_reasoning: bool, prefixes: dict) -> str:
    """The conversation's text: the template's, except that with keep_final_reasoning the final assistant
    turn holds its whole content even where the template would drop a reasoning block from it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if not keep_final_reasoning or last is None:
        return text
    content = messages[last]["content"]
    prefix = _generation_prefix(tokenizer, messages, last, prefixes)
    if text.startswith(prefix) and content in text[len(prefix):]:
        return text  # the template kept the content: its own text, unchanged
    stand_in = [*messages[:last], {**messages[last], "content": _PLACEHOLDER}, *messages[last + 1:]]
    rendered = tokenizer.apply_chat_template(stand_in, tokenize=False)
    at = rendered.find(_PLACEHOLDER)
    if at < 0 or rendered.count(_PLACEHOLDER) != 1:
        raise MaskError("the chat template rewrites the final assistant content; cannot keep its reasoning "
                        "(set data.keep_final_reasoning=false to let the template drop it)")
    if not rendered.startswith(prefix) or prefix != rendered[:at]:
        # the turn must read: generation prompt, content, end of turn -- as at inference
        raise MaskError("the chat template puts text between the generation prompt and the final assistant "
                        "content; cannot keep its reasoning (set data.keep_final_reasoning=false)")
    return rendered[:at] + content + rendered[at + len(_PLACEHOLDER):]


def _template_content(tokenizer, messages: list[dict], index: int) -> str | None:
    """How the template renders assistant turn `index` (e.g. without its reasoning block): the text between
    the generation prompt and what the template writes after a content it keeps (its end of turn)."""
    prefix = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
    turn = tokenizer.apply_chat_template(messages[:index + 1], tokenize=False)
    stand_in = tokenizer.apply_chat_template([*messages[:index], {**messages[index], "content": _PLACEHOLDER}],
                                             tokenize=False)
    at = stand_in.find(_PLACEHOLDER)
    if not (turn.startswith(prefix) and stand_in.startswith(prefix) and at == len(prefix)):
        return None
    suffix = stand_in[at + len(_PLACEHOLDER):]
    if not turn.endswith(suffix) or len(turn) - len(suffix) < len(prefix):
        return None
    return turn[len(prefix):len(turn) - len(suffix)]


def render_and_mask(tokenizer, messages: list[dict], special_ids: set[int] | None = None,
                    keep_final_reasoning: bool = True):
    """(input_ids, loss_mask, prompt_tokens) of a conversation; raises MaskError when the mask cannot be exact.

    Every assistant turn is in the loss as the model sees it: earlier turns as the template renders them (a
    Llama-Nemotron template drops their reasoning), the final turn whole when keep_final_reasoning is set.
    """
    special_ids = _special_ids(tokenizer) if special_ids is None else special_ids
    # Llama/Nemotron templates trim each content; trimming first lets the content be found verbatim
    messages = [{**m, "content": m["content"].strip()} for m in messages]
    prefixes: dict = {}
    text = _render(tokenizer, messages, keep_final_reasoning, prefixes)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    spans, cursor = [], 0
    for index, message in enumerate(messages):
        content = message["content"]
        if message["role"] == "assistant":
            # the answer starts after the generation header: render the prefix so a header word can never
            # be mistaken for the content
            prefix = _generation_prefix(tokenizer, messages, index, prefixes)
            if text.startswith(prefix):
                cursor = max(cursor, len(prefix))
        start = text.find(content, cursor)
        if start < 0 and message["role"] == "assistant":
            # the template rewrote this turn (dropped its reasoning): the loss covers what the model sees
            rendered = _template_content(tokenizer, messages, index)
            if rendered:
                content = rendered
                start = text.find(content, cursor)
        if start < 0:
            raise MaskError(f"{message['role']} content not found verbatim in the rendered chat template "
                            f"(the template rewrites content?)")
        cursor = start + len(content)
        if message["role"] == "assistant":
            spans.append((start, cursor, content))
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
           special_ids: set[int] | None = None, keep_final_reasoning: bool = True) -> Encoded:
    """Tokenize + mask one conversation and apply the truncation policy (drop | truncate_prompt)."""
    special_ids = _special_ids(tokenizer) if special_ids is None else special_ids
    ids, mask, prompt_tokens = render_and_mask(tokenizer, messages, special_ids, keep_final_reasoning)
    length = len(ids)
    if length > max_seq_length and truncation == "truncate_prompt":
        ids, mask, prompt_tokens, removed, status = _truncate_prompt(tokenizer, messages, max_seq_length,
                                                                     special_ids, length, keep_final_reasoning)
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


def _truncate_prompt(tokenizer, messages, max_seq_length, special_ids, length, keep_final_reasoning=True):
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
        ids, mask, prompt_tokens = render_and_mask(tokenizer, trimmed, special_ids, keep_final_reasoning)
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
