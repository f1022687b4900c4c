"""The real Ray path on CPU: OpenRLHF 0.11.2's trainer, Ray actors, DeepSpeed's CPU accelerator.

- recipes/train_safesteer_cpu.sh (exact objective, 2 steps): parameters change, the logged loss is
  finite and equals the core's localized_reverse_kl recomputed here, on the same batch, from the
  initial checkpoint; the teacher's log-probs on S equal the core's steer() on that checkpoint.
- the sampled objective (1 step, in this process's shared Ray session): the advantages of the real
  experience equal the core's sampled_advantages on independently recomputed log-probs.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from openrlhf_safesteer.testing import load_dump
from openrlhf_safesteer.testing import reference_logits as recompute

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_cpu_recipe_two_steps_exact_loss_equals_core(tiny_run, tmp_path, warm_python):
    from safetensors.torch import load_file

    from openrlhf_safesteer.objectives import gather_logprobs, localized_reverse_kl

    out = tmp_path / "run"
    env = dict(os.environ, PYTHON=warm_python, MODEL=tiny_run["model"], VECTOR=tiny_run["vector"],
               TOKENS=tiny_run["tokens"], PROMPTS=tiny_run["prompts"],
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["bash", str(REPO / "recipes" / "train_safesteer_cpu.sh"), "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]

    # Two optimizer steps, each logged by OpenRLHF's trainer with a finite policy loss.
    steps = [line for line in log.splitlines() if "Global step" in line]
    logged = [float(re.search(r"'policy_loss': ([-+0-9.e]+)", line).group(1)) for line in steps]
    assert len(logged) == 2 and all(math.isfinite(x) for x in logged), log[-3000:]

    ids = torch.tensor(tiny_run["safety_ids"])
    batch, meta = load_dump(out / "dump" / "policy_step1")
    assert meta["loss"] == pytest.approx(logged[0], rel=1e-6)
    # Step 1 trains on weights that are still the initial checkpoint: recompute everything here.
    student, teacher = recompute(tiny_run["model"], tiny_run["vector"], batch["sequences"], batch["attention_mask"])
    mask = batch["action_mask"].float()
    teacher_on_s = gather_logprobs(teacher, ids) * mask.unsqueeze(-1)
    torch.testing.assert_close(batch["teacher_on_s"], teacher_on_s, atol=1e-4, rtol=1e-4)
    core_loss, _ = localized_reverse_kl(student, teacher_on_s, ids, mask)
    assert logged[0] == pytest.approx(float(core_loss), rel=1e-4, abs=1e-7)
    # The steered teacher really differs from the student on S (the subset KL itself may have either sign).
    student_on_s = gather_logprobs(student, ids) * mask.unsqueeze(-1)
    assert (teacher_on_s - student_on_s).abs().max() > 1e-2

    final = load_file(str(out / "final" / "model.safetensors"))
    initial = load_file(str(Path(tiny_run["model"]) / "model.safetensors"))
    changed = [name for name in initial if not torch.equal(initial[name].float(), final[name].float())]
    assert len(changed) >= len(initial) // 2, f"only {changed} changed"


def test_sampled_objective_advantages_of_a_real_experience_equal_core(tiny_run, tmp_path, ray_session, cpu_flags):
    from transformers import AutoTokenizer

    from openrlhf_safesteer.cli import train_safesteer_ray
    from openrlhf_safesteer.objectives import gather_logprobs, sampled_advantages
    from openrlhf_safesteer.safety_tokens import SafetyTokenSet

    # A wide S so the handful of sampled tokens surely hits it (the advantage is 0 off S).
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    wide = list(range(20, 400, 2))
    SafetyTokenSet(ids=wide, tokens=tokenizer.convert_ids_to_tokens(wide), votes=[1] * len(wide)).save(
        tmp_path / "wide.json")
    out = tmp_path / "sampled"
    argv = cpu_flags(tiny_run, out, ["--safesteer.objective", "sampled", "--safesteer.rollout", "hf",
                                     "--data.max_samples", "2", "--actor.lr_warmup_ratio", "0"])
    argv[argv.index("--safesteer.tokens") + 1] = str(tmp_path / "wide.json")
    assert train_safesteer_ray.main(argv) == 0

    batch, meta = load_dump(out / "dump" / "experience_batch1")
    assert meta["objective"] == "sampled"
    ids = torch.tensor(wide)
    mask = batch["action_mask"]
    student, teacher = recompute(tiny_run["model"], tiny_run["vector"], batch["sequences"], batch["attention_mask"])
    sampled = batch["sequences"][:, 1:]
    student_lp = gather_logprobs(student, sampled) * mask
    teacher_lp = gather_logprobs(teacher, sampled) * mask
    torch.testing.assert_close(batch["student_logprobs"].float(), student_lp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch["teacher_logprobs"].float(), teacher_lp, atol=1e-4, rtol=1e-4)
    expected = sampled_advantages(student_lp, teacher_lp, sampled, ids, mask)
    torch.testing.assert_close(batch["advantages"], expected, atol=1e-4, rtol=1e-4)
    assert (batch["advantages"] != 0).sum() > 0
    assert torch.all(batch["advantages"][~torch.isin(sampled, ids) | ~mask.bool()] == 0)


def test_the_suites_ray_workers_are_forks_of_a_warm_interpreter(ray_session, warm_ray_workers):
    """tests/conftest.py's warm_ray_workers: a new worker of this session's Ray job is a fork of the warm server (it
    starts with DeepSpeed loaded, which nothing here imports), with the job's own id and environment."""
    import time
    import uuid

    assert warm_ray_workers is not None
    socket_path = Path(warm_ray_workers).parent / "socket"
    deadline = time.monotonic() + 300
    while not socket_path.exists():      # the server loads its libraries in the background
        assert time.monotonic() < deadline, "the warm Ray worker server did not start"
        time.sleep(0.2)

    @ray_session.remote(num_cpus=0)
    class Probe:
        def seen(self):
            import sys

            return "deepspeed" in sys.modules, os.environ.get("RAY_JOB_ID"), os.environ.get("PROBE"), os.getpid()

    # a runtime env of its own: a new worker process, not an idle one started before the server was up
    marker = uuid.uuid4().hex
    probe = Probe.options(runtime_env={"env_vars": {"PROBE": marker}}).remote()
    preloaded, job_id, seen_marker, pid = ray_session.get(probe.seen.remote(), timeout=120)
    assert preloaded and seen_marker == marker and pid != os.getpid()
    assert job_id == ray_session.get_runtime_context().get_job_id()
    ray_session.kill(probe)
