"""Bad-input battery for `nemotune demo`: a --work path it did not make, and bad numbers, are refused in one
line before anything is written or replaced. `{root}` in a case's argv is the module's scratch directory."""
import dataclasses

import pytest

from battery import BadInput, check

DEMO = "nemotune.recipes.demo"
CASES = [
    BadInput("work_dir_with_users_files", [DEMO, "--work", "{root}/project"],
             ["--work", "'notes.txt' is not the demo's", "nothing was changed"]),
    BadInput("work_path_is_a_file", [DEMO, "--work", "{root}/a_file"], ["--work", "'a_file' is not the demo's"]),
    BadInput("eval_limit_zero", [DEMO, "--work", "{root}/new", "--eval-limit", "0"], ["--eval-limit 0", ">= 1"]),
    BadInput("max_new_tokens_negative", [DEMO, "--work", "{root}/new", "--max-new-tokens", "-3"],
             ["--max-new-tokens -3", ">= 1"]),
    BadInput("eval_limit_not_a_number", [DEMO, "--work", "{root}/new", "--eval-limit", "many"],
             ["--eval-limit", "invalid int value: 'many'"]),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_bad")
    (root / "project" / "runs").mkdir(parents=True)
    (root / "project" / "notes.txt").write_text("the user's notes\n")
    (root / "a_file").write_text("not a directory\n")
    return root


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_demo_refuses(scratch, case):
    argv = [str(a).format(root=scratch) for a in case.argv]
    check(dataclasses.replace(case, argv=argv, guard=[scratch]))
