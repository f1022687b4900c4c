"""What the OpenRLHF engine needs from its environment: the OpenRLHF check (`versions` says which releases), import
stand-ins for the two CUDA-only packages on machines without them, and CPU shims.

Nothing here is needed on a GPU machine with flash-attn and vLLM installed: each function checks
first and does nothing there. Importing this module changes nothing: the stand-ins are installed by the
processes that import OpenRLHF, the launcher (`prepare_process()` before OpenRLHF's entry point runs) and
every Ray worker of its job (`worker_setup`, Ray's worker_process_setup_hook, before the worker unpickles
an actor class whose module imports OpenRLHF). "Is vLLM / flash-attn here?" (`vllm_available`,
`flash_attn_available`, `openrlhf_safesteer.optional`) answers for the real package: a stand-in carries
STAND_IN_MARK and never counts.

Stand-ins (CPU machines only, clearly not the real thing):
- `flash_attn`: `openrlhf.models` imports `flash_attn.bert_padding` at module import (ring attention
  and sample packing). The stand-in lets the import succeed; calling any of its functions raises,
  because packing without flash-attn's varlen kernels would let samples attend to each other.
- `vllm`: `openrlhf.trainer.ray` imports vLLM at module import, and the sample generator builds
  `vllm.SamplingParams`. The stand-in provides a plain `SamplingParams` (the fields OpenRLHF sets)
  and nothing else; the engine itself is replaced by the HF-generate rollout actor
  (`openrlhf_safesteer.plugin.rollout`), which is real generation with transformers.

CPU shims: OpenRLHF (0.10.2 to 0.11.2) calls `torch.cuda.set_device/current_device/synchronize/current_stream` and builds a
"cuda" device mesh unconditionally. On a machine without CUDA they are pointed at the CPU, the
DeepSpeed optimizer is told to use torch's AdamW (DeepSpeed's CPU FusedAdam is a 2-minute JIT
build), and DeepSpeed's shared-memory comm op (a 90 s JIT build) is skipped; DeepSpeed then runs
with its CPU accelerator and the gloo backend.
"""

from __future__ import annotations

import functools
import importlib.machinery
import logging
import os
import sys
import types
import uuid
from typing import Any

from openrlhf_safesteer.optional import STAND_IN_MARK, really_installed
from openrlhf_safesteer.optional import vllm_installed as vllm_available  # the real package, never the stand-in
from openrlhf_safesteer.plugin import versions

logger = logging.getLogger(__name__)

# Which OpenRLHF releases run, and what each lacks, is `versions`' business; these names are kept for callers.
SUPPORTED_OPENRLHF = versions.TESTED
UnsupportedOpenRLHFError = versions.UnsupportedOpenRLHFError
openrlhf_version = versions.installed_version


def check_openrlhf_version() -> str:
    """The installed OpenRLHF's version; UnsupportedOpenRLHFError (one line) unless it is 0.10.2 or newer
    (a warning for a release newer than the tested range). Reads files only: nothing of OpenRLHF is imported."""
    return versions.check_installed()


def flash_attn_available() -> bool:
    return really_installed("flash_attn")


def _stand_in_module(name: str, **attrs: Any) -> types.ModuleType:
    # A real module object with a spec: transformers probes optional packages with find_spec and
    # importlib.metadata; a MagicMock breaks those probes, a ModuleType does not (and
    # importlib.metadata still says "not installed", so transformers does not try to use it).
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    module.__path__ = []
    module.__file__ = f"<safesteer stand-in for {name}>"
    setattr(module, STAND_IN_MARK, True)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def _unavailable(what: str):
    def call(*args, **kwargs):
        raise RuntimeError(
            f"{what} is a stand-in on this machine (flash-attn is not installed): sample packing "
            "(--ds.packing_samples) and ring attention need the real flash-attn kernels, which need CUDA."
        )

    call.__name__ = what.rsplit(".", 1)[-1]
    return call


