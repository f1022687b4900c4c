"""A short `safesteer demo` on the real default model (Qwen2.5-Coder-0.5B-Instruct from its PyPI parts).

A couple of training steps on a few prompts: it checks the mechanism (the steered teacher refuses,
S holds refusal-opening tokens, every artifact is written and loads), not the size of the effect,
which needs the full demo (README). The first run converts the GGUF once (about 95 s on 2 cores).
"""

from __future__ import annotations

import json

import pytest

from openrlhf_safesteer.demo import model as demo_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def default_model_available():
    pytest.importorskip("gguf")
    try:
        demo_model.part_paths(demo_model.QWEN_CODER_05B)
    except demo_model.ModelFileError as err:
        pytest.skip(f"default model packages not installed: {err}")


def test_short_demo_on_default_model(tmp_path, default_model_available):
    from openrlhf_safesteer.cli.main import main

    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--layers", "14", "15", "--token-prompts", "4", "--token-samples", "2",
               "--objectives", "exact", "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2",
               "--max-new-tokens", "8", "--eval-limit", "4", "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    # the teacher (base + steering hook) refuses harmful requests
    assert report["teacher"]["teacher_harmful_refusal_rate"] >= 0.5, report["samples"]["teacher"]
    # S holds refusal-opening tokens
    assert report["safety_tokens"]["refusal_openers"], report["safety_tokens"]["texts"]
    for name in ("base", "safesteer"):
        for key in ("harmful_refusal_rate", "harmless_refusal_rate", "general_score"):
            assert key in report[name]
    assert 0 <= report["safesteer"]["general_score"] <= 100
    history = report["training"]["safesteer"]
    assert len(history) == 2 and all(h["teacher_mass_on_S"] > h["student_mass_on_S"] for h in history[:1])
    # artifacts: merged HF model, steering vector, safety tokens, report with plots
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "final").num_hidden_layers == 24
    assert not (out / "final" / "adapter_config.json").exists()
    assert (out / "vector" / "vector.safetensors").is_file() and (out / "safety_tokens.json").is_file()
    md = (out / "report.md").read_text()
    for plot in ("before_after", "direction_scores", "safety_tokens", "training"):
        assert (out / "plots" / f"{plot}.png").is_file() and f"plots/{plot}.png" in md
