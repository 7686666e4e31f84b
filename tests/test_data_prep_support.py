"""Shared helpers for the data_prep tests (imported by test_data_prep*.py and test_packing*.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real FiQA rows live beside the checkout (never copied into the project).
SHARED_FIQA = REPO.parent / "shared" / "data" / "fiqa" / "test.jsonl"
needs_shared_fiqa = pytest.mark.skipif(not SHARED_FIQA.is_file(), reason=f"real FiQA rows absent: {SHARED_FIQA}")
REAL_FIQA_OVERRIDES = ["data.source=local", f"data.path={SHARED_FIQA}", "data.name=fiqa_real",
                       "data.fields.prompt=question", "data.fields.response=answer"]


def prep_config_dir(tmp_root: Path) -> Path:
    """The repo's conf/ when it has model/tiny.yaml; otherwise a copy with a minimal model/tiny.yaml."""
    conf = REPO / "conf"
    if (conf / "model" / "tiny.yaml").is_file():
        return conf
    target = tmp_root / "conf"
    if not target.exists():
        target.mkdir(parents=True)
        shutil.copy(conf / "prep.yaml", target / "prep.yaml")
        shutil.copytree(conf / "data", target / "data")
        (target / "model").mkdir()
        (target / "model" / "tiny.yaml").write_text("name: tiny\ntokenizer: nemotune/tiny\n")
    return target


def run_prep(config_dir: Path, out: Path, *overrides: str, flags: tuple = ()) -> int:
    from nemotune.data_prep import main

    return main(["--config-dir", str(config_dir), "--quiet", *flags, f"data.output_dir={out}", *overrides])


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
