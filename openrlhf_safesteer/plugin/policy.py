"""The SafeSteer policy step inside OpenRLHF's actor.

- objective `exact` (default, the paper's loss): the actor computes the localized reverse KL from
  its own logits and the teacher's log-probs on S that came with the experience,
      L_t = sum_{v in S} p_s(v) (log p_s(v) - log p_t(v)),
  token mean per sequence then mean over sequences (OpenRLHF's seq-mean-token-mean aggregation,
  normalised over the whole optimizer step and all DP ranks). No ratio, no clipping, no KL term.
- objective `sampled`: OpenRLHF's stock PPO policy loss on the per-token advantages that the
  experience maker set.

The teacher's (B, A, K) log-probs ride on each Experience as the attribute TEACHER_ON_S. OpenRLHF's
batching helpers iterate the dataclass fields only, so the replay buffer below splits and re-pads
that attribute alongside them.

Imports OpenRLHF at module level (it subclasses OpenRLHF's classes), and OpenRLHF imports flash_attn and vllm:
where those are not installed, import it after `compat.prepare_process()` (the launcher does) or in a Ray worker
set up by `compat.worker_setup` (install.ensure_ray starts Ray with it). Importing it installs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, Optional

import ray
import torch
import torch.nn.functional as F
from openrlhf.trainer.ppo_utils import NaiveReplayBuffer
from openrlhf.trainer.ppo_utils.experience import (
    Experience,
    make_experience_batch,
    remove_padding_in_sequences,
    split_experience_batch,
)
from openrlhf.trainer.ray import ppo_actor
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer, PolicyModelActor

from openrlhf_safesteer.objectives import SUBSET_OBJECTIVES, gather_logprobs, safety_metrics
from openrlhf_safesteer.plugin import compat, versions
from openrlhf_safesteer.plugin.dump import save_dump
from openrlhf_safesteer.plugin.logits import (
    action_logprobs,
    can_share_header,
    hf_model_inside,
    padded_logits,
    plain_hf_forward,
    response_window,
    window_logits,
)
from openrlhf_safesteer.plugin.rollout import HFWeightSync
from openrlhf_safesteer.plugin.surgery import UpdateSurgery, guard_dot
from openrlhf_safesteer.plugin.vllm_sync import VLLMWeightSync

logger = logging.getLogger(__name__)

TEACHER_ON_S = "safesteer_teacher_logprobs_on_s"

# OpenRLHF's own from 0.10.3 on; copies of 0.11.2's on 0.10.2, which has neither.
aggregate_loss, get_loss_batch_info = versions.loss_functions()


def pad_first_dim(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    """Stack (A_i, K) tensors into (N, length, K), zero-padding each on the right of dim 0."""
    return torch.stack([F.pad(t, (0, 0, 0, length - t.shape[0])) for t in tensors])


class SafeSteerReplayBuffer(NaiveReplayBuffer):
    """NaiveReplayBuffer that keeps the teacher's (B, A, K) tensor aligned with each sample."""

    def __init__(self, *args, **kwargs):
        if not compat.cuda_present():
            # The stock __init__ builds torch.device(f"cuda:{current_device()}").
            real = torch.cuda.current_device
            torch.cuda.current_device = lambda: 0
            try:
                super().__init__(*args, **kwargs)
            finally:
                torch.cuda.current_device = real
            self.target_device = torch.device("cpu")
        else:
            super().__init__(*args, **kwargs)

    @torch.no_grad()
    def append(self, experience: Experience) -> None:
        teacher = experience.__dict__.pop(TEACHER_ON_S, None)
        if self.cpu_offload:
            experience.to_device(torch.device("cpu"))
            teacher = teacher.cpu() if teacher is not None else None
        items = remove_padding_in_sequences(split_experience_batch(experience))
        if teacher is not None:
            if teacher.shape[:2] != experience.action_mask.shape:
                raise ValueError(f"teacher log-probs on S {tuple(teacher.shape)} do not match action_mask "
                                 f"{tuple(experience.action_mask.shape)}")
            for i, item in enumerate(items):
                setattr(item, TEACHER_ON_S, teacher[i, : item.action_mask.shape[0]])
        self.items.extend(items)
        if self.limit > 0 and len(self.items) > self.limit:
            self.items = self.items[len(self.items) - self.limit:]

    def collate_fn(self, batch) -> Experience:
        if self.dynamic_batch:
            batch = batch[0]
        experience = make_experience_batch(batch, self.packing_samples)
        if hasattr(batch[0], TEACHER_ON_S):
            teacher = pad_first_dim([getattr(item, TEACHER_ON_S) for item in batch], experience.action_mask.shape[1])
            setattr(experience, TEACHER_ON_S, teacher)
        return experience


