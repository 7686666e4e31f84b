"""Bad-input battery for the files nemotune reads and the outputs it writes (issue 11 items 1, 2, 5, 6, 7).

Hostile files: crafted pickles (a `__reduce__` that touches a marker file) as a converted checkpoint's
`.metadata` or `common.pt`, inside a `.nemo`, and in a training checkpoint; the marker must never appear.
Outputs: a command never replaces or deletes what it did not write (folders with other files, its own
inputs), replaces its own previous output only when asked, cleans the temporaries of a killed run, reports
a full disk and a read-only target in one line, and leaves files with the user's umask.
"""

from __future__ import annotations

import os
import pickle
import shutil
import stat
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from battery import BadInput, check, run, snapshot
from conftest import REPO, run_module

SAMPLE = REPO / "data_prep" / "assets" / "fiqa_sample"


class RunsCode:
    """Pickles to a call of os.system: unpickling it with plain pickle runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_pickle(marker: Path) -> bytes:
    return pickle.dumps(RunsCode(marker))


def _mount_tmpfs(path: Path, options: str) -> str | None:
    """Mount a tmpfs (needs root); None when mounted, else the reason it could not be."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                            text=True)
    return None if result.returncode == 0 else f"cannot mount a tmpfs here: {result.stderr.strip() or 'not root'}"


def _train_args(assets, run_dir, *extra):
    return ["experiment=tiny_lora", f"model.hf_path={assets['base']}", f"model.checkpoint={assets['mcore']}",
            f"data.output_dir={assets['prep']}", f"run.output_dir={run_dir}", "run.tensorboard=false",
            "trainer.train_split=sft", "trainer.validation_split=eval", "trainer.sft.limit_val_batches=1", *extra]


@pytest.fixture(scope="module")
def files(tiny_assets, tmp_path_factory):
    """Every hostile or mistaken input, built once from the tiny assets."""
    from nemotune.converters.formats import adapters as adapter_io
    from nemotune.converters.formats.hf_config import load_hf_config
    from nemotune.converters.tiny_model import write_tiny_llama

    root = tmp_path_factory.mktemp("bad_files")
    f = dict(tiny_assets, work=root, marker=root / "code_ran", outs=root / "outs")
    f["outs"].mkdir()
    crafted = crafted_pickle(f["marker"])

    f["evil_mcore"] = root / "evil_mcore"  # a converted dir whose .metadata runs code
    shutil.copytree(f["mcore"], f["evil_mcore"])
    (f["evil_mcore"] / "weights" / ".metadata").write_bytes(crafted)
    f["evil_common"] = root / "evil_common"  # megatron's common.pt (torch.load) that runs code
    shutil.copytree(f["mcore"], f["evil_common"])
    (f["evil_common"] / "weights" / "common.pt").write_bytes(crafted)
    f["truncated"] = root / "truncated_mcore"
    shutil.copytree(f["mcore"], f["truncated"])
    shard = f["truncated"] / "weights" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-4096])

    run_module("nemotune.converters.convert", "hf-to-nemo", "--hf", f["base"], "--out", root / "base.nemo",
               "--no-progress")
    f["evil_nemo"] = root / "evil.nemo"
    staging = root / "nemo_staging"
    with tarfile.open(root / "base.nemo") as archive:
        archive.extractall(staging, filter="data")
    (staging / "model_weights" / ".metadata").write_bytes(crafted)
    with tarfile.open(f["evil_nemo"], "w:") as archive:
        for path in sorted(staging.rglob("*")):
            archive.add(path, arcname="./" + str(path.relative_to(staging)), recursive=False)

    hf = load_hf_config(f["base"])
    config = {"dim": 4, "alpha": 8, "dropout": 0.0, "target_modules": list(adapter_io.TARGETS), "variant": "nemo",
              "layer_selection": None, "base_model": hf, "base_model_name_or_path": str(f["base"])}
    f["adapter"] = adapter_io.save_adapter(root / "adapter", adapter_io.random_adapter(config), config)
    f["peft"] = adapter_io.export_hf_peft(f["adapter"], root / "peft")
    f["lora_nemo"] = adapter_io.export_nemo_lora(f["adapter"], root / "lora.nemo")
    f["other"] = write_tiny_llama(root / "other_model", seed=1, hidden=32, heads=2, kv_heads=1, ffn=96)
    f["bad_config"] = root / "bad_config"
    shutil.copytree(f["base"], f["bad_config"])
    (f["bad_config"] / "config.json").write_text('{"hidden_size": 64,\n  "num_layers" 2}\n')

    f["user_dir"] = root / "user_dir"  # a folder of the user's: never replaced, never emptied
    f["user_dir"].mkdir()
    (f["user_dir"] / "notes.txt").write_text("my notes\n")
    (f["user_dir"] / "prepared.jsonl").write_text('{"id": 1}\n')
    f["inputs"] = root / "inputs"  # prep input folder
    shutil.copytree(SAMPLE, f["inputs"])
    f["previous_convert"] = root / "previous_convert"  # our own previous output
    shutil.copytree(f["mcore"], f["previous_convert"])

    # a training checkpoint (one step), then the same checkpoint with a crafted .metadata planted
    run_module("nemotune.recipes.lora_sft", *_train_args(f, root / "run", "trainer.sft.max_steps=1"))
    (root / "run" / "checkpoints" / "step0000001" / "dist" / ".metadata").write_bytes(crafted)
    f["evil_run"] = root / "run"

    f["full"], f["read_only"] = root / "full", root / "read_only"
    f["no_mount"] = (_mount_tmpfs(f["full"], "size=256k")
                     or _mount_tmpfs(f["read_only"], "size=64k,ro"))
    yield f
    for mount in (f["full"], f["read_only"]):
        subprocess.run(["umount", str(mount)], capture_output=True)


