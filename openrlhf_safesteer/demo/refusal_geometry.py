"""How alike the refusal gradients of different prompt kinds are, where the demo's LoRA update starts.

For each prompt set (harmful training and dev prompts, borderline-safe training (the surgery's guard) and dev
prompts, contrast and harmless dev prompts): the gradient of the mean first-reply-token refusal log-odds
(`selective.refusal_gradient`) over the trainable parameters of the demo's student (LoRA r 16 on every linear layer,
at its seeded initialisation, as `local.engine.prepare_student` makes it; at LoRA's start only the B matrices get a
gradient). Prints and writes the cosine between every pair, and for every set the share of its gradient that is
orthogonal to the guard's (`selective.kept_after_projection`): what a step that does not raise borderline-safe
refusal can still do to that set's refusal, to first order. This is the geometry the update surgery
(docs/METHOD.md section 8.1) works in.

    python -m openrlhf_safesteer.demo.refusal_geometry --out outputs/refusal_geometry.json

One forward and backward per 16 prompts of each set (about 300 prompts; a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from openrlhf_safesteer import data
from openrlhf_safesteer.directions import refusal_token_ids
from openrlhf_safesteer.files import atomic_write_json
from openrlhf_safesteer.selective import gradient_cosine, kept_after_projection, refusal_gradient

GUARD = "borderline-safe train (the guard)"


def prompt_sets() -> dict[str, list[str]]:
    """The sets compared, by name; GUARD is the surgery's (the local engine's default retain prompts)."""
    return {"harmful train": data.harmful("train"), "harmful validation": data.harmful("validation"),
            GUARD: data.borderline("train"), "borderline-safe dev": data.borderline("dev"),
            "contrast dev": data.borderline("contrast_dev"), "harmless validation": data.harmless("validation")}


def geometry(gradients: dict[str, list[torch.Tensor]], guard: str = GUARD) -> dict:
    """{"cosine": {a: {b: cos}}, "kept_vs_guard": {a: sqrt(1 - cos(a, guard)^2)}} for per-set gradients."""
    names = list(gradients)
    return {"cosine": {a: {b: gradient_cosine(gradients[a], gradients[b]) for b in names} for a in names},
            "kept_vs_guard": {a: kept_after_projection(gradients[a], gradients[guard]) for a in names}}


def table(result: dict) -> str:
    names = list(result["cosine"])
    lines = ["| refusal gradient of | " + " | ".join(names) + " | orthogonal to the guard |",
             "|---" * (len(names) + 2) + "|"]
    for a in names:
        cells = " | ".join(f"{result['cosine'][a][b]:+.2f}" for b in names)
        lines.append(f"| {a} | {cells} | {result['kept_vs_guard'][a]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for the cosines")
    p.add_argument("--model", default=None, help="model (default: the demo's)")
    p.add_argument("--seed", type=int, default=0, help="the LoRA initialisation's seed (the demo's: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from openrlhf_safesteer.demo.pipeline import DemoConfig, train_config
    from openrlhf_safesteer.loading import load_model, resolve_model
    from openrlhf_safesteer.local.engine import prepare_student

    if args.threads:
        torch.set_num_threads(args.threads)
    demo = DemoConfig(seed=args.seed, **({"model": args.model} if args.model else {}))
    model, tokenizer = load_model(resolve_model(demo.model))
    student = prepare_student(model, train_config(demo, "exact", str(Path(args.out).parent / "unused")))
    params = [q for q in student.parameters() if q.requires_grad]
    ids = refusal_token_ids(tokenizer)
    gradients = {name: refusal_gradient(student, tokenizer, prompts, ids, params)
                 for name, prompts in prompt_sets().items()}
    result = {"model": demo.model, "seed": args.seed, "trainable_parameters": sum(q.numel() for q in params),
              "sets": {name: len(prompts) for name, prompts in prompt_sets().items()}, **geometry(gradients)}
    atomic_write_json(Path(args.out), result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
