"""Malformed inputs: each gives a clear error naming file and line (nothing written), a rejects.jsonl entry with
--skip-bad, and a listing with --validate-only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data_prep_support import run_prep

from nemotune.data_prep import formats, make_sample

GOOD = [json.loads(line) for line in (make_sample.SAMPLE_DIR / "validation.jsonl").read_text().splitlines()[:5]]
GOOD_FIELDS = [json.dumps({"question": r["question"], "answer": r["ground_truths"][0]}).encode() for r in GOOD]
BAD_LINE = 4  # the malformed record is written as line 4 of the file


def chat(*turns):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}).encode()


# name -> (bad line bytes, words the reason must contain)
CASES = {
    "truncated_json": (GOOD_FIELDS[0][:40], "invalid JSON"),
    "missing_field": (json.dumps({"question": "What is a 401(k)?"}).encode(), "missing field 'answer'"),
    "wrong_role": (chat(("user", "Hi?"), ("bot", "Hello.")), "role='bot'"),
    "empty_answer": (json.dumps({"question": "Is gold a hedge?", "answer": ""}).encode(), "empty"),
    "whitespace_answer": (json.dumps({"question": "Is gold a hedge?", "answer": " \n\t "}).encode(), "whitespace"),
    "binary_bytes": (bytes(range(128, 256)), "not valid UTF-8"),
    "latin1_text": ('{"question": "Caf\xe9 loans?", "answer": "Yes."}'.encode("latin-1"), "not valid UTF-8"),
    "nul_bytes": (b'{"question": "a\x00b", "answer": "c"}', "NUL"),
    "ten_mb_line": (json.dumps({"question": "Long?", "answer": "x" * 10_000_000}).encode(), "over data.max_line_bytes"),
    "duplicate": (GOOD_FIELDS[1], "duplicate of"),
    "question_not_string": (json.dumps({"question": 401, "answer": "A retirement plan."}).encode(), "must be a string"),
    "answer_null": (json.dumps({"question": "What is an IRA?", "answer": None}).encode(), "must be a string"),
    "empty_answer_list": (json.dumps({"question": "What is an IRA?", "answer": []}).encode(), "empty list"),
    "not_an_object": (b"[1, 2, 3]", "must be a JSON object"),
    "assistant_first": (chat(("assistant", "Buy bonds."), ("user", "Thanks")), "must start with a user turn"),
    "ends_with_user": (chat(("user", "Should I refinance?"),), "must end with an assistant turn"),
    "two_user_turns": (chat(("user", "Hi"), ("user", "Hello?"), ("assistant", "Hi.")), "must alternate"),
    "system_in_middle": (chat(("user", "Hi"), ("system", "Be nice"), ("assistant", "Hi.")), "system message"),
    "messages_not_list": (json.dumps({"messages": "user: hi"}).encode(), "non-empty list"),
    "content_not_string": (json.dumps({"messages": [{"role": "user", "content": ["a"]},
                                                    {"role": "assistant", "content": "b"}]}).encode(),
                           "content must be a string"),
    "nemo_bad_speaker": (json.dumps({"system": "", "conversations": [{"from": "Robot", "value": "hi"}]}).encode(),
                         "not User/Assistant"),
}


def write_input(directory: Path, bad: bytes) -> Path:
    lines = GOOD_FIELDS[:3] + [bad] + GOOD_FIELDS[3:]
    path = directory / "input.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def overrides(path: Path) -> list[str]:
    return ["data.source=local", f"data.path={path}", "data.format=auto", "data.fields.prompt=question",
            "data.fields.response=answer"]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_is_named_by_file_and_line(case, prep_conf_dir, tmp_path, capsys):
    bad, reason = CASES[case]
    path = write_input(tmp_path, bad)
    out = tmp_path / "out"
    assert run_prep(prep_conf_dir, out, *overrides(path)) == 2
    error = capsys.readouterr().err
    assert f"{path}:{BAD_LINE}: " in error and reason in error, error[:2000]
    assert error.count(f"  {path}:") == 1  # only the bad line is reported
    assert not out.exists() and leftovers(tmp_path) == []

    assert run_prep(prep_conf_dir, out, *overrides(path), flags=("--validate-only",)) == 1
    listing = capsys.readouterr().out
    assert f"{path}:{BAD_LINE}: " in listing and reason in listing
    assert not out.exists()

    assert run_prep(prep_conf_dir, out, *overrides(path), flags=("--skip-bad",)) == 0
    [reject] = list(formats.iter_jsonl(out / formats.REJECTS))
    assert reject["source"] == str(path) and reject["line"] == BAD_LINE and reason in reject["reason"]
    manifest = formats.read_manifest(out)
    assert manifest["counts"]["rejected"] == 1
    assert sum(manifest["counts"][s]["examples_in"] for s in manifest["splits"]) == len(GOOD_FIELDS)
    assert leftovers(tmp_path) == []


def test_every_problem_is_listed_at_once(prep_conf_dir, tmp_path, capsys):
    path = tmp_path / "input.jsonl"
    path.write_bytes(b"\n".join([GOOD_FIELDS[0], CASES["truncated_json"][0], GOOD_FIELDS[1],
                                 CASES["empty_answer"][0], CASES["binary_bytes"][0]]) + b"\n")
    assert run_prep(prep_conf_dir, tmp_path / "out", *overrides(path)) == 2
    error = capsys.readouterr().err
    assert "3 problem(s)" in error
    for line in (2, 4, 5):
        assert f"{path}:{line}: " in error
    assert "--skip-bad" in error


def test_validate_only_flags_prompts_without_room_for_an_answer(prep_conf_dir, tmp_path, capsys):
    long_question = json.dumps({"question": "Please explain how taxes work. " * 60, "answer": "It depends."}).encode()
    path = write_input(tmp_path, long_question)
    assert run_prep(prep_conf_dir, tmp_path / "out", *overrides(path), "data.max_seq_length=128",
                    "data.pack_size=1024", flags=("--validate-only",)) == 1
    listing = capsys.readouterr().out
    assert f"{path}:{BAD_LINE}: prompt is" in listing and "no room for an answer" in listing
    assert not (tmp_path / "out").exists()


def test_error_while_writing_leaves_previous_output_untouched(prep_conf_dir, tmp_path, monkeypatch):
    path = write_input(tmp_path, GOOD_FIELDS[4].replace(b"?", b"??"))
    out = tmp_path / "out"
    assert run_prep(prep_conf_dir, out, *overrides(path)) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(formats, "write_packed", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        run_prep(prep_conf_dir, out, *overrides(path), "data.seed=99", "data.overwrite=true")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert leftovers(tmp_path) == []
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        run_prep(prep_conf_dir, fresh, *overrides(path))
    assert not fresh.exists() and leftovers(tmp_path) == []


def test_bad_config_values_are_reported_together(prep_conf_dir, tmp_path, capsys):
    assert run_prep(prep_conf_dir, tmp_path / "out", "data.truncation=middle", "data.pack_algorithm=best_fit",
                    "data.split_ratios=[0.5,0.2]") == 2
    error = capsys.readouterr().err
    for key in ("data.truncation", "data.pack_algorithm", "data.split_ratios"):
        assert key in error
    assert run_prep(prep_conf_dir, tmp_path / "out", "data.no_such_key=1") == 2
    assert "no_such_key" in capsys.readouterr().err