CONVERT, EXPORT, PREP, EVAL, TRAIN = ("nemotune.converters.convert", "nemotune.converters.export",
                                      "nemotune.data_prep", "nemotune.recipes.evaluate", "nemotune.recipes.lora_sft")


@dataclass
class Row:
    name: str
    build: Callable[[dict], BadInput]
    needs_mount: bool = False


def _prep(f, *extra):
    return [PREP, "--quiet", "data=fiqa_sample", "model=tiny", *extra]


def _eval(f, out):
    return [EVAL, f"data_dir={f['prep']}", f"base_model={f['base']}", f"adapter={f['peft']}", f"out_dir={out}",
            "eval.split=eval", "eval.limit=1"]


CASES = [
    # ---- item 1: no code runs from a file we read
    Row("crafted_metadata_megatron_to_hf", lambda f: BadInput(
        "crafted_metadata_megatron_to_hf",
        [CONVERT, "megatron-to-hf", "--ckpt", f["evil_mcore"], "--out", f["outs"] / "a"],
        [str(f["evil_mcore"] / "weights" / ".metadata"), "refusing to unpickle posix.system"],
        guard=[f["evil_mcore"], f["outs"]], must_not_exist=f["marker"])),
    Row("crafted_metadata_verify", lambda f: BadInput(
        "crafted_metadata_verify", [CONVERT, "verify", "--hf", f["base"], "--ckpt", f["evil_mcore"]],
        [".metadata", "refusing to unpickle"], guard=[f["evil_mcore"]], must_not_exist=f["marker"])),
    Row("crafted_common_pt", lambda f: BadInput(
        "crafted_common_pt", [CONVERT, "megatron-to-hf", "--ckpt", f["evil_common"], "--out", f["outs"] / "a"],
        [str(f["evil_common"] / "weights" / "common.pt"), "weights_only=True"],
        guard=[f["evil_common"], f["outs"]], must_not_exist=f["marker"])),
    Row("crafted_metadata_in_nemo_to_hf", lambda f: BadInput(
        "crafted_metadata_in_nemo_to_hf", [CONVERT, "nemo-to-hf", "--nemo", f["evil_nemo"], "--out", f["outs"] / "a"],
        [f"{f['evil_nemo']}:model_weights/.metadata", "refusing to unpickle"],
        guard=[f["evil_nemo"], f["outs"]], must_not_exist=f["marker"])),
    Row("crafted_metadata_in_nemo_verify", lambda f: BadInput(
        "crafted_metadata_in_nemo_verify", [CONVERT, "verify", "--hf", f["base"], "--ckpt", f["evil_nemo"]],
        [f"{f['evil_nemo']}:model_weights/.metadata"], guard=[f["evil_nemo"]], must_not_exist=f["marker"])),
    Row("crafted_metadata_train_base", lambda f: BadInput(
        "crafted_metadata_train_base",
        [TRAIN, *_train_args({**f, "mcore": f["evil_mcore"]}, f["outs"] / "run", "trainer.sft.max_steps=1")],
        [".metadata", "refusing to unpickle"], guard=[f["evil_mcore"]], must_not_exist=f["marker"],
        may_create=(".log", ".json", ".jsonl"))),
    Row("crafted_metadata_resume", lambda f: BadInput(
        "crafted_metadata_resume", [TRAIN, *_train_args(f, f["evil_run"], "trainer.sft.max_steps=2")],
        [str(f["evil_run"] / "checkpoints" / "step0000001" / "dist" / ".metadata"), "refusing to unpickle"],
        guard=[f["evil_run"] / "checkpoints"], must_not_exist=f["marker"])),
    # ---- item 2: no command deletes or replaces what it did not create
    Row("eval_out_dir_holds_user_files", lambda f: BadInput(
        "eval_out_dir_holds_user_files", _eval(f, f["user_dir"]),
        [f"out_dir={f['user_dir']}", "not an output of nemotune eval"], guard=[f["user_dir"]])),
    Row("eval_out_dir_is_the_data_dir", lambda f: BadInput(
        "eval_out_dir_is_the_data_dir", _eval(f, f["prep"]), ["is the input", str(f["prep"])], guard=[f["prep"]])),
    Row("prep_output_dir_holds_user_files", lambda f: BadInput(
        "prep_output_dir_holds_user_files", _prep(f, f"data.output_dir={f['user_dir']}"),
        [str(f["user_dir"]), "not an output of nemotune prep"], exit_code=2, guard=[f["user_dir"]])),
    Row("prep_output_dir_is_the_input_folder", lambda f: BadInput(
        "prep_output_dir_is_the_input_folder",
        _prep(f, f"data.path={f['inputs'] / 'train.jsonl'}", f"data.output_dir={f['inputs']}"),
        [str(f["inputs"]), "contains the input"], exit_code=2, guard=[f["inputs"]])),
    Row("prep_output_dir_inside_the_input", lambda f: BadInput(
        "prep_output_dir_inside_the_input", _prep(f, f"data.path={f['inputs']}", f"data.output_dir={f['inputs'] / 'out'}"),
        ["lies inside the input"], exit_code=2, guard=[f["inputs"]])),
    Row("prep_over_previous_output_without_overwrite", lambda f: BadInput(
        "prep_over_previous_output_without_overwrite", _prep(f, f"data.output_dir={f['prep']}"),
        [str(f["prep"]), "data.overwrite=true"], exit_code=2, guard=[f["prep"]])),
    Row("convert_over_previous_output_without_overwrite", lambda f: BadInput(
        "convert_over_previous_output_without_overwrite",
        [CONVERT, "hf-to-megatron", "--hf", f["base"], "--out", f["previous_convert"], "--no-progress"],
        [str(f["previous_convert"]), "pass --overwrite"], guard=[f["previous_convert"]])),
    Row("convert_overwrite_of_a_user_folder", lambda f: BadInput(
        "convert_overwrite_of_a_user_folder",
        [CONVERT, "hf-to-megatron", "--hf", f["base"], "--out", f["user_dir"], "--overwrite", "--no-progress"],
        [str(f["user_dir"]), "never replaces what it did not write"], guard=[f["user_dir"]])),
    Row("convert_out_is_the_input", lambda f: BadInput(
        "convert_out_is_the_input",
        [CONVERT, "hf-to-megatron", "--hf", f["base"], "--out", f["base"], "--overwrite", "--no-progress"],
        ["is the input", str(f["base"])], guard=[f["base"]])),
    Row("convert_out_inside_the_input", lambda f: BadInput(
        "convert_out_inside_the_input",
        [CONVERT, "megatron-to-hf", "--ckpt", f["mcore"], "--out", f["mcore"] / "hf", "--no-progress"],
        ["lies inside the input", str(f["mcore"])], guard=[f["mcore"]])),
    Row("export_over_another_verbs_output", lambda f: BadInput(
        "export_over_another_verbs_output",
        [EXPORT, "hf-peft", "--adapter", f["adapter"], "--out", f["previous_convert"], "--overwrite"],
        ["an output of nemotune convert"], guard=[f["previous_convert"], f["adapter"]])),
    Row("export_out_is_the_adapter", lambda f: BadInput(
        "export_out_is_the_adapter", [EXPORT, "hf-peft", "--adapter", f["adapter"], "--out", f["adapter"], "--overwrite"],
        ["is the input", str(f["adapter"])], guard=[f["adapter"]])),
    # ---- item 5: one line naming the file and the fix
    Row("truncated_converted_shard", lambda f: BadInput(
        "truncated_converted_shard", [CONVERT, "megatron-to-hf", "--ckpt", f["truncated"], "--out", f["outs"] / "a"],
        [str(f["truncated"] / "weights" / "__0_0.distcp"), "truncated"], guard=[f["truncated"], f["outs"]])),
    Row("invalid_config_json_convert", lambda f: BadInput(
        "invalid_config_json_convert", [CONVERT, "hf-to-megatron", "--hf", f["bad_config"], "--out", f["outs"] / "a"],
        [str(f["bad_config"] / "config.json"), "invalid JSON at line 2"], guard=[f["bad_config"], f["outs"]])),
    Row("invalid_config_json_verify", lambda f: BadInput(
        "invalid_config_json_verify", [CONVERT, "verify", "--hf", f["bad_config"], "--ckpt", f["mcore"]],
        [str(f["bad_config"] / "config.json"), "invalid JSON"], guard=[f["bad_config"]])),
    Row("verify_seq_len_zero", lambda f: BadInput(
        "verify_seq_len_zero", [CONVERT, "verify", "--hf", f["base"], "--ckpt", f["mcore"], "--seq-len", "0"],
        ["--seq-len 0", ">= 1"])),
    Row("lora_nemo_as_base_convert", lambda f: BadInput(
        "lora_nemo_as_base_convert", [CONVERT, "nemo-to-hf", "--nemo", f["lora_nemo"], "--out", f["outs"] / "a"],
        [str(f["lora_nemo"]), "LoRA adapter .nemo", "not a base model"], guard=[f["lora_nemo"], f["outs"]])),
    Row("lora_nemo_as_base_verify", lambda f: BadInput(
        "lora_nemo_as_base_verify", [CONVERT, "verify", "--hf", f["base"], "--ckpt", f["lora_nemo"]],
        [str(f["lora_nemo"]), "not a base model"], guard=[f["lora_nemo"]])),
    Row("verify_base_of_another_model", lambda f: BadInput(
        "verify_base_of_another_model", [CONVERT, "verify", "--hf", f["other"], "--ckpt", f["mcore"]],
        ["model.embed_tokens.weight is [1024, 64]", "[1024, 32]", str(f["other"]), str(f["mcore"])])),
    Row("disk_full_convert", lambda f: BadInput(
        "disk_full_convert", [CONVERT, "hf-to-megatron", "--hf", f["base"], "--out", f["full"] / "mcore",
                              "--no-progress"],
        ["no space left", str(f["full"] / "mcore"), "partial output was removed"], guard=[f["full"]]), True),
    Row("disk_full_convert_nemo", lambda f: BadInput(
        "disk_full_convert_nemo", [CONVERT, "hf-to-nemo", "--hf", f["base"], "--out", f["full"] / "x.nemo",
                                   "--no-progress"],
        ["no space left", str(f["full"] / "x.nemo")], guard=[f["full"]]), True),
    Row("disk_full_export_merge", lambda f: BadInput(
        "disk_full_export_merge", [EXPORT, "merge", "--base", f["base"], "--adapter", f["adapter"],
                                   "--out", f["full"] / "merged", "--no-progress"],
        ["no space left", str(f["full"] / "merged")], guard=[f["full"]]), True),
    Row("read_only_export", lambda f: BadInput(
        "read_only_export", [EXPORT, "hf-peft", "--adapter", f["adapter"], "--out", f["read_only"] / "peft"],
        [str(f["read_only"] / "peft"), "read-only file system"], guard=[f["read_only"]]), True),
    Row("read_only_convert", lambda f: BadInput(
        "read_only_convert", [CONVERT, "hf-to-megatron", "--hf", f["base"], "--out", f["read_only"] / "m"],
        [str(f["read_only"] / "m"), "read-only file system"], guard=[f["read_only"]]), True),
]


