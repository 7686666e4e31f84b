"""nemotune.recipes.evaluate end to end on tiny models: report files, self-comparison, bad inputs (no partial report)."""

import json
from pathlib import Path

import pytest
import torch

from nemotune.converters.tiny_model import write_tiny_llama
from nemotune.data_prep.tokenizer import load_tokenizer, tokenizer_fingerprint
from nemotune.recipes import evaluate
from nemotune.recipes.engine.eval_metrics import EmbeddingModelNotFoundError
from nemotune.recipes.engine.generation import EvalInputError

QA = [
    ("How do index funds work?", "They hold every stock of an index at low cost."),
    ("Should I pay off my credit card debt first?", "Yes, high interest debt usually comes first."),
    ("What is a Roth IRA?", "A retirement account funded with taxed money that grows tax free."),
    ("Is a bond safer than a stock?", "Usually, because bond holders are paid before shareholders."),
    ("What does diversification mean?", "Spreading money over many assets to lower risk."),
]


def write_prepared(out: Path, tokenizer, qa=QA, split="test") -> Path:
    """A prepared-data dir in data_prep's layout: messages, tokenized (answer-only loss_mask), manifest."""
    out.mkdir(parents=True, exist_ok=True)
    messages_rows, tokenized_rows = [], []
    for i, (q, a) in enumerate(qa):
        messages = [{"role": "system", "content": "detailed thinking off"},
                    {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        messages_rows.append({"id": f"{split}-{i}", "messages": messages})
        tokenized_rows.append({"id": f"{split}-{i}", "input_ids": full_ids,
                               "loss_mask": [0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids))})
    for suffix, rows in (("messages", messages_rows), ("tokenized", tokenized_rows)):
        (out / f"{split}.{suffix}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "manifest.json").write_text(json.dumps({"tokenizer": tokenizer_fingerprint(tokenizer)}))
    return out


def write_peft_adapter(base: Path, out: Path, *, random_b: bool, seed: int = 0) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    # init_lora_weights=True zeroes lora_B: base + adapter == base exactly; False: random A and B
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=not random_b)
    peft_model = get_peft_model(model, config)
    if random_b:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(20.0)  # make the adapter change greedy answers of the tiny model
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = write_tiny_llama(root / "base", seed=0)
    tokenizer = load_tokenizer(str(base))
    return {
        "root": root,
        "base": base,
        "data": write_prepared(root / "data", tokenizer),
        "zero_adapter": write_peft_adapter(base, root / "zero_adapter", random_b=False),
        "adapter": write_peft_adapter(base, root / "adapter", random_b=True),
    }


def cfg_for(assets, out_dir, adapter="adapter", **eval_settings):
    settings = dict(max_new_tokens=12, batch_size=4, semantic_similarity=False, bootstrap_resamples=200,
                    progress=False)
    settings.update(eval_settings)
    return evaluate.make_config(data_dir=str(assets["data"]), base_model=str(assets["base"]),
                                adapter=str(assets[adapter]) if adapter in assets else adapter,
                                out_dir=str(out_dir), eval=settings)


def read_rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]


def test_model_against_itself_has_zero_difference(assets, tmp_path):
    out = tmp_path / "report"
    summary = evaluate.run_evaluation(cfg_for(assets, out, adapter="zero_adapter", semantic_similarity=True))
    rows = read_rows(out)
    assert len(rows) == len(QA)
    assert [r["id"] for r in rows] == [f"test-{i}" for i in range(len(QA))]
    assert all(r["base"] == r["lora"] for r in rows)
    assert set(summary["metrics"]) == {"rouge_l_f1", "semantic_similarity", "length_ratio"}
    for name, s in summary["metrics"].items():
        assert s["diff_mean"] == 0.0 and s["diff_ci_low"] == 0.0 and s["diff_ci_high"] == 0.0, name
        assert s["base_mean"] == s["lora_mean"]
    hf = summary["loss"]["hf"]
    assert hf["base"]["loss"] == pytest.approx(hf["lora"]["loss"], rel=1e-6)
    # a random 1024-token model: answer loss near ln(1024) = 6.93
    assert 5.5 < hf["base"]["loss"] < 8.5 and hf["base"]["tokens"] > 0
    assert json.loads((out / "summary.json").read_text())["n_examples"] == len(QA)
    assert "| Semantic similarity (cosine) |" in (out / "summary.md").read_text()


