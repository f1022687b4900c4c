"""`safesteer eval` on the offline demo model (Qwen2.5-Coder-0.5B-Instruct from the GGUF packages,
converted by openrlhf_safesteer.loading): real replies through the whole path. Slow."""

from __future__ import annotations

import json

import pytest

from openrlhf_safesteer.cli.main import main
from openrlhf_safesteer.loading import QWEN_CODER_05B, missing_packages
from openrlhf_safesteer.refusal import is_refusal

# Only packages that are not installed skip: an installed package without its part file, or a bug in
# part_paths, must fail the test, not hide as a skip (`make setup` installs them, so in CI this is empty).
MISSING = missing_packages(QWEN_CODER_05B)

# One xdist worker runs every test of the embedded model, so the one-time conversion (95 s) happens once
@pytest.mark.slow
@pytest.mark.xdist_group("demo_model")
@pytest.mark.skipif(bool(MISSING), reason=f"demo model packages not installed: {', '.join(MISSING)}")
def test_demo_model_end_to_end(tmp_path):
    from openrlhf_safesteer.loading import QWEN_CODER_05B, part_paths

    part_paths(QWEN_CODER_05B)   # installed but broken (a part file missing): ModelFileError fails the test
    out = tmp_path / "eval"
    argv = ["eval", "--models", "qwen=qwen2.5-coder-0.5b", "--benchmarks", "safesteer_harmful", "safesteer_xstest",
            "--limit", "1", "--max-new-tokens", "16", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    entry = results["checkpoints"]["qwen"]
    assert entry["rendered_example"].startswith("<|im_start|>")  # Qwen's own ChatML template
    rows = [json.loads(line) for line in (out / "generations" / "qwen" / "safesteer_harmful.jsonl").open()]
    assert len(rows) == 1 and all(len(r["reply"].split()) >= 3 for r in rows)  # real text, not empty
    harmful = entry["safety"]["safesteer_harmful"]
    refused = [is_refusal(r["reply"]) for r in rows]
    assert harmful["refusal_rate"] == sum(refused) / 1
    assert harmful["asr"] == 1 - harmful["refusal_rate"]  # the string judge: a non-refusal is a success
    assert (out / "chart.png").is_file() and "| safesteer_harmful (ASR ↓, judge refusal) |" in (out / "table.md").read_text()
    assert main(argv) == 0  # resumes: everything from the cache
    assert len((out / "generations" / "qwen" / "safesteer_harmful.jsonl").read_text().splitlines()) == 1
