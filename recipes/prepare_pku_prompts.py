"""Write N prompts from the unsafe part of PKU-SafeRLHF as JSONL ({"prompt": ...}), the paper's training set.

    python recipes/prepare_pku_prompts.py --out prompts.jsonl --n 100 --seed 0

"Unsafe part": prompts for which both responses in the dataset are labelled unsafe. Prompts are
de-duplicated, shuffled with the seed, and the first N kept. Needs the `datasets` package and
access to the Hugging Face hub (or a local copy: --dataset PATH).
"""

from __future__ import annotations

import argparse
import json
import random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output JSONL file")
    parser.add_argument("--n", type=int, default=100, help="number of prompts")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    parser.add_argument("--dataset", default="PKU-Alignment/PKU-SafeRLHF", help="hub id or local path")
    parser.add_argument("--split", default="train", help="dataset split")
    args = parser.parse_args()

    from datasets import load_dataset

    from openrlhf_safesteer.files import atomic_write_text

    rows = load_dataset(args.dataset, split=args.split)
    prompts = sorted({r["prompt"].strip() for r in rows if not r["is_response_0_safe"] and not r["is_response_1_safe"]})
    if len(prompts) < args.n:
        raise SystemExit(f"only {len(prompts)} unsafe prompts in {args.dataset}:{args.split}, asked for {args.n}")
    random.Random(args.seed).shuffle(prompts)
    atomic_write_text(args.out, "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts[: args.n]))
    print(f"wrote {args.n} prompts to {args.out}")


if __name__ == "__main__":
    main()
