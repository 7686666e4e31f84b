"""The bad-input battery's harness: run one command on a mistaken or hostile input and check how it fails.

Every case asserts the same four things (issue: "nothing lost, nothing executed, nothing silently wrong"):
  - the exit code (2 for refused input unless the case says otherwise),
  - one message line on stderr that names the file, line or key (each `needles` string appears in it),
  - no Python traceback anywhere in the output,
  - no input or pre-existing file changed: sha256 of every file under `guard` paths before and after, and no
    file appeared under them except the ones the case expects to create.
Each `tests/test_bad_inputs_*.py` file lists its cases as `BadInput` rows and runs them through `check`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BadInput:
    """One bad input. `argv` is run as `python -m <argv...>` from the repository root."""

    name: str
    argv: Sequence[str]
    needles: Sequence[str]
    exit_code: int = 2
    guard: Sequence[Path] = ()
    # files a case may leave behind under a guarded path (none by default: a refused command writes nothing)
    may_create: Sequence[str] = ()
    env: dict = field(default_factory=dict)
    timeout: int = 300
    # a marker path that must NOT exist afterwards (crafted pickles write it if they ever run)
    must_not_exist: Optional[Path] = None
    # extra assertion on the completed process (for example a stated resume line)
    extra: Optional[Callable[[subprocess.CompletedProcess], None]] = None


def snapshot(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of every file under the given paths (files or directories), keyed by path."""
    digests: dict[str, str] = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for path in files:
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def run(argv: Sequence[str], *, env: Optional[dict] = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1",
                **(env or {})}
    return subprocess.run([sys.executable, "-m", *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def message_line(stderr: str) -> str:
    """The error line: the last non-empty stderr line (a command may print progress before failing)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def check(case: BadInput) -> subprocess.CompletedProcess:
    before = snapshot(case.guard)
    result = run(case.argv, env=case.env, timeout=case.timeout)
    output = result.stdout + result.stderr
    where = f"[{case.name}] python -m {' '.join(map(str, case.argv))}\nstdout:\n{result.stdout[-2000:]}\n" \
            f"stderr:\n{result.stderr[-3000:]}"
    assert "Traceback (most recent call last)" not in output, f"traceback\n{where}"
    assert result.returncode == case.exit_code, f"exit {result.returncode}, expected {case.exit_code}\n{where}"
    line = message_line(result.stderr)
    for needle in case.needles:
        assert str(needle) in line, f"message line lacks {needle!r}: {line!r}\n{where}"
    after = snapshot(case.guard)
    changed = [p for p, digest in before.items() if after.get(p) != digest]
    created = [p for p in after if p not in before and not any(p.endswith(m) for m in case.may_create)]
    assert not changed, f"changed or removed: {changed}\n{where}"
    assert not created, f"created: {created}\n{where}"
    if case.must_not_exist is not None:
        assert not Path(case.must_not_exist).exists(), f"{case.must_not_exist} appeared: code ran\n{where}"
    if case.extra is not None:
        case.extra(result)
    return result
