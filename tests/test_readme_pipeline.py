"""The README's own commands work in order: its tiny-pipeline block, run verbatim from an empty directory with
the installed `nemotune`, `torchrun` and `python` first on PATH (what a newcomer's activated venv gives)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "# readme-pipeline"


def readme_pipeline() -> list[str]:
    """The commands of the README's ```bash block that starts with the readme-pipeline marker, in order."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"```bash\n" + re.escape(MARKER) + r"[^\n]*\n(.*?)```", text, re.S)
    assert match, f"README.md has no ```bash block starting with {MARKER!r}"
    return [line for line in match.group(1).splitlines() if line.strip() and not line.startswith("#")]


def tiny_column() -> list[str]:
    """The commands in the 'tiny CPU demo' column of the README's step table."""
    rows = [line.split("|") for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| ")]
    header = next(r for r in rows if "the tiny CPU demo" in "|".join(r))
    column = [c.strip() for c in header].index(next(c.strip() for c in header if "tiny CPU demo" in c))
    return [cmd for row in rows[rows.index(header) + 2:] for cmd in re.findall(r"`([^`]+)`", row[column])]


def test_the_table_and_the_block_give_the_same_prep_and_train_commands():
    block = readme_pipeline()
    column = tiny_column()
    for step in ("nemotune prep ", "torchrun ", "nemotune convert hf-to-megatron ", "nemotune eval "):
        [in_table] = [c for c in column if c.startswith(step)]
        [in_block] = [c for c in block if c.startswith(step)]
        assert in_block.startswith(in_table), (in_table, in_block)


@pytest.mark.slow
def test_readme_tiny_pipeline_runs_verbatim_in_order(tmp_path):
    commands = readme_pipeline()
    assert commands[0].startswith("nemotune prep ") and any(c.startswith("torchrun ") for c in commands)
    # one shell, so a variable set by one line is seen by the next; each command must exit 0 before the next
    script = ["set -euo pipefail"]
    for number, command in enumerate(commands, start=1):
        script += [command, f"echo '::ok {number}'"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)
    done = [int(n) for n in re.findall(r"^::ok (\d+)$", result.stdout, re.M)]
    failed = commands[len(done)] if len(done) < len(commands) else None
    assert result.returncode == 0 and done == list(range(1, len(commands) + 1)), (
        f"README command {len(done) + 1} failed (exit {result.returncode}): {failed}\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    # what the block promises exists: both stages trained, both exports, the report
    assert (tmp_path / "work" / "prep" / "fiqa_sample_resplit" / "manifest.json").is_file()
    runs = tmp_path / "work" / "runs" / "tiny_two_stage"
    assert sorted(p.name for p in runs.glob("stage*") if p.is_dir()) == ["stage1", "stage2"]
    assert (runs / "stages.json").is_file()
    assert (tmp_path / "work" / "peft" / "adapter_config.json").is_file()
    assert (tmp_path / "work" / "lora.nemo").is_file()
    assert (tmp_path / "work" / "eval" / "summary.json").is_file()
