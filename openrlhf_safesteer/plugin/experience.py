"""The SafeSteer experience maker, the trainer that uses it, and the actor group that places no
reward model.

Per micro-batch of rollouts the maker asks the steered reference actor for the teacher's log-probs (sampled
tokens and S) and, for the sampled objective, the policy actor for the student's, then:
- objective `exact`: attaches the teacher's (B, A, K) log-probs on S to the experience (the policy
  step computes the loss from them); advantages are zero and unused;
- objective `sampled`: sets advantage_t = -[y_t in S] (log p_s(y_t) - log p_t(y_t) + 1) per token
  (core `sampled_advantages`): no reward, no critic, no whitening or group baseline that would mix
  tokens or sequences.
With --safesteer.coeff_key, each prompt's teacher scale (its label: 1 harmful, 0 retain) goes to the teacher
actor, which steers each row with coeff * scale (docs/METHOD.md section 8: the retain rows' teacher is the
unsteered base, so the same loss pulls the student back to the base on them).
With the sampled objective it logs per sequence the KL over S, the student's and teacher's mass on S, and the
sampled-token log-ratio (`kl`); with the exact objective the policy step logs the same from its own forward
(`safesteer/kl_on_S`, ...), so no student forward is spent on logs. OpenRLHF logs the response length. Rewards are zero (SafeSteer has none).

Imports OpenRLHF at module level (it subclasses OpenRLHF's classes), and OpenRLHF imports flash_attn and vllm:
where those are not installed, import it after `compat.prepare_process()` (the launcher does) or in a Ray worker
set up by `compat.worker_setup` (install.ensure_ray starts Ray with it). Importing it installs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import List

import ray
import torch
from openrlhf.models.utils import masked_mean
from openrlhf.trainer.ppo_trainer import PPOTrainer
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
from openrlhf.trainer.ray.launcher import RayActorGroup, RewardModelActor
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from openrlhf_safesteer.objectives import sampled_advantages
from openrlhf_safesteer.plugin import compat
from openrlhf_safesteer.plugin.config import teacher_scale
from openrlhf_safesteer.plugin.dump import save_dump
from openrlhf_safesteer.plugin.policy import TEACHER_ON_S

logger = logging.getLogger(__name__)

TEACHER_SAMPLED = "safesteer_teacher_logprobs"

# Every actor this driver placed, so the launcher can end them when training returns (OpenRLHF's
# train() leaves them to the end of the driver process, which in a shared session never comes).
LAUNCHED: list = []


def per_sequence_safety(student_on_s: torch.Tensor, teacher_on_s: torch.Tensor, mask: torch.Tensor) -> dict:
    """Per-sequence token means (B,) of the KL over S and the mass on S of student and teacher."""
    student_on_s, teacher_on_s, mask = student_on_s.float(), teacher_on_s.float(), mask.float()
    kl = (student_on_s.exp() * (student_on_s - teacher_on_s)).sum(-1)
    return {
        "kl_on_S": masked_mean(kl, mask, dim=-1),
        "student_mass_on_S": masked_mean(student_on_s.exp().sum(-1), mask, dim=-1),
        "teacher_mass_on_S": masked_mean(teacher_on_s.exp().sum(-1), mask, dim=-1),
    }


def teacher_scales(labels: list, key: str) -> torch.Tensor:
    """(B,) float: each row's teacher scale, read from the prompt labels that carry --safesteer.coeff_key."""
    return torch.tensor([teacher_scale(label, key) for label in labels], dtype=torch.float32)


