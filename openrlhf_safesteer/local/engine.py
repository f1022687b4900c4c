"""The single-machine SafeSteer engine: on-policy rollouts, a steered teacher, the localized loss.

    cfg = TrainConfig(out="run/", lr=1e-5, ...)
    result = train(model, tokenizer, steering_vector, safety_tokens, prompts, cfg)

One optimizer step (docs/METHOD.md section 4):
  1. take the next `prompts_per_step` prompts of a seeded per-epoch permutation (and, with the retain term,
     the next `retain_prompts_per_step` retain prompts of their own permutation: docs/METHOD.md section 8);
  2. the student samples `samples_per_prompt` completions each (HF generate, each request seeded by
     (seed, step, its prompt, k): sampling.py);
  3. the teacher (frozen base + steering hook; with LoRA the same weights, adapter disabled) scores
     prompt + completion without gradient, gathered on S (retain rows: the base unsteered);
  4. the student scores the same tokens with gradient; loss = the chosen objective, accumulated over
     micro-batches; clip the gradient norm; AdamW; cosine schedule with linear warm-up.

Why a plain loop and not transformers' Trainer / TRL: every step draws fresh on-policy data from
the model being trained and scores it with a second (hooked) forward pass; Trainer's fixed-dataset
loop would have to be bent around that, and its resume does not restore our per-step generation
seeds. The pieces it would give us are used directly: torch AdamW, transformers'
get_cosine_schedule_with_warmup, clip_grad_norm_.

Resume is exact: the data order and every random stream are functions of (seed, step), and the
checkpoint holds the trainable weights, the AdamW moments and the schedule position.

The settings and their checks are in `local/config.py` (TrainConfig), the checkpoints, run identity
and resume in `local/checkpoints.py`; this module holds the step's pieces and the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from openrlhf_safesteer.chat import completion_logits, require_chat_template
from openrlhf_safesteer.directions import refusal_token_ids
from openrlhf_safesteer.models import decoder_layers
from openrlhf_safesteer.objectives import (
    SUBSET_OBJECTIVES,
    check_safety_ids,
    full_vocab_reverse_kl,
    gather_logprobs,
    safety_metrics,
    sampled_advantages,
    sequence_mean,
)
from openrlhf_safesteer.optional import vllm_usable
from openrlhf_safesteer.refusal import refusal_rate
from openrlhf_safesteer.selective import first_token_refusal_scores, project_conflict, refusal_hinge
from openrlhf_safesteer.steering import SteeringVector

from .checkpoints import load_checkpoint, resume_point, run_identity, save_checkpoint, save_final
from .config import TrainConfig, flag_of, steps_per_epoch, total_steps
from .metrics import MetricsLogger
from .rollout import Rollouts, sample_rollouts
from .teacher import Teacher, teacher_logprobs

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# data order


def step_prompts(prompts: list[str], step: int, prompts_per_step: int, seed: int) -> list[str]:
    """The prompts of optimizer step `step`: a slice of a seeded per-epoch permutation (pure function)."""
    per_epoch = steps_per_epoch(len(prompts), prompts_per_step)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [prompts[i] for i in order[index * prompts_per_step:(index + 1) * prompts_per_step]]


def retain_seed(seed: int) -> int:
    """The seed of the retain prompts' permutation: a stream of its own, so the harmful prompts of every step
    are those of the run without the retain term."""
    return seed + 500_009


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % (2 ** 63)


# ----------------------------------------------------------------------------------------------
# model preparation


def prepare_student(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Wrap with LoRA (peft) or set up full fine-tuning; returns the module to train."""
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for t in cfg.lora_targets if t in present]
        if not targets:
            raise ValueError(f"none of the LoRA target modules {cfg.lora_targets} exist in this model")
        if cfg.lora_layers is not None:
            n_layers = len(decoder_layers(model))
            bad = [i for i in cfg.lora_layers if not 0 <= i < n_layers]
            if bad or not cfg.lora_layers:
                raise ValueError(f"lora_layers must be a non-empty list of layer indices in [0, {n_layers}), "
                                 f"got {cfg.lora_layers}")
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                          layers_to_transform=cfg.lora_layers, task_type="CAUSAL_LM")
        torch.manual_seed(cfg.seed)   # the adapter's init: the plugin seeds the same way (plugin.policy)
        model = get_peft_model(model, lora)
    elif cfg.freeze_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    return model


