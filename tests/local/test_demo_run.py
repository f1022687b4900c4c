"""A short `safesteer demo` on the real default model (Qwen2.5-Coder-0.5B-Instruct from its PyPI parts).

A couple of training steps on a few prompts: it checks the mechanism (the steered teacher refuses,
S at the demo's H = 7 holds safety words and at H = 1 refusal-opening tokens, every artifact is
written and loads), not the size of the effect, which needs the full demo (README). The first run converts the GGUF once (about 95 s on 2 cores).
"""

from __future__ import annotations

import json
import shutil

import pytest

from openrlhf_safesteer import loading

# Only packages that are not installed skip; an installed but broken one (part_paths' ModelFileError) fails.
MISSING = loading.missing_packages(loading.QWEN_CODER_05B)
# one xdist worker runs every test of the embedded model, so the one-time conversion (95 s) happens once
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800), pytest.mark.xdist_group("demo_model"),
              pytest.mark.skipif(bool(MISSING), reason=f"demo model packages not installed: {', '.join(MISSING)}")]


@pytest.fixture(scope="module")
def default_model_available():
    loading.part_paths(loading.QWEN_CODER_05B)


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
    # S at H = 7 (docs/METHOD.md for Qwen) holds safety words
    words = {t.strip().lower() for t in report["safety_tokens"]["texts"]}
    assert words & {"illegal", "unethical", "malicious", "unsafe", "criminal", "harmful", "dangerous"}, words
    # and at H = 1 the vote goes to refusal openers (docs/METHOD.md section 3)
    import torch

    from openrlhf_safesteer import data
    from openrlhf_safesteer.demo.pipeline import refusal_openers_in
    from openrlhf_safesteer.safety_tokens import select_safety_tokens
    from openrlhf_safesteer.steering import SteeringVector

    model, tokenizer = loading.load_model(loading.DEFAULT_MODEL)
    with torch.no_grad():
        openers = select_safety_tokens(model, tokenizer, SteeringVector.load(out / "vector"),
                                       data.harmless("validation")[:4], horizon=1, n_samples=2, min_prob=1e-3,
                                       progress=False)
    assert refusal_openers_in(openers.texts), openers.texts
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
    # The merged fp32 model is 2.4 GB and pytest keeps its last three temp dirs: on a CI disk that filled
    # once, a passing run leaves nothing that size behind (a failing one keeps it to debug).
    shutil.rmtree(out / "final")