@pytest.mark.parametrize("row", CASES, ids=lambda r: r.name)
def test_bad_input(row, files):
    if row.needs_mount and files["no_mount"]:
        pytest.skip(files["no_mount"])
    check(row.build(files))
    assert not files["marker"].exists()


# ---- outputs: replacing our own output when asked, cleaning up, crashes, permissions ------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_overwrite_replaces_our_previous_output_only_when_asked(files, tmp_path):
    out = tmp_path / "mcore"
    run_module(CONVERT, "hf-to-megatron", "--hf", files["base"], "--out", out, "--no-progress")
    (out / "stale_extra_file").write_text("from the previous run\n")  # ours to replace, with --overwrite
    refused = run([CONVERT, "hf-to-megatron", "--hf", files["base"], "--out", out, "--no-progress"])
    assert refused.returncode == 2 and "pass --overwrite" in refused.stderr
    assert (out / "stale_extra_file").is_file()
    run_module(CONVERT, "hf-to-megatron", "--hf", files["base"], "--out", out, "--no-progress", "--overwrite")
    assert not (out / "stale_extra_file").exists() and (out / "weights" / ".metadata").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mcore"]  # no temporary or set-aside copy left


def test_prep_overwrite_key_replaces_its_own_output(files, tmp_path):
    out = tmp_path / "prep"
    args = ["--quiet", "data=fiqa_sample", "model=tiny", f"data.output_dir={out}"]
    run_module(PREP, *args)
    first = snapshot([out])
    run_module(PREP, *args, "data.overwrite=true", "data.seed=7")
    assert snapshot([out]) != first and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prep"]


