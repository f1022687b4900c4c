"""`safesteer train`: localized on-policy distillation on one machine (the local engine).

    safesteer train --model M --vector vec/ --tokens tokens.json --prompts harmful.json --out run/

The prompts default to the project's own harmful training split. Re-running the same command
resumes from run/checkpoints/latest (exactly: same data order, optimizer state and random streams).
"""

from __future__ import annotations

import argparse
import logging

from openrlhf_safesteer.cli import HelpFormatter

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from openrlhf_safesteer.local.config import OBJECTIVES, TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="train the student with localized on-policy distillation (local engine)",
        description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True,
                   help="student = teacher base: HF directory, hub id, or an embedded model name (qwen2.5-coder-0.5b)")
    p.add_argument("--vector", help="steering-vector folder from `safesteer direction` (not needed for "
                   "--safesteer.objective system_prompt)")
    p.add_argument("--tokens", required=True, help="safety-token set JSON from `safesteer tokens`")
    p.add_argument("--prompts", help="harmful prompts: JSON list / JSONL with 'prompt' / text file; default: the "
                   "project's harmful training split")
    p.add_argument("--retain-prompts-per-step", type=int, default=d.retain_prompts_per_step,
                   help="the project's selectivity extension (docs/METHOD.md section 8): retain prompts per step, "
                        "whose teacher is the unsteered base; 0 (default): the paper's method")
    p.add_argument("--retain-prompts", help="retain prompts (same formats as --prompts); default: the project's "
                   "borderline-safe training split")
    p.add_argument("--out", required=True, help="run directory (checkpoints/, final/, metrics.jsonl)")
    p.add_argument("--safesteer.objective", dest="objective", default=d.objective, choices=OBJECTIVES,
                   help="exact: localized reverse KL on S (SafeSteer); sampled: its sampled-token advantage; "
                        "forward / full_vocab / renormalized / system_prompt: the docs/METHOD.md ablations")
    p.add_argument("--safesteer.coeff", dest="coeff", type=float, default=None,
                   help="steering coefficient (default: the vector's own)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (peak of the cosine schedule)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="linear warm-up share of the steps")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping norm")
    p.add_argument("--epochs", type=float, default=d.epochs, help="passes over the prompts")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step, help="prompts per optimizer step")
    p.add_argument("--samples-per-prompt", type=int, default=d.samples_per_prompt,
                   help="on-policy completions per prompt (M)")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size,
                   help="sequences per forward/backward (gradient accumulation within a step)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="rollout length limit")
    p.add_argument("--temperature", type=float, default=d.temperature, help="rollout and loss temperature")
    p.add_argument("--top-p", type=float, default=d.top_p, help="rollout nucleus sampling")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank; 0 = full fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha")
    p.add_argument("--freeze-embeddings", action="store_true", help="full fine-tuning without the embeddings "
                   "(saves memory: AdamW on the 0.5B default model peaks at 15 GB otherwise)")
    p.add_argument("--teacher", default=d.teacher, choices=("auto", "frozen_copy", "shared_lora"),
                   help="auto: shared_lora with LoRA (one copy of the weights), else a frozen copy")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument("--rollout-backend", default=d.rollout_backend, choices=("auto", "hf", "vllm"),
                   help="on-policy sampler: hf generate, or vllm (needs vLLM, a CUDA GPU and --lora-r > 0); "
                        "auto: vllm when all three hold, else hf")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=d.vllm_gpu_memory_utilization,
                   help="share of the GPU the vLLM rollout engine takes (the trainer needs the rest)")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and compute (GPU only)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data order and every random stream")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--stop-after", type=int, default=None, help="stop with a checkpoint after N steps of this call")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start a fresh run; an --out that holds checkpoints is refused, not mixed in")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    p.add_argument("--wandb-project", default=d.wandb_project, help="wandb project")
    return p


def run(args) -> int:
    import torch

    from openrlhf_safesteer import data
    from openrlhf_safesteer.cli import check_chat_template
    from openrlhf_safesteer.loading import load_model
    from openrlhf_safesteer.local.checkpoints import resume_point, run_identity
    from openrlhf_safesteer.local.config import TrainConfig
    from openrlhf_safesteer.local.engine import train
    from openrlhf_safesteer.safety_tokens import SafetyTokenSet
    from openrlhf_safesteer.steering import SteeringVector

    # artifacts and prompts first: bad input fails before the model loads
    tokens = SafetyTokenSet.load(args.tokens)
    vector = SteeringVector.load(args.vector) if args.vector else None
    if vector is None and args.objective != "system_prompt":
        raise SystemExit(f"--vector is required for --safesteer.objective {args.objective}")
    prompts = data.load_prompt_file(args.prompts) if args.prompts else data.harmful("train")
    retain = None
    if args.retain_prompts_per_step:
        retain = data.load_prompt_file(args.retain_prompts) if args.retain_prompts else data.borderline("train")
    elif args.retain_prompts:
        raise SystemExit("--retain-prompts needs --retain-prompts-per-step > 0")
    cfg = TrainConfig(
        out=args.out, objective=args.objective, lr=args.lr, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm, epochs=args.epochs,
        max_steps=args.max_steps, prompts_per_step=args.prompts_per_step,
        retain_prompts_per_step=args.retain_prompts_per_step, samples_per_prompt=args.samples_per_prompt,
        micro_batch_size=args.micro_batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, coeff=args.coeff, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        freeze_embeddings=args.freeze_embeddings, teacher=args.teacher,
        gradient_checkpointing=args.gradient_checkpointing, rollout_backend=args.rollout_backend,
        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization, bf16=args.bf16, seed=args.seed,
        save_every=args.save_every, stop_after=args.stop_after, resume=args.resume, tensorboard=args.tensorboard,
        wandb=args.wandb, wandb_project=args.wandb_project)
    cfg.validate()
    # the run folder and the tokenizer need no weights: a fresh run over old checkpoints, a resume with other
    # settings or a tokenizer without a chat template fail here, not after the model load
    resume_point(cfg, run_identity(cfg, prompts, vector, tokens.ids, retain))
    check_chat_template(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32, device=device)
    tokens.check_compatible(model.get_output_embeddings().weight.shape[0], tokenizer)
    logger.info("training on %d prompts with |S| = %d, objective %s", len(prompts), len(tokens.ids), cfg.objective)
    result = train(model, tokenizer, vector, torch.tensor(tokens.ids), prompts, cfg, retain)
    if result.final_dir is not None:
        print(f"trained model: {result.final_dir}")
    else:
        print(f"stopped after step {result.steps}; run the same command again to resume")
    return 0
