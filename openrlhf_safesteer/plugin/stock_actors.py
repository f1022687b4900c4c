"""The Ray actor classes of `plugin.stock` (OpenRLHF's own PPO on a machine without a GPU): OpenRLHF's policy
actor and PPO controller with the CPU shims, the policy syncing its weights to the HF-generate engines.

Imports OpenRLHF at module level (it subclasses OpenRLHF's classes), and OpenRLHF imports flash_attn and vllm:
where those are not installed, import it after `compat.prepare_process()` (`stock.run` does) or in a Ray worker
set up by `compat.worker_setup` (install.ensure_ray starts Ray with it). Importing it installs nothing.
"""

from __future__ import annotations

import ray
from openrlhf.trainer.ppo_trainer import PPOTrainer
from openrlhf.trainer.ray.launcher import ReferenceModelActor
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer, PolicyModelActor

from openrlhf_safesteer.plugin import compat
from openrlhf_safesteer.plugin.actor_window import install_response_window
from openrlhf_safesteer.plugin.experience import Tracked, seeded_samples
from openrlhf_safesteer.plugin.policy import init_with_trainer
from openrlhf_safesteer.plugin.rollout import HFWeightSync


class HFSyncActorPPOTrainer(HFWeightSync, ActorPPOTrainer):
    """OpenRLHF's ActorPPOTrainer, syncing weights to HF-generate engines (nothing else differs)."""


class CPUPolicyActor(PolicyModelActor.__ray_actor_class__):
    """OpenRLHF's PolicyModelActor in a worker with the CPU shims, training with HFSyncActorPPOTrainer, its Actor's
    log-probs computed from the response window's logits only (`actor_window`: the same values, a third of the LM
    head's work on the demo's batches)."""

    def __init__(self, *args, **kwargs):
        compat.prepare_process()
        super().__init__(*args, **kwargs)

    def init_model_from_pretrained(self, *args, **kwargs):
        init_with_trainer(self, HFSyncActorPPOTrainer, *args, **kwargs)
        install_response_window(self.actor, self.strategy)


class CPUReferenceActor(ReferenceModelActor.__ray_actor_class__):
    """OpenRLHF's ReferenceModelActor (the PPO baseline's KL anchor, the frozen base) in a worker with the CPU shims;
    nothing else differs."""

    def __init__(self, *args, **kwargs):
        compat.prepare_process()
        super().__init__(*args, **kwargs)


class CPUPPOTrainer(PPOTrainer.__ray_actor_class__):
    """OpenRLHF's PPOTrainer (the single controller) in a worker with the CPU shims, its sample generator the
    repeatable one (`plugin.samples`: seeded requests, a step barrier, results in dispatch order)."""

    def __init__(self, pretrain, strategy, *args, **kwargs):
        compat.prepare_process()
        with seeded_samples(int(strategy.args.train.seed)):
            super().__init__(pretrain, strategy, *args, **kwargs)


CPUPolicyActorRemote = ray.remote(num_gpus=0)(CPUPolicyActor)
CPUReferenceActorRemote = ray.remote(num_gpus=0)(CPUReferenceActor)
CPUPPOTrainerRemote = Tracked(ray.remote(num_cpus=0)(CPUPPOTrainer))
