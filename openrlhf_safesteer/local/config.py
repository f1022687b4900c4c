"""`TrainConfig`: every knob of a local SafeSteer run, its checks, and the `safesteer train` flag of each.

The engine (`local/engine.py`) runs it, the checkpoints (`local/checkpoints.py`) store it; the demo and the
comparison build theirs from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from openrlhf_safesteer.optional import vllm_missing

from .teacher import DEFAULT_SAFETY_SYSTEM_PROMPT

OBJECTIVES = ("exact", "sampled", "forward", "full_vocab", "renormalized", "system_prompt")
ROLLOUT_BACKENDS = ("auto", "hf", "vllm")

# `safesteer train`'s flag for a TrainConfig field (or a run-identity key), so errors name what to change
FLAGS = {"objective": "--safesteer.objective", "coeff": "--safesteer.coeff", "total_steps": "--max-steps/--epochs",
         "prompts": "--prompts", "vector": "--vector", "safety_ids": "--tokens"}


def flag_of(name: str) -> str:
    """'lr (--lr)': a setting with the `safesteer train` flag that sets it, for error messages."""
    return f"{name} ({FLAGS.get(name, '--' + name.replace('_', '-'))})"


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
                raise ValueError(f"{flag_of(name)} must be >= 1, got {getattr(self, name)}")
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
                raise ValueError(f"{flag_of(name)} must be a finite number, got {getattr(self, name)}")
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
                raise ValueError(f"{flag_of(name)} must be {allowed}, got {getattr(self, name)}")

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


def steps_per_epoch(num_prompts: int, prompts_per_step: int) -> int:
    return math.ceil(num_prompts / prompts_per_step)


def total_steps(num_prompts: int, cfg: TrainConfig) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(num_prompts, cfg.prompts_per_step)))
