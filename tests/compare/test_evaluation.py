"""The frontier's evaluation (compare/evaluation.py) on a tiny model: the same greedy replies and refusal scores as the
demo's `evaluate` at the same length, every judge's verdicts on them, the enlarged test harmful set."""

from __future__ import annotations

import pytest

from openrlhf_safesteer import data
from openrlhf_safesteer.compare import evaluation
from openrlhf_safesteer.compare.frontier_stats import decode_bits
from openrlhf_safesteer.demo.evaluate import EvalSets, evaluate


def test_test_harmful_set_adds_the_prompts_no_arm_trains_on():
    sets = evaluation.eval_sets("test")
    assert sets.harmful == data.harmful("test") + data.harmful("train_extra") and len(sets.harmful) == 116
    assert not set(sets.harmful) & set(data.harmful("train"))
    dev = evaluation.eval_sets("dev")
    assert not set(dev.harmful) & set(sets.harmful) and not set(dev.borderline) & set(sets.borderline)
    assert evaluation.sets_digest(dev) != evaluation.sets_digest(sets)
    with pytest.raises(ValueError):
        evaluation.eval_sets("train")


def test_replies_and_scores_equal_the_demos_evaluation(tiny_demo):
    from openrlhf_safesteer.loading import load_model

    model, tokenizer = load_model(tiny_demo["model"])
    sets = EvalSets(data.harmful("test")[:5], data.harmless("test")[:4], data.general_questions()[:3],
                    data.borderline("test")[:3], data.borderline("contrast_test")[:2])
    judged = evaluation.evaluate_judged(model, tokenizer, sets, 64, batch_size=7)
    demo = evaluate(model, tokenizer, sets, 64, progress=False)
    for name in ("harmful", "harmless", "borderline", "contrast"):
        mine, theirs = judged["evaluation"]["samples"][name], demo["samples"][name]
        assert [s["reply"] for s in mine] == [s["reply"] for s in theirs]
        assert [s["score"] for s in mine] == pytest.approx([s["score"] for s in theirs], abs=1e-4)
        for judge, refuses in evaluation.JUDGES.items():
            assert decode_bits(judged["verdicts"][name][judge]).tolist() == [int(refuses(s["reply"])) for s in theirs]
    assert decode_bits(judged["general"]).tolist() == [int(s["correct"]) for s in demo["samples"]["general"]]
    assert judged["scores"]["harmful"] == pytest.approx(demo["harmful_refusal_score"], abs=1e-4)
    with pytest.raises(ValueError, match=">= 64"):
        evaluation.evaluate_judged(model, tokenizer, sets, 12)