def rollout_backend(cfg: TrainConfig) -> str:
    """The rollout sampler: cfg.rollout_backend, with auto = vllm when usable and training LoRA, else hf."""
    if cfg.rollout_backend != "auto":
        return cfg.rollout_backend
    return "vllm" if cfg.lora_r > 0 and vllm_usable() else "hf"


def teacher_mode(cfg: TrainConfig) -> str:
    if cfg.teacher != "auto":
        return cfg.teacher
    return "shared_lora" if cfg.lora_r > 0 else "frozen_copy"


def make_teacher(model: nn.Module, tokenizer, steering_vector: SteeringVector | None, cfg: TrainConfig) -> Teacher:
    """frozen_copy: call BEFORE prepare_student (it copies the untouched base); shared_lora: call with the PEFT student."""
    mode = teacher_mode(cfg)
    system_prompt = cfg.system_prompt if cfg.objective == "system_prompt" else None
    vector = None if cfg.objective == "system_prompt" else steering_vector
    return Teacher(model, vector, mode, coeff=cfg.coeff, system_prompt=system_prompt, tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------
# loss


def micro_batch_loss(student: nn.Module, teacher: Teacher, rollouts: Rollouts, safety_ids: Tensor,
                     cfg: TrainConfig) -> tuple[Tensor, dict[str, float], Tensor]:
    """Loss of one micro-batch (a scalar with grad) and its metrics; also the per-sequence valid-token flag (B,)."""
    mask = rollouts.loss_mask[:, rollouts.prompt_len - 1:]           # (B, C)
    sampled = rollouts.input_ids[:, rollouts.prompt_len:]            # (B, C)
    retain = retain_rows(rollouts, cfg)
    started = time.perf_counter()
    if cfg.objective == "full_vocab" or retain is not None:
        teacher_logits = teacher.logits(rollouts)
        teacher_on_s, teacher_sampled = teacher_logprobs(teacher_logits, rollouts, safety_ids, cfg.temperature)
    else:
        teacher_logits = None
        teacher_on_s, teacher_sampled = teacher.logprobs(rollouts, safety_ids, cfg.temperature)
    teacher_seconds = time.perf_counter() - started
    logits = completion_logits(student, rollouts.input_ids, rollouts.attention_mask, rollouts.prompt_len)
    with torch.no_grad():  # for the metrics only: no graph through a second pass over (B, C, V)
        student_on_s = gather_logprobs(logits.detach(), safety_ids, cfg.temperature)
    if cfg.objective in ("exact", "system_prompt"):
        loss, per_token = SUBSET_OBJECTIVES["reverse"](logits, teacher_on_s, safety_ids, mask, cfg.temperature)
    elif cfg.objective in ("forward", "renormalized"):
        loss, per_token = SUBSET_OBJECTIVES[cfg.objective](logits, teacher_on_s, safety_ids, mask, cfg.temperature)
    elif cfg.objective == "full_vocab":
        loss, per_token = full_vocab_reverse_kl(logits, teacher_logits, mask, cfg.temperature)
    else:  # sampled: REINFORCE with the per-token advantage A_t
        student_sampled = gather_logprobs(logits, sampled, cfg.temperature)
        advantages = sampled_advantages(student_sampled.detach(), teacher_sampled, sampled, safety_ids, mask)
        per_token = -advantages * student_sampled
        loss = sequence_mean(per_token, mask)
    if retain is not None:
        # the retain rows: the reverse KL to the unsteered base over the whole vocabulary, in place of the loss on S
        _, on_retain = full_vocab_reverse_kl(logits[retain], teacher_logits[retain], mask[retain], cfg.temperature)
        per_token = per_token.masked_scatter(retain[:, None].expand_as(per_token), on_retain)
        loss = sequence_mean(per_token, mask)
    metrics = {**safety_metrics(student_on_s.detach(), teacher_on_s, mask), "teacher_seconds": teacher_seconds}
    return loss, metrics, mask.sum(-1) > 0


def retain_rows(rollouts: Rollouts, cfg: TrainConfig) -> Tensor | None:
    """(B,) bool: the rows whose loss is the full-vocabulary KL to the base (retain rows, with retain_divergence
    full_vocab); None when there are none (then the loss is the objective's on every row, as in the paper)."""
    if rollouts.teacher_scale is None or cfg.retain_divergence != "full_vocab":
        return None
    rows = rollouts.teacher_scale == 0
    return rows if bool(rows.any()) else None


def train_step(student: nn.Module, teacher: Teacher, rollouts: Rollouts, safety_ids: Tensor,
               cfg: TrainConfig) -> dict[str, float]:
    """Forward/backward over micro-batches; gradients accumulate so the sum equals the full-batch loss."""
    valid = rollouts.loss_mask.sum(-1) > 0
    n_valid = max(int(valid.sum()), 1)
    totals = {"loss": 0.0, "student_mass_on_S": 0.0, "teacher_mass_on_S": 0.0, "kl_on_S": 0.0}
    started, teacher_seconds = time.perf_counter(), 0.0
    for start in range(0, rollouts.input_ids.shape[0], cfg.micro_batch_size):
        part = rollouts.select(slice(start, start + cfg.micro_batch_size))
        part_valid = int((part.loss_mask.sum(-1) > 0).sum())
        if part_valid == 0:
            continue
        loss, metrics, _ = micro_batch_loss(student, teacher, part, safety_ids, cfg)
        weight = part_valid / n_valid      # sequence_mean over the whole batch = weighted mean of the parts
        (loss * weight).backward()
        totals["loss"] += float(loss.detach()) * weight
        for key in ("student_mass_on_S", "teacher_mass_on_S", "kl_on_S"):
            totals[key] += metrics[key] * weight
        teacher_seconds += metrics["teacher_seconds"]
    # where the step's time goes (docs/demo.md, "Performance"): the teacher's forward, and the student's forward,
    # loss and backward
    totals["teacher_seconds"] = teacher_seconds
    totals["student_seconds"] = time.perf_counter() - started - teacher_seconds
    return totals


# ----------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    model: nn.Module
    steps: int
    history: list[dict]
    final_dir: Path | None


@dataclass
class LocalRun:
    """What every step of one train() call shares: the data, the two models, the optimizer and the sampler."""

    cfg: TrainConfig
    tokenizer: Any
    prompts: list[str]
    retain_prompts: list[str] | None
    student: nn.Module
    teacher: Teacher
    safety_ids: Tensor              # (K,) long, on the student's device
    params: list[nn.Parameter]      # the trainable ones
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: Any = None             # VLLMRollout, or None: HF generate
    refusal_ids: list[int] | None = None    # R, the refusal openers' first tokens (retain_divergence refusal)
    base_refusal: dict[str, float] = dataclasses.field(default_factory=dict)   # the base's s(x) per retain prompt
    surgery_guard: list[Tensor | None] | None = None   # this step's retain refusal gradient (surgery_target update)


def retain_rollouts(cfg: TrainConfig) -> bool:
    """Whether the retain prompts are sampled into the step's rollouts (full_vocab, subset); the refusal retain
    reads only the first reply position, which depends on the prompt alone, so it samples none."""
    return bool(cfg.retain_prompts_per_step) and cfg.retain_divergence != "refusal"


def retain_scale(rows: int, harmful_rows: int) -> Tensor:
    """Rollouts.teacher_scale of a batch whose first `harmful_rows` rows are harmful and the rest retain: (rows,)."""
    scale = torch.zeros(rows)
    scale[:harmful_rows] = 1.0
    return scale


def check_inputs(model: nn.Module, tokenizer, steering_vector: SteeringVector | None, safety_ids: Tensor,
                 prompts: list[str], cfg: TrainConfig, retain_prompts: list[str] | None) -> Tensor:
    """Refuse inputs that do not fit the settings or the model, before the teacher copy; returns safety_ids (K,) long."""
    if not prompts:
        raise ValueError("no training prompts")
    if cfg.retain_prompts_per_step and not retain_prompts:
        raise ValueError(f"{flag_of('retain_prompts_per_step')} = {cfg.retain_prompts_per_step} needs retain prompts "
                         "(--retain-prompts)")
    if retain_prompts and not cfg.retain_prompts_per_step:
        raise ValueError(f"retain prompts were given but {flag_of('retain_prompts_per_step')} is 0: set it, "
                         "or leave the retain prompts out")
    if cfg.objective != "system_prompt":
        if steering_vector is None:
            raise ValueError(f"objective {cfg.objective!r} needs a steering vector")
        steering_vector.check_compatible(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    safety_ids = torch.as_tensor(safety_ids, dtype=torch.long)
    check_safety_ids(safety_ids, vocab)
    require_chat_template(tokenizer)   # rollouts render chats: fail before the teacher copy, not at step 0
    return safety_ids


def build_run(model: nn.Module, tokenizer, steering_vector: SteeringVector | None, safety_ids: Tensor,
              prompts: list[str], cfg: TrainConfig, retain_prompts: list[str] | None, n_steps: int) -> LocalRun:
    """The teacher and the student (in the order the teacher mode needs), AdamW with the cosine schedule over
    `n_steps`, and the rollout sampler."""
    from transformers import get_cosine_schedule_with_warmup

    base_path = getattr(model, "name_or_path", "")   # the base's HF directory, before any PEFT wrapping
    if teacher_mode(cfg) == "frozen_copy":
        teacher = make_teacher(model, tokenizer, steering_vector, cfg)   # copies the base before LoRA/training
        student = prepare_student(model, cfg)
    else:
        student = prepare_student(model, cfg)
        teacher = make_teacher(student, tokenizer, steering_vector, cfg)
    device = next(student.parameters()).device
    safety_ids = safety_ids.to(device)

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(round(cfg.warmup_ratio * n_steps)), n_steps)

    backend = rollout_backend(cfg)
    logger.info("rollout backend: %s", backend)
    refusal_ids = refusal_token_ids(tokenizer) if cfg.retain_divergence == "refusal" else None
    sampler = None
    if backend == "vllm":
        from .vllm_rollout import VLLMRollout  # lazily: vllm is optional

        sampler = VLLMRollout(student, base_path, cfg.lora_r,
                              gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=cfg.seed)
    return LocalRun(cfg, tokenizer, prompts, retain_prompts, student, teacher, safety_ids, params, optimizer,
                    scheduler, sampler, refusal_ids)


def step_batch(run: LocalRun, step: int) -> tuple[list[str], int]:
    """The prompts of step `step` (the harmful ones first, then any retain ones) and the number of harmful rows."""
    cfg = run.cfg
    batch_prompts = step_prompts(run.prompts, step, cfg.prompts_per_step, cfg.seed)
    n_harmful = len(batch_prompts) * cfg.samples_per_prompt
    if retain_rollouts(cfg):
        # one generate call for both kinds: on a CPU 16 rows decode in about the time of 8
        batch_prompts = batch_prompts + step_prompts(run.retain_prompts, step, cfg.retain_prompts_per_step,
                                                     retain_seed(cfg.seed))
    return batch_prompts, n_harmful


def step_rollouts(run: LocalRun, step: int, batch_prompts: list[str], n_harmful: int) -> Rollouts:
    """The student's on-policy samples of step `step` (seeded by the step), retain rows marked for the base teacher."""
    cfg = run.cfg
    if run.sampler is not None:
        rollouts = run.sampler.sample(batch_prompts, cfg.samples_per_prompt, cfg.max_new_tokens, cfg.temperature,
                                      cfg.top_p, step_seed(cfg.seed, step), run.tokenizer, step)
    else:
        rollouts = sample_rollouts(run.student, run.tokenizer, batch_prompts, cfg.samples_per_prompt,
                                   cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed=cfg.seed, rollout_index=step)
    if retain_rollouts(cfg):
        rollouts.teacher_scale = retain_scale(len(rollouts.prompts), n_harmful)
    return rollouts


def optimizer_step(run: LocalRun, step: int, rollouts: Rollouts) -> tuple[dict[str, float], Tensor]:
    """The loss and its gradient over the step's rollouts, clipped; one AdamW and schedule step. Returns
    (the step's loss and metrics, the gradient norm before clipping)."""
    cfg = run.cfg
    run.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(step_seed(cfg.seed, step) + 1)   # any dropout in the loss pass
    totals = train_step(run.student, run.teacher, rollouts, run.safety_ids, cfg)
    if cfg.retain_divergence == "refusal" and cfg.retain_prompts_per_step:
        totals.update(refusal_retain(run, step))
    totals["lr"] = run.scheduler.get_last_lr()[0]      # this step's (the schedule moves on below)
    started = time.perf_counter()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
    guard, run.surgery_guard = run.surgery_guard, None
    before = [p.detach().clone() for p in run.params] if guard is not None else None
    run.optimizer.step()
    if guard is not None:
        totals.update(project_update(run.params, before, guard))
    run.scheduler.step()
    totals["optimizer_seconds"] = time.perf_counter() - started
    return totals, grad_norm


@torch.no_grad()
def project_update(params: list[nn.Parameter], before: list[Tensor], guard: list[Tensor | None]) -> dict[str, float]:
    """Surgery on AdamW's step (surgery_target update): the step d = after - before raises the retain prompts' mean
    refusal log-odds by about <d, a> (a: their gradient, `guard`); when that is positive the step loses its
    component along a (`project_conflict` on -d, whose rule is written for descent directions)."""
    step = [p - b for p, b in zip(params, before)]
    projected, cos, applied = project_conflict([-d for d in step], guard)
    if applied:
        for p, b, d in zip(params, before, projected):
            p.copy_(b - d)
    return {"surgery_cos": cos, "surgery_applied": float(applied)}


def base_refusal_scores(run: LocalRun, prompts: list[str]) -> Tensor:
    """The base model's first-token refusal log-odds of `prompts` (N,), computed once per prompt (the teacher
    with coefficient 0 is the plain base, also after a resume) and cached on the run."""
    missing = [p for p in dict.fromkeys(prompts) if p not in run.base_refusal]
    if missing:
        with torch.no_grad(), run.teacher.as_base() as base:
            scores = first_token_refusal_scores(base, run.tokenizer, missing, run.refusal_ids)
        run.base_refusal.update(zip(missing, scores.tolist()))
    return torch.tensor([run.base_refusal[p] for p in prompts])


def grad_norm(grads) -> float:
    """The 2-norm of a list of gradients (None entries count as zero)."""
    return float(torch.nn.utils.get_total_norm([g for g in grads if g is not None]))


def refusal_retain(run: LocalRun, step: int) -> dict[str, float]:
    """The refusal retain of step `step` (docs/METHOD.md section 8), on the gradients the harmful rows left in
    .grad: the surgery (refusal_surgery) projects them against the gradient of the retain prompts' mean refusal
    log-odds, then retain_weight * hinge adds its own gradient. Returns the step's retain metrics."""
    cfg = run.cfg
    prompts = step_prompts(run.retain_prompts, step, cfg.retain_prompts_per_step, retain_seed(cfg.seed))
    base = base_refusal_scores(run, prompts)
    started = time.perf_counter()
    scores = first_token_refusal_scores(run.student, run.tokenizer, prompts, run.refusal_ids)       # (N,) with grad
    hinge = refusal_hinge(scores, base, cfg.retain_margin)
    metrics = {"retain_hinge": float(hinge.detach()),
               "retain_refusal_shift": float((scores.detach() - base).mean()),
               "retain_refusing_more": float((scores.detach() > base).float().mean())}
    if cfg.refusal_surgery:
        guard = torch.autograd.grad(scores.mean(), run.params, allow_unused=True,
                                    retain_graph=cfg.retain_weight > 0 or cfg.retain_grad_ratio is not None)
        if cfg.surgery_target == "update":
            run.surgery_guard = guard       # optimizer_step projects AdamW's step against it
        else:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run.params]
            projected, cos, applied = project_conflict(grads, guard)
            for p, g in zip(run.params, projected):
                p.grad = g
            metrics.update(surgery_cos=cos, surgery_applied=float(applied))
    if cfg.retain_grad_ratio is not None and float(hinge) > 0:
        harmful_norm = grad_norm([p.grad for p in run.params])
        hinge_grads = torch.autograd.grad(hinge, run.params, allow_unused=True)
        scale = cfg.retain_grad_ratio * harmful_norm / max(grad_norm(hinge_grads), 1e-12)
        for p, g in zip(run.params, hinge_grads):
            if g is not None:
                p.grad = g * scale if p.grad is None else p.grad + g * scale
        metrics["retain_weight"] = scale
    elif cfg.retain_grad_ratio is None and cfg.retain_weight > 0:
        (cfg.retain_weight * hinge).backward()
    metrics["retain_seconds"] = time.perf_counter() - started
    return metrics


