"""Stand-in training payload for the Slurm tests (swap for `recipes.lora_sft` by dropping the
`cluster.module=<this file>` override): reads the same Hydra-style overrides the recipe takes
(run.output_dir, trainer.sft.max_steps), trains a tiny data-parallel model on gloo, and handles the
pre-timeout signal the way the trainer does (PreemptionHandler: collective stop, checkpoint, requeue,
exit 0; resume from the checkpoint on restart).

Writes under run.output_dir: metrics.jsonl ({"step", "train/loss", "restart"}), checkpoint.pt, and at
the end adapter/adapter_weights.pt + adapter/adapter_config.json.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from launchers.signals import PreemptionHandler


def overrides(argv):
    return dict(a.lstrip("+").split("=", 1) for a in argv if "=" in a)


def main() -> int:
    opts = overrides(sys.argv[1:])
    out = Path(opts["run.output_dir"])
    max_steps = int(opts.get("trainer.sft.max_steps", 20))
    step_sleep = float(os.environ.get("PAYLOAD_STEP_SLEEP", "0.2"))
    handler = PreemptionHandler()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"

    torch.manual_seed(0)
    weight = torch.zeros(4, requires_grad=True)
    target = torch.arange(4, dtype=torch.float32)
    opt = torch.optim.SGD([weight], lr=0.1)
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt)
        weight.data.copy_(state["weight"])
        opt.load_state_dict(state["optim"])
        start = state["step"] + 1
        if rank == 0:
            print(f"[payload] resumed from step {state['step']} (restart {restart})", flush=True)
    if rank == 0:
        print(f"[payload] world {world} on {os.uname().nodename}, steps {start}..{max_steps - 1}", flush=True)

    for step in range(start, max_steps):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step * world + rank))
        loss = ((x @ weight - x @ target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        dist.all_reduce(weight.grad)
        weight.grad /= world
        opt.step()
        dist.all_reduce(loss_t := loss.detach().clone())
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "train/loss": loss_t.item() / world, "restart": restart}) + "\n")
        time.sleep(step_sleep)
        if handler.should_stop():
            if rank == 0:
                torch.save({"step": step, "weight": weight.detach(), "optim": opt.state_dict()}, ckpt)
                print(f"[payload] signal {handler.received} -> checkpoint at step {step}", flush=True)
            dist.barrier()
            handler.requeue()
            dist.destroy_process_group()
            return 0

    if rank == 0:
        (out / "adapter").mkdir(exist_ok=True)
        torch.save({"weight": weight.detach()}, out / "adapter" / "adapter_weights.pt")
        (out / "adapter" / "adapter_config.json").write_text(json.dumps({"world": world, "steps": max_steps}))
        print("[payload] done", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
