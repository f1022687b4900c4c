"""`safesteer eval` checks every checkpoint before any generation: its path, its tokenizer's chat
template and its --steer vector (against config.json). A bad second checkpoint is reported (exit 2)
before the first one has loaded its weights or generated anything."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from openrlhf_safesteer.cli.main import main
from openrlhf_safesteer.eval.generation import Checkpoint, GenerationSettings
from openrlhf_safesteer.eval.runner import CheckpointError, _preflight_checkpoint
from openrlhf_safesteer.steering import SteeringVector
from openrlhf_safesteer.testing import save_tiny_checkpoint, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """A tiny checkpoint (2 layers, hidden 32), the same without a chat template, and three vectors."""
    root = tmp_path_factory.mktemp("preflight")
    good = save_tiny_checkpoint(str(root / "good"), "llama", layers=2, hidden=32)
    tok = tiny_tokenizer()
    tok.chat_template = None
    tiny_model("llama", tok, layers=2, hidden=32).save_pretrained(root / "notmpl")
    tok.save_pretrained(root / "notmpl")
    vectors = {"fit": (32, 1), "wide": (48, 1), "deep": (32, 5)}
    for name, (hidden, layer) in vectors.items():
        SteeringVector(torch.ones(hidden), layer=layer).save(root / name)
    return {"good": good, "notmpl": str(root / "notmpl"), **{n: str(root / n) for n in vectors}, "root": str(root)}


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if any checkpoint's weights load or any reply is generated."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or a reply generated before the preflight finished")

    for name in ("load_checkpoint", "hf_generate", "vllm_generate"):
        monkeypatch.setattr(f"openrlhf_safesteer.eval.runner.{name}", refuse)


def run_eval(out, models: list[str], *extra: str) -> int:
    return main(["eval", "--models", *models, "--benchmarks", "safesteer_harmful", "--max-new-tokens", "4",
                 "--backend", "hf", "--no-plot", "--out", str(out), *extra])


@pytest.mark.parametrize("case, second, extra, expected", [
    ("no template", "notmpl", [], r"checkpoint 'b': tokenizer .* has no chat template"),
    ("missing path", None, [], r"checkpoint 'b': .*typo/dir does not exist"),
    ("missing vector", "good", ["--steer", "b=VEC:nonexistent"], r"checkpoint 'b': --steer .*nonexistent: .*not found"),
    ("too wide", "good", ["--steer", "b=VEC:wide"], r"made for hidden size 48 .* the model has hidden size 32"),
    ("too deep", "good", ["--steer", "b=VEC:deep"], r"targets decoder layer 5 but the model has 2 layers \(0\.\.1\)"),
    ("nan coeff", "good", ["--steer", "b=VEC:fit", "--steer-coeff", "nan"], r"--steer-coeff must be a finite"),
])
def test_bad_second_checkpoint_fails_before_the_first_generates(inputs, tmp_path, no_compute, caplog, case, second,
                                                                extra, expected):
    second_path = inputs[second] if second else inputs["root"] + "/typo/dir"
    extra = [e.replace("VEC:", inputs["root"] + "/") for e in extra]
    with caplog.at_level(logging.ERROR):
        code = run_eval(tmp_path / "out", [f"a={inputs['good']}", f"b={second_path}"], *extra)
    assert code == 2, case
    assert any(record.levelno == logging.ERROR for record in caplog.records)
    assert re.search(expected, caplog.text), caplog.text
    assert not (tmp_path / "out" / "generations").exists()


def test_preflight_accepts_a_fitting_vector_and_returns_the_tokenizer(inputs):
    checkpoint = Checkpoint("a", path=inputs["good"], steer=inputs["fit"], steer_coeff=2.0)
    tokenizer = _preflight_checkpoint(checkpoint, needs_template=True)
    assert tokenizer.chat_template


def test_preflight_allows_no_template_when_nothing_is_rendered(inputs):
    # lm-eval tasks without the chat template (--no-general-chat-template) on a base model need none.
    assert _preflight_checkpoint(Checkpoint("b", path=inputs["notmpl"]), needs_template=False) is not None
    with pytest.raises(CheckpointError, match="has no chat template"):
        _preflight_checkpoint(Checkpoint("b", path=inputs["notmpl"]), needs_template=True)


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.5, 7.0, float("nan")])
def test_top_p_outside_the_unit_interval_is_refused(top_p):
    with pytest.raises(ValueError, match=r"top_p \(--top-p\) must be in \(0, 1\], got"):
        GenerationSettings(temperature=0.5, top_p=top_p)


def test_top_p_is_checked_before_any_model_loads(inputs, tmp_path, no_compute):
    with pytest.raises(ValueError, match=r"must be in \(0, 1\], got 7.0"):
        run_eval(tmp_path / "out", [f"a={inputs['good']}"], "--top-p", "7", "--temperature", "0.5")
    assert GenerationSettings(temperature=0.5, top_p=1.0).top_p == 1.0


@pytest.mark.parametrize("temperature", [-0.1, float("nan")])
def test_negative_or_nan_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        GenerationSettings(temperature=temperature)