class SafeSteerExperienceMaker(RemoteExperienceMaker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.safesteer = self.args.safesteer
        self.safety_ids = torch.tensor(self.safesteer.safety_ids, dtype=torch.long)
        self._batches = 0

    @torch.no_grad()
    def make_experience(self, samples_list: List[Experience]) -> List[Experience]:
        args = self.args
        duplicate = args.ds.ring_attn_size * args.ds.tensor_parallel_size
        forward_kwargs = dict(
            sequences=[s.sequences for s in samples_list],
            action_mask=[s.action_mask for s in samples_list],
            attention_mask=[s.attention_mask for s in samples_list],
        )
        colocated = args.train.colocate_all or args.train.colocate_actor_ref
        # The exact objective's policy step recomputes the student's logits with gradient and logs the same
        # KL / mass metrics from them; a student forward here would serve nothing but duplicate logs (on a
        # 2-core CPU it also halves the teacher's cores). The sampled objective's advantage needs it.
        need_student = self.safesteer.objective != "exact"
        student_refs = self._dispatch_forward(self.actor_model_group, colocated, **forward_kwargs) \
            if need_student else None
        teacher_kwargs = dict(forward_kwargs)
        if self.safesteer.coeff_key:
            teacher_kwargs["steering_scales"] = [teacher_scales(s.labels, self.safesteer.coeff_key) for s in samples_list]
            for samples, scales in zip(samples_list, teacher_kwargs["steering_scales"]):
                samples.info["teacher_scale"] = scales    # logged: the step's share of steered (harmful) rows
        teacher_refs = self._dispatch_forward(self.initial_model_group, colocated, **teacher_kwargs)
        teachers = self._flatten_results(teacher_refs, duplicate)
        students = self._flatten_results(student_refs, duplicate) if need_student else [None] * len(teachers)
        if not len(samples_list) == len(students) == len(teachers):
            raise RuntimeError(f"{len(samples_list)} micro-batches but {len(students)} student and {len(teachers)} "
                               "teacher results")

        for samples, student, teacher in zip(samples_list, students, teachers):
            mask = samples.action_mask
            batch = mask.shape[0]
            if samples.rewards is None:  # SafeSteer has no reward; OpenRLHF's logging expects one
                samples.rewards = torch.zeros(batch)
            samples.info["reward"] = samples.rewards.float()
            # With retain rows the teacher's sampled-token log-probs ride in OpenRLHF's reference field: on a retain
            # row they are the unsteered base's, which the policy step's full-vocabulary retain estimate needs.
            samples.base_action_log_probs = teacher["logprobs"].float() if self.safesteer.coeff_key else None
            samples.values = None
            setattr(samples, TEACHER_SAMPLED, teacher["logprobs"].float())
            if student is None:   # exact: OpenRLHF's batching wants the field; nothing reads its values
                samples.action_log_probs = torch.zeros_like(teacher["logprobs"], dtype=torch.float32)
                samples.kl = None
            else:
                log_ratio = (student["logprobs"].float() - teacher["logprobs"].float()) * mask
                samples.action_log_probs = student["logprobs"]
                samples.kl = log_ratio
                samples.info["kl"] = masked_mean(log_ratio, mask, dim=-1)
                samples.info.update(per_sequence_safety(student["logprobs_on_s"], teacher["logprobs_on_s"], mask))
            if self.safesteer.objective == "exact":
                setattr(samples, TEACHER_ON_S, teacher["logprobs_on_s"].float())
        return samples_list

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences: List[Experience]) -> List[Experience]:
        self._batches += 1
        for index, experience in enumerate(experiences):
            mask = experience.action_mask
            teacher = experience.__dict__.pop(TEACHER_SAMPLED)
            if self.safesteer.objective == "sampled":
                width = mask.shape[1]
                advantages = sampled_advantages(
                    experience.action_log_probs.float(), teacher, experience.sequences[:, 1:][:, -width:],
                    self.safety_ids, mask)
            else:
                advantages = torch.zeros_like(experience.action_log_probs, dtype=torch.float32)  # unused by the loss
            if self.safesteer.dump_dir and index == 0:
                tensors = {"sequences": experience.sequences, "attention_mask": experience.attention_mask,
                           "action_mask": mask, "teacher_logprobs": teacher, "advantages": advantages}
                if self.safesteer.objective != "exact":   # exact makes no student forward here
                    tensors["student_logprobs"] = experience.action_log_probs
                if hasattr(experience, TEACHER_ON_S):
                    tensors["teacher_on_s"] = getattr(experience, TEACHER_ON_S)
                if "teacher_scale" in experience.info:
                    tensors["teacher_scale"] = experience.info["teacher_scale"]
                save_dump(os.path.join(self.safesteer.dump_dir, f"experience_batch{self._batches}"), tensors,
                          {"batch": self._batches, "objective": self.safesteer.objective,
                           "safety_ids": list(self.safesteer.safety_ids)})
            experience.advantages = advantages
            experience.returns = advantages.clone()
            experience.info["return"] = advantages.sum(dim=-1)
            experience.kl = None
        return experiences


class SafeSteerActorGroup(RayActorGroup):
    """RayActorGroup that places no reward-model actors (SafeSteer has no reward) and, on a machine
    without GPUs, asks Ray for CPU shares instead of GPUs."""

    CPU_SHARE = 0.5  # per model actor on CPU: policy + teacher fit in `ray.init(num_cpus=2)` with room left

    def __init__(self, num_nodes, num_gpus_per_node, ray_actor_type, pg=None, num_gpus_per_actor=1,
                 duplicate_actors: int = 1, resources=None, num_resources_per_node=None):
        if ray_actor_type is RewardModelActor:
            self._num_nodes, self._num_gpus_per_node = num_nodes, num_gpus_per_node
            self.ray_actor_type, self.duplicate_actors = ray_actor_type, duplicate_actors
            self._resources, self._num_resources_per_node = resources, num_resources_per_node
            self._actor_handlers = []
            return
        super().__init__(num_nodes, num_gpus_per_node, ray_actor_type, pg=pg, num_gpus_per_actor=num_gpus_per_actor,
                         duplicate_actors=duplicate_actors, resources=resources,
                         num_resources_per_node=num_resources_per_node)

    @property
    def is_empty(self) -> bool:
        return not self._actor_handlers

    def _initiate_actors(self, pg, num_gpus_per_actor):
        self._place(pg, num_gpus_per_actor)
        LAUNCHED.extend(self._actor_handlers)

    def _place(self, pg, num_gpus_per_actor):
        if compat.cuda_present():
            return super()._initiate_actors(pg, num_gpus_per_actor)
        world_size = self._num_nodes * self._num_gpus_per_node
        options = {"num_cpus": self.CPU_SHARE, "num_gpus": 0}
        if pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                              placement_group_bundle_index=0)
        master = self.ray_actor_type.options(**options).remote(world_size, 0, None, None)
        self._actor_handlers = [master]
        if world_size > 1:
            addr, port = ray.get(master.get_master_addr_port.remote())
            for rank in range(1, world_size):
                self._actor_handlers.append(self.ray_actor_type.options(**options).remote(world_size, rank, addr, port))


