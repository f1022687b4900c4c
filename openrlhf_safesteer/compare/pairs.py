"""The training data of the DPO and SFT arms, from the same prompt draws as every other arm.

- sample_replies: replies sampled like the rollouts (temperature 1, the seeded per-request sampler), to the end of
  the turn up to `max_new_tokens`; each reply says whether it ended (a reply still cut at the limit is incomplete).
- DPO: one pair per prompt draw, chosen = the steered teacher's complete reply that the judge calls a refusal,
  rejected = the base model's complete reply that the judge calls compliance. A draw without both after
  `attempts` samplings is dropped; the count of surviving pairs is returned and logged (`pair_stats`).
- SFT: the steered teacher's first complete reply to each prompt draw, whatever the judge says (the distillation
  baseline imitates the teacher; it does not filter).
With `fill`, the surviving rows are repeated in draw order up to one per prompt draw, so the arm takes the same
optimizer steps on the same batch size as the others (its stats say how many rows are repeats).
The judge is the project's refusal judge (`openrlhf_safesteer.refusal.is_refusal`), the PPO arm's reward too: the
report's headline judge is one that neither saw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Reply:
    text: str
    complete: bool        # ended with an end-of-turn token within the limit


def sample_replies(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                   rollout_index: int = 0, batch_size: int | None = None) -> list[Reply]:
    """One sampled reply per prompt (the local engine's seeded sampler), with whether it ended in the limit.

    batch_size: generate in chunks of this many prompts (a GPU's memory); chunk c draws with rollout index
    rollout_index * 1000 + c, so the same prompt twice in two chunks still gets two different draws."""
    from openrlhf_safesteer.chat import end_of_turn_ids
    from openrlhf_safesteer.local.rollout import sample_rollouts

    if not prompts:
        return []
    if batch_size is not None and len(prompts) > batch_size:
        out: list[Reply] = []
        for c, start in enumerate(range(0, len(prompts), batch_size)):
            out += sample_replies(model, tokenizer, prompts[start:start + batch_size], max_new_tokens, seed,
                                  rollout_index * 1000 + c)
        return out
    rollouts = sample_rollouts(model, tokenizer, prompts, 1, max_new_tokens, seed=seed, rollout_index=rollout_index)
    completion = rollouts.input_ids[:, rollouts.prompt_len:]
    ended = torch.isin(completion, torch.tensor(end_of_turn_ids(tokenizer), device=completion.device)).any(dim=1)
    return [Reply(text.strip(), bool(e)) for text, e in zip(rollouts.completions, ended.tolist())]


def fill_rows(rows: list, target: int, fill: bool) -> tuple[list, int]:
    """rows repeated in order up to `target` (when fill and rows is not empty); returns (rows, repeats added)."""
    if not fill or not rows or len(rows) >= target:
        return list(rows), 0
    out = [rows[i % len(rows)] for i in range(target)]
    return out, target - len(rows)


def choose_pairs(draws: list[str], chosen_tries: list[list[Reply]], rejected_tries: list[list[Reply]],
                 refuses: Callable[[str], bool] | None) -> tuple[list[dict | None], dict]:
    """Per draw, the first valid chosen (complete, refusing) and rejected (complete, complying) reply over the
    tries; None where either is missing. refuses None: complete replies, no judge. Returns (per-draw pair or None,
    counts of why draws were dropped)."""
    pairs: list[dict | None] = []
    why = {"no complete refusing chosen": 0, "no complete complying rejected": 0}

    def chosen_ok(r: Reply) -> bool:
        return r.complete and (refuses is None or refuses(r.text))

    def rejected_ok(r: Reply) -> bool:
        return r.complete and (refuses is None or not refuses(r.text))

    for i, prompt in enumerate(draws):
        chosen = next((r for r in chosen_tries[i] if chosen_ok(r)), None)
        rejected = next((r for r in rejected_tries[i] if rejected_ok(r)), None)
        why["no complete refusing chosen"] += chosen is None
        why["no complete complying rejected"] += rejected is None
        pairs.append(None if chosen is None or rejected is None else
                     {"chosen": _chat(prompt, chosen.text), "rejected": _chat(prompt, rejected.text)})
    return pairs, why


def _chat(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def _tries(model, tokenizer, draws: list[str], max_new_tokens: int, seed: int, attempts: int,
           good: Callable[[Reply], bool], batch_size: int | None = None) -> tuple[list[list[Reply]], int]:
    """Up to `attempts` samplings per draw, each attempt only for the draws with no good reply yet (a new rollout
    index: new draws). Returns (per-draw list of replies, sequences sampled)."""
    tries: list[list[Reply]] = [[] for _ in draws]
    sampled = 0
    for attempt in range(attempts):
        todo = [i for i, t in enumerate(tries) if not any(good(r) for r in t)]
        if not todo:
            break
        replies = sample_replies(model, tokenizer, [draws[i] for i in todo], max_new_tokens, seed, attempt, batch_size)
        sampled += len(todo)
        for i, reply in zip(todo, replies):
            tries[i].append(reply)
    return tries, sampled


def build_training_data(model, tokenizer, vector, coeff: float, draws: list[str], seed: int, max_new_tokens: int,
                        attempts: int, fill: bool, want_pairs: bool = True, want_sft: bool = True,
                        refuses: Callable[[str], bool] | None = None, filter_pairs: bool = True,
                        batch_size: int | None = None) -> dict:
    """{"dpo_pairs": [...], "sft": [...], "stats": {...}} for the prompt draws (either part may be skipped).

    The teacher is `model` steered by `vector` at `coeff`; the rejected replies are the unsteered model's. Seeds:
    the teacher samples with `seed`, the base with `seed + 1` (as the comparison always did). refuses: the pairs'
    judge (default the project's refusal judge); filter_pairs False keeps every complete pair unjudged (tests)."""
    from openrlhf_safesteer.refusal import is_refusal
    from openrlhf_safesteer.steering import steer

    refuses = refuses or is_refusal
    pair_judge = refuses if filter_pairs else None
    stats: dict = {"draws": len(draws), "max_new_tokens": max_new_tokens, "attempts": attempts,
                   "pair_filter": getattr(pair_judge, "__name__", "none")}
    out: dict = {"stats": stats}
    with torch.no_grad():
        with steer(model, vector, coeff):
            # a draw needs another teacher sample when its replies so far give neither a DPO chosen nor (for SFT)
            # any complete reply
            def teacher_good(r: Reply) -> bool:
                return r.complete and (not want_pairs or pair_judge is None or pair_judge(r.text))

            chosen_tries, n_teacher = _tries(model, tokenizer, draws, max_new_tokens, seed, attempts, teacher_good,
                                             batch_size)
        rejected_tries, n_base = ([], 0)
        if want_pairs:
            rejected_tries, n_base = _tries(model, tokenizer, draws, max_new_tokens, seed + 1, attempts,
                                            lambda r: r.complete and (pair_judge is None or not pair_judge(r.text)),
                                            batch_size)
    stats["generated_sequences"] = n_teacher + n_base
    first = [t[0] for t in chosen_tries]
    stats["teacher_first_reply_complete"] = sum(r.complete for r in first)
    stats["teacher_first_reply_refuses"] = sum(refuses(r.text) for r in first)
    if want_pairs:
        pairs, why = choose_pairs(draws, chosen_tries, rejected_tries, pair_judge)
        kept = [p for p in pairs if p is not None]
        if not kept:
            raise RuntimeError(f"no DPO pair survived ({why}); raise pair_max_new_tokens or pair_attempts")
        out["dpo_pairs"], repeats = fill_rows(kept, len(draws), fill)
        stats.update(dpo_pairs_surviving=len(kept), dpo_pairs_dropped=len(draws) - len(kept), dpo_dropped_why=why,
                     dpo_pairs_repeated=repeats, dpo_pairs_trained=len(out["dpo_pairs"]),
                     base_first_reply_complete=sum(t[0].complete for t in rejected_tries))
    if want_sft:
        rows = []
        for prompt, tries in zip(draws, chosen_tries):
            reply = next((r for r in tries if r.complete), None)
            if reply is not None:
                rows.append({"prompt": prompt, "response": reply.text})
        if not rows:
            raise RuntimeError("no complete teacher reply for SFT; raise pair_max_new_tokens")
        out["sft"], repeats = fill_rows(rows, len(draws), fill)
        stats.update(sft_rows_surviving=len(rows), sft_rows_dropped=len(draws) - len(rows), sft_rows_repeated=repeats,
                     sft_rows_trained=len(out["sft"]),
                     sft_rows_refusing=sum(refuses(r["response"]) for r in rows))
    return out


def gpu_draws(prompts: list[str], draws_per_prompt: int, seed: int) -> list[str]:
    """Every prompt `draws_per_prompt` times in a seeded order: the GPU recipes' SafeSteer run samples 8 replies of
    each of its 100 prompts, so its DPO and SFT baselines get one pair / target per such draw."""
    order = torch.randperm(len(prompts) * draws_per_prompt, generator=torch.Generator().manual_seed(seed)).tolist()
    repeated = [p for p in prompts for _ in range(draws_per_prompt)]
    return [repeated[i] for i in order]


def main(argv: list[str] | None = None) -> int:
    """`python -m openrlhf_safesteer.compare.pairs`: the DPO pairs and SFT targets of the GPU comparison."""
    import argparse
    import json
    import sys
    import time
    from pathlib import Path

    from openrlhf_safesteer.compare.evaluation import JUDGES
    from openrlhf_safesteer.data import load_prompt_file
    from openrlhf_safesteer.files import atomic_write_json, atomic_write_text

    p = argparse.ArgumentParser(prog="python -m openrlhf_safesteer.compare.pairs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--vector", required=True, help="steering-vector folder (`safesteer direction`)")
    p.add_argument("--prompts", required=True, help="the SafeSteer run's training prompts (JSON / JSONL / text)")
    p.add_argument("--out", required=True, help="folder for dpo_pairs.jsonl, sft.jsonl, data_stats.json")
    p.add_argument("--draws-per-prompt", type=int, default=8, help="pairs / targets per prompt (SafeSteer's samples)")
    p.add_argument("--coeff", type=float, default=1.0, help="the teacher's steering coefficient")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="replies still cut at this length are dropped")
    p.add_argument("--attempts", type=int, default=2)
    p.add_argument("--filter", default="refusal", choices=[*JUDGES, "none"], help="the DPO pairs' judge")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="prompts generated at once")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda when there is one")
    p.add_argument("--dry-run", action="store_true", help="check the files and settings; load and write nothing")
    args = p.parse_args(argv)
    out = Path(args.out)
    prompts = load_prompt_file(args.prompts) if Path(args.prompts).is_file() else None
    if args.dry_run:
        print(f"pairs: {args.draws_per_prompt} draws of each prompt of {args.prompts} "
              f"({'found' if prompts else 'made by the SafeSteer stage'}), replies up to {args.max_new_tokens} "
              f"tokens, filter {args.filter}, into {out}; dry run OK")
        return 0
    if prompts is None:
        print(f"error: no prompt file {args.prompts}", file=sys.stderr)
        return 2
    if (out / "data_stats.json").is_file():
        print(f"{out / 'data_stats.json'} exists: kept")
        return 0
    from openrlhf_safesteer.loading import load_model
    from openrlhf_safesteer.steering import SteeringVector

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    draws = gpu_draws(prompts, args.draws_per_prompt, args.seed)
    start = time.time()
    made = build_training_data(model, tokenizer, SteeringVector.load(args.vector), args.coeff, draws, args.seed,
                               args.max_new_tokens, args.attempts, True, True, True,
                               refuses=None if args.filter == "none" else JUDGES[args.filter],
                               filter_pairs=args.filter != "none", batch_size=args.batch_size)
    for name, part in (("dpo_pairs.jsonl", "dpo_pairs"), ("sft.jsonl", "sft")):
        atomic_write_text(out / name, "".join(json.dumps(r) + "\n" for r in made[part]))
    atomic_write_json(out / "data_stats.json", {**made["stats"], "seconds": round(time.time() - start, 1)})
    print(json.dumps(made["stats"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
