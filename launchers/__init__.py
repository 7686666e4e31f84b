"""Launchers: local torchrun and multi-node Slurm (sbatch, pyxis containers), rendered from the cluster config.

The `nemotune launch` story (compose, validate, then run or submit) is `nemotune.recipes.launch`.
"""
