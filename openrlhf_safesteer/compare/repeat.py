"""Did two comparison runs repeat each other? Arm by arm: rollout tokens and losses per step, final weights, scores.

    python -m openrlhf_safesteer.compare.repeat outputs/cmp_a outputs/cmp_b

For every arm both folders finished, it compares what the arm left behind:
- the plugin arms' `--safesteer.dump_dir` entries: each step's experience tokens (`experience_batchN`) and its
  policy-step loss (`policy_stepN`), exactly;
- the final weights: a SHA-256 over the final folder's safetensors files (a LoRA adapter, or a full model), where
  the comparison kept them;
- the held-out evaluation (`result.json`): every rate and mean score.
Exit status 0 when every compared item is equal, 1 otherwise. Reads files only (no model is loaded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch


def weights_digest(folder: Path) -> str | None:
    """SHA-256 over the *.safetensors files of folder (sorted by name); None when there are none."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def dump_steps(dump: Path) -> list[int]:
    return sorted(int(p.stem.removeprefix("experience_batch")) for p in dump.glob("experience_batch*.json"))


def compare_dumps(first: Path, second: Path) -> dict:
    """Per step: equal experience tokens (sequences and action mask) and equal policy-step loss."""
    from openrlhf_safesteer.testing import load_dump

    steps = dump_steps(first)
    equal_tokens, equal_loss = [], []
    for step in steps:
        a, _ = load_dump(first / f"experience_batch{step}")
        b, _ = load_dump(second / f"experience_batch{step}")
        equal_tokens.append(torch.equal(a["sequences"], b["sequences"]) and torch.equal(a["action_mask"],
                                                                                         b["action_mask"]))
        loss_a, loss_b = (first / f"policy_step{step}.json", second / f"policy_step{step}.json")
        if loss_a.is_file() and loss_b.is_file():
            equal_loss.append(json.loads(loss_a.read_text())["loss"] == json.loads(loss_b.read_text())["loss"])
    return {"steps": len(steps), "tokens_equal": sum(equal_tokens), "losses_compared": len(equal_loss),
            "losses_equal": sum(equal_loss)}


def scores(result: dict) -> dict[str, float]:
    return {key: value for key, value in result["eval"].items() if isinstance(value, (int, float))
            and key != "seconds"}


def compare_arm(first: Path, second: Path) -> dict:
    row: dict = {}
    if (first / "dump").is_dir() and (second / "dump").is_dir():
        row["dump"] = compare_dumps(first / "dump", second / "dump")
    digests = [weights_digest(d / "final") for d in (first, second)]
    # the comparison keeps no final folder for some arms (the local engine's is deleted after its evaluation)
    row["weights"] = "not kept" if None in digests else "equal" if digests[0] == digests[1] else "differ"
    a, b = (json.loads((d / "result.json").read_text()) for d in (first, second))
    row["scores_equal"] = scores(a) == scores(b)
    row["scores"] = scores(a)
    row["train_seconds"] = (a.get("train_seconds"), b.get("train_seconds"))
    return row


def repeated(row: dict) -> bool:
    dump = row.get("dump")
    same_dump = dump is None or (dump["tokens_equal"] == dump["steps"] and dump["losses_equal"] ==
                                 dump["losses_compared"])
    return same_dump and row["weights"] != "differ" and row["scores_equal"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openrlhf_safesteer.compare.repeat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path, help="a finished comparison folder (compare.run --out)")
    parser.add_argument("second", type=Path, help="another, with the same settings")
    args = parser.parse_args(argv)
    for folder in (args.first, args.second):
        if not (folder / "arms").is_dir():
            print(f"error: {folder} is not a comparison folder (no arms/ in it)", file=sys.stderr)
            return 2
    arms = sorted(p.name for p in (args.first / "arms").iterdir()
                  if (p / "result.json").is_file() and (args.second / "arms" / p.name / "result.json").is_file())
    if not arms:
        print(f"error: no arm finished in both {args.first} and {args.second}", file=sys.stderr)
        return 2
    all_same = True
    for arm in arms:
        row = compare_arm(args.first / "arms" / arm, args.second / "arms" / arm)
        same = repeated(row)
        all_same &= same
        dump = row.get("dump")
        steps = (f"rollout tokens equal at {dump['tokens_equal']}/{dump['steps']} steps, losses "
                 f"{dump['losses_equal']}/{dump['losses_compared']}; ") if dump else ""
        print(f"{arm}: {'REPEATED' if same else 'DIFFERENT'}: {steps}final weights "
              f"{row['weights']}; held-out scores "
              f"{'equal' if row['scores_equal'] else 'differ'}; train seconds {row['train_seconds'][0]} / "
              f"{row['train_seconds'][1]}")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
