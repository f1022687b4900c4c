"""The local engine's checkpoint files (local/checkpoints.py) beyond the engine tests: what saving costs."""

from __future__ import annotations

import pytest


def test_saving_the_final_model_does_not_import_deepspeed(tmp_path):
    """accelerate's unwrap inside save_pretrained imports deepspeed (2-7 s on 2 cores) to ask whether the model is a
    DeepSpeedEngine; a process that never loaded deepspeed skips the question, and the saved model loads equal."""
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    script = f"""
import sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from openrlhf_safesteer.local.checkpoints import save_final
from openrlhf_safesteer.testing import tiny_model, tiny_tokenizer
tok = tiny_tokenizer()
model = tiny_model("qwen2", tok, layers=1, hidden=32)
final, _ = save_final(Path({str(tmp_path)!r}), model, tok)
assert "deepspeed" not in sys.modules, "save_final imported deepspeed"
loaded = AutoModelForCausalLM.from_pretrained(final)
assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