def step_record(run: LocalRun, step: int, totals: dict[str, float], grad_norm: Tensor, rollouts: Rollouts,
                n_harmful: int, t0: float, t1: float) -> dict:
    """The metrics line of step `step` (t0: when the step began, t1: when its rollouts were done)."""
    record = {
        "step": step + 1, **totals, "grad_norm": float(grad_norm),
        "response_length": float(rollouts.response_lengths().float().mean()),
        "rollout_refusal_rate": refusal_rate(rollouts.completions[:n_harmful]),
        "rollout_seconds": t1 - t0, "step_seconds": time.time() - t0,
    }
    if retain_rollouts(run.cfg):
        record["retain_rollout_refusal_rate"] = refusal_rate(rollouts.completions[n_harmful:])
    return record


def train(model: nn.Module, tokenizer, steering_vector: SteeringVector | None, safety_ids: Tensor,
          prompts: list[str], cfg: TrainConfig, retain_prompts: list[str] | None = None) -> TrainResult:
    """Run SafeSteer's localized on-policy distillation on `model` (modified in place / wrapped).

    safety_ids (K,) long: the safety-token set S. prompts: harmful user prompts (plain text).
    retain_prompts: borderline-safe / harmless prompts for the retain term (cfg.retain_prompts_per_step > 0).
    Returns the trained module (a PeftModel with LoRA, or the merged model when save_final=True).
    """
    from tqdm.auto import tqdm

    cfg.validate()
    safety_ids = check_inputs(model, tokenizer, steering_vector, safety_ids, prompts, cfg, retain_prompts)
    identity = run_identity(cfg, prompts, steering_vector, safety_ids, retain_prompts)
    ckpt = resume_point(cfg, identity)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    n_steps = total_steps(len(prompts), cfg)
    run = build_run(model, tokenizer, steering_vector, safety_ids, prompts, cfg, retain_prompts, n_steps)

    start = 0
    if ckpt is not None:
        start = load_checkpoint(ckpt, run.student, run.optimizer, run.scheduler)
        logger.info("resumed from %s at step %d of %d", ckpt, start, n_steps)
    metrics_log = MetricsLogger(out, resume_step=start, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                wandb_project=cfg.wandb_project, config=dataclasses.asdict(cfg))
    history = []
    bar = tqdm(range(start, n_steps), desc=f"safesteer train ({cfg.objective})", disable=not cfg.progress,
               initial=start, total=n_steps)
    try:
        for step in bar:
            t0 = time.time()
            batch_prompts, n_harmful = step_batch(run, step)
            rollouts = step_rollouts(run, step, batch_prompts, n_harmful)
            t1 = time.time()
            totals, grad_norm = optimizer_step(run, step, rollouts)
            record = step_record(run, step, totals, grad_norm, rollouts, n_harmful, t0, t1)
            history.append(record)
            metrics_log.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", mass_S=f"{record['student_mass_on_S']:.3f}",
                            refusal=f"{record['rollout_refusal_rate']:.2f}")
            done = step + 1
            stopping = cfg.stop_after is not None and done - start >= cfg.stop_after and done < n_steps
            if (cfg.save_every and done % cfg.save_every == 0) or done == n_steps or stopping:
                save_checkpoint(out, done, run.student, tokenizer, run.optimizer, run.scheduler, cfg, identity)
            if stopping:
                logger.info("stopping after %d steps (--stop-after); resume with the same command", cfg.stop_after)
                break
    finally:
        metrics_log.close()
        if run.sampler is not None:
            run.sampler.close()
    done = start + len(history)
    finished = done >= n_steps
    final_dir, trained = save_final(out, run.student, tokenizer) if cfg.save_final and finished else (None, run.student)
    return TrainResult(trained, done, history, final_dir)