def test_report_rows_and_limit(assets, tmp_path):
    out = tmp_path / "report"
    summary = evaluate.run_evaluation(cfg_for(assets, out, limit=3, thinking="on"))
    rows = read_rows(out)
    assert len(rows) == 3 == summary["n_examples"]
    row = rows[1]
    assert row["prompt"] == QA[1][0] and row["reference"] == QA[1][1]
    assert set(row["metrics"]) == {"base", "lora"}
    assert set(row["metrics"]["lora"]) == {"rouge_l_f1", "length_ratio"}
    assert any(r["base"] != r["lora"] for r in rows)  # the random adapter changes greedy answers
    hf = summary["loss"]["hf"]
    assert hf["lora"]["loss"] != pytest.approx(hf["base"]["loss"])
    assert summary["config"]["eval"]["limit"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["nemotune_output.json", "predictions.jsonl", "summary.json",
                                                     "summary.md"]


def test_main_cli(assets, tmp_path, capsys):
    assert evaluate.main(["--help"]) == 0
    assert "eval.limit" in capsys.readouterr().out
    out = tmp_path / "cli"
    rc = evaluate.main([f"data_dir={assets['data']}", f"base_model={assets['base']}", f"adapter={assets['adapter']}",
                        f"out_dir={out}", "eval.limit=2", "eval.max_new_tokens=4", "eval.semantic_similarity=false",
                        "eval.progress=false", "eval.bootstrap_resamples=50"])
    assert rc == 0 and len(read_rows(out)) == 2
    assert "| ROUGE-L F1 |" in capsys.readouterr().out
    # every config problem at once
    rc = evaluate.main(["eval.limit=0", "eval.backend=tgi"])
    err = capsys.readouterr().err
    assert rc == 2
    for key in ("data_dir: required", "base_model: required", "adapter: required", "out_dir: required",
                "eval.limit=0", "eval.backend=tgi"):
        assert key in err


def test_several_adapters_get_one_column_each_against_the_base(assets, tmp_path, capsys):
    """The three-stage report: base, after SFT, after RL. The zero adapter ("sft") answers exactly like the
    base, the random one ("rl") does not: a mix-up of the adapters (or one left active) would show."""
    out = tmp_path / "stages"
    rc = evaluate.main([f"data_dir={assets['data']}", f"base_model={assets['base']}", f"out_dir={out}",
                        f"adapters={{sft: {assets['zero_adapter']}, rl: {assets['adapter']}}}", "eval.limit=3",
                        "eval.max_new_tokens=8", "eval.semantic_similarity=false", "eval.progress=false",
                        "eval.bootstrap_resamples=50"])
    printed, errors = capsys.readouterr()
    assert rc == 0, errors
    rows = read_rows(out)
    assert len(rows) == 3 and set(rows[0]["metrics"]) == {"base", "sft", "rl"}
    assert [r["sft"] for r in rows] == [r["base"] for r in rows]
    assert any(r["rl"] != r["base"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["systems"] == ["base", "sft", "rl"]
    sft, rl = summary["comparisons"]["sft"], summary["comparisons"]["rl"]
    assert sft["rouge_l_f1"]["diff_mean"] == 0.0 and sft["length_ratio"]["diff_mean"] == 0.0
    assert rl["rouge_l_f1"]["lora_mean"] == pytest.approx(sum(r["metrics"]["rl"]["rouge_l_f1"] for r in rows) / 3)
    hf = summary["loss"]["hf"]
    assert hf["sft"]["loss"] == pytest.approx(hf["base"]["loss"], rel=1e-6)
    assert hf["rl"]["loss"] != pytest.approx(hf["base"]["loss"], rel=1e-3)
    table = (out / "summary.md").read_text()
    assert "| Metric | base | sft | rl | sft - base (95% CI) | rl - base (95% CI) |" in table
    assert "| rl | " in table and table in printed


def test_several_adapters_bad_names_and_paths_are_refused_at_once(assets, tmp_path):
    cfg = evaluate.make_config(data_dir=str(assets["data"]), base_model=str(assets["base"]), out_dir=str(tmp_path / "r"),
                               adapters={"base": str(assets["adapter"]), "rl": str(tmp_path / "nowhere")})
    with pytest.raises(evaluate.EvalConfigError) as err:
        evaluate.validate_eval(cfg)
    assert [p.split(":")[0] for p in err.value.problems] == ["adapters.base", f"adapters.rl={tmp_path / 'nowhere'}"]
    assert "not base or lora" in err.value.problems[0] and "no such directory" in err.value.problems[1]
    none = evaluate.make_config(data_dir=str(assets["data"]), base_model=str(assets["base"]), out_dir=str(tmp_path))
    with pytest.raises(evaluate.EvalConfigError, match="adapters=\\{name: dir"):
        evaluate.validate_eval(none)


# ------------------------------------------------------------------------------------------ bad inputs
def assert_no_report(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_adapter_for_another_base_shape(assets, tmp_path):
    other = write_tiny_llama(tmp_path / "other_base", seed=1, hidden=32, heads=2, kv_heads=1, ffn=96)
    out = tmp_path / "report"
    cfg = cfg_for(assets, out)
    cfg.base_model = str(other)
    with pytest.raises(EvalInputError, match="does not fit base model") as err:
        evaluate.run_evaluation(cfg)
    assert "q_proj.lora_A.weight" in str(err.value)
    assert_no_report(out)


def test_base_with_another_tokenizer(assets, tmp_path):
    out = tmp_path / "report"
    small = write_tiny_llama(tmp_path / "small_vocab", seed=0, vocab=512)  # the tiny tokenizer has 1024 tokens
    cfg = cfg_for(assets, out)
    cfg.base_model = str(small)
    with pytest.raises(EvalInputError, match="vocab_size=512"):
        evaluate.run_evaluation(cfg)
    assert_no_report(out)
    # data prepared with a different tokenizer (manifest fingerprint differs)
    data = tmp_path / "data"
    write_prepared(data, load_tokenizer(str(assets["base"])))
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"]["tokenizer_json_sha256"] = "0" * 64
    (data / "manifest.json").write_text(json.dumps(manifest))
    cfg = cfg_for(assets, out)
    cfg.data_dir = str(data)
    with pytest.raises(EvalInputError, match="another tokenizer"):
        evaluate.run_evaluation(cfg)
    assert_no_report(out)


def test_empty_test_split(assets, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.messages.jsonl").write_text("")
    out = tmp_path / "report"
    cfg = cfg_for(assets, out)
    cfg.data_dir = str(data)
    with pytest.raises(EvalInputError, match="split is empty"):
        evaluate.run_evaluation(cfg)
    assert_no_report(out)


def test_missing_embedding_model_leaves_old_report_untouched(assets, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.md").write_text("previous report\n")
    (out / "nemotune_output.json").write_text('{"verb": "eval"}\n')  # a previous eval report, replaceable
    cfg = cfg_for(assets, out, semantic_similarity=True, embedding_model=str(tmp_path / "nope"), overwrite=True)
    with pytest.raises(EmbeddingModelNotFoundError, match="eval.embedding_model"):
        evaluate.run_evaluation(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["nemotune_output.json", "summary.md"]
    assert (out / "summary.md").read_text() == "previous report\n"


def test_vllm_backend_without_vllm_is_a_clear_error(assets, tmp_path):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    out = tmp_path / "report"
    with pytest.raises(RuntimeError, match="eval.backend=hf"):
        evaluate.run_evaluation(cfg_for(assets, out, backend="vllm"))
    assert_no_report(out)


def test_base_system_is_the_plain_base_model(assets, tmp_path):
    """Batched, left-padded base answers == one-at-a-time greedy answers of transformers without peft."""
    from transformers import AutoModelForCausalLM

    from nemotune.recipes.engine.generation import prompt_messages

    out = tmp_path / "report"
    evaluate.run_evaluation(cfg_for(assets, out, limit=4, max_new_tokens=8, loss=False))
    rows = read_rows(out)
    tok = load_tokenizer(str(assets["base"]))
    model = AutoModelForCausalLM.from_pretrained(assets["base"]).eval()
    for row, (q, a) in zip(rows, QA):
        messages = [{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": q}]
        text = tok.apply_chat_template(prompt_messages(messages), tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        assert row["base"] == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
