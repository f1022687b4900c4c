"""`python -m openrlhf_safesteer.compare.repeat A B`: two comparison folders written here, once equal, then with one
rollout token, one adapter byte or one score changed; each change is found and named, and a folder that is not a
comparison is one line and exit status 2."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import save_file

from openrlhf_safesteer.compare import repeat
from openrlhf_safesteer.plugin.dump import save_dump


def _arm(root, name, sequences, weight, harmful=0.75):
    arm = root / "arms" / name
    (arm / "final").mkdir(parents=True)
    save_file({"lora_A": weight}, str(arm / "final" / "adapter_model.safetensors"))
    (arm / "result.json").write_text(json.dumps({"train_seconds": 1.0, "eval": {
        "harmful_refusal_rate": harmful, "harmless_refusal_rate": 0.1, "seconds": 3.0}}))
    for step in (1, 2):
        save_dump(arm / "dump" / f"experience_batch{step}", {"sequences": sequences + step,
                                                             "action_mask": torch.ones_like(sequences)}, {})
        save_dump(arm / "dump" / f"policy_step{step}", {"x": torch.zeros(1)}, {"loss": 0.5 / step})


def _pair(tmp_path):
    sequences, weight = torch.arange(12).reshape(3, 4), torch.linspace(-1, 1, 8).reshape(2, 4)
    for run in ("a", "b"):
        _arm(tmp_path / run, "safesteer", sequences, weight)
        _arm(tmp_path / run, "ppo", sequences, weight)
        shutil.rmtree(tmp_path / run / "arms" / "ppo" / "dump")   # the stock arms leave no dump
    return tmp_path / "a", tmp_path / "b"


def test_equal_runs_repeat_and_each_difference_is_found(tmp_path, capsys):
    first, second = _pair(tmp_path)
    assert repeat.main([str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert "safesteer: REPEATED: rollout tokens equal at 2/2 steps, losses 2/2" in out and "ppo: REPEATED" in out

    arm = second / "arms" / "safesteer"
    changed = torch.arange(12).reshape(3, 4) + 2
    changed[1, 2] += 1
    save_dump(arm / "dump" / "experience_batch2", {"sequences": changed,
                                                   "action_mask": torch.ones_like(changed)}, {})
    assert repeat.main([str(first), str(second)]) == 1
    assert "rollout tokens equal at 1/2 steps" in capsys.readouterr().out

    first, second = _pair(tmp_path / "again")
    save_file({"lora_A": torch.linspace(-1, 1, 8).reshape(2, 4) * (1 + 1e-7)},
              str(second / "arms" / "ppo" / "final" / "adapter_model.safetensors"))
    assert repeat.main([str(first), str(second)]) == 1
    assert "ppo: DIFFERENT: final weights differ; held-out scores equal" in capsys.readouterr().out


def test_not_a_comparison_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "a" / "arms").mkdir(parents=True)
    assert repeat.main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_weights_the_comparison_did_not_keep_are_not_compared(tmp_path, capsys):
    first, second = _pair(tmp_path)
    for run in (first, second):
        shutil.rmtree(run / "arms" / "ppo" / "final")   # as the comparison deletes the local engine's
    assert repeat.main([str(first), str(second)]) == 0
    assert "ppo: REPEATED: final weights not kept; held-out scores equal" in capsys.readouterr().out