class SafeSteerActorTrainer(VLLMWeightSync, HFWeightSync, ActorPPOTrainer):
    """ActorPPOTrainer with the exact SafeSteer loss, weight sync to HF-generate engines, and to vLLM engines
    with LoRA merged and a check after each sync (`vllm_sync`)."""

    def __init__(self, strategy, *args, **kwargs):
        config = strategy.args.safesteer
        self.safesteer = config
        self.hf_rollout = config.rollout == "hf"
        self.safety_ids = torch.tensor(config.safety_ids, dtype=torch.long)
        self.divergence = SUBSET_OBJECTIVES[config.divergence]
        self._ppo_calls = 0
        self.surgery = (UpdateSurgery(list(config.surgery_prompt_list), int(config.surgery_prompts_per_step),
                                      int(strategy.args.train.seed), list(config.refusal_ids))
                        if getattr(config, "refusal_surgery", False) else None)
        super().__init__(strategy, *args, **kwargs)
        if config.objective == "sampled" and not versions.has_loss_agg_mode(self.args):
            # Before 0.11.2 no flag selects seq-mean-token-mean (docs/METHOD.md section 4); set it on the loss.
            versions.aggregate_per_sequence(self)

    # ---------------------------------------------------------------- the policy step
    def _with_retain_rows(self, per_token: torch.Tensor, logits: torch.Tensor, experience: Experience,
                          mask: torch.Tensor) -> torch.Tensor:
        """per_token (B, A) with the retain rows (teacher scale 0, --safesteer.coeff_key) replaced by the
        full-vocabulary reverse KL to the unsteered base, estimated on the sampled tokens y_t ~ p_s:
        (log p_s(y_t) - log p_base(y_t)) detached, times log p_s(y_t), whose gradient is an unbiased estimate of
        the per-position KL's gradient (docs/METHOD.md section 8; the local engine takes the KL itself)."""
        scales = experience.info.get("teacher_scale") if self.safesteer.coeff_key else None
        if scales is None or self.safesteer.retain_divergence != "full_vocab":
            return per_token
        scales = torch.as_tensor(scales, dtype=torch.float32)   # OpenRLHF's batching may hand info back as a list
        if not bool((scales == 0).any()):
            return per_token
        if experience.base_action_log_probs is None:
            raise RuntimeError("retain rows but no base log-probs on the experience: was it made by "
                               "SafeSteerExperienceMaker with --safesteer.coeff_key?")
        width = mask.shape[1]     # W: the last W action columns (the response window)
        student = gather_logprobs(logits, experience.sequences[:, 1:][:, -width:].to(logits.device))   # (B, W)
        base = experience.base_action_log_probs[:, -width:].to(logits.device).float()
        estimate = (student - base).detach() * student * mask
        retain = (scales.to(logits.device) == 0)[:, None]
        return torch.where(retain, estimate, per_token)

    def _response_logits(self, experience: Experience, width: int) -> torch.Tensor:
        """(B, W = width, V) float32 logits at the positions that predict the last W tokens of the sequences (the
        response window), divided by the rollout temperature like the teacher's.

        Without packing, ring attention or a vision model the HF model computes only those positions' logits
        (`logits_to_keep`, as the local engine does): the LM head and the loss over every prompt position cost
        as much again on the demo's model, where prompts are twice the responses (docs/openrlhf.md, "Wall
        time"). With sdpa or eager attention and no gradient checkpointing (which drops the KV cache in
        training) the chat header every row starts with is also encoded once per micro-batch and shared through
        the KV cache, gradients flowing back through it (`chat.completion_logits`, the local engine's student
        forward). Otherwise OpenRLHF's Actor.forward gives all T positions and they are sliced.
        """
        actor, sequences, attention = self.actor, experience.sequences, experience.attention_mask
        temperature = getattr(actor, "temperature", 1.0)
        if plain_hf_forward(actor, self.strategy):
            logits = window_logits(actor.model, sequences, attention, width,
                                   share_header=can_share_header(actor.model, training=True)).float()
            return logits / temperature if temperature != 1.0 else logits
        output = actor(sequences, None, attention_mask=attention, return_output=True, allgather_logits=True,
                       ring_attn_group=self.strategy.ring_attn_group)
        scaled = versions.returned_logits(output["logits"], temperature)
        # (B, T, V); under --ds.packing_samples the Actor's packed gather returns (B, T, 1, V).
        return padded_logits(scaled, sequences)[:, :-1][:, -width:]

    def _unsharded_grad_norm(self) -> float:
        """The 2-norm of the policy's gradients where this rank holds them whole (ZeRO stage 0), else 0."""
        ds = getattr(self.strategy.args, "ds", None)
        if getattr(ds, "zero_stage", 0) != 0:
            return 0.0
        grads = [p.grad for p in self.actor.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _at_optimizer_boundary(self) -> bool:
        """Whether this micro-batch's optimizer_step steps the optimizer (DeepSpeed's gradient accumulation)."""
        check = getattr(self.actor.model, "is_gradient_accumulation_boundary", None)
        return bool(check()) if callable(check) else True

    def _surgery_guard(self) -> tuple[list, list, float, float] | None:
        """Before an optimizer step that steps: (trainable parameters, the guard a over them, <theta, a>, the guarded
        prompts' mean refusal log-odds) for `UpdateSurgery.apply` after it; None without the surgery or off the
        boundary. The step index is the scheduler's count of optimizer steps taken (checkpointed with it)."""
        if self.surgery is None or not self._at_optimizer_boundary():
            return None
        model = hf_model_inside(self.actor.model)
        if model is None:
            raise RuntimeError("--safesteer.refusal_surgery: no transformers model inside the actor to score with")
        params = [p for p in self.actor.model.parameters() if p.requires_grad]
        step = int(self.actor_scheduler.last_epoch)
        guard, score = self.surgery.guard(model, self.tokenizer, params, step,
                                          share_header=can_share_header(model, training=True))
        return params, guard, guard_dot(params, guard), score

    def ppo_train(self, kl_ctl: float):
        self._ppo_calls += 1
        return super().ppo_train(kl_ctl)

    def training_step(self, experience: Experience, kl_ctl: float, step: int,
                      loss_batch_info: Optional[Dict] = None) -> Dict[str, float]:
        if self.safesteer.objective == "sampled":
            stock = super().training_step   # takes loss_batch_info from 0.10.4 on
            return stock(experience, kl_ctl, step, **versions.training_step_kwargs(stock, loss_batch_info))
        return self._exact_training_step(experience, step, loss_batch_info)

    def _exact_training_step(self, experience: Experience, step: int, loss_batch_info: Optional[Dict]):
        self.actor.train()
        action_mask = experience.action_mask
        teacher_on_s = getattr(experience, TEACHER_ON_S, None)
        if teacher_on_s is None:
            raise RuntimeError("experience carries no teacher log-probs on S: was it made by "
                               "SafeSteerExperienceMaker with --safesteer.objective exact?")
        if loss_batch_info is None:   # OpenRLHF before 0.10.4 passes none: normalise over this micro-batch
            loss_batch_info = get_loss_batch_info(self.strategy, action_mask, replay_buffer=self.replay_buffer,
                                                  step=step, dynamic_batch=self.args.train.dynamic_batch_enable)
        # Only the columns from the first one any row acts on carry a loss (response_window: the prompts fill the
        # first 60% of OpenRLHF's action mask on the demo), so only their logits are computed; per_token is padded
        # back to the action mask's width for the retain rows' base log-probs and the dump.
        first = response_window(action_mask)
        width = action_mask.shape[1] - first
        logits = self._response_logits(experience, width)     # (B, W, V), divided by the rollout temperature
        teacher_on_s = teacher_on_s[:, first:].to(logits.device)
        mask = action_mask[:, first:].to(logits.dtype)
        core_loss, per_token = self.divergence(logits, teacher_on_s, self.safety_ids.to(logits.device), mask)
        per_token = self._with_retain_rows(per_token, logits, experience, mask)
        per_token = F.pad(per_token, (first, 0))                  # (B, A): zeros before the window, as masked
        # The paper's reduction (token mean per sequence, then mean over sequences), normalised over
        # the optimizer step's sequences on all ranks so gradient accumulation and DP do not change it.
        loss = aggregate_loss(per_token, action_mask.to(logits.dtype), token_level_loss=False, **loss_batch_info)

        lr = float(self.actor_scheduler.get_last_lr()[0])     # this step's, before the scheduler moves on
        self.strategy.backward(loss, self.actor, self.actor_optim)
        own_norm = self._unsharded_grad_norm()
        surgery = self._surgery_guard()     # after the loss's graph is freed, before the weights move
        self.strategy.optimizer_step(self.actor_optim, self.actor, self.actor_scheduler, name="actor")
        surgery_metrics = {}
        if surgery is not None:
            params, guard, before, score = surgery
            surgery_metrics = {**UpdateSurgery.apply(params, guard, before), "surgery_refusal_logodds": score}
        # before clipping, as the local engine logs it; DeepSpeed keeps none in plain fp32 without ZeRO (CPU runs)
        grad_norm = self.strategy.get_grad_norm(self.actor) or own_norm
        if self.safesteer.dump_dir and step == 0 and self.strategy.is_rank_0():
            save_dump(os.path.join(self.safesteer.dump_dir, f"policy_step{self._ppo_calls}"), {
                "sequences": experience.sequences, "attention_mask": experience.attention_mask,
                "action_mask": action_mask, "teacher_on_s": getattr(experience, TEACHER_ON_S),
                "per_token": per_token.detach(),
            }, {"loss": float(loss.detach()), "core_loss": float(core_loss.detach()), "ppo_call": self._ppo_calls,
                "grad_norm": float(grad_norm), "lr": lr, "surgery": surgery_metrics,
                "loss_batch_info": {k: float(v) for k, v in loss_batch_info.items()}})
        if self.ema_model:
            self.strategy.moving_average(self.actor, self.ema_model, self.ema_beta,
                                         "cuda" if compat.cuda_present() else "cpu")

        with torch.no_grad():
            student_on_s = gather_logprobs(logits.detach(), self.safety_ids.to(logits.device))
            watch = safety_metrics(student_on_s, teacher_on_s, mask)
        metrics = {
            "policy_loss": loss.detach(),
            "safesteer/loss": core_loss.detach().reshape(1),
            "safesteer/kl_on_S": torch.tensor([watch["kl_on_S"]]),
            "safesteer/student_mass_on_S": torch.tensor([watch["student_mass_on_S"]]),
            "safesteer/teacher_mass_on_S": torch.tensor([watch["teacher_mass_on_S"]]),
            **{f"safesteer/{key}": torch.tensor([value]) for key, value in surgery_metrics.items()},
        }
        weights = {key: "sample" for key in metrics}
        weights["policy_loss"] = "token"
        metrics["actor_lr"] = self.actor_scheduler.get_last_lr()[0]
        weights["actor_lr"] = None
        metrics["actor_grad_norm"] = grad_norm
        weights["actor_grad_norm"] = None
        for key, value in experience.info.items():
            if isinstance(value, torch.Tensor):
                metrics[key] = value
                weights[key] = "token" if value.dim() == 0 else "sample"
            elif isinstance(value, list):
                metrics[key] = torch.tensor(value, dtype=torch.float)
                weights[key] = "sample"
        for name in ("response_length", "truncated", "total_length"):
            value = getattr(experience, name, None)
            if isinstance(value, torch.Tensor) and name not in metrics:
                metrics[name] = value
                weights[name] = "sample"
        return {
            "metrics": metrics,
            "weights": weights,
            "num_samples": float(action_mask.shape[0]),
            "num_action_tokens": float(action_mask.sum().item()),
        }


_StockPolicy = PolicyModelActor.__ray_actor_class__


@contextlib.contextmanager
def seeded_lora_init(seed: int):
    """While OpenRLHF builds the policy, seed torch right before it wraps the model in its LoRA adapter, as the
    local engine does (`local.engine.prepare_student`): both engines start from the same adapter at one seed
    (OpenRLHF seeds once, before loading the model, so what its A matrices get depends on what ran between)."""
    import openrlhf.models.actor as actor_module

    stock = actor_module.get_peft_model

    def get_peft_model(model, config, *args, **kwargs):
        torch.manual_seed(seed)
        return stock(model, config, *args, **kwargs)

    actor_module.get_peft_model = get_peft_model
    try:
        yield
    finally:
        actor_module.get_peft_model = stock


def init_with_trainer(actor: _StockPolicy, trainer_class: type, *args, **kwargs) -> None:
    """Run the stock PolicyModelActor.init_model_from_pretrained, building `trainer_class` and
    SafeSteerReplayBuffer where it builds ActorPPOTrainer and NaiveReplayBuffer.

    The stock method builds its trainer, and the trainer its replay buffer, by module-global names.
    Point those names (in the globals the running functions actually use) at the classes wanted; the
    process is this actor's own, so nothing else sees the swap.
    """
    stock = _StockPolicy.init_model_from_pretrained
    stock.__globals__["ActorPPOTrainer"] = trainer_class
    ActorPPOTrainer.__init__.__globals__["NaiveReplayBuffer"] = SafeSteerReplayBuffer
    ppo_actor.ActorPPOTrainer = trainer_class
    ppo_actor.NaiveReplayBuffer = SafeSteerReplayBuffer
    strategy = args[0] if args else kwargs["strategy"]
    with seeded_lora_init(int(strategy.args.train.seed)):
        stock(actor, *args, **kwargs)
    if not isinstance(actor.trainer, trainer_class):
        raise RuntimeError(f"OpenRLHF built {type(actor.trainer).__name__}, not {trainer_class.__name__}: this "
                           "OpenRLHF's PolicyModelActor does not build its trainer by module name")


class SafeSteerPolicyActor(_StockPolicy):
    """OpenRLHF's PolicyModelActor running SafeSteerActorTrainer with SafeSteerReplayBuffer.

    `forward` (experience making) also returns the student's log-probs on S, for the KL-over-S and
    mass-on-S logs.
    """

    def __init__(self, *args, **kwargs):
        compat.prepare_process()
        super().__init__(*args, **kwargs)

    def init_model_from_pretrained(self, *args, **kwargs):
        init_with_trainer(self, SafeSteerActorTrainer, *args, **kwargs)

    def forward(self, sequences, action_mask=None, attention_mask=None, packed_seq_lens=None,
                mm_train_inputs_list=None):
        device = torch.cuda.current_device()
        safety_ids = torch.tensor(self.strategy.args.safesteer.safety_ids, dtype=torch.long)
        self.actor.eval()
        with torch.no_grad():
            output = self.actor(sequences.to(device), None, attention_mask.to(device), return_output=True,
                                allgather_logits=True, ring_attn_group=self.strategy.ring_attn_group)
            logits = versions.returned_logits(output["logits"], getattr(self.actor, "temperature", 1.0))
            result = action_logprobs(logits, sequences.to(device), action_mask.to(device), safety_ids)
        self.actor.train()
        return {key: value.to("cpu") for key, value in result.items()}


SafeSteerPolicyActorRemote = ray.remote(num_gpus=1)(SafeSteerPolicyActor)
