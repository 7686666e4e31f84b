"""Config composition and the CLI front: override checks with the nearest name, prep composing an experiment's
data, --validate-only agreeing with prep, each verb's usage line, the typed cluster config, and megatron-core's
Transformer Engine / Apex warning said once."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemotune.data_prep import formats, make_sample
from nemotune.data_prep.overrides import nearest
from nemotune.launchers.config import ClusterConfig, cluster_config, container_path_problems, host_path
from nemotune.recipes.engine.config import check_overrides, compose, experiment_names

REPO = Path(__file__).resolve().parents[1]
APEX_TE = "Transformer Engine and Apex are not installed"


# ---------------------------------------------------------------------------------------------- overrides
@pytest.mark.parametrize("override, needle", [
    ("+trainer.lrr=5", "did you mean trainer.optim.lr?"),
    ("trainer.sft.max_step=3", "did you mean trainer.sft.max_steps?"),
    ("data.pack_sise=1", "did you mean data.pack_size?"),
    ("clusterr.nodes=2", "did you mean cluster.nodes?"),
    ("experiment=tiny_two_stag", "did you mean tiny_two_stage?"),
    ("parallel=tp3", "available: dp2, pp2, single, tp2, tp2_pp2, tp2_sp"),
])
def test_unknown_names_are_refused_with_the_nearest(override, needle):
    [problem] = check_overrides([override])
    assert problem.startswith(override.lstrip("+").split("=")[0]) and needle in problem, problem


def test_open_maps_and_valid_keys_pass():
    assert check_overrides(["+cluster.env.NCCL_DEBUG=INFO", "+model.hf_config.rope_theta=10000.0",
                            "experiment=tiny_lora", "model=tiny", "trainer.optim.lr=1e-3", "~run.stage",
                            "cluster.container_mounts=[/a:/b]", "stages=[]"]) == []


def test_nearest_prefers_the_last_part_and_never_an_ancestor():
    keys = ["trainer", "trainer.optim", "trainer.optim.lr", "trainer.sft", "trainer.sft.max_steps"]
    assert nearest("trainer.lrr", keys) == "trainer.optim.lr"
    assert nearest("trainer.zzzzzz", keys) is None


def test_experiment_typo_is_an_error_not_the_default_experiment():
    from nemotune.recipes.engine.config import ConfigError

    with pytest.raises(ConfigError) as err:
        compose("lora_sft", ["experiment=tiny_lroa"])
    assert str(err.value) == ("invalid configuration: experiment=tiny_lroa: no such experiment (did you mean "
                              f"tiny_lora?); available: {', '.join(experiment_names())}")


# ---------------------------------------------------------------------------------------------- prep
@pytest.mark.parametrize("experiment", experiment_names())
def test_prep_experiment_prepares_what_the_experiment_trains_on(experiment):
    from nemotune.data_prep.cli import compose as compose_prep

    prep = compose_prep([f"experiment={experiment}"])
    train = compose("lora_sft", [f"experiment={experiment}"])
    assert OmegaConf.to_container(prep.data) == OmegaConf.to_container(train.data, resolve=True)
    assert prep.tokenizer == train.model.tokenizer


def test_the_tiny_two_stage_data_has_the_splits_it_trains_on():
    cfg = compose("lora_sft", ["experiment=tiny_two_stage"])
    assert cfg.data.resplit and cfg.data.output_dir == "work/prep/fiqa_sample_resplit"
    used = {cfg.trainer.train_split, cfg.trainer.validation_split}
    used |= {s.overrides[k] for s in cfg.stages for k in s.overrides if k.endswith("_split")}
    assert used <= set(cfg.data.split_names)


def test_validate_only_reports_exactly_what_prep_drops(tmp_path, capsys):
    """A 200k-character answer: --validate-only lists it (it printed "no problems" before) and prep drops it."""
    from test_data_prep_support import prep_config_dir, run_prep

    rows = [json.loads(line) for line in (make_sample.SAMPLE_DIR / "validation.jsonl").read_text().splitlines()[:6]]
    rows[3]["ground_truths"] = ["The answer depends on your tax bracket. " * 5000]  # 200k characters
    assert len(rows[3]["ground_truths"][0]) == 200_000
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    conf = prep_config_dir(tmp_path)
    args = ["data.source=local", f"data.path={path}"]

    assert run_prep(conf, tmp_path / "out", *args, flags=("--validate-only",)) == 1
    listing = capsys.readouterr().out
    reported = {int(line.split(":")[1]): line for line in listing.splitlines() if line.startswith(f"  {path}:")}
    assert 4 in reported and "over data.max_seq_length=1024: prep drops it" in reported[4], listing
    assert not (tmp_path / "out").exists()

    assert run_prep(conf, tmp_path / "out", *args) == 0
    manifest = formats.read_manifest(tmp_path / "out")
    dropped = {d["line"]: d["reason"] for split in manifest["dropped"].values() for d in split}
    assert dropped[4] == "too_long"
    assert sorted(dropped) == sorted(reported)  # the same rows, no more, no fewer


def test_an_empty_input_file_is_an_error(tmp_path, capsys):
    from test_data_prep_support import prep_config_dir, run_prep

    inputs = tmp_path / "inputs"  # outside the output: prep never writes inside its inputs
    inputs.mkdir()
    (inputs / "train.jsonl").write_text(json.dumps({"question": "q?", "ground_truths": ["a."]}) + "\n")
    (inputs / "validation.jsonl").write_text("\n\n")  # blank lines only: no records
    assert run_prep(prep_config_dir(tmp_path), tmp_path / "out", "data.source=local", f"data.path={inputs}") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{inputs}/validation.jsonl: empty input file (no records); fix: point data.path at the "
                        "file that holds the data, or remove the empty split file"), err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- CLI front
VERBS = ("prep", "convert", "export", "train", "eval", "launch", "demo")


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_names_itself_in_its_usage_line(verb, capsys):
    from nemotune.recipes.cli import main

    try:
        code = main([verb, "--help"])
    except SystemExit as exit:  # argparse
        code = exit.code
    assert code == 0
    first = capsys.readouterr().out.strip().splitlines()[0]
    assert first.startswith(f"usage: nemotune {verb} "), first


def test_no_verb_prints_help_and_fails(capsys):
    from nemotune.recipes.cli import main

    assert main([]) == 2
    err = capsys.readouterr().err
    assert "no verb given" in err and "usage: nemotune <verb>" in err and "prep" in err


def _stderr_of(code: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RANK")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**clean, "OMP_NUM_THREADS": "1", **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_megatron_apex_te_warning_is_said_once_per_command():
    imports = "import megatron.core, megatron.core.optimizer, megatron.core.distributed"
    if APEX_TE not in _stderr_of(imports):
        pytest.skip("Transformer Engine or Apex is installed here: megatron-core does not warn")
    assert _stderr_of(imports).count(APEX_TE) >= 2  # what megatron-core says on its own
    ours = "import nemotune.recipes.engine.distributed; " + imports
    assert _stderr_of(ours).count(APEX_TE) == 1
    assert _stderr_of(ours, RANK="1").count(APEX_TE) == 0  # other ranks stay quiet


# ---------------------------------------------------------------------------------------------- cluster
def test_cluster_yaml_files_state_only_what_differs_from_the_dataclass():
    defaults = dataclasses.asdict(ClusterConfig())
    for path in sorted((REPO / "conf" / "cluster").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        restated = [k for k, v in node.items() if k != "defaults" and k in defaults and v == defaults[k]
                    and k != "kind"]
        assert not restated, f"{path.name} restates ClusterConfig defaults: {restated}"


def test_cluster_config_is_typed_and_resolved():
    cfg = compose("lora_sft", ["cluster=slurm", "run.name=r"])
    cluster = cluster_config(cfg.cluster)
    assert isinstance(cluster, ClusterConfig)
    assert (cluster.nproc_per_node, cluster.job_name, cluster.exclusive) == (8, "nemotune-r", True)
    assert (cluster.derived_cpus_per_task(), cluster.derived_mem()) == (None, "0")
    local = cluster_config({"nodes": 1, "nproc_per_node": 2})
    assert (local.derived_cpus_per_task(), local.derived_mem(), local.rdzv_backend) == ("2", None, "c10d")


def test_container_paths_must_be_mounted_and_map_back_to_the_host():
    cluster = dict(kind="slurm", container=True, container_image="i.sqsh", container_workdir="/workspace/w",
                   container_mounts=["/srv/w:/workspace/w", "/lustre/models:/models:ro"])
    cfg = {"cluster": cluster, "model": {"hf_path": "/models/nano", "checkpoint": "/scratch/mcore",
                                         "tokenizer": "nvidia/Llama-3.1-Nemotron-Nano-8B-v1"},
           "data": {"output_dir": "work/prep/x"}, "run": {"output_dir": "/workspace/w/runs/x"}}
    assert container_path_problems(cfg) == [
        "model.checkpoint=/scratch/mcore: the container job cannot see /scratch/mcore (cluster.container_mounts "
        "destinations: /workspace/w, /models); add the mount /scratch:/scratch to cluster.container_mounts"]
    assert host_path(cluster, "work/prep/x") == "/srv/w/work/prep/x"
    assert host_path(cluster, "/models/nano") == "/lustre/models/nano"
    assert host_path({"workdir": "/home/u/run"}, "work/prep/x") == "/home/u/run/work/prep/x"
