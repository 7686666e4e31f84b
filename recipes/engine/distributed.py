"""Process groups for every entry point: torch.distributed + megatron parallel_state, nccl or gloo."""

from __future__ import annotations

import datetime
import os
import socket

import torch

from nemotune.recipes.engine import megatron_cpu


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend() -> str:
    return "nccl" if megatron_cpu.on_gpu() else "gloo"


def device() -> torch.device:
    if megatron_cpu.on_gpu():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> None:
    """Start torch.distributed (from torchrun's env, or a world of one) and megatron's parallel state.

    On a machine without CUDA this first switches megatron-core to the CPU (`nemotune.recipes.engine.megatron_cpu`).
    """
    from megatron.core import parallel_state, tensor_parallel

    megatron_cpu.enable_cpu_megatron()
    if not torch.distributed.is_initialized():
        if megatron_cpu.on_gpu():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ:  # torchrun / Slurm
            torch.distributed.init_process_group(backend=backend(), timeout=timeout)
        else:  # a world of one; the environment is left alone for the processes this one starts
            torch.distributed.init_process_group(backend=backend(), timeout=timeout, rank=0, world_size=1,
                                                 init_method=f"tcp://127.0.0.1:{_free_port()}")
    wanted = (tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size)
    if parallel_state.model_parallel_is_initialized() and wanted != _current_layout():
        parallel_state.destroy_model_parallel()  # another layout in the same process (tests, evaluation)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _current_layout() -> tuple:
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size())


def destroy_distributed() -> None:
    import sys

    if "megatron.core.parallel_state" not in sys.modules:  # never set up (a refused config): nothing to import
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank() -> int:
    """This process's global rank; before the process group exists, the launcher's RANK (torchrun sets it), so
    rank-0-only output stays rank-0-only from the first line."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_rank_zero() -> bool:
    return rank() == 0


def print_rank_zero(*args, **kwargs) -> None:
    if is_rank_zero():
        print(*args, **kwargs, flush=True)
