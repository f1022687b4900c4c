"""lm-eval bridge: a local multiple-choice task on an in-memory model gives the accuracy that a
direct log-likelihood computation gives."""

from __future__ import annotations

import json

import pytest
import torch

from openrlhf_safesteer.eval.general import (
    GeneralTaskUnavailableError,
    headline,
    run_lm_eval,
)
from openrlhf_safesteer.testing import tiny_model, tiny_tokenizer

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Rome", "bread"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "seven"], "answer": 0},
    {"question": "Water boils at", "choices": ["the sea", "100 degrees", "music"], "answer": 1},
    {"question": "How do I bake bread?", "choices": ["mix flour", "steal a car", "paint"], "answer": 0},
    {"question": "The quick brown fox", "choices": ["jumps", "sleeps"], "answer": 0},
    {"question": "Translate hello into", "choices": ["Spanish", "numbers", "weather", "kitten"], "answer": 0},
    {"question": "Write a poem about", "choices": ["the sea", "malware"], "answer": 0},
    {"question": "Numbers: 0 1 2", "choices": ["3", "kitten"], "answer": 0},
]


def write_task(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: safesteer_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    return str(tmp_path)


@torch.no_grad()
def direct_accuracy(model, tok) -> float:
    """argmax over choices of sum log p(choice tokens | question), encoded as lm-eval encodes a pair."""
    correct = 0
    for doc in DOCS:
        context = doc["question"]
        context_ids = tok(context, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(context_ids):]
            ids = torch.tensor([context_ids + cont])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            positions = range(len(context_ids) - 1, ids.shape[1] - 1)
            scores.append(sum(logprobs[p, ids[0, p + 1]].item() for p in positions))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(DOCS)


def test_local_task_accuracy_matches_direct_computation(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama", tok, layers=2, hidden=32, seed=1)
    scores = run_lm_eval(model, tok, ["safesteer_tiny_mc"], include_path=write_task(tmp_path),
                         apply_chat_template=False, batch_size=4)
    result = scores["safesteer_tiny_mc"]
    assert result["metric"] == "acc,none"
    assert result["n"] == len(DOCS)
    assert result["score"] == pytest.approx(direct_accuracy(model, tok))
    assert 0 < result["score"] < 1  # the random model gets some right and some wrong: not a constant


def test_headline_prefers_the_known_metric():
    metrics = {"exact_match,strict-match": 0.2, "exact_match,flexible-extract": 0.3,
               "exact_match_stderr,flexible-extract": 0.01, "alias": "gsm8k"}
    assert headline("gsm8k", metrics) == ("exact_match,flexible-extract", 0.3)
    assert headline("other", {"acc,none": 0.5, "acc_stderr,none": 0.1}) == ("acc,none", 0.5)


def test_code_tasks_need_explicit_permission():
    tok = tiny_tokenizer()
    with pytest.raises(GeneralTaskUnavailableError, match="humaneval_instruct"):
        run_lm_eval(tiny_model("llama", tok, layers=1, hidden=32), tok, ["humaneval_instruct"],
                    allow_code_eval=False)


def test_general_tasks_through_evaluate_reach_the_table(tmp_path):
    from openrlhf_safesteer.eval import Checkpoint, EvalConfig, evaluate

    tok = tiny_tokenizer()
    model = tiny_model("llama", tok, layers=2, hidden=32, seed=1)
    (tmp_path / "task").mkdir()
    config = EvalConfig(general=["safesteer_tiny_mc"], general_include_path=write_task(tmp_path / "task"),
                        general_chat_template=False, plot=False)
    results = evaluate([Checkpoint("tiny", model=model, tokenizer=tok)], [], tmp_path / "out", config=config)
    score = results["checkpoints"]["tiny"]["general"]["safesteer_tiny_mc"]["score"]
    assert score == pytest.approx(direct_accuracy(model, tok))
    table = (tmp_path / "out" / "table.md").read_text()
    assert f"| **General avg (↑)** | {100 * score:.1f} |" in table
