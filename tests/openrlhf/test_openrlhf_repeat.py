"""The plugin repeats itself at a fixed seed and follows the local engine, through the real Ray path (OpenRLHF's
trainer, Ray actors, DeepSpeed's CPU accelerator in float32, the HF-generate engine):

- two runs with the same --train.seed draw the same rollout tokens at every step and end with the same weights
  (bit for bit), while a run with another seed draws other tokens (the negative control);
- the plugin's step-1 rollouts are token for token the local engine's (`sample_rollouts` with the same seed, the
  same prompts in the same order): both engines draw a request's tokens the same way;
- replay: the local engine, fed the plugin's rollouts of every step, gives the same per-step loss, gradient norm
  and learning rate and the same final weights (1e-5 relative): the same objective, optimizer and schedule.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from openrlhf_safesteer.testing import load_dump

# one xdist worker runs this module: its module-scoped `runs` (three trainings) is built once, not per worker
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.xdist_group("repeat")]

SEED = 42   # OpenRLHF's default --train.seed
LR = 1e-3
# The local engine's optimizer in OpenRLHF's flags (compare/arms.py does the same for the comparison).
LOCAL_OPTIMIZER = ["--actor.adam.lr", repr(LR), "--actor.adam.betas", "0.9", "0.999", "--actor.adam.weight_decay",
                   "0.0", "--actor.lr_scheduler", "cosine_with_min_lr", "--actor.min_lr_ratio", "0.0",
                   "--actor.lr_warmup_ratio", "0", "--actor.max_norm", "1.0"]


def _train(tiny_run, out: Path, cpu_flags, *extra: str) -> Path:
    from openrlhf_safesteer.cli import train_safesteer_ray

    argv = cpu_flags(tiny_run, out, ["--safesteer.rollout", "hf", "--safesteer.keep_prompt_order",
                                     *LOCAL_OPTIMIZER, *extra])
    assert train_safesteer_ray.main(argv) == 0
    return out


SURGERY = ["--safesteer.refusal_surgery", "--safesteer.surgery_prompts_per_step", "2"]


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory, ray_session, cpu_flags):
    """Two runs at seed 42 (2 steps of 2 prompts x 2 samples) and one step at seed 7, in float32. The seed-7 run
    also runs the selectivity surgery (`--safesteer.refusal_surgery`; it moves no rollout of step 1, which is all
    that run is compared on), so the surgery's real Ray path costs no training of its own."""
    root = tmp_path_factory.mktemp("repeat")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAFESTEER_CPU_DTYPE", "fp32")
        return {"a": _train(tiny_run, root / "a", cpu_flags), "b": _train(tiny_run, root / "b", cpu_flags),
                "c": _train(tiny_run, root / "c", cpu_flags, "--train.seed", "7", "--data.max_samples", "2",
                            *SURGERY)}


def _responses(dump: dict) -> list[list[int]]:
    """Each row's response tokens: the tokens the action mask marks (action position t predicts token t + 1)."""
    predicted = dump["sequences"][:, 1:][:, -dump["action_mask"].shape[1]:]
    return [row[mask.bool()].tolist() for row, mask in zip(predicted, dump["action_mask"])]


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _prompts(tiny_run, n: int) -> list[str]:
    return [json.loads(line)["prompt"] for line in Path(tiny_run["prompts"]).read_text().splitlines()][:n]


def test_same_seed_same_rollouts_and_weights(runs):
    for step in (1, 2):   # --data.max_samples 4, 2 prompts x 2 samples a step: 2 steps, one micro-batch each
        first, _ = load_dump(runs["a"] / "dump" / f"experience_batch{step}")
        second, _ = load_dump(runs["b"] / "dump" / f"experience_batch{step}")
        assert torch.equal(first["sequences"], second["sequences"]), f"step {step} rollouts differ"
        assert torch.equal(first["action_mask"], second["action_mask"])
    assert _digest(runs["a"] / "final") == _digest(runs["b"] / "final")
    # another seed, other draws: the comparison above could fail
    other, _ = load_dump(runs["c"] / "dump" / "experience_batch1")
    first, _ = load_dump(runs["a"] / "dump" / "experience_batch1")
    assert _responses(other) != _responses(first)


