"""Checks on Hydra command-line overrides before composition, shared by every Hydra entry point.

Hydra lets two mistakes through: `experiment=<typo>` selects an *optional* config that does not exist, so the
default experiment runs silently, and `+key=value` adds a key to a typed group (`+trainer.lrr=5` becomes a
new, ignored key). `check_overrides` refuses both, and any other unknown key or group option, with the
nearest valid name (difflib), before Hydra composes anything.

It lives in the lowest layer that has a Hydra entry point (prep) so that train, eval and launch
(recipes.engine.config) use the same code.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

# open maps: `+key=value` below one of them adds an entry, which is what they are for
OPEN = "<open>"


def group_options(config_dir: Path, group: str) -> list[str]:
    """The options of a config group: the stems of conf/<group>/*.yaml."""
    return sorted(p.stem for p in (Path(config_dir) / group).glob("*.yaml"))


def _unwrap(tp: Any) -> Any:
    """Optional[X] -> X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return args[0]
    return tp


def schema_tree(schema: Any) -> Any:
    """A dataclass as a nested dict of its keys (leaves None, maps OPEN); other types -> None or OPEN."""
    if isinstance(schema, Mapping):
        return {k: schema_tree(v) for k, v in schema.items()}
    schema = _unwrap(schema)
    if dataclasses.is_dataclass(schema):
        hints = typing.get_type_hints(schema)
        return {f.name: schema_tree(hints[f.name]) for f in dataclasses.fields(schema)}
    if schema is Any or typing.get_origin(schema) in (dict, typing.Dict) or schema is dict:
        return OPEN
    return None


def _dotted(tree: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(tree, dict):
        for key, sub in tree.items():
            name = f"{prefix}{key}"
            out.append(name)
            out += _dotted(sub, name + ".")
    return out


def nearest(name: str, candidates: Iterable[str]) -> Optional[str]:
    """The closest candidate to `name` (difflib): by the last dotted part first, then by the whole key."""
    candidates = [c for c in candidates if not name.startswith(c + ".")]
    last = name.rsplit(".", 1)[-1]
    by_last: dict[str, str] = {}
    for candidate in candidates:
        by_last.setdefault(candidate.rsplit(".", 1)[-1], candidate)
    found = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.6)
    if found:
        return by_last[found[0]]
    # whole keys, compared past the dotted parts they share (a shared `trainer.` proves nothing)
    best, best_ratio = None, 0.6
    parts = name.split(".")
    for candidate in candidates:
        theirs = candidate.split(".")
        shared = 0
        while shared < min(len(parts), len(theirs)) - 1 and parts[shared] == theirs[shared]:
            shared += 1
        ratio = difflib.SequenceMatcher(None, ".".join(parts[shared:]), ".".join(theirs[shared:])).ratio()
        if ratio > best_ratio:
            best, best_ratio = candidate, ratio
    return best


def _hint(name: str, candidates: Iterable[str]) -> str:
    match = nearest(name, candidates)
    return f" (did you mean {match}?)" if match else ""


def check_overrides(overrides: Sequence[str], *, tree: Mapping[str, Any], groups: Mapping[str, list[str]],
                    verb: str, ignored: Mapping[str, str] = {}) -> list[str]:
    """Every problem of `overrides` against the config's keys (`tree`, see schema_tree) and group options.

    `groups` maps each config group of this entry point to its options; `ignored` maps top-level keys the
    entry point composes but never reads to the reason (they are refused: a setting there would be lost).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    problems: list[str] = []
    for text in overrides:
        try:
            override = parser.parse_overrides([text])[0]
        except OverrideParseException as err:
            problems.append(f"{text}: not a valid override ({str(err).splitlines()[0]}); write key=value")
            continue
        key = override.key_or_group
        if override.package:
            continue  # group@package overrides: let Hydra judge
        if key in groups:
            if override.is_delete():
                continue
            value = override.value()
            options = groups[key]
            if not isinstance(value, str) or value not in options:
                what = "experiment" if key == "experiment" else f"{key} config (conf/{key}/<name>.yaml)"
                problems.append(f"{key}={value}: no such {what}{_hint(str(value), options)}; available: "
                                f"{', '.join(options)}")
            continue
        top = key.split(".", 1)[0]
        if top in ignored:
            problems.append(f"{text}: {ignored[top]}")
            continue
        node: Any = tree
        walked: list[str] = []
        for part in key.split("."):
            if node is OPEN:
                break
            if not isinstance(node, dict) or part not in node:
                where = ".".join(walked)
                if isinstance(node, dict):
                    # the keys below the section reached so far first, then the rest of the config
                    below = [f"{where}.{k}" if where else k for k in _dotted(node)]
                    candidates = below if nearest(key, below) else _dotted(tree)
                    adding = " (+ adds keys only to open maps such as cluster.env)" if override.is_add() else ""
                    hint = _hint(key, candidates) or "; `--cfg` prints every key"
                    problems.append(f"{key}: unknown key{adding} for `{verb}`{hint}")
                else:
                    problems.append(f"{key}: {where} is a value, not a section; set {where}=<value>")
                break
            walked.append(part)
            node = node[part]
    return problems