_StockTrainer = PPOTrainer.__ray_actor_class__


@contextlib.contextmanager
def prompts_in_order(strategy, enabled: bool):
    """While PPOTrainer builds its prompt dataloader, make the strategy build it without shuffling.

    OpenRLHF's prepare_datasets hard-codes shuffle=True (a seeded permutation of the prompt rows). With
    --safesteer.keep_prompt_order the rows are drawn as the file lists them, so a file written in the local
    engine's step order trains on the same prompts at every step as `safesteer train`.
    """
    if not enabled:
        yield
        return
    stock = strategy.setup_dataloader

    def in_order(dataset, batch_size, pin_memory=False, shuffle=True, *args, **kwargs):
        return stock(dataset, batch_size, pin_memory, False, *args, **kwargs)

    strategy.setup_dataloader = in_order
    try:
        yield
    finally:
        del strategy.setup_dataloader  # the instance attribute; the class's method shows through again


@contextlib.contextmanager
def seeded_samples(seed: int):
    """While PPOTrainer builds its prompt loader and sample generator: the generator is `SeededSamplesGenerator`
    (repeatable rollouts), and the controller's torch RNG is seeded with --train.seed.

    Why the seed: the controller process has no torch.distributed group, so OpenRLHF's setup_dataloader builds no
    DistributedSampler (whose shuffle takes --train.seed) and the prompt loader shuffles with the process's global
    RNG, which nothing seeds there: each run drew the prompts in another order (found by running the stock PPO arm
    twice). This also holds on GPU clusters (the controller is a CPU actor).
    """
    import openrlhf.trainer.ppo_trainer as ppo_trainer

    from openrlhf_safesteer.plugin.install import patched
    from openrlhf_safesteer.plugin.samples import SeededSamplesGenerator

    torch.manual_seed(seed)
    with patched(ppo_trainer, "SamplesGenerator", SeededSamplesGenerator):
        yield


class SafeSteerPPOTrainer(_StockTrainer):
    """OpenRLHF's PPOTrainer (single controller) with SafeSteerExperienceMaker and no reward group."""

    def __init__(self, pretrain, strategy, actor_model_group, critic_model_group, reward_model_group,
                 reference_model_group, vllm_engines, **generate_kwargs):
        compat.prepare_process()
        if reward_model_group is not None and getattr(reward_model_group, "is_empty", False):
            reward_model_group = None
        if reference_model_group is None:
            raise RuntimeError("SafeSteer needs the reference group (the teacher): --algo.kl.init_coef must be > 0")
        with prompts_in_order(strategy, strategy.args.safesteer.keep_prompt_order), \
                seeded_samples(int(strategy.args.train.seed)):
            super().__init__(pretrain, strategy, actor_model_group, critic_model_group, reward_model_group,
                             reference_model_group, vllm_engines, **generate_kwargs)
        self.experience_maker = SafeSteerExperienceMaker(
            self.actor_model_group, self.critic_model_group, self.reward_model_group, self.reference_model_group,
            self.kl_ctl, self.strategy, self.tokenizer)


class Tracked:
    """A Ray actor class whose `.remote(...)` also records the handle in LAUNCHED."""

    def __init__(self, actor_class):
        self.actor_class = actor_class

    def remote(self, *args, **kwargs):
        handle = self.actor_class.remote(*args, **kwargs)
        LAUNCHED.append(handle)
        return handle

    def options(self, **options):
        return Tracked(self.actor_class.options(**options))


# A controller: it holds no model, so it takes no CPU share from the model actors.
SafeSteerPPOTrainerRemote = Tracked(ray.remote(num_cpus=0)(SafeSteerPPOTrainer))


def end_launched_actors() -> int:
    """ray.kill every actor recorded in LAUNCHED; returns how many."""
    count = 0
    while LAUNCHED:
        handle = LAUNCHED.pop()
        try:
            ray.kill(handle, no_restart=True)
            count += 1
        except Exception as error:  # already dead, or the session is gone
            logger.debug("could not kill %s: %s", handle, error)
    return count
