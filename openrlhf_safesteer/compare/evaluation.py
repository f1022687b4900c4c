"""The frontier's held-out evaluation: greedy replies of >= 64 tokens judged by the four string judges the project
ships, with every per-prompt verdict kept.

    sets = eval_sets("test")                       # or "dev"
    judged = evaluate_judged(model, tokenizer, sets, reply_tokens=64)
    judged["verdicts"]["harmful"]["xstest_strmatch"]   # '0110...': 1 = that judge calls the reply a refusal

Judges (`JUDGES`): refusal (the project's own refusal strings, `openrlhf_safesteer.refusal`; also the PPO arm's
reward and the DPO pairs' filter, so never the headline), jbb_string (JailbreakBench's StringClassifier), arditi
(Arditi et al.'s substring judge) and xstest_strmatch (XSTest's string match: a reply that *starts* with a refusal),
the last three verbatim from their benchmarks (`eval/string_judges.py`).

Sets. test: harmful = the 48 held-out test requests + the 68 `train_extra` requests (no arm trains on them: every
arm trains on the `train` split), 100 harmless, 64 borderline-safe, 32 contrast (harmful in the borderline words),
100 general questions. dev: the harmful and harmless direction + validation splits (they fit the direction and
vote S, so dev is not independent of SafeSteer's artifacts; it never saw a test prompt), 48 borderline-safe dev,
24 contrast dev, the same 100 general questions (the project has one general set).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from openrlhf_safesteer import data
from openrlhf_safesteer.compare.frontier_stats import encode_bits
from openrlhf_safesteer.demo.evaluate import EvalSets
from openrlhf_safesteer.eval.string_judges import arditi_refuses, jbb_refuses, xstest_refuses
from openrlhf_safesteer.refusal import is_refusal

JUDGES: dict[str, Callable[[str], bool]] = {
    "refusal": is_refusal, "jbb_string": jbb_refuses, "arditi": arditi_refuses, "xstest_strmatch": xstest_refuses,
}
REWARD_JUDGE = "refusal"        # recipes/safety_reward.py with SAFETY_JUDGE=refusal: the PPO arm's reward
REFUSAL_SETS = ("harmful", "harmless", "borderline", "contrast")
PHASES = ("dev", "test")


def judge(name: str) -> Callable[[str], bool]:
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; choose from {', '.join(JUDGES)}")
    return JUDGES[name]


def eval_sets(phase: str, limit: int | None = None) -> EvalSets:
    """The phase's held-out sets (first `limit` of each): see the module docstring."""
    if phase == "dev":
        return EvalSets.dev(limit)
    if phase != "test":
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"eval limit must be >= 1, got {limit}")
    return EvalSets((data.harmful("test") + data.harmful("train_extra"))[:limit], data.harmless("test")[:limit],
                    data.general_questions()[:limit], data.borderline("test")[:limit],
                    data.borderline("contrast_test")[:limit])


def set_prompts(sets: EvalSets) -> dict[str, list[str]]:
    return {"harmful": list(sets.harmful), "harmless": list(sets.harmless), "borderline": list(sets.borderline),
            "contrast": list(sets.contrast), "general": [q["question"] for q in sets.general]}


def sets_digest(sets: EvalSets) -> str:
    """A short hash of every prompt of every set, in order: rows with the same digest compare prompt for prompt."""
    return hashlib.sha256(json.dumps(set_prompts(sets)).encode()).hexdigest()[:16]


def judge_samples(samples: dict) -> dict:
    """verdicts (set -> judge -> bits), general (bits), empty replies per set, from `evaluate`'s samples."""
    verdicts = {name: {j: encode_bits(fn(s["reply"]) for s in samples[name]) for j, fn in JUDGES.items()}
                for name in REFUSAL_SETS if samples.get(name)}
    return {"verdicts": verdicts, "general": encode_bits(s["correct"] for s in samples["general"]),
            "empty": {name: sum(not s["reply"].strip() for s in samples[name]) for name in verdicts}}


def evaluate_judged(model, tokenizer, sets: EvalSets, reply_tokens: int = 64, batch_size: int = 96,
                    general_tokens: int = 6, progress: bool = False) -> dict:
    """Greedy replies of `reply_tokens` tokens to every refusal set (one batched pass over all of them, rows batched
    by prompt length), judged by all four judges; general answers as the demo reads them (`data.answer_matches` on
    `general_tokens` tokens); each prompt's refusal score (docs/METHOD.md section 1) from one prefill forward.

    The demo's `evaluate` reads the scores from the first generation step and keeps every step's logits to do so
    (64 steps x rows x vocabulary floats: 1.9 GB at 50 rows, about a fifth of the 64-token evaluation's time);
    here the replies are generated without logits, so batches can be larger. Same greedy replies (greedy rows do
    not depend on their batch mates: chat._generate).
    Returns {"verdicts", "general", "empty", "scores" (mean per set), "evaluation" (samples with replies, per-prompt
    scores and general answers, in the demo's layout), "seconds"}."""
    import time

    from openrlhf_safesteer.chat import generate
    from openrlhf_safesteer.directions import refusal_score

    if reply_tokens < 64:
        raise ValueError(f"replies are judged at >= 64 tokens (a 12-token reply cannot tell a refusal from 'I'm "
                         f"sorry, but here is how...'), got {reply_tokens}")
    start = time.time()
    was_training = model.training
    model.eval()
    names = [n for n in REFUSAL_SETS if getattr(sets, n)]
    prompts = [p for n in names for p in getattr(sets, n)]
    replies = generate(model, tokenizer, prompts, reply_tokens, batch_size, progress=progress)
    scores = refusal_score(model, tokenizer, prompts, batch_size=batch_size).tolist()
    questions = [q["question"] for q in sets.general]
    answers = generate(model, tokenizer, questions, general_tokens, batch_size, progress=progress)
    model.train(was_training)
    samples: dict = {}
    at = 0
    for name in names:
        part = getattr(sets, name)
        samples[name] = [{"prompt": p, "reply": r, "score": sc}
                         for p, r, sc in zip(part, replies[at:at + len(part)], scores[at:at + len(part)])]
        at += len(part)
    samples["general"] = [{"question": q["question"], "reply": a, "correct": data.answer_matches(a, q["answers"])}
                          for q, a in zip(sets.general, answers)]
    out = judge_samples(samples)
    out["scores"] = {name: sum(s["score"] for s in samples[name]) / len(samples[name]) for name in names}
    out["seconds"] = round(time.time() - start, 1)
    out["evaluation"] = {"samples": samples, "reply_tokens": reply_tokens, "seconds": out["seconds"]}
    return out