def test_step_one_rollouts_are_the_local_engines(runs, tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_safesteer.local.rollout import sample_rollouts

    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_run["model"], dtype=torch.float32)
    # the file's first two prompts, in order (--safesteer.keep_prompt_order), 2 samples each, as the plugin's step 1
    local = sample_rollouts(model, tokenizer, _prompts(tiny_run, 2), 2, max_new_tokens=8, seed=SEED, rollout_index=0)
    local_responses = [row[mask.bool()].tolist() for row, mask in
                       zip(local.input_ids[:, local.prompt_len:], local.attention_mask[:, local.prompt_len:])]
    plugin, _ = load_dump(runs["a"] / "dump" / "experience_batch1")
    assert _responses(plugin) == local_responses


def test_local_engine_replaying_the_plugins_rollouts_takes_the_same_steps(runs, tiny_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_safesteer.compare.run import rollouts_from_openrlhf
    from openrlhf_safesteer.local.config import TrainConfig
    from openrlhf_safesteer.local.engine import build_run, optimizer_step
    from openrlhf_safesteer.safety_tokens import SafetyTokenSet
    from openrlhf_safesteer.steering import SteeringVector

    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_run["model"], dtype=torch.float32)
    vector = SteeringVector.load(tiny_run["vector"])
    safety_ids = torch.tensor(SafetyTokenSet.load(tiny_run["tokens"]).ids)
    cfg = TrainConfig(out=str(runs["a"] / "replay"), lr=LR, lora_r=0, freeze_embeddings=False, warmup_ratio=0.0,
                      weight_decay=0.0, max_grad_norm=1.0, prompts_per_step=2, samples_per_prompt=2,
                      micro_batch_size=4, max_steps=2, seed=SEED, progress=False, save_final=False)
    run = build_run(model, tokenizer, vector, safety_ids, _prompts(tiny_run, 4), cfg, None, n_steps=2)
    for step in (0, 1):
        batch, _ = load_dump(runs["a"] / "dump" / f"experience_batch{step + 1}")
        _, logged = load_dump(runs["a"] / "dump" / f"policy_step{step + 1}")
        lr = run.scheduler.get_last_lr()[0]
        totals, grad_norm = optimizer_step(run, step, rollouts_from_openrlhf(
            batch["sequences"], batch["attention_mask"], batch["action_mask"]))
        assert lr == pytest.approx(logged["lr"], rel=1e-6), f"step {step + 1} learning rate"
        # abs 1e-8: the loss is a sum of differences of nearly equal log-probabilities (the student starts at the
        # base), about 1e-4; the two engines' float32 forwards (different row layouts) round the terms apart by
        # about 2e-9 (measured: 1.13099e-4 against 1.13101e-4), which rel 1e-5 alone does not always allow
        assert totals["loss"] == pytest.approx(logged["loss"], rel=1e-5, abs=1e-8), f"step {step + 1} loss"
        assert float(grad_norm) == pytest.approx(logged["grad_norm"], rel=1e-5), f"step {step + 1} gradient norm"
    plugin = load_file(str(runs["a"] / "final" / "model.safetensors"))
    local = {name: p.detach() for name, p in run.student.named_parameters()}
    moved = 0
    initial = load_file(str(Path(tiny_run["model"]) / "model.safetensors"))
    for name, weight in plugin.items():
        # Per tensor, in norm: the weights within 1e-5 relative, and the two updates within 1% of each other.
        # Elementwise is too strict for Adam's first steps: an entry whose gradient is near zero moves by up to
        # lr in either direction (m / sqrt(v) is its sign), so the fp32 rounding of two computation orders (the
        # plugin forwards OpenRLHF's [prompt | response] rows, the local engine left-padded ones) decides it.
        weight, start = weight.float(), initial[name].float()
        gap = float((local[name] - weight).norm())
        assert gap <= 1e-5 * float(weight.norm()), f"{name}: weights {gap:.3g} apart"
        assert gap <= 1e-2 * float((weight - start).norm()), f"{name}: updates {gap:.3g} apart"
        moved += not torch.equal(initial[name], weight)
    assert moved >= len(plugin) // 2    # the steps moved the weights: the equality above is not initial == initial


