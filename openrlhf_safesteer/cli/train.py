"""`safesteer train`: localized on-policy distillation on one machine (the local engine).

    safesteer train --model M --vector vec/ --tokens tokens.json --prompts harmful.json --out run/

The prompts default to the project's own harmful training split. Re-running the same command
resumes from run/checkpoints/latest (exactly: same data order, optimizer state and random streams).
"""

from __future__ import annotations

import argparse
import logging

from openrlhf_safesteer.cli import HelpFormatter, add_config_flags, config_values

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from openrlhf_safesteer.local.config import TrainConfig

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
    p.add_argument("--retain-prompts", help="retain prompts (same formats as --prompts); default: the project's "
                   "borderline-safe training split")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    # every TrainConfig setting with a flag, its help, default, choices and checks from the field (local/config.py)
    add_config_flags(p, TrainConfig(), required=("out",))
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
    cfg = TrainConfig(**config_values(args, TrainConfig))
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
