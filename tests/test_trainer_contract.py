"""The SupervisedTrainer's contract without torch.distributed: the pure step plan and progress decision,
the resume rules (schedule followed, data order refused), and state_dict / load_state_dict round trips."""
import math
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from nemotune.recipes.engine.trainer import (DATA_ORDER_KEYS, Progress, ResumeRefused, SupervisedTrainer, TrainerState,
                                             check_progress, plan_steps, resume_changes)


def test_plan_counts_epochs_steps_and_intervals():
    plan = plan_steps(105, 4, max_epochs=1, max_steps=-1, val_check_interval=0.5, save_interval=-1)
    assert (plan.steps_per_epoch, plan.max_steps, plan.val_interval, plan.save_interval) == (26, 26, 13, 13)
    plan = plan_steps(105, 4, max_epochs=3, max_steps=8, val_check_interval=2, save_interval=3)
    assert (plan.max_steps, plan.val_interval, plan.save_interval) == (8, 2, 3)
    assert plan_steps(105, 4, max_epochs=2, max_steps=-1, val_check_interval=1.0, save_interval=-1).max_steps == 52
    with pytest.raises(ValueError, match="trainer.global_batch_size"):
        plan_steps(3, 4, max_epochs=1, max_steps=-1, val_check_interval=1.0, save_interval=-1)


@pytest.mark.parametrize("step, kwargs, expected", [
    (1, {}, Progress(validate=False, save=False, stop=False)),
    (2, {}, Progress(validate=True, save=False, stop=False)),
    (3, {}, Progress(validate=False, save=True, stop=False)),
    (6, {}, Progress(validate=True, save=True, stop=False)),
    (7, {}, Progress(validate=True, save=True, stop=True, reason="max_steps")),
    (1, {"preempted": True}, Progress(validate=False, save=True, stop=True, reason="preempted")),
    (4, {"stop_after_steps": 2, "steps_this_process": 2}, Progress(validate=True, save=True, stop=True,
                                                                   reason="stop_after_steps")),
    (5, {"stop_after_steps": 2, "steps_this_process": 1}, Progress(validate=False, save=False, stop=False)),
    (7, {"preempted": True}, Progress(validate=True, save=True, stop=True, reason="max_steps")),
])
def test_progress_decision(step, kwargs, expected):
    assert check_progress(step=step, max_steps=7, val_interval=2, save_interval=3, **kwargs) == expected


SAVED = {"trainer.sft.max_steps": 4, "trainer.sft.max_epochs": 1, "trainer.optim.lr": 3e-3,
         "trainer.optim.min_lr": 0.0, "trainer.optim.warmup_steps": 2, "trainer.optim.scheduler": "cosine",
         "run.seed": 1234, "trainer.global_batch_size": 4, "trainer.train_split": "sft", "data.packing": False,
         "train samples": 105, "train data (sha256 of the prepared split)": "ab" * 32}


def test_raised_max_steps_is_followed_and_stated_in_one_line():
    notes = resume_changes(SAVED, {**SAVED, "trainer.sft.max_steps": 8}, ckpt="step4", stage="sft", max_steps=8,
                           step=4)
    assert len(notes) == 1
    assert notes[0].startswith("resume: trainer.sft.max_steps 4 -> 8: the cosine schedule now ends at step 8")
    assert resume_changes(SAVED, dict(SAVED), ckpt="step4", stage="sft", max_steps=4, step=4) == []


def test_lowered_max_steps_says_nothing_is_left_to_train():
    notes = resume_changes({**SAVED, "trainer.sft.max_steps": 8}, SAVED, ckpt="c", stage="sft", max_steps=4, step=6)
    assert notes == ["resume: trainer.sft.max_steps 8 -> 4: the run is already at step 6 of 4; nothing to train"]


@pytest.mark.parametrize("key", DATA_ORDER_KEYS)
def test_a_changed_data_order_is_refused_naming_the_key(key):
    changed = {**SAVED, key: "cd" * 32 if isinstance(SAVED[key], str) else
               (not SAVED[key] if isinstance(SAVED[key], bool) else SAVED[key] + 1)}
    with pytest.raises(ResumeRefused, match="run.output_dir") as err:
        resume_changes(SAVED, changed, ckpt="run/checkpoints/step0000004", stage="sft", max_steps=4, step=4)
    assert key in str(err.value) and "run/checkpoints/step0000004" in str(err.value)


def test_a_checkpoint_without_a_recorded_key_is_not_refused_for_it():
    older = {k: v for k, v in SAVED.items() if k != "train data (sha256 of the prepared split)"}
    assert resume_changes(older, SAVED, ckpt="c", stage="sft", max_steps=4, step=4) == []


def _bare_trainer(max_steps: int, lr: float = 3e-3):
    """A SupervisedTrainer's state-holding part, without process groups or a model."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from nemotune.recipes.engine.builders import build_scheduler

    cfg = OmegaConf.create({
        "run": {"seed": 1234}, "data": {"packing": False}, "peft": {"peft_scheme": "lora"},
        "trainer": {"global_batch_size": 4, "train_split": "sft",
                    "sft": {"max_steps": max_steps, "max_epochs": 1},
                    "optim": {"lr": lr, "min_lr": 0.0, "warmup_steps": 2, "scheduler": "cosine",
                              "weight_decay": 0.01}}})
    trainer = SupervisedTrainer.__new__(SupervisedTrainer)
    optimizer = SimpleNamespace(param_groups=[{"lr": 0.0}])
    trainer.cfg, trainer.stage, trainer.state = cfg, "sft", TrainerState()
    trainer.global_batch_size, trainer.train_samples, trainer.data_fingerprint = 4, [None] * 105, "ab" * 32
    trainer.max_steps = max_steps
    trainer.scheduler = build_scheduler(cfg, optimizer, max_steps)
    assert isinstance(trainer.scheduler, OptimizerParamScheduler)
    return trainer, optimizer


def test_state_dict_round_trip_restores_progress_and_the_schedule_position():
    source, _ = _bare_trainer(max_steps=8)
    for _ in range(3):
        source.scheduler.step(increment=1)
    source.state.step, source.state.consumed_samples, source.state.epoch = 3, 12, 12 / 104
    source.state.last_val_loss, source.state.best_val_loss = 6.5, 6.4
    payload = source.state_dict()
    target, optimizer = _bare_trainer(max_steps=8)
    target.load_state_dict(payload)
    assert (target.state.step, target.state.consumed_samples, target.state.epoch) == (3, 12, 12 / 104)
    assert (target.state.last_val_loss, target.state.best_val_loss) == (6.5, 6.4)
    assert target.scheduler.num_steps == source.scheduler.num_steps == 4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(source.scheduler.get_lr(optimizer.param_groups[0]))
    assert target.resume_notes == [] and target.state_dict()["config"] == payload["config"]


def test_resume_with_raised_max_steps_continues_on_the_longer_schedule():
    short, _ = _bare_trainer(max_steps=4)
    short.scheduler.step(increment=4)  # after step 4
    short.state.step, short.state.consumed_samples = 4, 16
    longer, optimizer = _bare_trainer(max_steps=8)
    longer.cfg.trainer.sft.max_steps = 8
    longer.load_state_dict(short.state_dict())
    reference, ref_optimizer = _bare_trainer(max_steps=8)
    reference.scheduler.step(increment=4)
    assert optimizer.param_groups[0]["lr"] > 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(ref_optimizer.param_groups[0]["lr"])
    assert math.isclose(longer.scheduler.lr_decay_steps, 9)
    assert longer.resume_notes and "now ends at step 8" in longer.resume_notes[0]
