"""`safesteer demo`: SafeSteer end to end on the embedded offline model, on a CPU, in one command.

    safesteer demo --out demo/

direction -> safety tokens -> training (SafeSteer; with --ablation also the full-vocabulary ablation) ->
before/after evaluation on held-out prompts. Writes demo/final (the trained model), demo/report.json and
demo/report.md with plots. The base evaluation and stage 1 are stored by content and reused by a later run with
the same model, prompts, settings, code and threads (--no-cache computes them again).
"""

from __future__ import annotations

import argparse
import json

from openrlhf_safesteer.cli import HelpFormatter, add_config_flags, config_values

# Every DemoConfig field, in the help's order (help, default and type: the field's), so that `safesteer demo --help`
# is the whole list of settings docs/demo.md says it is; `onednn` alone is the top-level `safesteer --no-onednn`.
FLAGS = ["out", "model", "seed", "layers", "positions", "kl_threshold", "coeff", "teacher_coeff", "horizon",
         "min_prob", "token_samples", "token_prompts", "k", "objectives", "ablation", "train_splits", "steps", "prompts_per_step",
         "samples_per_prompt", "max_new_tokens", "lr", "lora_r", "lora_alpha", "lora_targets", "lora_layers",
         "freeze_embeddings", "warmup_ratio", "micro_batch_size", "retain_prompts_per_step", "retain_divergence",
         "retain_splits", "retain_weight", "retain_margin", "retain_grad_ratio", "refusal_surgery", "surgery_target", "selective", "false_refusal_ablation", "eval_limit", "refusal_tokens", "teacher_check_prompts", "threads", "vector", "tokens",
         "cache", "progress"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    from openrlhf_safesteer.demo.pipeline import DemoConfig

    p = subparsers.add_parser("demo", help="run the whole pipeline on the embedded offline model (CPU, no hub)",
                              description=__doc__, formatter_class=HelpFormatter)
    add_config_flags(p, DemoConfig(), FLAGS)
    return p


def run(args) -> int:
    from openrlhf_safesteer.demo.pipeline import DemoConfig, run_demo

    cfg = DemoConfig(**config_values(args, DemoConfig, FLAGS), onednn=not getattr(args, "no_onednn", False))
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
