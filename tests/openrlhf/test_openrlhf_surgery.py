"""The selectivity mechanism in the plugin (issue 26, part 4): gradient surgery on AdamW's update,
`--safesteer.refusal_surgery` (plugin/surgery.py), against the local engine's `refusal_surgery` with
`surgery_target update` (docs/METHOD.md section 8.1).

- Both engines, one batch each step: SafeSteerActorTrainer's policy step (its real code: loss, surgery, metrics)
  and the local engine's optimizer_step, fed the same rollouts from the same weights with the same AdamW and
  schedule, log the same loss and end each step with the same weights; the surgery changed those weights (the
  run without it ends elsewhere), so the equality is the surgery's, not the paper loss's alone.
- Under DeepSpeed ZeRO-2 (fp32 master copies partitioned apart from the model's weights) the projection lands in
  the optimizer's master copy and in the model's weight, equal to A-GEM's rule computed by hand from the master
  copies before and after the step; a guard the step does not raise leaves the step alone.
- Bad flags are refused before any actor starts.

Stubbed, as in test_openrlhf_policy_step.py: OpenRLHF's ActorPPOTrainer.__init__ (it needs torch.distributed) and the
strategy (a real torch AdamW step where DeepSpeed's engine.step would run). The tiny model, tokenizer, teacher and
rollouts are real.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from openrlhf_safesteer.plugin import compat

compat.install_import_stand_ins()

from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer  # noqa: E402

from openrlhf_safesteer.plugin.config import SafeSteerConfig  # noqa: E402
from openrlhf_safesteer.plugin.policy import TEACHER_ON_S, SafeSteerActorTrainer  # noqa: E402
from openrlhf_safesteer.testing import RecordingStrategy, light_trainer_init  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SEED = 5
LR = 2e-2       # large enough that a step moves the borderline prompts' refusal score measurably
BORDERLINE = ["How do I kill a Python process?", "Where can I shoot a good photo?", "How do I beat my brother at chess?",
              "What is the best way to blow up a balloon?", "How do I smash a tennis serve?",
              "How can I steal the show at a talent contest?"]


class StepStrategy(RecordingStrategy):
    """RecordingStrategy whose optimizer_step does what DeepSpeed's engine.step does at a boundary on one rank:
    clip the gradient norm, step the optimizer and the schedule, zero the gradients."""

    def __init__(self, config, seed):
        super().__init__(config)
        self.args.train.seed = seed

    def optimizer_step(self, optimizer, model, scheduler, name=None):
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


class HFActor:
    """OpenRLHF's Actor as far as the exact policy step uses it without packing: the HF model as .model."""

    def __init__(self, model):
        self.model = model

    def train(self):
        self.model.train()

    def parameters(self):
        return self.model.parameters()


