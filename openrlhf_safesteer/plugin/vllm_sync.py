"""The policy's side of the weight sync to OpenRLHF's vLLM engines: LoRA as merged weights, and a check after each sync.

`VLLMWeightSync` is mixed into the policy's trainer before `rollout.HFWeightSync` (which handles the HF-generate
engines, `hf_rollout`); with vLLM engines it:
- on a machine without CUDA installs the transport shim before OpenRLHF builds the sync group (`vllm_cpu`);
- with a LoRA policy sends each adapted weight merged (W + B A * scale) under the base model's HF name. OpenRLHF
  0.11.2's `broadcast_to_vllm` sends the PEFT model's own parameters (`base_model.model....base_layer.weight`,
  `lora_A...`), names vLLM's `load_weights` does not have; the frozen base weights are already the engine's, so
  only the adapted ones travel, over OpenRLHF's own sync group and `update_weight` call;
- after every sync, full or LoRA, checks that the engine holds what was sent (`sync_guard`), and stops the run
  with a clear error where it does not, so no step trains on rollouts of a model that is not the policy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import ray
import torch

from openrlhf_safesteer.plugin import sync_guard, vllm_cpu

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."  # PeftModel's name prefix over the wrapped HF model


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{HF weight name of the base layer: PEFT LoRA layer} for every LoRA-adapted linear layer of `model`
    (empty for a model without LoRA)."""
    if not hasattr(model, "peft_config"):
        return {}
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(PEFT_PREFIX) + ".weight": module for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and hasattr(module.base_layer, "weight")}


def merged_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The base weight (out, in) plus the active adapter's delta (B A * scale), in the base weight's dtype: what an
    engine without the adapter must hold to compute what the adapted layer computes."""
    base = layer.base_layer.weight
    delta = layer.get_delta_weight(layer.active_adapters[0])
    return (base.data.float() + delta.float()).to(base.dtype)


class VLLMWeightSync:
    """ActorPPOTrainer methods for vLLM engines (module doc); with HF-generate engines they defer to the next class."""

    hf_rollout = True

    def _init_vllm_sync_group(self, backend: str):
        if self.hf_rollout or not vllm_cpu.active():
            return super()._init_vllm_sync_group(backend)
        import openrlhf.trainer.ray.ppo_actor as ppo_actor

        logger.info("vLLM on CPU: weight sync over gloo (plugin.vllm_cpu; --vllm.sync_backend is not read there)")
        with vllm_cpu.gloo_transport(ppo_actor):   # the name ActorPPOTrainer._init_vllm_sync_group calls
            super()._init_vllm_sync_group(backend)

    def broadcast_to_vllm(self):
        if self.hf_rollout:
            return super().broadcast_to_vllm()
        layers = lora_layers(self.actor.model.module)
        if layers:
            self._broadcast_merged_lora(layers)
        else:
            super().broadcast_to_vllm()
        self._check_engine_weights(layers)

    # ------------------------------------------------------------------ LoRA
    def _zero3(self) -> bool:
        return self.strategy.args.ds.zero_stage == 3

    def _merged(self, layers: dict[str, torch.nn.Module], names: list[str] | None = None
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, merged weight) per adapted layer, gathered under ZeRO-3 (every rank must iterate)."""
        import deepspeed

        for name, layer in layers.items():
            if names is not None and name not in names:
                continue
            with deepspeed.zero.GatheredParameters(list(layer.parameters()), enabled=self._zero3()):
                yield name, merged_weight(layer)

    def _broadcast_merged_lora(self, layers: dict[str, torch.nn.Module]) -> None:
        """OpenRLHF's broadcast path (`_broadcast_param` in ActorPPOTrainer.broadcast_to_vllm) for merged weights."""
        from openrlhf.utils.distributed_util import torch_dist_barrier_and_cuda_sync

        if self.use_cuda_ipc:   # refused before launch (config.refusals); say so if it is reached anyway
            raise NotImplementedError("LoRA with vLLM engines syncs by broadcast; the CUDA IPC path "
                                      "(--train.colocate_all with the nccl backend) is not supported")
        args = self.strategy.args.vllm
        rank0 = torch.distributed.get_rank() == 0
        resets = ([engine.reset_prefix_cache.remote() for engine in self.vllm_engines]
                  if rank0 and getattr(args, "enable_prefix_caching", False) else [])
        for count, (name, weight) in enumerate(self._merged(layers), start=1):
            if not rank0:
                continue
            refs = [engine.update_weight.remote(name, dtype=weight.dtype, shape=weight.shape,
                                                empty_cache=count == len(layers)) for engine in self.vllm_engines]
            if getattr(args, "sync_with_ray", False):
                import ray.util.collective as collective

                collective.broadcast(weight, 0, group_name=self._model_update_group)
            else:
                self._model_update_group.broadcast(weight, src=0, stream=torch.cuda.current_stream())
            ray.get(refs)
        if resets:
            ray.get(resets)
        torch_dist_barrier_and_cuda_sync()

    # ------------------------------------------------------------------ the check
    def _sent(self, layers: dict[str, torch.nn.Module]) -> dict[str, tuple[int, ...]]:
        """HF name -> shape of every tensor the sync sends (ZeRO-3 keeps the full shape in ds_shape)."""
        if layers:
            return {name: tuple(getattr(layer.base_layer.weight, "ds_shape", layer.base_layer.weight.shape))
                    for name, layer in layers.items()}
        return {name: tuple(getattr(param, "ds_shape", param.shape))
                for name, param in self.actor.model.module.named_parameters()}

    def _policy_fingerprints(self, layers: dict[str, torch.nn.Module], names: list[str]
                             ) -> dict[str, tuple[float, float]]:
        if layers:
            return {name: sync_guard.fingerprint(weight) for name, weight in self._merged(layers, names)}
        import deepspeed

        params = dict(self.actor.model.module.named_parameters())
        prints = {}
        for name in names:
            with deepspeed.zero.GatheredParameters([params[name]], enabled=self._zero3()):
                prints[name] = sync_guard.fingerprint(params[name].data)
        return prints

    def _check_engine_weights(self, layers: dict[str, torch.nn.Module]) -> None:
        """Every rank calls it (ZeRO-3 gathers); rank 0 compares and raises WeightSyncError on a mismatch."""
        self._syncs_checked = getattr(self, "_syncs_checked", 0) + 1
        rank0 = torch.distributed.get_rank() == 0
        names = getattr(self, "_sync_check_names", None)
        if names is None:
            chosen = [None]
            if rank0:
                sent = self._sent(layers)
                shapes = ray.get(self.vllm_engines[0].weight_shapes.remote(list(sent)))
                chosen = [sync_guard.pick(sync_guard.comparable(sent, shapes), sent)]
            torch.distributed.broadcast_object_list(chosen, src=0)
            names = self._sync_check_names = chosen[0]
        if not names:
            if rank0 and self._syncs_checked == 1:
                logger.warning("weight-sync check: the engine holds none of the sent tensors under the same name and "
                               "shape (a model vLLM renames or fuses throughout); the sync is not checked")
            return
        policy = self._policy_fingerprints(layers, names)
        if not rank0:
            return
        engine = [held for ranks in ray.get([e.weight_fingerprints.remote(names) for e in self.vllm_engines])
                  for held in ranks]
        lines = sync_guard.mismatches(policy, engine)
        if lines:
            raise sync_guard.sync_error(self._syncs_checked, lines)
        logger.info("weight sync %d checked: %d engine rank(s) hold the policy's %s", self._syncs_checked,
                    len(engine), ", ".join(names))
