"""`TrainConfig`: every knob of a local SafeSteer run, its checks, and the `safesteer train` flag of each.

The engine (`local/engine.py`) runs it, the checkpoints (`local/checkpoints.py`) store it; the demo and the
comparison build theirs from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from openrlhf_safesteer.optional import vllm_missing

from .teacher import DEFAULT_SAFETY_SYSTEM_PROMPT

OBJECTIVES = ("exact", "sampled", "forward", "full_vocab", "renormalized", "system_prompt")
ROLLOUT_BACKENDS = ("auto", "hf", "vllm")
TEACHER_MODES = ("auto", "frozen_copy", "shared_lora")

# Run-identity keys that are no TrainConfig field, with the `safesteer train` flags that set them
IDENTITY_FLAGS = {"total_steps": "--max-steps/--epochs", "prompts": "--prompts", "vector": "--vector",
                  "safety_ids": "--tokens"}


RETAIN_DIVERGENCES = ("full_vocab", "subset", "refusal")


def knob(default: Any = dataclasses.MISSING, help: str = "", *, check: tuple[Callable[[Any, Any], bool], str] | None = None,
         choices: tuple | None = None, flag: str | None = None, cli: bool = True,
         factory: Callable[[], Any] | None = None, **extra: Any) -> Any:
    """A config field that carries its own help, its range check and its command-line flag.

    check: (ok(value, config), "what is allowed"), tested by `check_fields` after the finiteness of floats.
    choices: the allowed values (and the flag's argparse choices). flag: the flag's name when it is not
    --NAME-WITH-DASHES (a bool that defaults to True gets --no-NAME; the help of a bool says what its flag
    does). cli: False for a setting that has no flag. factory: a default_factory (lists). extra: more metadata.
    """
    metadata = {"help": help, "check": check, "choices": choices, "flag": flag, "cli": cli, **extra}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of a config field: its own, --no-NAME for a bool that defaults to True, else --NAME."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    prefix = "--no-" if f.default is True else "--"
    return prefix + f.name.replace("_", "-")


def flag_of(name: str) -> str:
    """'lr (--lr)': a setting with the `safesteer train` flag that sets it, for error messages."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    flag = IDENTITY_FLAGS.get(name) or (flag_name(fields[name]) if name in fields else "--" + name.replace("_", "-"))
    return f"{name} ({flag})"


def check_fields(config: Any) -> None:
    """Every field's own checks, in field order: its choices, then (floats) finiteness, then its range.

    NaN passes every `x <= 0` test, so finiteness is checked before the range; each failure here used to
    surface only after the model load (torch's "Invalid learning rate: nan") or not at all (top_p 0: greedy
    rollouts, the M samples of a prompt identical).
    """
    for f in dataclasses.fields(config):
        value, choices, check = getattr(config, f.name), f.metadata.get("choices"), f.metadata.get("check")
        if choices and value not in choices:
            raise ValueError(f"{f.name} must be one of {choices}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag_of(f.name)} must be a finite number, got {value}")
        if check and not check[0](value, config):
            raise ValueError(f"{flag_of(f.name)} must be {check[1]}, got {value}")


def _at_least_one(value, cfg) -> bool:
    return value >= 1


def _positive(value, cfg) -> bool:
    return value > 0


def _unset_or_at_least_one(value, cfg) -> bool:
    return value is None or value >= 1


@dataclass
class TrainConfig:
    """Every knob of a local SafeSteer run (defaults: docs/METHOD.md, Qwen; the demo overrides for CPU).

    Each field carries its help, its check and its `safesteer train` flag (`knob`); `cli/train.py` derives
    the flags from them."""

    out: str = knob("safesteer_run", "run directory (checkpoints/, final/, metrics.jsonl)")
    objective: str = knob(
        "exact", "exact: localized reverse KL on S (SafeSteer); sampled: its sampled-token advantage; "
        "forward / full_vocab / renormalized / system_prompt: the docs/METHOD.md ablations",
        choices=OBJECTIVES, flag="--safesteer.objective")
    lr: float = knob(1e-5, "AdamW learning rate (peak of the cosine schedule)", check=(_positive, "> 0"))
    weight_decay: float = knob(0.0, "AdamW weight decay", check=(lambda v, c: v >= 0, ">= 0"))
    warmup_ratio: float = knob(0.1, "linear warm-up share of the steps", check=(lambda v, c: 0 <= v < 1, "in [0, 1)"))
    max_grad_norm: float = knob(1.0, "gradient clipping norm", check=(_positive, "> 0"))
    epochs: float = knob(1.0, "passes over the prompts (fractions allowed)",
                         check=(lambda v, c: c.max_steps is not None or v > 0, "> 0 (or set --max-steps)"))
    # max_steps 0 or less ran no step and wrote the untrained base as final/ (exit 0)
    max_steps: int | None = knob(None, "optimizer steps (overrides --epochs)",
                                 check=(_unset_or_at_least_one, ">= 1 (or unset: use --epochs)"))
    prompts_per_step: int = knob(4, "prompts per optimizer step", check=(_at_least_one, ">= 1"))
    retain_prompts_per_step: int = knob(
        0, "the project's selectivity extension (docs/METHOD.md section 8): retain prompts (borderline-safe / "
        "harmless) per step, whose teacher is the unsteered base; 0 (default): the paper's method",
        check=(lambda v, c: v >= 0, ">= 0 (0: no retain term)"))
    retain_divergence: str = knob(
        "full_vocab", "the retain rows' loss (docs/METHOD.md section 8): full_vocab, the reverse KL to the unsteered "
        "base over the whole vocabulary (it holds the refusal openers too); subset, the method's loss on S; "
        "refusal, a one-sided hinge on the first reply token's refusal log-odds against the base's (prompt-only: "
        "no retain rollouts; --retain-weight, --retain-margin)",
        choices=RETAIN_DIVERGENCES)
    retain_weight: float = knob(
        1.0, "retain_divergence refusal: the hinge's weight, added to the harmful rows' loss (which it does not "
        "dilute); 0 with --refusal-surgery: the surgery alone", check=(lambda v, c: v >= 0, ">= 0"))
    # Not 0: the base's scores come from the no-gradient kernels (oneDNN on CPU) and the student's from the
    # training ones, which differ by ~1e-6 at step 0; at a kink of 0 that noise switched the hinge on with its full
    # gradient (norm ~24 at weight 1 on the demo model, against ~0.1 for the harmful loss), and AdamW, which
    # normalises gradient scale away, then took it as the step's direction (dev run of 2026-12-07).
    retain_margin: float = knob(
        0.1, "retain_divergence refusal: log-odds the student may exceed the base's by before the hinge binds",
        check=(lambda v, c: v >= 0, ">= 0"))
    retain_grad_ratio: float | None = knob(
        None, "retain_divergence refusal: whenever the hinge binds, rescale its gradient to this multiple of the "
        "harmful rows' gradient norm (instead of --retain-weight's fixed weight; the hinge's own gradient is ~100x "
        "the harmful loss's on the demo model, and AdamW followed one such step for the rest of the run)",
        check=(lambda v, c: v is None or v > 0, "> 0 (or unset)"))
    surgery_target: str = knob(
        "gradient", "refusal_surgery: project the harmful gradient before AdamW (gradient, A-GEM), or AdamW's own "
        "update after its step (update: AdamW's per-parameter scaling turns a projected gradient into a step that "
        "still raises the retain prompts' refusal, to first order)", choices=("gradient", "update"))
    refusal_surgery: bool = knob(
        False, "retain_divergence refusal: A-GEM gradient surgery, the harmful gradient loses its component that "
        "would raise the retain prompts' mean first-token refusal log-odds (docs/METHOD.md section 8)")
    samples_per_prompt: int = knob(8, "on-policy completions per prompt (M)", check=(_at_least_one, ">= 1"))
    micro_batch_size: int = knob(8, "sequences per forward/backward (gradient accumulation within a step)",
                                 check=(_at_least_one, ">= 1"))
    max_new_tokens: int = knob(512, "rollout length limit", check=(_at_least_one, ">= 1"))
    temperature: float = knob(1.0, "rollout and loss temperature", check=(_positive, "> 0"))
    top_p: float = knob(1.0, "rollout nucleus sampling", check=(lambda v, c: 0 < v <= 1, "in (0, 1]"))
    coeff: float | None = knob(None, "steering coefficient (default: the vector's own)", flag="--safesteer.coeff")
    system_prompt: str = knob(DEFAULT_SAFETY_SYSTEM_PROMPT, "the teacher's system prompt (objective system_prompt only)",
                              cli=False)
    lora_r: int = knob(0, "LoRA rank; 0 = full fine-tuning (with LoRA the teacher shares the weights)",
                       check=(lambda v, c: v >= 0, ">= 0 (0: full fine-tuning)"))
    # alpha 0 scales the adapter's update to zero: the run "trains" and writes the untrained base
    lora_alpha: float = knob(32.0, "LoRA alpha", check=(lambda v, c: c.lora_r == 0 or v > 0, "> 0 with LoRA (--lora-r > 0)"))
    lora_targets: list[str] = knob(help="module names that get LoRA adapters (those the model has)", cli=False,
                                   factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])
    lora_layers: list[int] | None = knob(None, "decoder layers that get adapters (None: all)", cli=False)
    freeze_embeddings: bool = knob(False, "full fine-tuning without the embeddings (saves memory: AdamW on the 0.5B "
                                   "default model peaks at 15 GB otherwise)")
    teacher: str = knob("auto", "auto: shared_lora with LoRA (one copy of the weights), else a frozen copy",
                        choices=TEACHER_MODES)
    gradient_checkpointing: bool = knob(False, "trade compute for memory")
    rollout_backend: str = knob("auto", "on-policy sampler: hf generate, or vllm (needs vLLM, a CUDA GPU and "
                                "--lora-r > 0); auto: vllm when all three hold, else hf", choices=ROLLOUT_BACKENDS)
    vllm_gpu_memory_utilization: float = knob(0.3, "share of the GPU the vLLM rollout engine takes (the trainer "
                                              "needs the rest)", check=(lambda v, c: 0 < v < 1, "in (0, 1)"))
    bf16: bool = knob(False, "bf16 weights and compute (GPU only)")
    seed: int = knob(0, "seed of the data order and every random stream")
    save_every: int = knob(0, "checkpoint every N steps (0: at the end)", check=(lambda v, c: v >= 0, ">= 0 (0: only at the end)"))
    keep_checkpoints: int = knob(2, "checkpoints kept (the newest)", cli=False)
    resume: bool = knob(True, "start a fresh run; an --out that holds checkpoints is refused, not mixed in "
                        "(without it: continue from OUT/checkpoints/latest when present)")
    stop_after: int | None = knob(None, "stop with a checkpoint after N steps of this call",
                                  check=(_unset_or_at_least_one, ">= 1 (or unset)"))
    save_final: bool = knob(True, "write out/final (merged if LoRA)", cli=False)
    tensorboard: bool = knob(False, "also log to OUT/tensorboard")
    wandb: bool = knob(False, "also log to Weights & Biases")
    wandb_project: str = knob("safesteer", "wandb project")
    progress: bool = knob(True, "hide progress bars", cli=False)

    def validate(self) -> None:
        """Reject bad settings before anything heavy (the model load, the teacher copy, generation)."""
        check_fields(self)
        if self.retain_prompts_per_step and self.objective == "system_prompt":
            raise ValueError("the retain term (retain_prompts_per_step > 0) needs a steering-vector teacher; "
                             "objective system_prompt has none to switch off")
        if self.refusal_surgery and (self.retain_divergence != "refusal" or not self.retain_prompts_per_step):
            raise ValueError("refusal_surgery projects against the retain prompts' refusal gradient: it needs "
                             "retain_divergence='refusal' and retain_prompts_per_step > 0")
        if self.teacher == "shared_lora" and self.lora_r <= 0:
            raise ValueError("teacher=shared_lora needs LoRA (lora_r > 0)")
        if self.bf16 and not torch.cuda.is_available():
            raise ValueError("bf16 training is for GPUs; on CPU train in float32")
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
