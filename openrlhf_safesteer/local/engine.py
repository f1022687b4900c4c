"""The single-machine SafeSteer engine: on-policy rollouts, a steered teacher, the localized loss.

    cfg = TrainConfig(out="run/", lr=1e-5, ...)
    result = train(model, tokenizer, steering_vector, safety_tokens, prompts, cfg)

One optimizer step (docs/METHOD.md section 4):
  1. take the next `prompts_per_step` prompts of a seeded per-epoch permutation (and, with the retain term,
     the next `retain_prompts_per_step` retain prompts of their own permutation: docs/METHOD.md section 8);
  2. the student samples `samples_per_prompt` completions each (HF generate, seeded per step);
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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from openrlhf_safesteer.chat import require_chat_template
from openrlhf_safesteer.files import atomic_write_text, json_sha256, replace_dir
from openrlhf_safesteer.models import decoder_layers
from openrlhf_safesteer.objectives import (
    SUBSET_OBJECTIVES,
    full_vocab_reverse_kl,
    gather_logprobs,
    safety_metrics,
    sampled_advantages,
    sequence_mean,
)
from openrlhf_safesteer.optional import vllm_missing, vllm_usable
from openrlhf_safesteer.refusal import refusal_rate
from openrlhf_safesteer.steering import SteeringVector

from .metrics import MetricsLogger
from .rollout import Rollouts, sample_rollouts
from .teacher import DEFAULT_SAFETY_SYSTEM_PROMPT, Teacher, completion_logits

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

OBJECTIVES = ("exact", "sampled", "forward", "full_vocab", "renormalized", "system_prompt")
ROLLOUT_BACKENDS = ("auto", "hf", "vllm")
CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"

# `safesteer train`'s flag for a TrainConfig field (or a run-identity key), so errors name what to change
_FLAGS = {"objective": "--safesteer.objective", "coeff": "--safesteer.coeff", "total_steps": "--max-steps/--epochs",
          "prompts": "--prompts", "vector": "--vector", "safety_ids": "--tokens"}


def _flag(name: str) -> str:
    return f"{name} ({_FLAGS.get(name, '--' + name.replace('_', '-'))})"


@dataclass
class TrainConfig:
    """Every knob of a local SafeSteer run (defaults: docs/METHOD.md, Qwen; the demo overrides for CPU)."""

    out: str = "safesteer_run"
    objective: str = "exact"            # exact | sampled | forward | full_vocab | renormalized | system_prompt
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    epochs: float = 1.0                 # passes over the prompts (fractions allowed)
    max_steps: int | None = None        # overrides epochs when set
    prompts_per_step: int = 4
    # the project's selectivity extension (docs/METHOD.md section 8; 0: the paper's method): this many retain
    # prompts (borderline-safe / harmless) per step join the batch, their teacher the unsteered base
    retain_prompts_per_step: int = 0
    samples_per_prompt: int = 8
    micro_batch_size: int = 8           # sequences per forward/backward (gradient accumulation inside a step)
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    coeff: float | None = None          # steering coefficient (None: the vector's own)
    system_prompt: str = DEFAULT_SAFETY_SYSTEM_PROMPT  # only for objective=system_prompt
    lora_r: int = 0                     # 0: full fine-tuning; > 0: LoRA rank (teacher shares the weights)
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    lora_layers: list[int] | None = None  # decoder layers that get adapters (None: all)
    freeze_embeddings: bool = False     # full fine-tuning without the (huge) embedding matrices
    teacher: str = "auto"               # auto | frozen_copy | shared_lora
    gradient_checkpointing: bool = False
    rollout_backend: str = "auto"       # auto (vllm when usable and LoRA, else hf) | hf | vllm
    vllm_gpu_memory_utilization: float = 0.3  # GPU share of the vLLM rollout engine; the trainer needs the rest
    bf16: bool = False                  # GPU only
    seed: int = 0
    save_every: int = 0                 # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    resume: bool = True                 # continue from out/checkpoints/latest when present
    stop_after: int | None = None       # stop (with a checkpoint) after this many steps of this invocation
    save_final: bool = True             # write out/final (merged if LoRA)
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "safesteer"
    progress: bool = True

    def validate(self) -> None:
        """Reject bad settings before anything heavy (the model load, the teacher copy, generation)."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name in ("prompts_per_step", "samples_per_prompt", "micro_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        self._validate_numbers()
        if self.teacher not in ("auto", "frozen_copy", "shared_lora"):
            raise ValueError(f"teacher must be auto, frozen_copy or shared_lora, got {self.teacher!r}")
        if self.retain_prompts_per_step and self.objective == "system_prompt":
            raise ValueError("the retain term (retain_prompts_per_step > 0) needs a steering-vector teacher; "
                             "objective system_prompt has none to switch off")
        if self.teacher == "shared_lora" and self.lora_r <= 0:
            raise ValueError("teacher=shared_lora needs LoRA (lora_r > 0)")
        if self.bf16 and not torch.cuda.is_available():
            raise ValueError("bf16 training is for GPUs; on CPU train in float32")
        self._validate_rollout_backend()

    def _validate_numbers(self) -> None:
        # NaN passes every `x <= 0` test, so finiteness is checked first; each failure here used to surface
        # only after the model load (torch's "Invalid learning rate: nan") or not at all (top_p 0: greedy
        # rollouts, the M samples of a prompt identical).
        floats = ["lr", "weight_decay", "warmup_ratio", "max_grad_norm", "epochs", "temperature", "top_p", "lora_alpha"]
        for name in floats + (["coeff"] if self.coeff is not None else []):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{_flag(name)} must be a finite number, got {getattr(self, name)}")
        checks = (
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("lora_r", self.lora_r >= 0, ">= 0 (0: full fine-tuning)"),
            # alpha 0 scales the adapter's update to zero: the run "trains" and writes the untrained base
            ("lora_alpha", self.lora_r == 0 or self.lora_alpha > 0, "> 0 with LoRA (--lora-r > 0)"),
            # max_steps 0 or less ran no step and wrote the untrained base as final/ (exit 0)
            ("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1 (or unset: use --epochs)"),
            ("epochs", self.max_steps is not None or self.epochs > 0, "> 0 (or set --max-steps)"),
            ("stop_after", self.stop_after is None or self.stop_after >= 1, ">= 1 (or unset)"),
            ("save_every", self.save_every >= 0, ">= 0 (0: only at the end)"),
            ("retain_prompts_per_step", self.retain_prompts_per_step >= 0, ">= 0 (0: no retain term)"),
        )
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{_flag(name)} must be {allowed}, got {getattr(self, name)}")

    def _validate_rollout_backend(self) -> None:
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"rollout_backend must be one of {ROLLOUT_BACKENDS}, got {self.rollout_backend!r}")
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1), got {self.vllm_gpu_memory_utilization}")
        if self.rollout_backend != "vllm":
            return
        if missing := vllm_missing():
            raise ValueError(f"rollout_backend='vllm' needs vLLM installed and a CUDA GPU, but "
                             f"{' and '.join(missing)}; use rollout_backend='hf' (--rollout-backend hf) or 'auto'")
        if self.lora_r <= 0:
            raise ValueError("rollout_backend='vllm' needs LoRA (lora_r > 0): full fine-tuning cannot update the "
                             "vLLM engine's weights each step; use --lora-r > 0 or --rollout-backend hf")


