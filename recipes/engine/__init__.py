"""The training engine under the recipes: the megatron-core model builder, LoRA, distributed set-up (and the
one CPU adaptation of megatron-core), batches, the SupervisedTrainer, checkpointing, FLOP accounting, the
typed configuration, and generation / metrics for evaluation. Recipes tell their story over these pieces."""

from nemotune.recipes.engine.megatron_cpu import quiet_import_warnings

quiet_import_warnings()  # before any engine module imports megatron-core
