"""Every registered general task can load and run in the environment `make setup` builds, and the
preflight names what is missing (a package, hub access, code permission) before any generation."""

from __future__ import annotations

import importlib

import pytest

from openrlhf_safesteer.eval import general
from openrlhf_safesteer.eval.general import GENERAL_TASKS, describe_problems, task_problems
from openrlhf_safesteer.eval.runner import EvalConfig, EvalError, evaluate
from openrlhf_safesteer.testing import tiny_model, tiny_tokenizer


@pytest.fixture
def hub(monkeypatch):
    """Set whether the hub answers (the tests never contact it)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def set_reachable(up: bool) -> None:
        monkeypatch.setattr("openrlhf_safesteer.eval.benchmarks.hub_reachable", lambda: up)
    return set_reachable


def test_every_registered_task_passes_the_preflight_here(hub):
    hub(True)
    assert task_problems(GENERAL_TASKS, allow_code_eval=True) == {}
    assert general.missing_math_requirements() == []


def test_minerva_math_utils_load_and_score_with_math_verify():
    # lm-eval's minerva_math/utils.py raises at import without lm-eval[math]; loading it is the real check.
    utils = importlib.import_module("lm_eval.tasks.minerva_math.utils")
    doc = {"problem": "What is 1/2 as a fraction?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "answer": "\\frac{1}{2}"}
    # math_verify accepts an equal value written differently, where exact match does not.
    decimal = utils.process_results(doc, ["The answer is $\\boxed{0.5}$."])
    assert decimal["math_verify"] == 1 and decimal["exact_match"] == 0
    assert utils.process_results(doc, ["The answer is $\\boxed{\\frac{1}{3}}$."])["math_verify"] == 0


def test_missing_pieces_are_named(hub, monkeypatch, tmp_path):
    hub(False)
    versions = {"antlr4-python3-runtime": "4.13.2", "math-verify": None}
    real = general._distribution_version
    monkeypatch.setattr(general, "_distribution_version", lambda name: versions[name] if name in versions else real(name))
    from evaluate import config

    monkeypatch.setattr(config, "HF_MODULES_CACHE", tmp_path)  # an empty evaluate modules cache
    problems = task_problems(["minerva_math500", "humaneval_instruct", "my_local_task"], allow_code_eval=False)
    assert set(problems) == {"minerva_math500", "humaneval_instruct"}  # a local task needs none of these
    text = describe_problems(problems)
    assert "general task minerva_math500: its data is on the Hugging Face hub, which is unreachable" in text
    assert "math-verify (not installed), antlr4-python3-runtime==4.11 (found 4.13.2)" in text
    assert "humaneval_instruct: " in text and "pass --allow-code-eval" in text
    assert "code_eval metric is loaded from the Hugging Face hub, which is unreachable" in text
    # A cached code_eval module (evaluate keeps it under a 64-character hash) is enough offline.
    (tmp_path / "evaluate_modules" / "metrics" / "evaluate-metric--code_eval" / ("0" * 64)).mkdir(parents=True)
    assert not any("code_eval" in p for p in task_problems(["humaneval_instruct"], True).get("humaneval_instruct", []))


def test_a_missing_package_stops_evaluate_before_any_generation(hub, monkeypatch, tmp_path):
    hub(True)
    monkeypatch.setattr(general, "missing_math_requirements", lambda: ["math-verify (not installed)"])

    def refuse(*args, **kwargs):
        raise AssertionError("a reply was generated before the preflight finished")

    monkeypatch.setattr("openrlhf_safesteer.eval.runner.hf_generate", refuse)
    tok = tiny_tokenizer()
    model = tiny_model("llama", tok, layers=1, hidden=32)
    from openrlhf_safesteer.eval import Checkpoint

    with pytest.raises(EvalError, match="general task minerva_math500: lm-eval's math extra is missing: math-verify"):
        evaluate([Checkpoint("tiny", model=model, tokenizer=tok)], [("safesteer_harmful", None)], tmp_path / "out",
                 config=EvalConfig(general=["gsm8k", "minerva_math500"], plot=False))
    assert not (tmp_path / "out" / "generations").exists()
