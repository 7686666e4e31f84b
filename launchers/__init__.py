"""Launchers: local torchrun and multi-node Slurm (sbatch, pyxis containers), with dry-run rendering.

`python -m launchers experiment=<name> cluster=slurm cluster.nodes=4 [--dry-run]` (= `nemotune launch`).
"""


def main(argv=None) -> int:
    from launchers.cli import main as _main

    return _main(argv)
