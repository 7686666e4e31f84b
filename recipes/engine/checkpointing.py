"""Training checkpoints: trainable weights + optimizer through megatron-core dist_checkpointing, plus trainer state.

<run_dir>/checkpoints/step0000042/
  dist/                  LoRA: adapter weights + optimizer state; full SFT (peft.peft_scheme=none): the whole
                         model under the key prefix `model.` (MODEL_PREFIX) + optimizer state
                         (dist_checkpointing, the distributed optimizer's state fully reshardable: reloads
                         under any TP/PP/DP)
  adapter/               LoRA only: the consolidated adapter (TP=1 layout, all layers) that `nemotune export` reads
  hf/                    the model's HF config.json, generation_config.json and the training tokenizer's files
                         (tokenizer.save_pretrained: the chat template the data was prepared with)
  trainer_state.json     step, consumed_samples, epoch, val_loss, scheduler state, peft_scheme, base reference
  rng/rank*.pt           each rank's RNG states
A LoRA checkpoint references the frozen base by path + sha256, never copies it. A checkpoint is written under a `.tmp-`
name (its writer's host and pid recorded in it, so the next run can clean it up) and renamed when every
rank has finished, so a crash mid-save never leaves one that looks complete.
Top-k checkpoints by val_loss are kept, plus the last.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException

from nemotune.converters.formats.outputs import disk_full
from nemotune.recipes.engine import distributed
from nemotune.recipes.engine.megatron_cpu import on_gpu
from nemotune.recipes.engine.run_dir import OWNER_NAME, owner_record

STATE_FILE = "trainer_state.json"
RESUME_FROM = ("latest", "previous")
MODEL_PREFIX = "model."  # a full-SFT checkpoint's model tensor keys: model.decoder.layers.0...., as in a .nemo
HF_DIR = "hf"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the path and the fix."""


def sharding_metadata() -> dict:
    """The distributed optimizer's state in megatron's format that any TP / PP / DP can load."""
    # a fresh dict each time: megatron stores the current data-parallel group into it
    return {"distrib_optim_sharding_type": "fully_reshardable"}


def adapter_sharded_state_dict(model_chunks) -> dict:
    sharded = {}
    for chunk in model_chunks:
        full = chunk.sharded_state_dict(metadata=sharding_metadata())
        for key, value in full.items():
            if "adapter_layer" in key:
                sharded[key] = value
    return sharded


def model_sharded_state_dict(model_chunks) -> dict:
    """The whole model's sharded state dict (full SFT), every key under MODEL_PREFIX."""
    sharded = {}
    for chunk in model_chunks:  # the GPTModel itself, not its DDP wrapper (which would add `module.`)
        sharded.update(unwrap(chunk).sharded_state_dict(prefix=MODEL_PREFIX, metadata=sharding_metadata()))
    return sharded


