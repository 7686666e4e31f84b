"""GRPO rewards: named, composable functions of a completion and its reference answer.

A reward function takes the completions of one batch and returns one float per completion:

    def my_reward(completions: list[str], references: list[str], **context) -> list[float]

`context` carries `prompts` (the rendered prompt texts) and `completion_ids` (the generated token ids, each
up to and including its end-of-turn token). `rl.grpo.rewards` selects and weights them:

    rl.grpo.rewards=[{name: rouge_l, weight: 1.0}, {name: think_format, weight: 0.5}, {name: "my_pkg.rewards:f"}]

Built-ins: rouge_l (ROUGE-L F1 to the reference), semantic (cosine similarity of the packaged all-MiniLM-L6-v2
embeddings), length_match (1 at the reference's word count, falling linearly to 0 at 0 or twice it) -- these
three score the final answer, after a leading <think>...</think> block --,
think_format (1 for a well-formed `<think>...</think>` followed by a non-empty answer, else 0). The total
reward is the weighted sum; each function's mean and std are logged under its name.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Dict, List, Sequence

RewardFn = Callable[..., List[float]]


def _answers(completions: Sequence[str]) -> List[str]:
    """The final answers: a leading <think>...</think> block is not compared with the reference."""
    from nemotune.recipes.engine.generation import strip_thinking

    return [strip_thinking(c) for c in completions]


def rouge_l(completions: Sequence[str], references: Sequence[str], **_) -> List[float]:
    from nemotune.recipes.engine.eval_metrics import rouge_l_f1

    return [rouge_l_f1(c, r) for c, r in zip(_answers(completions), references)]


_EMBEDDER = []


def semantic(completions: Sequence[str], references: Sequence[str], **_) -> List[float]:
    from nemotune.recipes.engine.eval_metrics import load_embedding_model, semantic_similarity

    if not _EMBEDDER:  # loaded once per process, from the packaged model (never downloaded)
        _EMBEDDER.append(load_embedding_model())
    return semantic_similarity(_answers(completions), list(references), _EMBEDDER[0])


def length_match(completions: Sequence[str], references: Sequence[str], **_) -> List[float]:
    from nemotune.recipes.engine.eval_metrics import word_count

    out = []
    for c, r in zip(_answers(completions), references):
        want = max(word_count(r), 1)
        out.append(max(0.0, 1.0 - abs(word_count(c) - want) / want))
    return out


_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*(\S.*)$", re.DOTALL)


def think_format(completions: Sequence[str], references: Sequence[str] = (), **_) -> List[float]:
    """1.0 for "<think>reasoning</think> answer" (one think block, closed, an answer after it), else 0.0."""
    out = []
    for c in completions:
        m = _THINK.match(c)
        ok = m is not None and "<think>" not in m.group(1) and "<think>" not in m.group(2) \
            and "</think>" not in m.group(2)
        out.append(1.0 if ok else 0.0)
    return out


BUILTIN: Dict[str, RewardFn] = {"rouge_l": rouge_l, "semantic": semantic, "length_match": length_match,
                                "think_format": think_format}


def resolve(name: str) -> RewardFn:
    """A built-in by name, or `package.module:function` imported from the Python path."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}; use one of {', '.join(BUILTIN)} or a function by import path "
                         f"'package.module:function'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({err}); put it on PYTHONPATH") \
            from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {name!r}: module {module_name!r} has no function {attr!r}")
    return fn


def reward_problems(specs: Sequence[dict]) -> List[str]:
    """Config problems of `rl.grpo.rewards` (each entry {name, weight}), all at once."""
    problems = []
    if not specs:
        problems.append("rl.grpo.rewards: empty; name at least one reward, e.g. rl.grpo.rewards=[{name:rouge_l}]")
    names = [s["name"] for s in specs]
    for i, spec in enumerate(specs):
        key = f"rl.grpo.rewards[{i}]"
        try:
            resolve(spec["name"])
        except ValueError as err:
            problems.append(f"{key}.name={spec['name']}: {err}")
        if names.count(spec["name"]) > 1 and names.index(spec["name"]) == i:
            problems.append(f"{key}.name={spec['name']}: listed {names.count(spec['name'])} times; list it once "
                            "with the summed weight")
    return problems


class Rewards:
    """The configured weighted sum; `score` returns (total per completion, {name: per completion})."""

    def __init__(self, specs: Sequence[dict]):
        self.specs = [(s["name"], float(s["weight"]), resolve(s["name"])) for s in specs]

    @property
    def names(self) -> List[str]:
        return [name for name, _, _ in self.specs]

    def score(self, completions: Sequence[str], references: Sequence[str], **context):
        parts: Dict[str, List[float]] = {}
        for name, _, fn in self.specs:
            values = [float(v) for v in fn(list(completions), list(references), **context)]
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
            parts[name] = values
        total = [sum(w * parts[name][i] for name, w, _ in self.specs) for i in range(len(completions))]
        return total, parts