# ----------------------------------------------------------------------------------------------
# data order


def steps_per_epoch(num_prompts: int, prompts_per_step: int) -> int:
    return math.ceil(num_prompts / prompts_per_step)


def total_steps(num_prompts: int, cfg: TrainConfig) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(num_prompts, cfg.prompts_per_step)))


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


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


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
    if cfg.objective == "full_vocab":
        teacher_logits = teacher.logits(rollouts)
        teacher_on_s = gather_logprobs(teacher_logits, safety_ids, cfg.temperature)
    else:
        teacher_logits = None
        teacher_on_s, teacher_sampled = teacher.logprobs(rollouts, safety_ids, cfg.temperature)
    logits = completion_logits(student, rollouts.input_ids, rollouts.attention_mask, rollouts.prompt_len)
    with torch.no_grad():  # for the metrics only: no graph through a second pass over (B, C, V)
        student_on_s = gather_logprobs(logits.detach(), safety_ids, cfg.temperature)
    if cfg.objective in ("exact", "system_prompt"):
        loss, _ = SUBSET_OBJECTIVES["reverse"](logits, teacher_on_s, safety_ids, mask, cfg.temperature)
    elif cfg.objective in ("forward", "renormalized"):
        loss, _ = SUBSET_OBJECTIVES[cfg.objective](logits, teacher_on_s, safety_ids, mask, cfg.temperature)
    elif cfg.objective == "full_vocab":
        loss, _ = full_vocab_reverse_kl(logits, teacher_logits, mask, cfg.temperature)
    else:  # sampled: REINFORCE with the per-token advantage A_t
        student_sampled = gather_logprobs(logits, sampled, cfg.temperature)
        advantages = sampled_advantages(student_sampled.detach(), teacher_sampled, sampled, safety_ids, mask)
        loss = sequence_mean(-advantages * student_sampled, mask)
    metrics = safety_metrics(student_on_s.detach(), teacher_on_s, mask)
    return loss, metrics, mask.sum(-1) > 0


