"""`safesteer direction`: compute the candidate refusal directions and select one (docs/METHOD.md section 1).

    safesteer direction --model M --harmful harmful.json --harmless harmless.json --out vec/

Writes vec/vector.safetensors + vec/steering_vector.json (the SteeringVector), vec/candidates.json
and vec/candidates.csv (every candidate's scores) and vec/candidates.png (the scores by layer). Each prompt file is split
with --seed into --n-val validation prompts and up to --n-train fitting prompts. Without
--harmful/--harmless the project's own prompt sets are used (their direction and validation splits).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

from openrlhf_safesteer.cli import add_device_map_flags, check_chat_template, check_out, device_placement
from openrlhf_safesteer.helpformat import HelpFormatter

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "direction", help="compute and select the refusal direction (steering vector)",
        description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="HF directory, hub id, or an embedded model name")
    p.add_argument("--harmful", default=None, help="harmful prompts: JSON list / JSONL with 'prompt' / text file, "
                   "one prompt a line; default: the project's harmful direction + validation splits")
    p.add_argument("--harmless", default=None, help="harmless prompts, same formats; default: the project's "
                   "harmless direction + validation splits")
    p.add_argument("--out", required=True, help="output folder for the steering vector and the candidate table")
    p.add_argument("--n-train", type=int, default=128, help="prompts per side used to fit the difference of means")
    p.add_argument("--n-val", type=int, default=32, help="prompts per side held out to score the candidates")
    p.add_argument("--no-filter", dest="filter_train", action="store_false",
                   help="keep every fitting prompt (default: only harmful prompts the model refuses, refusal score "
                        "> 0, and harmless ones it answers, < 0)")
    p.add_argument("--max-layer-fraction", type=float, default=0.8,
                   help="candidates come from layers < int(L * this); the last 20%% of the stack is dropped")
    p.add_argument("--kl-threshold", type=float, default=0.1,
                   help="drop candidates whose ablation moves harmless next-token distributions by more KL")
    p.add_argument("--coeff", type=float, default=1.0, help="activation-addition coefficient stored with the vector")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="score only these layers (a reduced search for big models; default: every layer below the cut)")
    p.add_argument("--positions", type=int, nargs="+", default=None,
                   help="score only these negative post-instruction positions, e.g. -1 (default: all of them)")
    p.add_argument("--refusal-words", nargs="+", default=["I", "Sorry", "As"],
                   help="refusal openers; their first tokens define the refusal score")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model weights dtype (means are accumulated in float64 regardless)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_device_map_flags(p)
    return p


def split_prompts(prompts: list[str], n_train: int, n_val: int, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle with seed; the first n_val are validation, the next (up to) n_train are for fitting."""
    if n_val < 1 or n_train < 1:
        raise ValueError(f"--n-train and --n-val must be >= 1, got {n_train} and {n_val}")
    if len(prompts) < n_val + 2:
        raise ValueError(f"need at least n_val + 2 = {n_val + 2} prompts, got {len(prompts)}; lower --n-val")
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return order[n_val:n_val + n_train], order[:n_val]


def check_flags(args) -> None:
    """Raise SystemExit naming the flag for a value that would fail (or silently misbehave) after the model
    loads; the built-in prompt sets are sliced, so a negative count would otherwise just drop prompts."""
    from openrlhf_safesteer.steering import finite_coeff

    if not 0 < args.max_layer_fraction <= 1:
        raise SystemExit(f"--max-layer-fraction must be in (0, 1], got {args.max_layer_fraction}")
    if not args.kl_threshold > 0:
        raise SystemExit(f"--kl-threshold must be > 0, got {args.kl_threshold}")
    for name in ("n_train", "n_val", "batch_size") + (("threads",) if args.threads is not None else ()):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        finite_coeff(args.coeff, "--coeff")
    except ValueError as error:
        raise SystemExit(str(error)) from None


def _load(path: str | None, kind: str, n_train: int, n_val: int, seed: int) -> tuple[list[str], list[str]]:
    from openrlhf_safesteer import data

    if path is None:
        split = data.harmful if kind == "harmful" else data.harmless
        return split("direction")[:n_train], split("validation")[:n_val]
    return split_prompts(data.load_prompt_file(path), n_train, n_val, seed)


def plot_candidates(table: list[dict], path: Path) -> None:
    """Ablation refusal score (lower = the direction mediates refusal) by layer, one line per position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openrlhf_safesteer.files import atomic_savefig

    fig, ax = plt.subplots(figsize=(7, 4))
    for position in sorted({row["position"] for row in table}):
        rows = [r for r in table if r["position"] == position and r["ablation_refusal"] is not None]
        if rows:
            ax.plot([r["layer"] for r in rows], [r["ablation_refusal"] for r in rows], marker="o", ms=3,
                    label=f"pos {position}")
    chosen = [r for r in table if r.get("selected")]
    if chosen:
        ax.scatter([chosen[0]["layer"]], [chosen[0]["ablation_refusal"]], s=120, facecolors="none",
                   edgecolors="red", label="selected")
    ax.set_xlabel("layer")
    ax.set_ylabel("harmful refusal score under ablation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def candidates_csv(rows: list[dict]) -> str:
    """Every candidate's scores as CSV text, one row per (layer, position), columns in table order."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["layer", "position"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def run(args) -> int:
    import torch

    from openrlhf_safesteer.directions import DirectionSelectionError, select_direction
    from openrlhf_safesteer.files import atomic_write_text
    from openrlhf_safesteer.loading import load_model
    from openrlhf_safesteer.steering import check_vector_dir

    # Flags, --out, prompts and the tokenizer's chat template first: bad input fails before the model loads.
    check_flags(args)
    placement = device_placement(args)  # contradictory placement flags fail before the model loads
    check_out(args.out, check_vector_dir)
    harmful_train, harmful_val = _load(args.harmful, "harmful", args.n_train, args.n_val, args.seed)
    harmless_train, harmless_val = _load(args.harmless, "harmless", args.n_train, args.n_val, args.seed)
    check_chat_template(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), **placement)
    logger.info("fitting on %d harmful / %d harmless prompts, scoring on %d / %d", len(harmful_train),
                len(harmless_train), len(harmful_val), len(harmless_val))
    try:
        vector, table = select_direction(
            model, tokenizer, harmful_train, harmless_train, harmful_val, harmless_val,
            refusal_words=args.refusal_words, filter_train=args.filter_train,
            max_layer_fraction=args.max_layer_fraction, kl_threshold=args.kl_threshold, coeff=args.coeff,
            layers=args.layers, positions=args.positions, batch_size=args.batch_size)
    except DirectionSelectionError as error:
        logger.error("%s", error)
        return 1
    vector.model_name = args.model
    out = Path(args.out)
    vector.save(out)    # swaps in a fresh folder: the old run's candidates.* go with its vector
    rows = [dict(r.to_dict(), selected=(r.layer == vector.layer and r.position == vector.position)) for r in table]
    atomic_write_text(out / "candidates.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(out / "candidates.csv", candidates_csv(rows))
    plot_candidates(rows, out / "candidates.png")
    print(f"steering vector: {out} (layer {vector.layer}, position {vector.position}, norm {vector.norm:.3f})")
    return 0
