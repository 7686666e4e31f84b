"""`nemotune launch` / `python -m nemotune.recipes.launch`: compose the training config, validate it, then run it with
torchrun here (cluster=local) or render + submit an sbatch job (cluster=slurm)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from nemotune.launchers.config import cluster_config, host_path, validate_cluster

USAGE = """\
nemotune launch [--dry-run] [--config-name NAME] [hydra overrides ...]

Composes the same config as training (conf/<config-name>.yaml, default lora_sft) with your overrides,
validates it (every problem at once, nothing is started or submitted while any remains), then:
  cluster=local   runs `torchrun -m nemotune.recipes.lora_sft <overrides>` on this machine
  cluster=slurm   writes an sbatch script under cluster.output_dir and submits it (prints the job id);
                  an experiment with `stages` becomes one job per stage, chained with afterok
  --dry-run       prints the torchrun command / sbatch script(s) instead

Examples:
  nemotune launch experiment=tiny_lora cluster=local cluster.nproc_per_node=2
  nemotune launch experiment=nano8b_fiqa_lora cluster=slurm cluster.nodes=4 cluster.partition=batch \\
      cluster.account=myacct cluster.time=08:00:00 --dry-run
  nemotune launch experiment=nano8b_fiqa_lora cluster=slurm_ngc cluster.container_image=/images/nemotune.sqsh
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nemotune launch", usage=USAGE, add_help=True)
    p.add_argument("--dry-run", action="store_true", help="print the command/script instead of running it")
    p.add_argument("--config-name", default="lora_sft", help="root config in conf/ (default lora_sft)")
    p.add_argument("--config-dir", default=None, help=argparse.SUPPRESS)  # tests: a config dir on disk
    p.add_argument("overrides", nargs="*", help="Hydra overrides: experiment=<name> cluster=slurm key=value")
    return p


def compose(config_name: str, overrides: Sequence[str], config_dir: Optional[str] = None):
    if config_dir is None:
        from nemotune.recipes.engine.config import compose as compose_root

        return compose_root(config_name, list(overrides))
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def check(cfg, *, full: bool) -> List[str]:
    """All problems: the recipe's validate (which includes validate_cluster; paths seen through a container
    job's mounts) for the real conf/ tree; validate_cluster alone for a bare test config."""
    from nemotune.recipes.engine.config import ConfigError, validate

    problems: List[str] = []
    if full:
        try:
            cluster = cluster_config(cfg.cluster)
            mapping = (lambda path: host_path(cluster, path))
        except Exception:  # a malformed cluster node: validate_cluster names it
            mapping = None
        try:
            validate(cfg, host_path=mapping)
        except ConfigError as err:
            problems.extend(err.problems)
    for p in validate_cluster(cfg):
        if p not in problems:
            problems.append(p)
    return problems


def needs(cfg, overrides: Sequence[str]) -> List[str]:
    """What the job will read, checked here before it queues: the prepared data (through the container
    mounts for a container job), naming the prep command that writes it."""
    from nemotune.recipes.engine.config import prepared_data_problems

    cluster = cluster_config(cfg.cluster)
    return prepared_data_problems(cfg, overrides, host_path=lambda path: host_path(cluster, path))


def _refuse(problems: List[str]) -> int:
    """Exit 2, one line per problem (one problem: one line), saying that nothing ran."""
    if len(problems) == 1:
        print(f"nemotune launch: nothing was started or submitted: {problems[0]}", file=sys.stderr)
    else:
        print(f"nemotune launch: invalid configuration ({len(problems)} problems); nothing was started or "
              "submitted:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = compose(args.config_name, args.overrides, args.config_dir)
    except Exception as err:  # ConfigError (unknown key/experiment), Hydra's composition errors
        from nemotune.recipes.engine.config import ConfigError, compose_error

        problems = err.problems if isinstance(err, ConfigError) else [compose_error(err)]
        return _refuse(problems)
    problems = check(cfg, full=args.config_dir is None)
    if not problems and args.config_dir is None:
        problems = needs(cfg, args.overrides)
    if problems:
        return _refuse(problems)

    from nemotune.launchers.slurm import SubmitError, render_jobs, submit_jobs
    from nemotune.launchers.torchrun import entry_argv, run_local

    cluster = cluster_config(cfg.cluster)
    overrides = list(args.overrides)
    if cluster.kind == "local":
        staged = bool(cfg.get("stages"))
        return run_local(cluster, entry_argv(cluster.module, overrides, staged=staged), dry_run=args.dry_run)
    jobs = render_jobs(cfg, overrides)
    try:
        submit_jobs(cluster, jobs, dry_run=args.dry_run)
    except (SubmitError, FileNotFoundError) as err:
        print(f"nemotune launch: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
