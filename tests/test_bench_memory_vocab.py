"""bench/memory_vocab.py: its packing of real rows and its refusal of missing inputs."""

import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA

sys.path.insert(0, str(REPO / "bench"))
import memory_vocab  # noqa: E402


def test_missing_tokenizer_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "no_tokenizer"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "memory_vocab.py"), "--tokenizer", str(missing)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and f"--tokenizer {missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_packs_hold_whole_documents_with_label_aligned_answer_masks():
    examples = [{"input_ids": list(range(10 * k, 10 * k + n)), "loss_mask": [0] * (n - 3) + [1] * 3}
                for k, n in enumerate([5, 6, 7, 4, 9])]
    rows = memory_vocab.packs(examples, seq=12, count=3)
    assert [r.seq_start_id for r in rows] == [[0, 5], [0, 7], [0]]
    assert rows[0].input_ids.tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15]
    # position i is weighted by token i+1's mask; a document's last position predicts nothing
    assert rows[0].loss_mask.tolist() == [0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0]


def test_real_fiqa_rows_mask_the_answer_and_eot():
    tokenizer, fiqa = SHARED_DATA / "llama3_tokenizer", SHARED_DATA / "fiqa" / "test.jsonl"
    if not fiqa.is_file() or not tokenizer.is_dir():
        pytest.skip(f"real tokenizer / FiQA rows not available under {SHARED_DATA}")
    from transformers import AutoTokenizer

    (example,) = memory_vocab.fiqa_examples(tokenizer, fiqa, limit=1)
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    answer = [t for t, m in zip(example["input_ids"], example["loss_mask"]) if m]
    import json

    first = json.loads(fiqa.open().readline())
    assert tok.decode(answer) == first["answer"].strip() + "<|eot_id|>"