@contextlib.contextmanager
def optimizer_state_to_load_into(optimizer):
    """For the block: an optimizer that has not stepped yet gets the state a checkpoint loads into.

    megatron's distributed optimizer (without Apex / TE's fused Adam) reads torch Adam's per-parameter `step`
    while it describes its state, which exists only after a first step, and then loads every tensor of the
    state but `step` (set from the checkpoint's own): a `step` is lent for the block and removed after it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    lent = []
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner, init = getattr(opt, "optimizer", None), getattr(opt, "init_state_fn", None)
        if not isinstance(opt, DistributedOptimizer) or inner is None or init is None:
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        if any(len(inner.state[p]) for p in params):
            continue
        init(inner)
        if isinstance(inner, torch.optim.Adam):  # AdamW derives from it
            for p in params:
                inner.state[p]["step"] = torch.tensor(0.0)
                lent.append(inner.state[p])
    try:
        yield
    finally:
        for state in lent:
            state.pop("step", None)


@contextlib.contextmanager
def torch_adam_step_tolerated(optimizer):
    """For the block: megatron-core's distributed optimizer loads a fully reshardable state into torch Adam.

    Without Apex / TE's fused Adam, its load_state_dict puts torch Adam's `step` into every parameter's state
    and then copies each state key from the checkpoint's tensors, which carry no `step` (KeyError 'step').
    The step it set (one tensor, the checkpoint's) is handed back for that key, so the copy is a no-op; after
    the load each parameter gets its own copy of it (torch Adam increments every parameter's `step` in place:
    one shared tensor would advance once per parameter per step and skew the bias correction)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        original = getattr(opt, "_set_main_param_and_optimizer_states", None) \
            if isinstance(opt, DistributedOptimizer) else None
        if original is None or not isinstance(getattr(opt, "optimizer", None), torch.optim.Adam):
            continue

        def set_states(model_param, tensors, opt=opt, original=original):
            if "step" not in tensors:
                step = next((s["step"] for s in opt.optimizer.state.values() if "step" in s), None)
                if step is not None:
                    tensors = {**tensors, "step": step}
            return original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class's method
            for state in opt.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()


def unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def write_hf_dir(out: Path, *, hf_config: dict, hf_path: Optional[str], tokenizer) -> None:
    """<step>/hf: the model's config.json and generation_config.json (model.hf_path's own files when it has
    them) and the training tokenizer's files, chat template included."""
    out.mkdir(parents=True, exist_ok=True)
    source = Path(hf_path) if hf_path else None
    for name in ("config.json", "generation_config.json"):
        if source is not None and (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    if not (out / "config.json").is_file():
        (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if not (out / "generation_config.json").is_file():
        generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if hf_config.get(k) is not None}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def _save_adapter(out: Path, state: dict, config: dict, tokenizer) -> None:
    """The consolidated adapter (an HF PEFT adapter) with the training tokenizer's files (its chat template)."""
    from nemotune.converters.formats.adapters import save_adapter

    if (config.get("base_model") or {}).get("family") == "nemotron_h":
        from nemotune.recipes.engine.hybrid_training import save_hybrid_adapter

        save_hybrid_adapter(out, state, config, tokenizer=tokenizer)
        return
    save_adapter(out, state, config, tokenizer=tokenizer)


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step*") if (p / STATE_FILE).is_file()), key=lambda p: p.name)


def read_state(ckpt: Path) -> dict:
    """A checkpoint's trainer_state.json, or CheckpointError naming it."""
    path = ckpt / STATE_FILE
    try:
        payload = json.loads(path.read_text())
        if not isinstance(payload, dict) or not {"step", "consumed_samples", "scheduler"} <= payload.keys():
            raise ValueError("not a trainer state (step, consumed_samples, scheduler)")
        return payload
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) else str(err).splitlines()[0]
        raise CheckpointError(f"{path} is damaged ({reason}); set run.resume_from=previous to resume from the "
                              f"checkpoint before it (this one is left in place), or run.output_dir=<new dir> "
                              f"to start a new run") from None


def check_peft_scheme(ckpt: Path, payload: dict, peft_scheme: str) -> None:
    """A LoRA checkpoint holds adapters only, a full-SFT one the whole model: neither resumes as the other."""
    saved = payload.get("peft_scheme") or "lora"  # checkpoints written before full SFT existed are LoRA
    if saved == peft_scheme:
        return
    what = {"lora": "a LoRA (adapter-only)", "none": "a full-parameter SFT"}
    raise CheckpointError(
        f"{ckpt} is {what.get(saved, saved)} checkpoint (peft_scheme {saved}) and this run has "
        f"peft.peft_scheme={peft_scheme}; resume it with peft={saved}, or set run.output_dir=<new dir> "
        f"to start a new run" + (" (a full-SFT step dir can be its model.checkpoint)" if saved == "none" else ""))


def refuse_other_peft_scheme(root: Path, *, peft_scheme: str, resume: bool, resume_from: str) -> None:
    """Before any model is built or base hashed: the checkpoint a resume would start from is of this peft
    scheme (the rest of it is checked when it loads)."""
    checkpoints = complete_checkpoints(Path(root)) if resume else []
    previous = resume_from == "previous"
    if len(checkpoints) > int(previous):  # the one Checkpointer.latest() picks (it refuses the other cases)
        ckpt = checkpoints[-2] if previous else checkpoints[-1]
        check_peft_scheme(ckpt, read_state(ckpt), peft_scheme)


class Checkpointer:
    def __init__(self, root: Path, *, adapter_config: Optional[dict], base_reference: dict, save_top_k: int,
                 resume: bool, resume_from: str = "latest", peft_scheme: str = "lora",
                 hf_config: Optional[dict] = None, hf_path: Optional[str] = None, tokenizer=None):
        if resume_from not in RESUME_FROM:
            raise CheckpointError(f"run.resume_from={resume_from}: expected one of {', '.join(RESUME_FROM)}")
        self.root = Path(root)
        self.adapter_config = adapter_config
        self.peft_scheme = peft_scheme
        self.hf_config, self.hf_path, self.tokenizer = hf_config, hf_path, tokenizer
        self.base_reference = base_reference
        self.save_top_k = save_top_k
        self.resume = resume
        self.resume_from = resume_from

    # ---- save ------------------------------------------------------------------------------------
    def save(self, trainer) -> Path:
        """Every rank writes its shards under `.tmp-stepN` (its writer recorded in it); renamed to `stepN`
        once all ranks are done. A failure on any rank removes the temporary and raises CheckpointError."""
        from megatron.core import dist_checkpointing

        progress = trainer.state_dict()
        step = progress["step"]
        final = self.root / f"step{step:07d}"
        tmp = self.root / f".tmp-step{step:07d}"
        failure: Optional[BaseException] = None
        try:
            if distributed.is_rank_zero():
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "dist").mkdir(parents=True)
                (tmp / "rng").mkdir()
                (tmp / OWNER_NAME).write_text(json.dumps(owner_record()))
        except OSError as err:
            failure = err
        self._agree(failure, tmp, final)
        try:
            dist_checkpointing.save(trainer.sharded_state_dict(), str(tmp / "dist"))
        except _FAILURES as err:  # torch DCP gathers every rank's failure: all ranks see it
            failure = err
        self._agree(failure, tmp, final)
        try:
            full_adapter = trainer.consolidated_adapter() if self.peft_scheme == "lora" else None
            torch.save(_rng_states(), tmp / "rng" / f"rank{distributed.rank()}.pt")
            if distributed.is_rank_zero():
                if self.peft_scheme == "lora":
                    _save_adapter(tmp / "adapter", full_adapter, self.adapter_config, self.tokenizer)
                if self.hf_config is not None:
                    write_hf_dir(tmp / HF_DIR, hf_config=self.hf_config, hf_path=self.hf_path,
                                 tokenizer=self.tokenizer)
                payload = {**progress, "peft_scheme": self.peft_scheme, "base_model": self.base_reference,
                           # sizes of the shard files: a resume names a truncated one before reading it
                           "dist_files": {f.name: f.stat().st_size for f in sorted((tmp / "dist").iterdir())
                                          if f.is_file()}}
                (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2))
        except OSError as err:
            failure = err
        self._agree(failure, tmp, final)
        if distributed.is_rank_zero():
            shutil.rmtree(final, ignore_errors=True)  # a damaged one of ours at the same step (resume_from=previous)
            tmp.rename(final)
            self._keep_top_k()
        torch.distributed.barrier()
        return final

    def _agree(self, failure: Optional[BaseException], tmp: Path, final: Path) -> None:
        """All ranks learn whether any failed; then rank 0 removes the temporary and all raise one line."""
        flag = torch.tensor([0 if failure is None else (2 if disk_full(failure) else 1)], dtype=torch.int32,
                            device=distributed.device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        code = int(flag.item())
        if code == 0:
            return
        if distributed.is_rank_zero():
            shutil.rmtree(tmp, ignore_errors=True)
        if code == 2:
            raise CheckpointError(f"no space left on device while saving checkpoint {final} (in {self.root}); the "
                                  f"partial {tmp.name} was removed; free space there or set run.output_dir to "
                                  f"another filesystem, then rerun to resume from the last complete checkpoint")
        reason = str(failure).splitlines()[0] if failure is not None else "failed on another rank"
        raise CheckpointError(f"saving checkpoint {final} failed ({type(failure).__name__ if failure else 'error'}: "
                              f"{reason}); the partial {tmp.name} was removed; check that {self.root} is writable")

    def _keep_top_k(self) -> None:
        checkpoints = complete_checkpoints(self.root)
        if self.save_top_k < 0 or len(checkpoints) <= 1:
            return
        last = checkpoints[-1]
        scored = []
        for ckpt in checkpoints[:-1]:
            scored.append((_val_loss(ckpt), ckpt))
        keep = {last}
        ranked = sorted(scored + [(_val_loss(last), last)], key=lambda item: item[0])
        keep.update(ckpt for _, ckpt in ranked[:self.save_top_k])
        for _, ckpt in scored:
            if ckpt not in keep:
                shutil.rmtree(ckpt, ignore_errors=True)

    # ---- load ------------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """The checkpoint to resume from: the newest complete one, or (run.resume_from=previous) the one
        before it."""
        if not self.resume:
            return None
        checkpoints = complete_checkpoints(self.root)
        if self.resume_from == "previous":
            if len(checkpoints) < 2:
                raise CheckpointError(f"run.resume_from=previous: {self.root} holds {len(checkpoints)} complete "
                                      f"checkpoint(s), no previous one; set run.output_dir=<new dir> to start anew")
            distributed.print_rank_zero(f"run.resume_from=previous: resuming from {checkpoints[-2].name}, not "
                                        f"{checkpoints[-1].name} (left in place; replaced when that step is saved again)")
            return checkpoints[-2]
        return checkpoints[-1] if checkpoints else None

    def load_latest(self, trainer) -> Optional[Path]:
        ckpt = self.latest()
        if ckpt is None:
            return None
        self.load(trainer, ckpt)
        return ckpt

    def load(self, trainer, ckpt: Path) -> None:
        from megatron.core import dist_checkpointing

        from nemotune.converters.formats.safe_pickle import UnsafeFileError, check_checkpoint_files

        payload = read_state(ckpt)  # names a damaged trainer_state.json
        self._check_peft_scheme(ckpt, payload)
        try:  # megatron / torch unpickle its .metadata: refuse anything but data first (and short shards)
            check_checkpoint_files(ckpt)
        except UnsafeFileError as err:
            raise CheckpointError(f"{err}; set run.resume_from=previous to resume from the checkpoint before it "
                                  f"(this one is left in place), or run.output_dir=<new dir> to start a new run") \
                from None
        self._check_shard_sizes(ckpt, payload.get("dist_files") or {})  # a shard shorter than when saved
        saved_base = payload.get("base_model", {})
        if saved_base.get("sha256") and self.base_reference.get("sha256") and \
                saved_base["sha256"] != self.base_reference["sha256"]:
            raise CheckpointError(f"{ckpt} was trained on base {saved_base.get('path')} (sha256 "
                                  f"{saved_base['sha256'][:12]}), not on model.checkpoint="
                                  f"{self.base_reference.get('path')}; use that base, or run.output_dir=<new dir>")
        trainer.load_state_dict(payload, source=str(ckpt))
        try:
            state = dist_checkpointing.load(trainer.sharded_state_dict(is_loading=True), str(ckpt / "dist"))
        except _FAILURES as err:  # truncated or missing shard files
            raise CheckpointError(f"{ckpt / 'dist'} is unreadable ({_damaged_file(ckpt / 'dist', err)}); set "
                                  f"run.resume_from=previous to resume from the checkpoint before it (this one is "
                                  f"left in place), or run.output_dir=<new dir> to start a new run") from None
        trainer.load_sharded_state_dict(state)
        rng_file = ckpt / "rng" / f"rank{distributed.rank()}.pt"
        if rng_file.is_file() and payload.get("world_size") == distributed.world_size():
            _set_rng_states(torch.load(rng_file, weights_only=True))


    def _check_peft_scheme(self, ckpt: Path, payload: dict) -> None:
        check_peft_scheme(ckpt, payload, self.peft_scheme)

    @staticmethod
    def _check_shard_sizes(ckpt: Path, recorded: dict) -> None:
        for name, size in recorded.items():
            path = ckpt / "dist" / name
            found = path.stat().st_size if path.is_file() else None
            if found != size:
                state = "missing" if found is None else f"{found} bytes, {size} when saved (truncated or altered)"
                raise CheckpointError(f"{path} is {state}; set run.resume_from=previous to resume from the "
                                      f"checkpoint before it (this one is left in place), or run.output_dir=<new "
                                      f"dir> to start a new run")


# torch's CheckpointException derives from BaseException: catch it, never Ctrl-C or exit
_FAILURES = (Exception, CheckpointException)


def _val_loss(ckpt: Path) -> float:
    try:
        val = json.loads((ckpt / STATE_FILE).read_text()).get("val_loss")
    except (OSError, ValueError, AttributeError):
        return float("inf")
    return float("inf") if val is None else val


def _damaged_file(dist_dir: Path, err: BaseException) -> str:
    """The shard file an exception names (torch's messages carry the path), else the exception's first line."""
    text = str(err)
    for shard in sorted(dist_dir.glob("*.distcp")):
        if shard.name in text:
            return f"{shard.name}: {_first_line(err)}"
    return f"{type(err).__name__}: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    return lines[-1][:200] if lines else type(err).__name__


def _rng_states() -> dict:
    from megatron.core import tensor_parallel

    states = {"cpu": torch.get_rng_state()}
    if on_gpu():
        states["cuda"] = torch.cuda.get_rng_state()
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    states.update({f"tracker/{name}": value for name, value in tracker.items()})
    return states


def _set_rng_states(states: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(states["cpu"])
    if "cuda" in states and on_gpu():
        torch.cuda.set_rng_state(states["cuda"])
    tracker = {k.split("/", 1)[1]: v for k, v in states.items() if k.startswith("tracker/")}
    if tracker:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
