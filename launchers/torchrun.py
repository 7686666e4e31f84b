"""torchrun command lines from a cluster config, and the local launcher (cluster=local).

One builder serves both launchers: locally it is run as a subprocess, under Slurm it becomes the command
of each node's srun task (with Slurm's variables in place of node count, rank and head node).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, List, Mapping, Optional, Sequence

from nemotune.launchers.config import cluster_config

DEFAULT_MODULE = "nemotune.recipes.lora_sft"
STAGED_MODULE = "nemotune.recipes.two_stage"


def entry_argv(module: Optional[str], overrides: Sequence[str], *, staged: bool = False) -> List[str]:
    """What torchrun starts: `-m module` or a script path (ends with .py), followed by the Hydra overrides."""
    module = module or (STAGED_MODULE if staged else DEFAULT_MODULE)
    target = [module] if module.endswith(".py") else ["-m", module]
    return [*target, *overrides]


def torchrun_argv(cluster: Any, entry: Sequence[str], *, python: Optional[str] = None,
                  nnodes: Any = None, node_rank: Any = None, rdzv_endpoint: Optional[str] = None,
                  rdzv_id: Optional[str] = None, log_dir: Optional[str] = None) -> List[str]:
    """`python -m torch.distributed.run ...` for one node (one agent); `cluster` is read as a ClusterConfig.

    Single node without an explicit endpoint: `--standalone` (a private c10d store on a free localhost
    port, so concurrent runs never collide). Otherwise multi-node flags: --nnodes, --node_rank,
    --rdzv_backend, --rdzv_endpoint, --rdzv_id. `nnodes`/`node_rank`/`rdzv_endpoint` may be shell
    expressions (the Slurm script passes "$SLURM_NNODES", "$SLURM_NODEID", "$HEAD_NODE:$PORT").
    With `log_dir`, every rank's lines carry its local rank (`[default1]:`) and land in per-rank files there.
    """
    c = cluster_config(cluster)
    python = python or c.python or sys.executable
    nnodes = c.nodes if nnodes is None else nnodes
    argv = [python, "-m", "torch.distributed.run", f"--nproc_per_node={c.nproc_per_node}"]
    endpoint = rdzv_endpoint or c.rdzv_endpoint
    if str(nnodes) == "1" and not endpoint:
        argv.append("--standalone")
    else:
        node_rank = c.node_rank if node_rank is None else node_rank
        argv += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--rdzv_backend={c.rdzv_backend}",
                 f"--rdzv_endpoint={endpoint}", f"--rdzv_id={rdzv_id or c.job_name}"]
    if c.max_restarts:
        argv.append(f"--max_restarts={c.max_restarts}")
    if log_dir:
        argv += ["--tee=3", f"--log-dir={log_dir}"]
    return [*argv, *entry]


def run_local(cluster: Any, entry: Sequence[str], *, dry_run: bool = False,
              env: Optional[Mapping[str, str]] = None) -> int:
    """cluster=local: run torchrun here (foreground), with cluster.env exported; returns its exit code."""
    c = cluster_config(cluster)
    argv = torchrun_argv(c, entry)
    if dry_run:
        print(" ".join(_quote(a) for a in argv))
        return 0
    child_env = dict(os.environ, **{str(k): str(v) for k, v in c.env.items()})
    child_env.update(env or {})
    return subprocess.call(argv, env=child_env, cwd=c.workdir or None)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
