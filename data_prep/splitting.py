"""Deterministic, seeded, stratified splitting (used when a dataset has no native splits, or data.resplit)."""
from __future__ import annotations

import bisect
import random
from typing import Any, Hashable, Sequence


def length_buckets(values: Sequence[float], n_buckets: int) -> list[int]:
    """Quantile bucket index of every value (equal-count buckets over the sorted values)."""
    if not values:
        return []
    ordered = sorted(values)
    edges = [ordered[min(len(ordered) - 1, (len(ordered) * k) // n_buckets)] for k in range(1, n_buckets)]
    return [bisect.bisect_right(edges, v) for v in values]


def allocate(n: int, ratios: Sequence[float]) -> list[int]:
    """Largest-remainder rounding: counts summing to n, each within 1 of ratio*n (ties to the earlier split)."""
    quotas = [r * n for r in ratios]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(ratios)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def stratified_split(ids: Sequence[str], strata: Sequence[Hashable], names: Sequence[str],
                     ratios: Sequence[float], seed: int) -> dict[str, str]:
    """id -> split name. Within every stratum the ids are put in a canonical order (sorted), shuffled with a
    seed derived from (seed, stratum), and cut by `allocate`: the result depends only on the set of
    (id, stratum) pairs and the seed, never on input order or process count."""
    groups: dict[Any, list[str]] = {}
    for eid, stratum in zip(ids, strata):
        groups.setdefault(stratum, []).append(eid)
    assignment = {}
    for stratum in sorted(groups, key=repr):
        members = sorted(groups[stratum])
        random.Random(f"{seed}:{stratum!r}").shuffle(members)
        start = 0
        for name, count in zip(names, allocate(len(members), ratios)):
            for eid in members[start:start + count]:
                assignment[eid] = name
            start += count
    return assignment
