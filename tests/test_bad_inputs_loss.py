"""Bad inputs of the chunked loss and its benchmark: each refused in one line, exit 2, nothing written."""

import pytest

from battery import BadInput, check

from nemotune.data_prep.tokenizer import tiny_tokenizer_dir

TRAIN_ARGS = ["experiment=tiny_lora", "run.tensorboard=false", "trainer.train_split=sft",
              "trainer.validation_split=eval", "trainer.sft.max_steps=1"]


@pytest.fixture(scope="module")
def cases(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_loss")
    assets = [f"model.hf_path={tiny_assets['base']}", f"model.checkpoint={tiny_assets['mcore']}",
              f"data.output_dir={tiny_assets['prep']}"]
    guard = [tiny_assets["prep"], tiny_assets["mcore"], tiny_assets["base"]]

    def no_metrics(run_dir):
        def extra(result):
            assert not (run_dir / "metrics.jsonl").exists(), "a refused run trained"
        return extra

    bad_impl_run = root / "bad_impl_run"
    return {c.name: c for c in [
        BadInput("train_unknown_loss_impl", ["nemotune.recipes.lora_sft", *TRAIN_ARGS, *assets,
                                             f"run.output_dir={bad_impl_run}"],
                 needles=["NEMOTUNE_LOSS_IMPL='fused-ish'", "auto, chunked, plain"],
                 env={"NEMOTUNE_LOSS_IMPL": "fused-ish"}, guard=guard, extra=no_metrics(bad_impl_run)),
        BadInput("bench_missing_tokenizer", ["bench.memory_vocab", "--tokenizer", str(root / "absent_tok")],
                 needles=["--tokenizer", "absent_tok", "does not exist"]),
        # a tokenizer that exists (the packaged tiny one), so the refusal is the missing --fiqa file's
        BadInput("bench_missing_fiqa", ["bench.memory_vocab", "--tokenizer", str(tiny_tokenizer_dir()),
                                         "--fiqa", str(root / "absent.jsonl")],
                 needles=["--fiqa", "absent.jsonl", "does not exist"]),
    ]}


NAMES = ["train_unknown_loss_impl", "bench_missing_tokenizer", "bench_missing_fiqa"]


@pytest.mark.parametrize("name", NAMES)
def test_bad_input(cases, name):
    check(cases[name])