def test_surgery_through_ray_scores_its_steps_borderline_prompts_on_the_policy(runs, tiny_run):
    """The seed-7 run's policy step ran the surgery (OpenRLHF's trainer in a Ray actor, DeepSpeed's engine): the
    refusal log-odds it guarded is the mean the core computes on the initial weights for the prompts the local
    engine would pick at step 0 (the project's borderline-safe training split, seed 7), and the update's component
    along the guard was measured (projected or not by its sign)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_safesteer import data
    from openrlhf_safesteer.directions import refusal_token_ids
    from openrlhf_safesteer.local.engine import retain_seed, step_prompts
    from openrlhf_safesteer.selective import first_token_refusal_scores

    _, logged = load_dump(runs["c"] / "dump" / "policy_step1")
    surgery = logged["surgery"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_run["model"], dtype=torch.float32)
    prompts = step_prompts(data.borderline("train"), 0, 2, retain_seed(7))
    with torch.no_grad():
        expected = float(first_token_refusal_scores(model, tokenizer, prompts, refusal_token_ids(tokenizer)).mean())
    assert surgery["surgery_refusal_logodds"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    other = step_prompts(data.borderline("train"), 1, 2, retain_seed(7))       # the next step's: other numbers
    with torch.no_grad():
        assert abs(float(first_token_refusal_scores(model, tokenizer, other, refusal_token_ids(tokenizer)).mean())
                   - expected) > 1e-4
    assert surgery["surgery_applied"] == float(surgery["surgery_update_along_guard"] > 0)
    assert surgery["surgery_update_along_guard"] != 0.0
    _, plain = load_dump(runs["a"] / "dump" / "policy_step1")
    assert plain["surgery"] == {}     # without the flag, no surgery


def test_stock_ppo_on_the_hf_engine_repeats_at_a_fixed_seed(tiny_run, tmp_path, warm_python):
    """OpenRLHF's own PPO (REINFORCE++-baseline, 2 samples a prompt, the refusal-judge reward), run as the
    comparison runs its ppo arm, twice at one seed: the same rewards and response lengths at every step and the
    same final weights. Before the controller's RNG was seeded, two runs drew the prompts in different orders."""
    import os
    import re
    import subprocess

    from openrlhf_safesteer.compare.arms import reward_file
    from openrlhf_safesteer.compare.run import arm_env

    def ppo(out: Path) -> list[tuple[str, str]]:
        argv = [warm_python, "-m", "openrlhf_safesteer.plugin.stock", "ppo",
                "--actor.model_name_or_path", tiny_run["model"], "--data.prompt_dataset", tiny_run["prompts"],
                "--data.input_key", "prompt", "--data.apply_chat_template", "--data.max_samples", "4",
                "--data.max_len", "64", "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1",
                "--vllm.num_engines", "1", "--ds.attn_implementation", "sdpa", "--ds.zero_stage", "0",
                "--rollout.batch_size", "2", "--rollout.n_samples_per_prompt", "2", "--rollout.micro_batch_size",
                "4", "--rollout.max_new_tokens", "8", "--train.batch_size", "4", "--train.micro_batch_size", "4",
                "--train.max_epochs", "1", *LOCAL_OPTIMIZER, "--algo.advantage.estimator", "reinforce_baseline",
                "--algo.kl.init_coef", "0", "--reward.remote_url", str(reward_file()),
                "--ckpt.output_dir", str(out / "final"), "--ckpt.path", str(out / "ckpt"), "--ckpt.disable_ds"]
        proc = subprocess.run(argv, env=arm_env(), capture_output=True, text=True, timeout=900,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        steps = re.findall(r"Global step \d+: (\{.*)", log)
        assert len(steps) == 2, log[-3000:]
        return [(re.search(r"'reward': ([-0-9.e]+)", s).group(1), re.search(r"'response_length': ([-0-9.e]+)",
                                                                           s).group(1)) for s in steps]

    first, second = ppo(tmp_path / "a"), ppo(tmp_path / "b")
    assert first == second
    assert _digest(tmp_path / "a" / "final") == _digest(tmp_path / "b" / "final")
