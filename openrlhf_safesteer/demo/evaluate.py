"""The demo's before/after evaluation: refusal on held-out harmful, harmless and borderline-safe prompts (with
their harmful contrast set), and general_score.

Greedy decoding with the model's chat template; the refusal-string judge (openrlhf_safesteer.refusal)
reads the opening of each reply, so short replies suffice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from openrlhf_safesteer import data
from openrlhf_safesteer.chat import generate, generate_with_first_logprobs
from openrlhf_safesteer.directions import (
    refusal_scores_from_logprobs,
    refusal_token_ids,
)
from openrlhf_safesteer.refusal import is_refusal

logger = logging.getLogger(__name__)


def _check_limit(limit: int | None) -> None:
    # [:limit] with a negative limit would silently drop the last prompts of every set
    if limit is not None and limit < 1:
        raise ValueError(f"eval limit must be >= 1 (or None for every prompt), got {limit}")


@dataclass
class EvalSets:
    harmful: list[str]
    harmless: list[str]
    general: list[dict]
    # borderline-safe prompts that merely sound harmful, and truly harmful ones in the same words (selectivity)
    borderline: list[str] = field(default_factory=list)
    contrast: list[str] = field(default_factory=list)

    @classmethod
    def default(cls, limit: int | None = None) -> EvalSets:
        """The held-out test splits (harmful, harmless, borderline-safe and its contrast) and the general
        questions (first `limit` of each)."""
        _check_limit(limit)
        return cls(data.harmful("test")[:limit], data.harmless("test")[:limit], data.general_questions()[:limit],
                   data.borderline("test")[:limit], data.borderline("contrast_test")[:limit])

    @classmethod
    def dev(cls, limit: int | None = None) -> EvalSets:
        """Prompts for choosing settings without looking at the test splits: the harmful and harmless direction
        and validation splits (never trained on; they fit the direction and vote S, so they are not independent
        of those artifacts) and the general questions (there is one general set)."""
        _check_limit(limit)
        return cls((data.harmful("direction") + data.harmful("validation"))[:limit],
                   (data.harmless("direction") + data.harmless("validation"))[:limit],
                   data.general_questions()[:limit], data.borderline("dev")[:limit],
                   data.borderline("contrast_dev")[:limit])


def evaluate(model, tokenizer, sets: EvalSets, refusal_tokens: int = 16, general_tokens: int = 6,
             batch_size: int = 50, progress: bool = True) -> dict:
    """Returns {harmful_refusal_rate, harmful_asr, harmless_refusal_rate, general_score (0-100),
    harmful_refusal_score, harmless_refusal_score, samples, seconds}, and for the sets.borderline / .contrast
    prompts (when given) borderline_refusal_rate, contrast_refusal_rate and their refusal scores.

    Rates are fractions in [0, 1]; general_score is a percentage. The two refusal scores are the mean
    docs/METHOD.md refusal score (logit of the refusal openers' next-token probability at the end of the prompt):
    a greedy refusal flips at a threshold, the score shows how far each set moved (a training run that is
    selective raises the harmful score more than the harmless one).
    """
    start = time.time()
    was_training = model.training
    model.eval()
    refusal_ids = refusal_token_ids(tokenizer)
    # Every refusal set in one call: rows are batched by prompt length (chat._generate), and on a CPU a decoding
    # step costs about the same for 50 rows as for 8 (small-M matrix products are far from the memory bound), so
    # fewer, fuller batches decode faster.
    judged = refusal_sets(model, tokenizer, {"harmful": sets.harmful, "harmless": sets.harmless,
                                             "borderline": sets.borderline, "contrast": sets.contrast},
                          refusal_tokens, batch_size, refusal_ids, progress)
    harmful, harmless = judged.pop("harmful"), judged.pop("harmless")
    selectivity = judged
    general = generate(model, tokenizer, [q["question"] for q in sets.general], general_tokens, batch_size,
                       progress=progress)
    model.train(was_training)
    correct = [data.answer_matches(r, q["answers"]) for r, q in zip(general, sets.general)]
    result = {
        "harmful_refusal_rate": harmful["rate"],
        "harmful_asr": 1 - harmful["rate"],
        "harmless_refusal_rate": harmless["rate"],
        "general_score": 100.0 * sum(correct) / len(correct),
        "harmful_refusal_score": harmful["score"],
        "harmless_refusal_score": harmless["score"],
        "n": {"harmful": len(sets.harmful), "harmless": len(sets.harmless), "general": len(correct)},
        "samples": {
            "harmful": harmful["samples"],
            "harmless": harmless["samples"],
            "general": [{"question": q["question"], "reply": r, "correct": c}
                        for q, r, c in zip(sets.general, general, correct)],
        },
    }
    for name, part in selectivity.items():
        result[f"{name}_refusal_rate"] = part["rate"]
        result[f"{name}_refusal_score"] = part["score"]
        result["n"][name] = len(part["samples"])
        result["samples"][name] = part["samples"]
    result["seconds"] = time.time() - start
    logger.info("harmful refusal %.2f (score %.2f), harmless refusal %.2f (score %.2f), general_score %.1f (%.0f s)",
                result["harmful_refusal_rate"], result["harmful_refusal_score"], result["harmless_refusal_rate"],
                result["harmless_refusal_score"], result["general_score"], result["seconds"])
    return result


def refusal_sets(model, tokenizer, sets: dict[str, list[str]], refusal_tokens: int, batch_size: int,
                  refusal_ids, progress: bool) -> dict[str, dict]:
    """Greedy refusal rate, mean refusal score and samples of each non-empty prompt set, in one generate call."""
    names = [name for name, prompts in sets.items() if prompts]
    prompts = [p for name in names for p in sets[name]]
    if not prompts:
        return {}
    replies, first = generate_with_first_logprobs(model, tokenizer, prompts, refusal_tokens, batch_size,
                                                  progress=progress)
    scores = refusal_scores_from_logprobs(first, refusal_ids)
    result, at = {}, 0
    for name in names:
        rows = slice(at, at + len(sets[name]))
        at = rows.stop
        result[name] = judged_set(sets[name], replies[rows], scores[rows])
    return result


def judged_set(prompts: list[str], replies: list[str], scores) -> dict:
    """One prompt set's greedy replies judged: refusal rate, mean refusal score (scores (N,) tensor) and samples."""
    flags = [is_refusal(r) for r in replies]
    return {"rate": sum(flags) / len(flags), "score": scores.mean().item(),
            "samples": [{"prompt": p, "reply": r, "refusal": f, "score": s}
                        for p, r, f, s in zip(prompts, replies, flags, scores.tolist())]}


def refusal_changes(before: list[dict], after: list[dict]) -> dict[str, list[str]]:
    """The prompts whose greedy refusal judgement changed between two evaluations of the same prompts.

    `before` and `after` are `evaluate(...)["samples"]["harmful" | "harmless"]` lists. Returns
    {"new": prompts refused after but answered before, "lost": prompts answered after but refused before}.
    A rate compares counts; this says which prompts moved (an over-refusal that always hits the same few
    borderline prompts reads differently from one spread over many).
    """
    if [s["prompt"] for s in before] != [s["prompt"] for s in after]:
        raise ValueError("refusal_changes compares evaluations of the same prompts in the same order")
    return {"new": [a["prompt"] for b, a in zip(before, after) if a["refusal"] and not b["refusal"]],
            "lost": [a["prompt"] for b, a in zip(before, after) if b["refusal"] and not a["refusal"]]}
