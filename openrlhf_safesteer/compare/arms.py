"""The comparison's settings and, for each arm, the command that trains it (pure functions of the settings).

Every arm trains the same LoRA adapter (rank, alpha, target projections) from the same base model
with the same learning rate, AdamW betas, cosine schedule to zero with the same warm-up, gradient
clipping and seed, for the same number of optimizer steps over draws from the same training prompts.
What differs is what each method needs (`ARM_NEEDS`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from openrlhf_safesteer.demo.pipeline import DemoConfig
from openrlhf_safesteer.local.engine import step_prompts


def default_python() -> str:
    """The interpreter the arms (and the frontier grid's runs) start: $PYTHON, the recipes' variable (compare_cpu.sh
    and compare_llama.sh pass it on; the tests set it to a warm interpreter), else this one."""
    return os.environ.get("PYTHON") or sys.executable


ARMS = ("safesteer", "safesteer_sampled", "dpo", "ppo", "sft", "safesteer_local")

# What each method consumes, for the report: the data and signals the method itself needs.
ARM_NEEDS = {
    "safesteer": "harmful prompts; steering vector + S; the steered reference model as teacher (no responses, "
                 "labels or reward)",
    "safesteer_sampled": "as safesteer (per-token advantage in OpenRLHF's stock policy loss)",
    "dpo": "harmful prompts + one preference pair per prompt draw (chosen: the steered teacher's complete reply that "
           "the refusal judge calls a refusal, rejected: the base's complete reply that it calls compliance; replies "
           "sampled to end of turn, cut ones dropped); a frozen reference model",
    "ppo": "harmful prompts; a reward function (the refusal judge: 1 for a refusal, 0 otherwise); "
           "{n} samples per prompt for the group baseline; a frozen reference model for the KL anchor",
    "sft": "harmful prompts + the steered teacher's complete sampled reply to each prompt draw (no judge, no labels)",
    "safesteer_local": "as safesteer, in one process (no Ray, no DeepSpeed)",
}


@dataclass
class CompareConfig:
    """The comparison's own knobs; the training settings are the demo's (`demo`), shared by every arm."""

    out: str
    from_dir: str | None = None        # a finished `safesteer demo` folder: reuse its vector, S and base eval
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    demo: DemoConfig = field(default_factory=DemoConfig)
    dpo_beta: float = 0.1              # OpenRLHF's default
    # REINFORCE++-baseline subtracts each prompt's mean reward: with a binary reward a group carries signal only when
    # its samples disagree, so 4 (the least of RLOO, GRPO and REINFORCE++ practice); the rollouts per step stay the
    # demo's prompts_per_step x samples_per_prompt (8 = 2 prompts x 4).
    ppo_samples_per_prompt: int = 4
    # The KL anchor to the base as OpenRLHF users set it (the project's GPU recipe, recipes/baseline_ppo_llama.sh):
    # k3 estimator in the loss, coefficient 0.01; 0 drops the anchor and the reference model.
    ppo_kl_coef: float = 0.01
    # DPO's pairs and SFT's targets: replies sampled to end of turn up to this many tokens (a reply still cut there is
    # dropped), at most pair_attempts draws per prompt draw; fill_budget repeats surviving pairs (in draw order) up
    # to one per prompt draw so every arm takes the same optimizer steps.
    pair_max_new_tokens: int = 256
    pair_attempts: int = 2
    # DPO's micro-batch: its rows are whole replies (up to pair_max_new_tokens), a chosen and a rejected one per pair,
    # each with the policy's and the reference's full-vocabulary logits; OpenRLHF accumulates gradients up to the
    # optimizer batch (the rollouts per step), and DPO's loss is a mean over pairs, so the update is the same.
    # Measured: at the demo's micro-batch of 8 pairs of up to 256 tokens the main process passed 17 GB and was
    # OOM-killed on a 24 GB machine; at 2 it stays near 14 GB (docs/openrlhf.md, "The frontier protocol").
    dpo_micro_batch_size: int = 2
    fill_budget: bool = True
    # the judge that filters DPO's pairs (a refusing chosen, a complying rejected): one of compare.evaluation.JUDGES,
    # or "none" (complete replies, no filter: only for tests on random tiny models, which never refuse)
    pair_filter: str = "refusal"
    local_objective: str = "exact"     # the safesteer_local arm's objective (full_vocab: the ablation)
    eval_limit: int | None = None      # first N prompts of each held-out set (tests)
    ppo_reward: str | None = None      # reward function file of the ppo arm (default: recipes/safety_reward.py)
    # The SafeSteer arms draw the prompts in the local engine's step order (8 distinct prompts a step); False
    # leaves OpenRLHF's shuffle, which repeats prompts within a step (measured weaker over 3 seeds: docs/openrlhf.md,
    # "Parity over seeds").
    keep_prompt_order: bool = True
    python: str = field(default_factory=default_python)

    def validate(self) -> None:
        """ValueError/FileNotFoundError on a bad setting, before any model is loaded."""
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms or len(set(self.arms)) < len(self.arms):
            raise ValueError(f"--arms must name distinct arms of {', '.join(ARMS)}, got {self.arms}")
        self.demo.validate()
        if self.demo.samples_per_prompt != 1 and "ppo" in self.arms:
            raise ValueError("the ppo arm keeps the rollouts per step equal by drawing prompts_per_step / "
                             f"{self.ppo_samples_per_prompt} prompts: use --samples-per-prompt 1")
        if "ppo" in self.arms and (self.ppo_samples_per_prompt < 2
                                   or self.demo.prompts_per_step % self.ppo_samples_per_prompt):
            raise ValueError(f"ppo samples per prompt must be >= 2 and divide prompts_per_step "
                             f"({self.demo.prompts_per_step}), got {self.ppo_samples_per_prompt}")
        if not (self.dpo_beta > 0 and math.isfinite(self.dpo_beta)):
            raise ValueError(f"--dpo-beta must be a positive number, got {self.dpo_beta}")
        if not (self.ppo_kl_coef >= 0 and math.isfinite(self.ppo_kl_coef)):
            raise ValueError(f"--ppo-kl-coef must be >= 0, got {self.ppo_kl_coef}")
        from openrlhf_safesteer.compare.evaluation import JUDGES

        if self.pair_filter not in (*JUDGES, "none"):
            raise ValueError(f"pair_filter must be one of {', '.join(JUDGES)} or none, got {self.pair_filter!r}")
        if self.dpo_micro_batch_size < 1 or self.rollouts_per_step % min(self.rollouts_per_step,
                                                                          self.dpo_micro_batch_size):
            raise ValueError(f"dpo_micro_batch_size must be >= 1 and divide the rollouts per step "
                             f"({self.rollouts_per_step}), got {self.dpo_micro_batch_size}")
        if self.pair_max_new_tokens < 1 or self.pair_attempts < 1:
            raise ValueError(f"pair_max_new_tokens and pair_attempts must be >= 1, got {self.pair_max_new_tokens}, "
                             f"{self.pair_attempts}")
        if self.ppo_reward is not None and not Path(self.ppo_reward).is_file():
            raise FileNotFoundError(f"--ppo-reward {self.ppo_reward} does not exist")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"--eval-limit must be >= 1, got {self.eval_limit}")
        if self.from_dir is not None:
            missing = [name for name in ("vector/steering_vector.json", "safety_tokens.json")
                       if not (Path(self.from_dir) / name).is_file()]
            if missing:
                raise FileNotFoundError(f"--from {self.from_dir}: not a finished demo folder (missing "
                                        f"{', '.join(missing)}; make one with `safesteer demo --out DIR`)")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def rollouts_per_step(self) -> int:
        return self.demo.prompts_per_step * self.demo.samples_per_prompt


def prompt_schedule(prompts: list[str], steps: int, per_step: int, seed: int) -> list[str]:
    """The prompts drawn for `steps` optimizer steps of `per_step` prompts: the local engine's order
    (a seeded permutation per pass), concatenated. OpenRLHF arms train on exactly this multiset."""
    return [p for step in range(steps) for p in step_prompts(prompts, step, per_step, seed)]


def write_prompts(path: Path, prompts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")


def _optimizer_flags(cfg: CompareConfig, prefix: str) -> list[str]:
    """The local engine's optimizer, in OpenRLHF's flags: AdamW (torch's betas), cosine to 0, warm-up, clip."""
    d = cfg.demo
    p = f"--{prefix}." if prefix else "--"
    return [f"{p}adam.lr", repr(d.lr), f"{p}adam.betas", "0.9", "0.999", f"{p}adam.weight_decay", "0.0",
            f"{p}lr_scheduler", "cosine_with_min_lr", f"{p}min_lr_ratio", "0.0", f"{p}lr_warmup_ratio",
            repr(d.warmup_ratio), f"{p}max_norm", "1.0"]


def _lora_flags(cfg: CompareConfig) -> list[str]:
    d = cfg.demo
    if d.lora_layers is not None:
        raise ValueError("OpenRLHF's --ds.lora.* flags cannot place adapters on some layers only: lora_layers "
                         "must be None for the comparison")
    return ["--ds.lora.rank", str(d.lora_r), "--ds.lora.alpha", str(int(d.lora_alpha)),
            "--ds.lora.target_modules", *d.lora_targets]


def ray_ppo_flags(cfg: CompareConfig, model: str, prompts: Path, n_prompts: int, arm_dir: Path,
                  prompts_per_step: int, samples_per_prompt: int) -> list[str]:
    """Flags of OpenRLHF's train_ppo_ray shared by the safesteer, safesteer_sampled and ppo arms (CPU)."""
    d = cfg.demo
    rollouts = prompts_per_step * samples_per_prompt
    return [
        "--actor.model_name_or_path", model, "--data.prompt_dataset", str(prompts), "--data.input_key", "prompt",
        "--data.apply_chat_template", "--data.max_samples", str(n_prompts), "--data.max_len", "1024",
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1", "--vllm.num_engines", "1",
        "--ds.attn_implementation", "sdpa", "--ds.zero_stage", "0",
        "--rollout.batch_size", str(prompts_per_step), "--rollout.n_samples_per_prompt", str(samples_per_prompt),
        "--rollout.micro_batch_size", str(rollouts), "--rollout.max_new_tokens", str(d.max_new_tokens),
        "--rollout.temperature", "1.0", "--rollout.top_p", "1.0",
        "--train.batch_size", str(rollouts), "--train.micro_batch_size", str(min(rollouts, d.micro_batch_size)),
        "--train.max_epochs", "1", "--train.num_episodes", "1", "--train.seed", str(d.seed),
        *_optimizer_flags(cfg, "actor"), *_lora_flags(cfg),
        "--ckpt.output_dir", str(arm_dir / "final"), "--ckpt.path", str(arm_dir / "ckpt"), "--ckpt.disable_ds",
        "--logger.tensorboard_dir", str(arm_dir / "tensorboard"),
    ]


def arm_command(arm: str, cfg: CompareConfig, model: str, data_dir: Path, arm_dir: Path, vector: Path,
                tokens: Path) -> list[str]:
    """The command line that trains `arm` (run from the repository root, or with the package installed)."""
    d = cfg.demo
    py = cfg.python
    steps = d.steps
    if arm in ("safesteer", "safesteer_sampled"):
        objective = "exact" if arm == "safesteer" else "sampled"
        return [py, "-m", "openrlhf_safesteer.cli.train_safesteer_ray",
                *ray_ppo_flags(cfg, model, data_dir / "train_prompts.jsonl", steps * d.prompts_per_step, arm_dir,
                               d.prompts_per_step, d.samples_per_prompt),
                "--ref.num_nodes", "1", "--ref.num_gpus_per_node", "1",
                "--safesteer.vector", str(vector), "--safesteer.tokens", str(tokens),
                "--safesteer.objective", objective, "--safesteer.coeff", repr(d.teacher_coeff or d.coeff),
                "--safesteer.rollout", "hf", "--safesteer.dump_dir", str(arm_dir / "dump"),
                # the draws file is in the local engine's step order: the same 8 prompts at every step
                *(["--safesteer.keep_prompt_order"] if cfg.keep_prompt_order else [])]
    if arm == "ppo":
        per_step = cfg.rollouts_per_step // cfg.ppo_samples_per_prompt
        # the anchor as the GPU recipe sets it: k3 KL in the loss against a frozen reference (the base)
        anchor = (["--algo.kl.use_loss", "--algo.kl.estimator", "k3", "--ref.num_nodes", "1",
                   "--ref.num_gpus_per_node", "1"] if cfg.ppo_kl_coef > 0 else [])
        return [py, "-m", "openrlhf_safesteer.plugin.stock", "ppo",
                *ray_ppo_flags(cfg, model, data_dir / "ppo_prompts.jsonl", steps * per_step, arm_dir, per_step,
                               cfg.ppo_samples_per_prompt),
                "--algo.advantage.estimator", "reinforce_baseline", "--algo.kl.init_coef", repr(cfg.ppo_kl_coef),
                *anchor, "--reward.remote_url", str(cfg.ppo_reward or reward_file())]
    if arm == "sft":
        return [py, "-m", "openrlhf_safesteer.plugin.stock", "sft",
                "--model.model_name_or_path", model, "--data.dataset", str(data_dir / "sft.jsonl"),
                "--data.input_key", "prompt", "--data.output_key", "response", "--data.apply_chat_template",
                "--data.max_len", "1024", "--train.batch_size", str(cfg.rollouts_per_step),
                "--train.micro_batch_size", str(min(cfg.rollouts_per_step, d.micro_batch_size)),
                "--train.max_epochs", "1", "--train.seed", str(d.seed), *_optimizer_flags(cfg, ""),
                *_lora_flags(cfg), "--ds.zero_stage", "0", "--ds.attn_implementation", "sdpa",
                "--ckpt.output_dir", str(arm_dir / "final"), "--ckpt.path", str(arm_dir / "ckpt"),
                "--ckpt.disable_ds"]
    if arm == "dpo":
        return [py, "-m", "openrlhf_safesteer.plugin.stock", "dpo",
                "--model.model_name_or_path", model, "--data.dataset", str(data_dir / "dpo_pairs.jsonl"),
                "--data.chosen_key", "chosen", "--data.rejected_key", "rejected", "--data.apply_chat_template",
                "--data.max_len", "1024", "--model.beta", repr(cfg.dpo_beta),
                "--train.batch_size", str(cfg.rollouts_per_step),
                "--train.micro_batch_size", str(min(cfg.rollouts_per_step, cfg.dpo_micro_batch_size)),
                "--train.max_epochs", "1", "--train.seed", str(d.seed), *_optimizer_flags(cfg, ""),
                *_lora_flags(cfg), "--ds.zero_stage", "0", "--ds.attn_implementation", "sdpa",
                "--ckpt.output_dir", str(arm_dir / "final"), "--ckpt.path", str(arm_dir / "ckpt"),
                "--ckpt.disable_ds"]
    if arm == "safesteer_local":
        return [py, "-m", "openrlhf_safesteer.cli.main", "train", "--model", model, "--vector", str(vector),
                "--tokens", str(tokens), "--prompts", str(data_dir / "train_split.jsonl"), "--out", str(arm_dir),
                "--max-steps", str(steps), "--prompts-per-step", str(d.prompts_per_step),
                "--samples-per-prompt", str(d.samples_per_prompt), "--micro-batch-size", str(d.micro_batch_size),
                "--max-new-tokens", str(d.max_new_tokens), "--lr", repr(d.lr), "--warmup-ratio",
                repr(d.warmup_ratio), "--lora-r", str(d.lora_r), "--lora-alpha", repr(d.lora_alpha),
                "--safesteer.coeff", repr(d.teacher_coeff or d.coeff), "--seed", str(d.seed), "--no-resume",
                *(["--safesteer.objective", cfg.local_objective] if cfg.local_objective != "exact" else [])]
    raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")


def reward_file() -> Path:
    """recipes/safety_reward.py of this checkout: the PPO baseline's reward function."""
    path = Path(__file__).resolve().parents[2] / "recipes" / "safety_reward.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the PPO arm's reward function (recipes/ of the repository) is missing")
    return path
