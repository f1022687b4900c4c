"""`safesteer tokens`: vote the safety-token set S (docs/METHOD.md section 3).

    safesteer tokens --model M --vector vec/ --prompts harmless_val.json --out tokens.json

Samples continuations from the steered model on harmless prompts, compares teacher and base
next-token distributions along them, and keeps the K ids that win most votes. Without --prompts
the project's harmless validation split is used. Horizon and min-prob default to the paper's
values for the model family (Llama: 5 and 1e-7; others, e.g. Qwen: 7 and 1e-8).
"""

from __future__ import annotations

import argparse
import logging

from openrlhf_safesteer.cli import add_device_map_flags, device_placement
from openrlhf_safesteer.helpformat import HelpFormatter

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tokens", help="vote the safety-token set S from teacher/base disagreement",
        description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="HF directory, hub id, or an embedded model name (the base model)")
    p.add_argument("--vector", required=True, help="steering-vector folder from `safesteer direction`")
    p.add_argument("--prompts", default=None, help="harmless prompts: JSON list / JSONL with 'prompt' / text file; "
                   "default: the project's harmless validation split")
    p.add_argument("--out", required=True, help="output JSON file for the safety-token set")
    p.add_argument("--horizon", type=int, default=None,
                   help="answer positions H compared per sample (default: 5 for Llama models, 7 otherwise)")
    p.add_argument("--n-samples", type=int, default=8, help="steered continuations sampled per prompt (N)")
    p.add_argument("--k", type=int, default=50, help="size of S: ids kept by votes")
    p.add_argument("--k-prime", type=int, default=200, help="ids voted for at each valid position (K')")
    p.add_argument("--min-prob", type=float, default=None,
                   help="ban ids whose mean teacher probability is lower (default: 1e-7 Llama, 1e-8 otherwise)")
    p.add_argument("--coeff", type=float, default=None, help="steering coefficient (default: the vector's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_device_map_flags(p)
    return p


def check_flags(args) -> None:
    """Raise SystemExit naming the flag for a value select_safety_tokens would reject after the model loads."""
    from openrlhf_safesteer.steering import finite_coeff

    for name in ("n_samples", "k", "k_prime", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("horizon", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.min_prob is not None and not 0 <= args.min_prob < 1:
        raise SystemExit(f"--min-prob must be in [0, 1), got {args.min_prob}")
    if args.coeff is not None:
        try:
            finite_coeff(args.coeff, "--coeff")
        except ValueError as error:
            raise SystemExit(str(error)) from None


def run(args) -> int:
    import torch

    from openrlhf_safesteer import data
    from openrlhf_safesteer.cli import check_chat_template, check_out
    from openrlhf_safesteer.loading import load_model
    from openrlhf_safesteer.safety_tokens import (
        default_horizon,
        default_min_prob,
        select_safety_tokens,
    )
    from openrlhf_safesteer.steering import SteeringVector, check_output_file

    # Artifacts, prompts, flags, --out and the chat template first: bad input fails before the model loads.
    vector = SteeringVector.load(args.vector)
    prompts = data.load_prompt_file(args.prompts) if args.prompts else data.harmless("validation")
    check_flags(args)
    placement = device_placement(args)  # contradictory placement flags fail before the model loads
    check_out(args.out, check_output_file)
    check_chat_template(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), **placement)
    vector.check_compatible(model)
    horizon = args.horizon or default_horizon(model)
    min_prob = args.min_prob if args.min_prob is not None else default_min_prob(model)
    tokens = select_safety_tokens(model, tokenizer, vector, prompts, horizon=horizon, n_samples=args.n_samples,
                                  k=args.k, k_prime=args.k_prime, min_prob=min_prob, seed=args.seed,
                                  coeff=args.coeff, batch_size=args.batch_size)
    tokens.model_name = args.model
    tokens.save(args.out)
    shown = " | ".join(repr(t) for t in tokens.texts[:15])
    print(f"safety tokens: {args.out} (|S| = {len(tokens)}): {shown}")
    return 0
