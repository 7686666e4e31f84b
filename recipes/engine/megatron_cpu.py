"""Run megatron-core on CPU (gloo) when CUDA is absent: the one place that adapts it.

megatron-core assumes a CUDA device in a handful of places that have nothing to do with the maths:
``torch.cuda.current_device()`` as the allocation device, the CUDA RNG tracker, CUDA streams and
``synchronize``, ``.cuda()`` copies, ``device="cuda"`` literals in the schedules / optimizer / grad
clipping, and ``param.type() == "torch.cuda.FloatTensor"`` checks in the optimizers. Everything else
(tensor/pipeline/data/sequence parallelism, the schedules, DDP, the distributed optimizer) runs unchanged
on gloo. This module redirects exactly those places to the CPU so CI exercises the real code paths.

`enable_cpu_megatron()` is idempotent and does nothing when CUDA is available: on a GPU machine
megatron-core runs untouched. It is called by `nemotune.recipes.engine.distributed.init_distributed` before any
megatron module builds a tensor. Every redirect is listed in `_REDIRECTS`; tests/test_foundation.py checks
the switch itself, and every multi-rank CPU test (TP / PP / SP / DP parity, LoRA layouts, training) runs
through the redirects.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types

import torch

_ENABLED = False

# megatron modules that build tensors with a literal device="cuda"; they see a torch whose tensor
# factories put "cuda" tensors on the CPU instead.
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.transformer.utils",  # the default causal mask
    "megatron.core.utils",  # the local multi_tensor_l2norm fallback (no apex)
)

# megatron functions that insist parameters are `torch.cuda.*Tensor`: inside them a CPU tensor reports
# the CUDA type name of its dtype.
_FUNCTIONS_CHECKING_CUDA_TYPES = (
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),  # imported by name there
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
)

_REDIRECTS = (
    "torch.cuda.current_device -> 'cpu'",
    "torch.cuda.synchronize / empty_cache / set_device -> no-op",
    "torch.cuda streams -> inert stream objects",
    "torch.cuda RNG (get/set_rng_state, manual_seed) -> the CPU generator",
    "torch.cuda memory statistics -> 0",
    "Tensor.cuda() -> the tensor on the CPU",
    "device='cuda' literals in " + ", ".join(_MODULES_WITH_CUDA_LITERALS),
    "Tensor.type() reports torch.cuda.* names inside the optimizer type checks",
)


def on_gpu() -> bool:
    """The one device decision of the project: CUDA when a device is present, else the CPU. Every
    `is it a GPU?` question in recipes/, converters/ and bench/ goes through here (converters/formats,
    below the engine, takes a device argument instead)."""
    return torch.cuda.is_available()


def accelerator() -> str:
    """"cuda" or "cpu": the device type for tensors and `.to()`."""
    return "cuda" if on_gpu() else "cpu"


# megatron-core warns at import, from four of its modules (and again in every rank), that Transformer Engine and
# Apex are missing: one fact, said once per command by quiet_import_warnings().
APEX_TE_MISSING = "Transformer Engine and Apex are not installed"
_said_apex_te = False


def is_gpt_model_deprecation(message: str) -> bool:
    """megatron-core 0.19 deprecates GPTModel in favour of HybridModel and says so at every model build.
    nemotune keeps GPTModel on purpose: it is the class 0.16 has (HybridModel does not exist there), it builds
    the same model on 0.19, and every test passes on 0.19.2 with it; the notice is dropped, nothing else."""
    text = message.lower()
    return "gptmodel" in text and "hybridmodel" in text and "deprecat" in text


class _DropGptModelDeprecation(logging.Filter):
    """The same notice when megatron logs it instead of warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_gpt_model_deprecation(record.getMessage())


def quiet_import_warnings() -> None:
    """Let megatron-core's "Transformer Engine and Apex are not installed" warning through once per command:
    the first occurrence on rank 0 (torchrun's RANK), reworded to cover all of them; the rest are dropped.
    megatron-core 0.19's GPTModel deprecation notice is dropped (:func:`is_gpt_model_deprecation`, warning or
    log record). Idempotent; other warnings pass unchanged."""
    import os
    import warnings

    previous = warnings.showwarning
    if getattr(previous, "nemotune_once", False):
        return
    drop = _DropGptModelDeprecation()
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).addFilter(drop)
    for handler in logging.getLogger().handlers:  # propagated records are filtered by the handlers, not loggers
        handler.addFilter(drop)

    def showwarning(message, category, filename, lineno, file=None, line=None):
        global _said_apex_te
        if is_gpt_model_deprecation(str(message)):
            return
        if APEX_TE_MISSING in str(message):
            if _said_apex_te or os.environ.get("RANK", "0") != "0":
                return
            _said_apex_te = True
            message = category(f"{APEX_TE_MISSING}: megatron-core uses its PyTorch fallbacks (optimizers, "
                               "multi-tensor ops); said once per command")
        previous(message, category, filename, lineno, file, line)

    showwarning.nemotune_once = True
    warnings.showwarning = showwarning


def cpu_mode() -> bool:
    """True when megatron runs on the CPU in this process (no CUDA device)."""
    return not on_gpu()


def is_enabled() -> bool:
    return _ENABLED


class _InertStream:
    """Stands in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None

    def wait_event(self, *args, **kwargs):
        pass


def _cpu_device(device):
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cpu")
    return device


class _TorchWithCpuForCuda(types.ModuleType):
    """A view of `torch` whose tensor factories map device='cuda' to the CPU; all else is torch."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "empty_like",
                  "ones_like", "full_like", "randn", "rand")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            @functools.wraps(attr)
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return attr(*args, **kwargs)
            return factory
        return attr


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cuda_type_names():
    original = torch.Tensor.type

    def type_as_cuda(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if args or kwargs:
            return name
        return _CUDA_TYPE_NAMES.get(name, name)

    torch.Tensor.type = type_as_cuda
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    if isinstance(fn, (staticmethod, classmethod)):
        return type(fn)(_with_cuda_type_names(fn.__func__))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _patch_torch_cuda():
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.Stream = _InertStream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.default_stream = lambda *a, **k: _InertStream()
    cuda.current_stream = lambda *a, **k: _InertStream()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    for stat in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, stat, lambda *a, **k: 0)
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self.to("cpu")


def _patch_megatron_rng():
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = lambda *a, clone=False, **k: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state())
    random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_cuda_literals():
    torch_for_cpu = _TorchWithCpuForCuda()
    for name in _MODULES_WITH_CUDA_LITERALS:
        module = importlib.import_module(name)
        module.torch = torch_for_cpu


def _patch_cuda_type_checks():
    for module_name, qualname in _FUNCTIONS_CHECKING_CUDA_TYPES:
        module = importlib.import_module(module_name)
        owner_name, _, attr = qualname.rpartition(".")
        owner = getattr(module, owner_name) if owner_name else module
        raw = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        setattr(owner, attr, _with_cuda_type_names(raw))


def enable_cpu_megatron() -> bool:
    """Redirect megatron-core's CUDA assumptions to the CPU. Returns True when active."""
    global _ENABLED
    if _ENABLED:
        return True
    if not cpu_mode():
        return False
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_cuda_literals()
    _patch_cuda_type_checks()
    _ENABLED = True
    return True
