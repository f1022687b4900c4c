"""The plugin repeats itself at a fixed seed, through the real Ray path (OpenRLHF's trainer, Ray actors, DeepSpeed's
CPU accelerator, the HF-generate engine):

- two runs with the same --train.seed draw the same rollout tokens at every step and end with the same weights
  (bit for bit), while a run with another seed draws other tokens (the negative control);
- the plugin's step-1 rollouts are token for token the local engine's (`sample_rollouts` with the same seed, the
  same prompts in the same order): both engines draw a request's tokens the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from openrlhf_safesteer.testing import load_dump

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SEED = 42   # OpenRLHF's default --train.seed


def _train(tiny_run, out: Path, cpu_flags, *extra: str) -> None:
    from openrlhf_safesteer.cli import train_safesteer_ray

    argv = cpu_flags(tiny_run, out, ["--safesteer.rollout", "hf", "--safesteer.keep_prompt_order",
                                     "--actor.lr_warmup_ratio", "0", *extra])
    assert train_safesteer_ray.main(argv) == 0


def _responses(dump: dict) -> list[list[int]]:
    """Each row's response tokens: the tokens the action mask marks (action position t predicts token t + 1)."""
    predicted = dump["sequences"][:, 1:][:, -dump["action_mask"].shape[1]:]
    return [row[mask.bool()].tolist() for row, mask in zip(predicted, dump["action_mask"])]


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_rollouts_and_weights_and_the_local_engines_draws(tiny_run, tmp_path, ray_session, cpu_flags):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_safesteer.chat import end_of_turn_ids
    from openrlhf_safesteer.local.rollout import sample_rollouts

    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        _train(tiny_run, out, cpu_flags)
    for step in (1, 2):   # --data.max_samples 4, 2 prompts x 2 samples a step: 2 steps, one micro-batch each
        first, _ = load_dump(runs[0] / "dump" / f"experience_batch{step}")
        second, _ = load_dump(runs[1] / "dump" / f"experience_batch{step}")
        assert torch.equal(first["sequences"], second["sequences"]), f"step {step} rollouts differ"
        assert torch.equal(first["action_mask"], second["action_mask"])
    assert _digest(runs[0] / "final") == _digest(runs[1] / "final")

    # another seed, other draws: the comparison above could fail
    _train(tiny_run, tmp_path / "c", cpu_flags, "--train.seed", "7", "--data.max_samples", "2")
    other, _ = load_dump(tmp_path / "c" / "dump" / "experience_batch1")
    first, _ = load_dump(runs[0] / "dump" / "experience_batch1")
    assert _responses(other) != _responses(first)

    # the local engine, same seed and prompts (the file's first two, in order: --safesteer.keep_prompt_order)
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_run["model"], dtype=torch.float32)
    prompts = [json.loads(line)["prompt"] for line in Path(tiny_run["prompts"]).read_text().splitlines()][:2]
    local = sample_rollouts(model, tokenizer, prompts, 2, max_new_tokens=8, seed=SEED, rollout_index=0)
    stop = set(end_of_turn_ids(tokenizer))
    local_responses = []
    for row, mask in zip(local.input_ids[:, local.prompt_len:], local.attention_mask[:, local.prompt_len:]):
        local_responses.append(row[mask.bool()].tolist())
    assert _responses(first) == local_responses
    assert any(r[-1] in stop for r in local_responses) or all(len(r) == 8 for r in local_responses)