def train_step(student: nn.Module, teacher: Teacher, rollouts: Rollouts, safety_ids: Tensor,
               cfg: TrainConfig) -> dict[str, float]:
    """Forward/backward over micro-batches; gradients accumulate so the sum equals the full-batch loss."""
    valid = rollouts.loss_mask.sum(-1) > 0
    n_valid = max(int(valid.sum()), 1)
    totals = {"loss": 0.0, "student_mass_on_S": 0.0, "teacher_mass_on_S": 0.0, "kl_on_S": 0.0}
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
    return totals


# ----------------------------------------------------------------------------------------------
# checkpoints


def _atomic_dir(final: Path, write) -> None:
    """Write a directory under a temporary name, then swap it into place (replace_dir: the old copy is
    removed only once the new one is at `final`)."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """AdamW state as flat tensors (safetensors) + JSON-able param groups (no pickle)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(out: Path, step: int, student: nn.Module, tokenizer, optimizer, scheduler,
                    cfg: TrainConfig, run: dict | None = None) -> Path:
    """out/checkpoints/step_N: the model in HF format (adapter folder if LoRA) + trainer state; atomic.
    run: the run's identity (run_identity), compared on resume."""
    from safetensors.torch import save_file

    root = out / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        state_dir = tmp / "trainer_state"
        state_dir.mkdir()
        save_file(trainable_state(student), str(state_dir / "trainable.safetensors"))
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, str(state_dir / "optimizer.safetensors"))
        (state_dir / "optimizer.json").write_text(json.dumps(opt_meta))
        (state_dir / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        (state_dir / "state.json").write_text(json.dumps({"step": step, "config": dataclasses.asdict(cfg),
                                                               "run": run}, indent=1))

    _atomic_dir(final, write)
    atomic_write_text(root / LATEST_FILE, final.name + "\n")
    kept = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in kept[:-cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint out/checkpoints/latest names; None when there is no pointer. A pointer to a missing
    or incomplete folder is an error: silently starting afresh would redo the run and mix it with the old one."""
    pointer = out / CHECKPOINT_DIR / LATEST_FILE
    if not pointer.is_file():
        return None
    path = out / CHECKPOINT_DIR / pointer.read_text().strip()
    if not (path / "trainer_state" / "state.json").is_file():
        raise ValueError(f"{pointer} names {path.name}, which is missing or incomplete; move {out / CHECKPOINT_DIR} "
                         "aside to start this run afresh, or choose another --out")
    return path


# The settings that define a run: resuming with another value would continue one run's checkpoint with
# another run's data, loss or schedule. total_steps stands for max_steps/epochs (they set the cosine
# schedule's length, so a new value changes the lr of every remaining step). Left out on purpose, as they
# may change between the invocations of one run: where and how it is saved or logged (out, resume,
# stop_after, save_every, keep_checkpoints, save_final, progress, tensorboard, wandb*), and how the same
# computation is carried out: micro_batch_size (accumulation sums to the same loss), gradient_checkpointing,
# teacher (frozen_copy and shared_lora are the same teacher), rollout_backend, vllm_gpu_memory_utilization,
# and bf16 (a run may move between a GPU and a CPU).
RUN_FIELDS = ("objective", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "prompts_per_step",
              "retain_prompts_per_step", "samples_per_prompt", "max_new_tokens", "temperature", "top_p", "lora_r",
              "lora_alpha", "lora_targets", "lora_layers", "freeze_embeddings", "seed")


def _digest(obj) -> str:
    """The short sha256 run identities store (of a list: the same digest as sha256(json.dumps(obj)))."""
    return json_sha256(obj)[:16]


def run_identity(cfg: TrainConfig, prompts: list[str], steering_vector: SteeringVector | None,
                 safety_ids, retain_prompts: list[str] | None = None) -> dict:
    """What makes two invocations the same run (JSON values; see RUN_FIELDS for what is left out and why)."""
    uses_vector = cfg.objective != "system_prompt" and steering_vector is not None
    ids = [int(i) for i in torch.as_tensor(safety_ids).flatten().tolist()]
    identity = {name: getattr(cfg, name) for name in RUN_FIELDS}
    identity.update(
        total_steps=total_steps(len(prompts), cfg),
        prompts=f"{len(prompts)} prompts, sha256 {_digest(list(prompts))}",
        safety_ids=f"{len(ids)} ids, sha256 {_digest(ids)}",
        vector=(f"layer {steering_vector.layer}, sha256 {_digest(steering_vector.vector.tolist())}"
                if uses_vector else None),
        coeff=((cfg.coeff if cfg.coeff is not None else steering_vector.coeff) if uses_vector else None),
        system_prompt=cfg.system_prompt if cfg.objective == "system_prompt" else None,
    )
    if cfg.retain_prompts_per_step:     # absent otherwise: checkpoints of runs without the term still resume
        identity["retain_prompts"] = f"{len(retain_prompts)} prompts, sha256 {_digest(list(retain_prompts))}"
    return json.loads(json.dumps(identity))   # tuples -> lists: comparable with what state.json gives back


def check_same_run(ckpt: Path, identity: dict) -> None:
    """Refuse to resume `ckpt` with settings that define another run (naming the first that differs)."""
    state = json.loads((ckpt / "trainer_state" / "state.json").read_text())
    saved = state.get("run")
    if saved is None:   # written before the identity was stored: compare the settings its config holds
        config = state.get("config", {})
        saved = {name: config[name] for name in RUN_FIELDS if name in config}
    for key, old in saved.items():
        if key in identity and identity[key] != old:
            raise ValueError(f"{ckpt} belongs to a run with {_flag(key)} = {old!r}, but this call has {identity[key]!r}; "
                             "resume with the run's own settings, or start a new run in another --out "
                             "(--no-resume does not reuse a folder that holds checkpoints)")


def resume_point(cfg: TrainConfig, identity: dict) -> Path | None:
    """The checkpoint this call continues from (None: a fresh run). Needs no model, so it runs before the
    model loads: it refuses a fresh run over another run's checkpoints (retention, by step number, would then
    delete the new run's checkpoints and keep the old run's), a dangling `latest`, and a resume whose
    settings differ from the run's."""
    root = Path(cfg.out) / CHECKPOINT_DIR
    steps = sorted(int(p.name[5:]) for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())
    if not cfg.resume:
        if steps:
            raise ValueError(f"{root} holds a previous run's checkpoints (step {steps[-1]}); resume it "
                             "without --no-resume, or choose another --out")
        return None
    ckpt = latest_checkpoint(Path(cfg.out))
    if ckpt is None:
        if steps:
            raise ValueError(f"{root} holds checkpoints (step {steps[-1]}) but no {LATEST_FILE!r} pointer; "
                             "move them aside to start afresh, or choose another --out")
        return None
    check_same_run(ckpt, identity)
    return ckpt


def load_checkpoint(path: Path, student: nn.Module, optimizer, scheduler) -> int:
    """Restore trainable weights, AdamW moments and the schedule; returns the number of steps done."""
    from safetensors.torch import load_file

    state_dir = path / "trainer_state"
    weights = load_file(str(state_dir / "trainable.safetensors"))
    params = dict(student.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        raise ValueError(f"checkpoint {path} does not match this run's trainable parameters "
                         f"(e.g. LoRA vs full fine-tuning); start a fresh --out or pass --no-resume")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    _load_optimizer(optimizer, load_file(str(state_dir / "optimizer.safetensors")),
                    json.loads((state_dir / "optimizer.json").read_text()))
    scheduler.load_state_dict(json.loads((state_dir / "scheduler.json").read_text()))
    return int(json.loads((state_dir / "state.json").read_text())["step"])


def merged(model: nn.Module) -> nn.Module:
    """The model with any LoRA adapter merged into its weights (in place: call when training is over), so
    generation does not pay the adapter's two extra matmuls per projection at every token."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def save_final(out: Path, student: nn.Module, tokenizer) -> tuple[Path, nn.Module]:
    """out/final: a plain HF checkpoint (LoRA merged into the weights), atomically. Returns (dir, plain model)."""
    final = out / "final"
    model = merged(student)  # the run is over
    model.eval()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _atomic_dir(final, write)
    return final, model


# ----------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    model: nn.Module
    steps: int
    history: list[dict]
    final_dir: Path | None


def retain_scale(rows: int, harmful_rows: int) -> Tensor:
    """Rollouts.teacher_scale of a batch whose first `harmful_rows` rows are harmful and the rest retain: (rows,)."""
    scale = torch.zeros(rows)
    scale[:harmful_rows] = 1.0
    return scale


def train(model: nn.Module, tokenizer, steering_vector: SteeringVector | None, safety_ids: Tensor,
          prompts: list[str], cfg: TrainConfig, retain_prompts: list[str] | None = None) -> TrainResult:
    """Run SafeSteer's localized on-policy distillation on `model` (modified in place / wrapped).

    safety_ids (K,) long: the safety-token set S. prompts: harmful user prompts (plain text).
    retain_prompts: borderline-safe / harmless prompts for the retain term (cfg.retain_prompts_per_step > 0).
    Returns the trained module (a PeftModel with LoRA, or the merged model when save_final=True).
    """
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    cfg.validate()
    if not prompts:
        raise ValueError("no training prompts")
    if cfg.retain_prompts_per_step and not retain_prompts:
        raise ValueError(f"{_flag('retain_prompts_per_step')} = {cfg.retain_prompts_per_step} needs retain prompts "
                         "(--retain-prompts)")
    if retain_prompts and not cfg.retain_prompts_per_step:
        raise ValueError(f"retain prompts were given but {_flag('retain_prompts_per_step')} is 0: set it, "
                         "or leave the retain prompts out")
    if cfg.objective != "system_prompt":
        if steering_vector is None:
            raise ValueError(f"objective {cfg.objective!r} needs a steering vector")
        steering_vector.check_compatible(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    from openrlhf_safesteer.objectives import check_safety_ids

    safety_ids = torch.as_tensor(safety_ids, dtype=torch.long)
    check_safety_ids(safety_ids, vocab)
    require_chat_template(tokenizer)   # rollouts render chats: fail before the teacher copy, not at step 0
    identity = run_identity(cfg, prompts, steering_vector, safety_ids, retain_prompts)
    ckpt = resume_point(cfg, identity)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
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
    n_steps = total_steps(len(prompts), cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(round(cfg.warmup_ratio * n_steps)), n_steps)

    backend = rollout_backend(cfg)
    logger.info("rollout backend: %s", backend)
    sampler = None
    if backend == "vllm":
        from .vllm_rollout import VLLMRollout  # lazily: vllm is optional

        sampler = VLLMRollout(student, base_path, cfg.lora_r,
                              gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=cfg.seed)

    start = 0
    if ckpt is not None:
        start = load_checkpoint(ckpt, student, optimizer, scheduler)
        logger.info("resumed from %s at step %d of %d", ckpt, start, n_steps)
    metrics_log = MetricsLogger(out, resume_step=start, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                wandb_project=cfg.wandb_project, config=dataclasses.asdict(cfg))
    history = []
    bar = tqdm(range(start, n_steps), desc=f"safesteer train ({cfg.objective})", disable=not cfg.progress,
               initial=start, total=n_steps)
    try:
        for step in bar:
            t0 = time.time()
            batch_prompts = step_prompts(prompts, step, cfg.prompts_per_step, cfg.seed)
            n_harmful = len(batch_prompts) * cfg.samples_per_prompt
            if cfg.retain_prompts_per_step:
                # one generate call for both kinds: on a CPU 16 rows decode in about the time of 8
                batch_prompts = batch_prompts + step_prompts(retain_prompts, step, cfg.retain_prompts_per_step,
                                                             retain_seed(cfg.seed))
            if sampler is not None:
                rollouts = sampler.sample(batch_prompts, cfg.samples_per_prompt, cfg.max_new_tokens, cfg.temperature,
                                          cfg.top_p, step_seed(cfg.seed, step), tokenizer, step)
            else:
                rollouts = sample_rollouts(student, tokenizer, batch_prompts, cfg.samples_per_prompt,
                                           cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                           seed=step_seed(cfg.seed, step))
            if cfg.retain_prompts_per_step:
                rollouts.teacher_scale = retain_scale(len(rollouts.prompts), n_harmful)
            t1 = time.time()
            optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(step_seed(cfg.seed, step) + 1)   # any dropout in the loss pass
            totals = train_step(student, teacher, rollouts, safety_ids, cfg)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            record = {
                "step": step + 1, **totals, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                "response_length": float(rollouts.response_lengths().float().mean()),
                "rollout_refusal_rate": refusal_rate(rollouts.completions[:n_harmful]),
                "rollout_seconds": t1 - t0, "step_seconds": time.time() - t0,
            }
            if cfg.retain_prompts_per_step:
                record["retain_rollout_refusal_rate"] = refusal_rate(rollouts.completions[n_harmful:])
            history.append(record)
            metrics_log.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", mass_S=f"{record['student_mass_on_S']:.3f}",
                            refusal=f"{record['rollout_refusal_rate']:.2f}")
            done = step + 1
            stopping = cfg.stop_after is not None and done - start >= cfg.stop_after and done < n_steps
            if (cfg.save_every and done % cfg.save_every == 0) or done == n_steps or stopping:
                save_checkpoint(out, done, student, tokenizer, optimizer, scheduler, cfg, identity)
            if stopping:
                logger.info("stopping after %d steps (--stop-after); resume with the same command", cfg.stop_after)
                break
    finally:
        metrics_log.close()
        if sampler is not None:
            sampler.close()
    done = start + len(history)
    finished = done >= n_steps
    final_dir, trained = save_final(out, student, tokenizer) if cfg.save_final and finished else (None, student)
    return TrainResult(trained, done, history, final_dir)