def test_stale_temporaries_of_a_killed_run_are_removed_and_reported(files, tmp_path):
    from nemotune.converters.formats.outputs import _host

    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".mcore.partial-{_host()}-{dead}-0badc0de"
    (stale / "weights").mkdir(parents=True)
    (stale / "weights" / "__0_0.distcp").write_bytes(b"\0" * (3 << 20))
    running = tmp_path / f".mcore.partial-{_host()}-{alive}-0000beef"  # a run still writing: left alone
    running.mkdir()
    other_target = tmp_path / f".other.partial-{_host()}-{dead}-00c0ffee"  # another target's: left alone
    other_target.mkdir()
    result = run_module(CONVERT, "hf-to-megatron", "--hf", files["base"], "--out", tmp_path / "mcore", "--no-progress")
    assert not stale.exists() and running.is_dir() and other_target.is_dir()
    said = [line for line in result.stderr.splitlines() if "removed" in line]
    assert len(said) == 1 and str(stale) in said[0] and f"pid {dead}" in said[0] and "3.0 MiB" in said[0]


def test_failed_replace_leaves_the_previous_output_intact(files, tmp_path):
    """A previous export on a tiny disk, replaced by a bigger one that does not fit: the old one stays."""
    if files["no_mount"]:
        pytest.skip(files["no_mount"])
    out = files["full"] / "exported"
    try:
        run_module(EXPORT, "hf-peft", "--adapter", files["adapter"], "--out", out)
        before = snapshot([out])
        result = run([EXPORT, "merge", "--base", files["base"], "--adapter", files["adapter"], "--out", out,
                      "--overwrite", "--no-progress"])
        assert result.returncode == 2 and "no space left" in result.stderr
        assert snapshot([out]) == before
        assert sorted(p.name for p in files["full"].iterdir()) == ["exported"]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_interrupted_replace_puts_the_previous_output_back(tmp_path):
    """Killed between setting the old output aside and renaming the new one: the next run restores it."""
    from nemotune.converters.formats.outputs import _host, output_target

    out = tmp_path / "report"
    set_aside = tmp_path / f".report.old-{_host()}-{_dead_pid()}-1234abcd"
    set_aside.mkdir()
    (set_aside / "nemotune_output.json").write_text('{"verb": "eval"}\n')
    (set_aside / "summary.md").write_text("previous\n")
    with pytest.raises(ValueError, match="eval.overwrite=true"):
        with output_target(out, verb="eval", overwrite_hint="eval.overwrite=true", quiet=True):
            pass
    assert (out / "summary.md").read_text() == "previous\n" and not set_aside.exists()