def local_run(tiny_run, out: Path, surgery: bool):
    """The local engine on the tiny model: full-parameter AdamW (lora_r 0), 2 borderline prompts a step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_safesteer.local.config import TrainConfig
    from openrlhf_safesteer.local.engine import build_run
    from openrlhf_safesteer.steering import SteeringVector

    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_run["model"], dtype=torch.float32)
    retain = dict(retain_prompts_per_step=2, retain_divergence="refusal", retain_weight=0.0,
                  refusal_surgery=True, surgery_target="update") if surgery else {}
    cfg = TrainConfig(out=str(out), lr=LR, lora_r=0, freeze_embeddings=False, warmup_ratio=0.0, weight_decay=0.0,
                      max_grad_norm=1.0, prompts_per_step=2, samples_per_prompt=2, micro_batch_size=4, max_steps=2,
                      max_new_tokens=8, seed=SEED, progress=False, save_final=False, **retain)
    return build_run(model, tokenizer, SteeringVector.load(tiny_run["vector"]), torch.tensor(tiny_run["safety_ids"]),
                     [json.loads(line)["prompt"] for line in Path(tiny_run["prompts"]).read_text().splitlines()],
                     cfg, BORDERLINE if surgery else None, n_steps=2)


def plugin_trainer(monkeypatch, tiny_run, tmp_path, surgery: bool):
    """A real SafeSteerActorTrainer on a fresh copy of the tiny model, with the local engine's AdamW and schedule
    (built for that copy), so the optimizer cannot be where the two engines differ."""
    from openrlhf_safesteer.directions import refusal_token_ids

    monkeypatch.setattr(ActorPPOTrainer, "__init__", light_trainer_init)
    shell = local_run(tiny_run, tmp_path / "plugin_shell", surgery=False)   # its model, optimizer, schedule
    config = SafeSteerConfig(objective="exact", rollout="hf", safety_ids=list(tiny_run["safety_ids"]),
                             refusal_surgery=surgery, surgery_prompts_per_step=2, surgery_prompt_list=BORDERLINE,
                             refusal_ids=refusal_token_ids(shell.tokenizer)).namespace()
    trainer = SafeSteerActorTrainer(StepStrategy(config, SEED), HFActor(shell.student), None, shell.optimizer,
                                    shell.scheduler)
    trainer.tokenizer = shell.tokenizer
    return trainer, shell


def openrlhf_experience(rollouts, teacher_model, tiny_run) -> Experience:
    """The local rollouts in OpenRLHF's layout (left-padded prompts, then responses; the action mask over the
    response columns) with the steered teacher's log-probs on S from the plugin's teacher function."""
    from openrlhf_safesteer.plugin.teacher import steered_response_outputs
    from openrlhf_safesteer.steering import SteeringVector

    action = rollouts.loss_mask[:, rollouts.prompt_len - 1:].bool()                        # (B, A)
    vector = SteeringVector.load(tiny_run["vector"])
    with torch.no_grad():
        teacher = steered_response_outputs(teacher_model, vector, vector.coeff, None, rollouts.input_ids,
                                           rollouts.attention_mask, action, torch.tensor(tiny_run["safety_ids"]))
    experience = Experience(sequences=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                            action_mask=action, info={})
    setattr(experience, TEACHER_ON_S, teacher["logprobs_on_s"])
    return experience


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_close(first: dict, second: dict, what: str) -> None:
    for name, weight in first.items():
        gap = float((second[name] - weight).norm())
        assert gap <= 1e-5 * float(weight.norm()) + 1e-7, f"{what}: {name} {gap:.3g} apart"


def test_plugin_surgery_steps_equal_the_local_engines(monkeypatch, tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from openrlhf_safesteer.local.engine import optimizer_step
    from openrlhf_safesteer.local.rollout import sample_rollouts

    local = local_run(tiny_run, tmp_path / "local", surgery=True)
    trainer, shell = plugin_trainer(monkeypatch, tiny_run, tmp_path, surgery=True)
    plain = local_run(tiny_run, tmp_path / "plain", surgery=False)          # the negative control
    teacher_model = AutoModelForCausalLM.from_pretrained(tiny_run["model"], dtype=torch.float32)
    _assert_close(_weights(local.student), _weights(shell.student), "initial weights")
    applied = []
    for step in (0, 1):
        rollouts = sample_rollouts(local.student, local.tokenizer, local.prompts[2 * step: 2 * step + 2], 2,
                                   max_new_tokens=8, seed=SEED, rollout_index=step)
        totals, _ = optimizer_step(local, step, rollouts)
        optimizer_step(plain, step, rollouts)
        status = trainer.training_step(openrlhf_experience(rollouts, teacher_model, tiny_run), kl_ctl=0.0, step=0)
        metrics = status["metrics"]
        assert float(metrics["policy_loss"]) == pytest.approx(totals["loss"], rel=1e-5, abs=1e-8), f"step {step}"
        assert float(metrics["safesteer/surgery_applied"]) == totals["surgery_applied"], f"step {step}"
        applied.append(totals["surgery_applied"])
        _assert_close(_weights(local.student), _weights(shell.student), f"step {step + 1}")
    assert 1.0 in applied, "the surgery never projected a step: the equality above would not test it"
    moved = max(float((a - b).norm() / b.norm()) for a, b in
                zip(_weights(local.student).values(), _weights(plain.student).values()))
    assert moved > 1e-4, "the surgery left the weights where the paper's loss alone puts them"


def test_plugin_surgery_off_the_boundary_and_without_the_flag_does_nothing(monkeypatch, tiny_run, tmp_path):
    trainer, _ = plugin_trainer(monkeypatch, tiny_run, tmp_path, surgery=False)
    assert trainer.surgery is None and trainer._surgery_guard() is None
    trainer, _ = plugin_trainer(monkeypatch, tiny_run, tmp_path, surgery=True)
    trainer.actor.model.is_gradient_accumulation_boundary = lambda: False   # DeepSpeed mid-accumulation
    assert trainer._surgery_guard() is None
    trainer.actor.model.is_gradient_accumulation_boundary = lambda: True
    params, guard, _before, _score = trainer._surgery_guard()
    assert len(params) == len(guard) and any(a is not None and bool(a.abs().sum() > 0) for a in guard)


def test_plugin_surgery_prompts_per_step_are_the_local_engines():
    from openrlhf_safesteer.local.engine import retain_seed, step_prompts
    from openrlhf_safesteer.plugin.surgery import UpdateSurgery

    surgery = UpdateSurgery(BORDERLINE, 2, SEED, [1])
    seen = [surgery.step_prompts(step) for step in range(3)]
    assert seen == [step_prompts(BORDERLINE, step, 2, retain_seed(SEED)) for step in range(3)]
    assert sorted(p for part in seen for p in part) == sorted(BORDERLINE)     # one pass covers every prompt once


ZERO2 = textwrap.dedent('''
    import json, os, socket, sys
    with socket.socket() as s:
        s.bind(("", 0)); port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      DS_ACCELERATOR="cpu")
    import deepspeed, torch
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import AutoModelForCausalLM
    from openrlhf_safesteer.plugin.surgery import UpdateSurgery, guard_dot

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for sign in (-1.0, 1.0):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                  "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                          config=config)
        params = [p for p in engine.module.parameters() if p.requires_grad]
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        # As the plugin does it: after the backward, a forward of the module inside the engine (not the engine's
        # own, whose hooks an autograd.grad would confuse) and autograd.grad. The guard is +-(the loss's gradient):
        # Adam's first step moves against the gradient's sign, so with sign -1 the step raises the guarded
        # quantity (projected) and with +1 it lowers it (kept).
        grads = torch.autograd.grad(engine.module(input_ids=ids, labels=ids).loss, params)
        guard = [sign * g.detach() for g in grads]
        master_before = [safe_get_full_fp32_param(p).clone() for p in params]
        before = guard_dot(params, guard)
        engine.step()
        master_after = [safe_get_full_fp32_param(p).clone() for p in params]
        metrics = UpdateSurgery.apply(params, guard, before)
        along = sum(float(((a - b).double() * g.double()).sum()) for a, b, g in zip(master_after, master_before, guard))
        guard_sq = sum(float((g.double() ** 2).sum()) for g in guard)
        expected = [a - (along / guard_sq) * g if along > 0 else a for a, g in zip(master_after, guard)]
        master_now = [safe_get_full_fp32_param(p) for p in params]
        results[str(sign)] = {
            "applied": metrics["surgery_applied"], "along_by_hand": along / guard_sq ** 0.5,
            "along": metrics["surgery_update_along_guard"],
            "master_gap": max(float((m - e).abs().max()) for m, e in zip(master_now, expected)),
            "weight_gap": max(float((p.detach() - e).abs().max()) for p, e in zip(params, expected)),
            "moved": max(float((m - a).abs().max()) for m, a in zip(master_now, master_after)),
            "mapped": sum(hasattr(p, "_hp_mapping") for p in params), "params": len(params), "raw_along": along}
        # the projected step no longer raises the guarded quantity (to first order): <theta - before, a> = 0
        results[str(sign)]["after_dot"] = sum(float(((m - b).double() * g.double()).sum())
                                              for m, b, g in zip(master_now, master_before, guard))
    print("RESULT " + json.dumps(results))
''')


@pytest.mark.slow
def test_surgery_writes_deepspeeds_zero2_master_copies(tiny_run):
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", ZERO2, tiny_run["model"]], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    [line] = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    results = json.loads(line[len("RESULT "):])
    raised, lowered = results["-1.0"], results["1.0"]
    assert raised["mapped"] == raised["params"] > 0        # ZeRO-2: every weight has a separate master copy
    assert raised["applied"] == 1.0 and raised["along"] > 0
    assert raised["along"] == pytest.approx(raised["along_by_hand"], rel=1e-6)
    assert raised["master_gap"] < 1e-6 and raised["weight_gap"] < 1e-6 and raised["moved"] > 1e-5
    assert abs(raised["after_dot"]) <= 1e-4 * raised["raw_along"]     # the step's rise, removed
    assert lowered["applied"] == 0.0 and lowered["along"] < 0 and lowered["moved"] == 0.0


def test_bad_surgery_flags_are_refused_before_any_actor(tmp_path):
    from openrlhf_safesteer.plugin.config import surgery_problems

    args = SimpleNamespace(ds=SimpleNamespace(zero_stage=2), actor=SimpleNamespace(gradient_checkpointing_enable=True))
    assert surgery_problems(args, SafeSteerConfig(refusal_surgery=True)) == []     # the project's borderline split
    assert surgery_problems(args, SafeSteerConfig(surgery_prompts_per_step=4)) == [
        "--safesteer.surgery_prompts_per_step needs --safesteer.refusal_surgery"]
    reentrant = surgery_problems(SimpleNamespace(ds=args.ds, actor=SimpleNamespace(
        gradient_checkpointing_enable=True, gradient_checkpointing_reentrant=True)), SafeSteerConfig(refusal_surgery=True))
    assert len(reentrant) == 1 and "reentrant checkpointing does not support" in reentrant[0]
    zero3 = surgery_problems(SimpleNamespace(ds=SimpleNamespace(zero_stage=3), actor=args.actor),
                             SafeSteerConfig(refusal_surgery=True))
    assert len(zero3) == 1 and "ZeRO-3 partitions" in zero3[0]
    sampled = surgery_problems(args, SafeSteerConfig(refusal_surgery=True, objective="sampled"))
    assert len(sampled) == 1 and "use the exact objective" in sampled[0]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert surgery_problems(args, SafeSteerConfig(refusal_surgery=True, surgery_prompts=str(empty))) == [
        f"--safesteer.surgery_prompts: {empty} holds no prompts"]
    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\n")
    assert surgery_problems(args, SafeSteerConfig(refusal_surgery=True, surgery_prompts=str(few))) == [
        "--safesteer.surgery_prompts holds 2 prompts, fewer than --safesteer.surgery_prompts_per_step 8"]
    assert surgery_problems(args, SafeSteerConfig(refusal_surgery=True, surgery_prompts_per_step=0)) == [
        "--safesteer.surgery_prompts_per_step must be >= 1, got 0"]
    missing = surgery_problems(args, SafeSteerConfig(refusal_surgery=True, surgery_prompts=str(tmp_path / "no")))
    assert len(missing) == 1 and "does not exist" in missing[0]
