"""`safesteer demo`: SafeSteer end to end on the embedded offline model, on a CPU, in one command.

    safesteer demo --out demo/

direction -> safety tokens -> training (SafeSteer and the full-vocabulary ablation) -> before/after
evaluation on held-out prompts. Writes demo/final (the trained model), demo/report.json and
demo/report.md with plots.
"""

from __future__ import annotations

import argparse
import json

from openrlhf_safesteer.cli import HelpFormatter


def add_parser(subparsers) -> argparse.ArgumentParser:
    from openrlhf_safesteer.demo.pipeline import DemoConfig

    d = DemoConfig()
    p = subparsers.add_parser("demo", help="run the whole pipeline on the embedded offline model (CPU, no hub)",
                              description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default=d.out, help="output directory")
    p.add_argument("--model", default=d.model, help="embedded model name, HF directory or hub id")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random choice")
    p.add_argument("--layers", type=int, nargs="+", default=d.layers, help="decoder layers searched for the direction")
    p.add_argument("--coeff", type=float, default=d.coeff,
                   help="steering coefficient for the direction search and the safety-token vote")
    p.add_argument("--teacher-coeff", type=float, default=d.teacher_coeff,
                   help="steering coefficient of the teacher during training (docs/METHOD.md: 1)")
    p.add_argument("--horizon", type=int, default=d.horizon, help="safety-token horizon H (docs/METHOD.md: 7 for Qwen)")
    p.add_argument("--min-prob", type=float, default=d.min_prob,
                   help="ban ids whose mean teacher probability is below this (docs/METHOD.md: 1e-8 for Qwen)")
    p.add_argument("--token-samples", type=int, default=d.token_samples, help="steered samples per prompt for S")
    p.add_argument("--token-prompts", type=int, default=d.token_prompts, help="harmless prompts voting S")
    p.add_argument("--objectives", nargs="+", default=d.objectives,
                   help="engine objectives to train (exact = SafeSteer; full_vocab = the ablation)")
    p.add_argument("--train-splits", nargs="+", default=d.train_splits,
                   help="harmful prompt splits to train on (openrlhf_safesteer/data/harmful.json; never 'test')")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per training run")
    p.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step, help="prompts per step")
    p.add_argument("--samples-per-prompt", type=int, default=d.samples_per_prompt, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="rollout length")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate (LoRA)")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N prompts of each set")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice; 1 is faster on a CPU shared with other jobs)")
    p.add_argument("--vector", default=None, help="reuse a steering-vector folder (skips the direction search)")
    p.add_argument("--tokens", default=None, help="reuse a safety-token JSON (skips the vote)")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="warm-up share of the steps")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return p


def run(args) -> int:
    from openrlhf_safesteer.demo.pipeline import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, model=args.model, seed=args.seed, layers=args.layers, coeff=args.coeff,
                     teacher_coeff=args.teacher_coeff,
                     horizon=args.horizon, min_prob=args.min_prob, token_samples=args.token_samples, token_prompts=args.token_prompts,
                     objectives=args.objectives, steps=args.steps, prompts_per_step=args.prompts_per_step,
                     samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens, lr=args.lr,
                     lora_r=args.lora_r, eval_limit=args.eval_limit, threads=args.threads, progress=args.progress,
                     vector=args.vector, tokens=args.tokens, warmup_ratio=args.warmup_ratio,
                     train_splits=args.train_splits, onednn=not getattr(args, "no_onednn", False))
    print("safesteer demo settings:\n" + cfg.summary(), flush=True)
    report = run_demo(cfg)
    names = [n for n in ("base", "safesteer", "full_vocab") if n in report]
    print(f"\n{'model':<12} {'harmful refusal':>16} {'harmless refusal':>17} {'general_score':>14}")
    for n in names:
        e = report[n]
        print(f"{n:<12} {100 * e['harmful_refusal_rate']:>15.1f}% {100 * e['harmless_refusal_rate']:>16.1f}% "
              f"{e['general_score']:>14.1f}")
    if "goal" in report:
        print("goal:", json.dumps(report["goal"]))
    print(f"total {report['timings_seconds']['total']:.0f} s; report: {args.out}/report.md")
    return 0
