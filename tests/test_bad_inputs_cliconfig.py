"""Bad-input battery, config and input rows: mistaken configs and inputs on every Hydra entry (prep, train, eval,
launch) are refused before anything runs, with one line naming the key or file and the fix (tests/battery.py)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from battery import REPO, BadInput, check

EXPERIMENT_TYPO = "experiment=tiny_lroa"
NANO_TOKENIZER = "nvidia/Llama-3.1-Nemotron-Nano-8B-v1"


def fake_prepared(out: Path, splits, pack_size: int = 1024, seed: int = 1234) -> Path:
    """What the pre-run checks read: a manifest naming the splits, each split's packed file."""
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"splits": list(splits),
                                                   "split_roles": {"train": splits[0], "validation": splits[1]}}))
    for split in splits:
        (out / split).mkdir()
        (out / split / f"packed_{pack_size}_seed{seed}.npy").write_bytes(b"")
    return out


# the rows name their input files, so the folder is known when the table is built; the fixture fills it
ROOT = Path(tempfile.mkdtemp(prefix="nemotune-bad-config-"))


@pytest.fixture(scope="module")
def inputs():
    root = ROOT
    (root / "empty.jsonl").write_bytes(b"")
    fake_prepared(root / "resplit", ["sft", "rl", "eval"])
    fake_prepared(root / "prepared", ["train", "validation"])
    (root / "hf_home").mkdir()  # an empty Hugging Face cache
    (root / "base").mkdir()
    (root / "adapter").mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def cases(root: Path) -> list[BadInput]:
    out = root / "out"
    guard = [root, REPO / "work"]
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf_home")}
    train, prep, launch, evaluate = ("nemotune.recipes.lora_sft", "nemotune.data_prep", "nemotune.recipes.launch",
                                     "nemotune.recipes.evaluate")
    eval_args = [f"data_dir={root / 'prepared'}", f"base_model={root / 'base'}", f"adapter={root / 'adapter'}",
                 f"out_dir={out}"]
    return [
        # unknown experiment: one line listing the available ones (Hydra's optional group skipped it silently)
        BadInput("train_experiment_typo", [train, EXPERIMENT_TYPO],
                 ["experiment=tiny_lroa: no such experiment", "did you mean tiny_lora", "tiny_two_stage"], guard=guard),
        BadInput("launch_experiment_typo", [launch, EXPERIMENT_TYPO, "--dry-run"],
                 ["experiment=tiny_lroa: no such experiment", "tiny_lora", "nothing was started"], guard=guard),
        BadInput("prep_experiment_typo", [prep, EXPERIMENT_TYPO, f"data.output_dir={out}"],
                 ["experiment=tiny_lroa: no such experiment", "tiny_lora"], guard=guard),
        BadInput("eval_experiment", [evaluate, EXPERIMENT_TYPO, *eval_args],
                 ["experiment=tiny_lroa", "takes no experiment", "tiny_lora"], guard=guard),
        BadInput("eval_train_overrides_experiment_typo",
                 [evaluate, f"eval.train_overrides=['{EXPERIMENT_TYPO}']", *eval_args],
                 ["eval.train_overrides", "experiment=tiny_lroa: no such experiment", "tiny_lora"], guard=guard),
        BadInput("train_model_option_typo", [train, "model=tinyy"],
                 ["model=tinyy: no such model config", "did you mean tiny"], guard=guard),
        # additions to typed groups: refused with the nearest valid key
        BadInput("train_plus_unknown_key", [train, "+trainer.lrr=5"],
                 ["trainer.lrr: unknown key", "did you mean trainer.optim.lr"], guard=guard),
        BadInput("launch_plus_unknown_key", [launch, "+trainer.lrr=5", "--dry-run"],
                 ["trainer.lrr: unknown key", "trainer.optim.lr"], guard=guard),
        BadInput("train_unknown_key_typo", [train, "trainer.sft.max_step=3"],
                 ["trainer.sft.max_step: unknown key", "did you mean trainer.sft.max_steps"], guard=guard),
        BadInput("prep_plus_unknown_key", [prep, "+data.pack_sise=2048", f"data.output_dir={out}"],
                 ["data.pack_sise: unknown key", "did you mean data.pack_size"], guard=guard),
        BadInput("prep_training_key", [prep, "trainer.optim.lr=1e-3", f"data.output_dir={out}"],
                 ["trainer.optim.lr=1e-3", "reads only data.*, model.* and tokenizer"], guard=guard),
        BadInput("eval_plus_unknown_key", [evaluate, "+eval.limt=3", *eval_args],
                 ["eval.limt: unknown key", "did you mean eval.limit"], guard=guard),
        # values that used to crash or pass
        BadInput("train_cluster_nodes_zero", [train, "cluster.nodes=0"], ["cluster.nodes=0", "integer >= 1"],
                 guard=guard),
        BadInput("launch_cluster_nodes_zero", [launch, "cluster=slurm", "cluster.nodes=0", "--dry-run"],
                 ["cluster.nodes=0", "integer >= 1"], guard=guard),
        BadInput("prep_missing_tokenizer_path", [prep, "model.tokenizer=/nonexistent/tokenizer",
                                                 f"data.output_dir={out}"],
                 ["model.tokenizer=/nonexistent/tokenizer: no such tokenizer directory", "tokenizer.json"], guard=guard),
        BadInput("train_missing_tokenizer_path", [train, "model.tokenizer=/nonexistent/tokenizer",
                                                  f"data.output_dir={root / 'prepared'}"],
                 ["model.tokenizer=/nonexistent/tokenizer: no such tokenizer directory"], guard=guard),
        BadInput("prep_hub_dataset_offline", [prep, "data=fiqa", f"data.output_dir={out}"],
                 ["data.hf_name=explodinggradients/fiqa", "HF_HUB_OFFLINE=1", "load_dataset('explodinggradients/fiqa'",
                  "data.path=fiqa"], env=offline, guard=guard),
        BadInput("prep_hub_tokenizer_offline", [prep, "model=nemotron_nano_8b", f"data.output_dir={out}"],
                 [f"model.hub_id={NANO_TOKENIZER}", "HF_HUB_OFFLINE=1", f"hf download {NANO_TOKENIZER}",
                  "--local-dir"], env=offline, guard=guard),
        BadInput("train_hub_tokenizer_offline", [train, "model=nemotron_nano_8b",
                                                 f"data.output_dir={root / 'prepared'}"],
                 [f"model.hub_id={NANO_TOKENIZER}", f"hf download {NANO_TOKENIZER}"], env=offline, guard=guard),
        BadInput("prep_empty_input_file", [prep, "data.source=local", f"data.path={root / 'empty.jsonl'}",
                                           f"data.output_dir={out}"],
                 [f"{root / 'empty.jsonl'}: empty input file"], guard=guard),
        # launch checks what the job needs before it queues
        BadInput("launch_dry_run_without_prepared_data",
                 [launch, "experiment=tiny_lora", f"data.output_dir={root / 'none'}", "--dry-run"],
                 [f"data.output_dir={root / 'none'}: no prepared data",
                  f"nemotune prep experiment=tiny_lora data.output_dir={root / 'none'}"], guard=guard),
        BadInput("launch_container_path_outside_mounts",
                 [launch, "cluster=slurm_ngc", "cluster.container_image=/images/nemotune.sqsh",
                  f"data.output_dir={root / 'prepared'}", "--dry-run"],
                 [f"data.output_dir={root / 'prepared'}: the container job cannot see",
                  f"add the mount /{root.parts[1]}:/{root.parts[1]} to cluster.container_mounts"], guard=guard),
        BadInput("train_split_missing_names_existing",
                 [train, f"data.output_dir={root / 'resplit'}", "trainer.validation_split=eval"],
                 ["trainer.train_split=train", "has no split 'train'", "it has sft, rl, eval",
                  "set trainer.train_split=sft"], guard=guard),
        BadInput("launch_split_missing_names_existing",
                 [launch, f"data.output_dir={root / 'resplit'}", "trainer.train_split=sft", "--dry-run"],
                 ["trainer.validation_split=validation", "it has sft, rl, eval"], guard=guard),
    ]


CASES = cases(ROOT)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_config_input_is_refused_in_one_line(case, inputs):
    check(case)