def test_outputs_follow_the_umask_022(files, tmp_path):
    """Files 0644, folders 0755 under umask 022 for convert, export (folder and .nemo) and prep."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    commands = {
        "mcore": [CONVERT, "hf-to-megatron", "--hf", files["base"], "--out", tmp_path / "mcore", "--no-progress"],
        "lora.nemo": [EXPORT, "nemo", "--adapter", files["adapter"], "--out", tmp_path / "lora.nemo"],
        "peft": [EXPORT, "hf-peft", "--adapter", files["adapter"], "--out", tmp_path / "peft"],
        "prep": [PREP, "--quiet", "data=fiqa_sample", "model=tiny", f"data.output_dir={tmp_path / 'prep'}"],
    }
    for argv in commands.values():
        subprocess.run([sys.executable, "-m", *map(str, argv)], cwd=REPO, env=env, check=True, capture_output=True,
                       preexec_fn=lambda: os.umask(0o022))
    assert_modes([tmp_path / name for name in commands], 0o644, 0o755)


def test_output_modes_follow_any_umask_even_for_private_temporaries(tmp_path):
    """umask 027: 0640 / 0750, also for files a writer created private (mkstemp-style 0600)."""
    from nemotune.converters.formats.outputs import output_target

    previous = os.umask(0o027)
    try:
        with output_target(tmp_path / "out", verb="eval") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            private = tmp / "sub" / "private.json"
            private.write_text("{}")
            os.chmod(private, 0o600)
    finally:
        os.umask(previous)
    assert_modes([tmp_path / "out"], 0o640, 0o750)


def assert_modes(tops, file_mode, dir_mode):
    for top in tops:
        for path in [top, *top.rglob("*")] if top.is_dir() else [top]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (dir_mode if path.is_dir() else file_mode), (str(path), oct(mode))