class SamplingParams:
    """Stand-in for vllm.SamplingParams: the fields OpenRLHF's sample generator sets, nothing else.

    Only used where vLLM is not installed; the HF-generate rollout actor reads these fields.
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, max_tokens: int | None = 16,
                 min_tokens: int = 0, skip_special_tokens: bool = True, logprobs: int | None = None,
                 seed: int | None = None, **extra: Any) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.skip_special_tokens = skip_special_tokens
        self.logprobs = logprobs
        self.seed = seed
        self.extra = extra

    def __repr__(self) -> str:
        return f"SamplingParams(stand-in, {self.__dict__})"


SamplingParams.__module__ = "vllm"  # pickled by reference as vllm.SamplingParams on every worker


def install_import_stand_ins() -> list[str]:
    """Register the flash_attn / vllm stand-ins for whichever of them is not installed.

    Returns the names installed (empty on a GPU machine with both packages).
    """
    installed = []
    if not flash_attn_available() and "flash_attn" not in sys.modules:
        import einops

        bert_padding = _stand_in_module(
            "flash_attn.bert_padding",
            index_first_axis=_unavailable("flash_attn.bert_padding.index_first_axis"),
            pad_input=_unavailable("flash_attn.bert_padding.pad_input"),
            unpad_input=_unavailable("flash_attn.bert_padding.unpad_input"),
            rearrange=einops.rearrange,
        )
        distributed = _stand_in_module("flash_attn.utils.distributed",
                                       all_gather=_unavailable("flash_attn.utils.distributed.all_gather"))
        utils = _stand_in_module("flash_attn.utils", distributed=distributed)
        root = _stand_in_module("flash_attn", __version__="0.0.0+safesteer.stand.in", bert_padding=bert_padding,
                                utils=utils)
        for module in (root, bert_padding, utils, distributed):
            sys.modules[module.__name__] = module
        installed.append("flash_attn")
    if not vllm_available() and "vllm" not in sys.modules:
        inputs = _stand_in_module("vllm.inputs", TokensPrompt=dict)
        utils = _stand_in_module("vllm.utils", random_uuid=lambda: uuid.uuid4().hex)
        root = _stand_in_module(
            "vllm", __version__="0.0.0+safesteer.stand.in", SamplingParams=SamplingParams, inputs=inputs,
            utils=utils, AsyncEngineArgs=_no_vllm_engine, AsyncLLMEngine=_no_vllm_engine,
        )
        for module in (root, inputs, utils):
            sys.modules[module.__name__] = module
        installed.append("vllm")
    if installed:
        _unlisted_in_transformers(installed)
        logger.info("registered CPU import stand-ins for %s (not installed here)", ", ".join(installed))
    return installed


def _unlisted_in_transformers(names: list[str]) -> None:
    """Give each stand-in an entry, naming no installed distribution, in transformers' import-name -> distribution
    map. transformers 5.5-5.7 (OpenRLHF 0.10.x's pins) find the stand-in with find_spec, then index that map by its
    import name and raise KeyError (is_flash_attn_2_available); with the entry they read it as not installed."""
    try:
        from transformers.utils import import_utils
    except ImportError:
        return
    mapping = getattr(import_utils, "PACKAGE_DISTRIBUTION_MAPPING", None)
    if isinstance(mapping, dict):
        for name in names:
            mapping.setdefault(name, [f"{name}-safesteer-stand-in"])


def _no_vllm_engine(*args, **kwargs):
    raise RuntimeError("vLLM is not installed on this machine: use the HF-generate rollout "
                       "(--safesteer.rollout hf) or install vllm on a GPU machine")


# --------------------------------------------------------------------------------------------- CPU


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def configure_cpu_environment() -> None:
    """Environment variables a CPU run needs before deepspeed is imported (idempotent)."""
    if cuda_present():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _ds_train_config_with_torch_adam(original):
    @functools.wraps(original)
    def get_train_ds_config(*args, **kwargs):
        config = original(*args, **kwargs)
        optimizer = config.get("optimizer")
        if optimizer and optimizer.get("type") == "AdamW":
            # DeepSpeed would build its fused CPU Adam op (a C++ JIT build of minutes); torch's
            # AdamW is the same update.
            optimizer.setdefault("params", {})["torch_adam"] = True
        return config

    get_train_ds_config._safesteer_cpu = True
    return get_train_ds_config


def _device_mesh_on_cpu(original):
    @functools.wraps(original)
    def init_device_mesh(device_type, *args, **kwargs):
        return original("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    init_device_mesh._safesteer_cpu = True
    return init_device_mesh


CPU_DTYPE_ENV = "SAFESTEER_CPU_DTYPE"


def _fp32_aware(original):
    @functools.wraps(original)
    def convert_to_torch_dtype(param_dtype: str):
        import torch

        return torch.float32 if param_dtype == "fp32" else original(param_dtype)

    convert_to_torch_dtype._safesteer_cpu = True
    return convert_to_torch_dtype


def apply_cpu_dtype(args) -> None:
    """SAFESTEER_CPU_DTYPE=fp32 on a machine without CUDA: train in float32 instead of --ds.param_dtype.

    OpenRLHF's parsers offer bf16 and fp16 only (GPU precisions). On a CPU, float32 is the local engine's
    precision, so a CPU comparison of the two engines, or of SafeSteer and the stock trainers, trains
    every arm in the same precision. DeepSpeed then runs without its bf16/fp16 modes (plain fp32 AdamW).
    """
    value = os.environ.get(CPU_DTYPE_ENV)
    if not value or cuda_present():
        return
    if value != "fp32":
        raise ValueError(f"{CPU_DTYPE_ENV} must be fp32 (or unset), got {value!r}")
    args.ds.param_dtype = "fp32"


def install_cpu_shims() -> bool:
    """Point OpenRLHF's unconditional CUDA calls at the CPU. Does nothing when CUDA is present.

    Returns True when the shims are active. Safe to call many times (each Ray worker calls it).
    """
    if cuda_present():
        return False
    configure_cpu_environment()
    import torch

    if not getattr(torch.cuda, "_safesteer_cpu", False):
        torch.cuda.set_device = lambda *args, **kwargs: None
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.synchronize = lambda *args, **kwargs: None
        torch.cuda.empty_cache = lambda: None
        # ActorPPOTrainer.broadcast_to_vllm passes stream=torch.cuda.current_stream() to the sync group's broadcast
        # (OpenRLHF's vLLM path on a CPU, plugin/vllm_cpu.py: the gloo group there ignores it).
        torch.cuda.current_stream = lambda *args, **kwargs: None
        torch.cuda._safesteer_cpu = True

    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", {})
    for name in list(compatible):
        if "shm" in name:
            # deepspeed.init_distributed would JIT-compile the shared-memory all-reduce (~90 s).
            compatible[name] = False

    import openrlhf.utils.deepspeed.deepspeed as ds_strategy

    if not getattr(ds_strategy.get_train_ds_config, "_safesteer_cpu", False):
        ds_strategy.get_train_ds_config = _ds_train_config_with_torch_adam(ds_strategy.get_train_ds_config)
    if not getattr(ds_strategy.init_device_mesh, "_safesteer_cpu", False):
        ds_strategy.init_device_mesh = _device_mesh_on_cpu(ds_strategy.init_device_mesh)
    import openrlhf.utils.utils as openrlhf_utils

    # Actor and the reward/critic model loaders import it from this module at call time.
    if not getattr(openrlhf_utils.convert_to_torch_dtype, "_safesteer_cpu", False):
        openrlhf_utils.convert_to_torch_dtype = _fp32_aware(openrlhf_utils.convert_to_torch_dtype)
    return True


def prepare_process() -> None:
    """Everything a process (driver or Ray worker) needs before it touches OpenRLHF."""
    configure_cpu_environment()
    install_import_stand_ins()
    install_cpu_shims()


# ------------------------------------------------------------------------------------------ Ray workers

# Ray runs this in every worker process of the job before the worker unpickles an actor class or a task
# (ray.init(runtime_env={"worker_process_setup_hook": ...}), see install.ensure_ray): the SafeSteer actors'
# modules subclass OpenRLHF's classes, and OpenRLHF's modules import flash_attn and vllm at import.
WORKER_SETUP_HOOK = f"{__name__}.worker_setup"


def worker_setup() -> None:
    """A Ray worker's setup before it imports any SafeSteer actor module: the CPU environment variables and the
    import stand-ins for whichever of flash_attn / vllm is not installed (a no-op on a GPU machine with both).
    The CPU shims, which import DeepSpeed and OpenRLHF, are installed by each actor's __init__
    (prepare_process), not here: a worker that runs no OpenRLHF code does not pay for them."""
    configure_cpu_environment()
    install_import_stand_ins()


def stand_ins_needed() -> list[str]:
    """The CUDA-only packages OpenRLHF imports that are not really installed here (each gets a stand-in)."""
    return [name for name, present in (("flash_attn", flash_attn_available()), ("vllm", vllm_available()))
            if not present]
