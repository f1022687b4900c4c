"""The comparison (openrlhf_safesteer.compare): arms' commands, bad input, layouts, LoRA sync, and the whole
run on a tiny model (every arm trains, is evaluated and appears in the report; a rerun skips them).

Real parts: OpenRLHF 0.11.2's parsers and trainers, Ray, DeepSpeed's CPU accelerator, transformers and
peft. Stand-ins: the flash_attn / vllm imports, and the vLLM engine's role played by the HF-generate
rollout actor (see conftest).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from openrlhf_safesteer.compare import run as compare_run
from openrlhf_safesteer.compare.arms import ARMS, CompareConfig, arm_command, prompt_schedule
from openrlhf_safesteer.demo.pipeline import DemoConfig

REPO = Path(__file__).resolve().parents[2]


def tiny_config(tiny_run, out: Path, **demo) -> CompareConfig:
    settings = dict(model=tiny_run["model"], steps=2, prompts_per_step=2, max_new_tokens=8, warmup_ratio=0.0,
                    micro_batch_size=2, progress=False)
    settings.update(demo)
    return CompareConfig(out=str(out), demo=DemoConfig(**settings), eval_limit=2)


def flags_of(command: list[str], module: str) -> list[str]:
    """The flags after `python -m MODULE [ppo|dpo]`."""
    start = command.index(module) + 1
    return command[start + 1:] if command[start] in ("ppo", "dpo") else command[start:]


def test_prompt_schedule_covers_every_prompt_once_per_pass():
    prompts = [f"p{i}" for i in range(32)]
    draws = prompt_schedule(prompts, steps=10, per_step=8, seed=3)
    assert len(draws) == 80
    # 4 steps make one pass: each pass is a permutation of the prompts, and passes differ in order
    assert Counter(draws[:32]) == Counter(prompts) and Counter(draws[32:64]) == Counter(prompts)
    assert draws[:32] != draws[32:64] and draws[:32] != prompts
    assert prompt_schedule(prompts, 10, 8, seed=4) != draws


def test_arm_commands_parse_with_openrlhf_and_share_the_budget(tiny_run, tmp_path):
    from openrlhf_safesteer.cli import train_safesteer_ray
    from openrlhf_safesteer.plugin.install import parse_openrlhf_flags

    cfg = tiny_config(tiny_run, tmp_path, steps=10, prompts_per_step=8, micro_batch_size=8)
    vector, tokens = Path(tiny_run["vector"]), Path(tiny_run["tokens"])
    data = tmp_path / "data"
    commands = {arm: arm_command(arm, cfg, tiny_run["model"], data, tmp_path / arm, vector, tokens) for arm in ARMS}

    ppo = parse_openrlhf_flags("openrlhf.cli.train_ppo_ray", flags_of(commands["ppo"], "openrlhf_safesteer.plugin.stock"))
    dpo = parse_openrlhf_flags("openrlhf.cli.train_dpo", flags_of(commands["dpo"], "openrlhf_safesteer.plugin.stock"))
    assert ppo.algo.advantage.estimator == "reinforce_baseline" and ppo.reward.remote_url[0].endswith("safety_reward.py")
    # Same rollouts per step and steps: 8 x 1 for SafeSteer, 4 x 2 for PPO's group baseline, 8 pairs for DPO
    assert ppo.rollout.batch_size * ppo.rollout.n_samples_per_prompt == 8 == dpo.train.batch_size
    assert ppo.data.max_samples // ppo.rollout.batch_size == 10
    for args, adam, prefix in ((ppo, ppo.actor.adam, ppo.actor), (dpo, dpo.adam, dpo)):
        assert adam.lr == cfg.demo.lr and tuple(adam.betas) == (0.9, 0.999)
        assert prefix.min_lr_ratio == 0.0 and prefix.lr_warmup_ratio == cfg.demo.warmup_ratio
        assert args.ds.lora.rank == cfg.demo.lora_r and list(args.ds.lora.target_modules) == cfg.demo.lora_targets

    for arm in ("safesteer", "safesteer_sampled"):
        argv = flags_of(commands[arm], "openrlhf_safesteer.cli.train_safesteer_ray")
        assert argv[argv.index("--rollout.batch_size") + 1] == "8"
        assert argv[argv.index("--data.max_samples") + 1] == "80"
        assert train_safesteer_ray.main([*argv, "--safesteer.dry_run"]) == 0
    assert "--safesteer.keep_prompt_order" in commands["safesteer"]
    cfg.keep_prompt_order = False   # --shuffled-prompts: OpenRLHF's own order
    assert "--safesteer.keep_prompt_order" not in arm_command("safesteer", cfg, tiny_run["model"], data,
                                                              tmp_path / "s", vector, tokens)
    local = commands["safesteer_local"]
    assert local[local.index("--max-steps") + 1] == "10" and local[local.index("--prompts-per-step") + 1] == "8"


def test_bad_input_is_refused_before_any_compute(tiny_run, tmp_path, monkeypatch, capsys):
    from openrlhf_safesteer.steering import SteeringVector

    base = ["--out", str(tmp_path / "out"), "--model", tiny_run["model"]]
    assert compare_run.main([*base, "--arms", "dpo", "nonsense"]) == 2
    assert "--arms must name distinct arms" in capsys.readouterr().err
    assert compare_run.main([*base, "--from", str(tmp_path / "nowhere")]) == 2
    assert "not a finished demo folder" in capsys.readouterr().err
    assert compare_run.main([*base, "--ppo-samples-per-prompt", "3"]) == 2
    assert "divide prompts_per_step" in capsys.readouterr().err

    # A vector of another model (hidden size 32 for a width-64 model): named before anything loads
    other = tmp_path / "other_demo"
    SteeringVector(vector=torch.ones(32), layer=1, model_name="other").save(other / "vector")
    (other / "safety_tokens.json").write_text(Path(tiny_run["tokens"]).read_text())
    assert compare_run.main([*base, "--from", str(other)]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "32" in err
    assert not (tmp_path / "out" / "artifacts").exists()

    # Less memory than three float32 copies of the model: refused with the estimate
    demo = tmp_path / "demo"
    SteeringVector.load(tiny_run["vector"]).save(demo / "vector")
    (demo / "safety_tokens.json").write_text(Path(tiny_run["tokens"]).read_text())
    monkeypatch.setattr(compare_run, "available_memory", lambda: 1024)
    assert compare_run.main([*base, "--from", str(demo)]) == 2
    assert "not enough memory for the comparison" in capsys.readouterr().err


def test_dry_run_checks_and_prints_each_arms_command_and_writes_nothing(tiny_run, tmp_path, capsys):
    """`--dry-run` (what `bash recipes/compare_cpu.sh --dry-run` runs): each arm's command line as `run` would
    start it, exit 0 and no output folder; a bad setting is still one line and exit 2."""
    import shlex

    out = tmp_path / "out"
    argv = ["--out", str(out), "--model", tiny_run["model"], "--arms", "dpo", "safesteer_local", "--dry-run"]
    assert compare_run.main(argv) == 0
    printed = capsys.readouterr().out
    cfg = compare_run.config_from_args(compare_run.build_parser().parse_args(argv))
    for arm in ("dpo", "safesteer_local"):
        want = arm_command(arm, cfg, tiny_run["model"], out / "data", out / "arms" / arm,
                           out / "artifacts" / "vector", out / "artifacts" / "safety_tokens.json")
        assert f"# {arm}\n{shlex.join(want)}\n" in printed
    assert "# safesteer\n" not in printed and "dry run OK" in printed
    assert not out.exists()
    assert compare_run.main([*argv, "--from", str(tmp_path / "nowhere")]) == 2
    assert "not a finished demo folder" in capsys.readouterr().err


def test_openrlhf_layout_becomes_the_local_engines_rollouts():
    from openrlhf_safesteer.local.rollout import build_rollouts

    prompt_ids = torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9]])
    prompt_mask = (prompt_ids != 0).long()
    completion = torch.tensor([[11, 12, 2, 4], [13, 2, 4, 4]])   # 2 = end of turn, then padding
    local = build_rollouts(prompt_ids, prompt_mask, completion, [2], ["a", "b"], ["", ""])
    # OpenRLHF's experience: the same sequences, action_mask over the response tokens (eos included)
    action_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    sequences = torch.cat([prompt_ids, completion], 1)
    attention = torch.cat([prompt_mask, action_mask], 1)
    converted = compare_run.rollouts_from_openrlhf(sequences, attention, action_mask)
    assert converted.prompt_len == local.prompt_len == 4
    assert torch.equal(converted.loss_mask, local.loss_mask)
    assert torch.equal(converted.attention_mask, local.attention_mask)


def test_hf_engine_lora_sync_reproduces_the_policy(tiny_run):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from openrlhf_safesteer.plugin.rollout import HFRolloutActor, lora_settings

    engine = HFRolloutActor(tiny_run["model"])
    base_sum = engine.parameter_checksum()
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_run["model"]),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    ids = torch.tensor([[3, 40, 41, 42, 43, 44]])
    generator = torch.Generator().manual_seed(0)
    for round_ in range(2):   # the second sync overwrites the adapter, it does not add to it
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        state = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
        assert engine.load_weights(state, lora_settings(policy)) == round_ + 1
        with torch.no_grad():
            expected = policy(ids).logits
            got = engine.model(ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_run["model"])
    assert (policy(ids).logits - base(ids).logits).abs().max() > 1e-3      # the adapter matters
    assert lora_settings(base) is None
    with torch.no_grad():   # the engine's base weights are untouched (only the adapter was loaded)
        engine.model.disable_adapter_layers()
        torch.testing.assert_close(engine.model(ids).logits, base(ids).logits)
    assert engine.parameter_checksum() != base_sum   # adapter parameters were added


def test_cpu_fp32_dtype(monkeypatch):
    import openrlhf.utils.utils as openrlhf_utils

    from openrlhf_safesteer.plugin import compat

    compat.install_cpu_shims()
    assert openrlhf_utils.convert_to_torch_dtype("fp32") is torch.float32
    assert openrlhf_utils.convert_to_torch_dtype("bf16") is torch.bfloat16
    args = SimpleNamespace(ds=SimpleNamespace(param_dtype="bf16"))
    monkeypatch.delenv(compat.CPU_DTYPE_ENV, raising=False)
    compat.apply_cpu_dtype(args)
    assert args.ds.param_dtype == "bf16"
    monkeypatch.setenv(compat.CPU_DTYPE_ENV, "fp32")
    compat.apply_cpu_dtype(args)
    assert args.ds.param_dtype == "fp32"
    monkeypatch.setenv(compat.CPU_DTYPE_ENV, "fp64")
    with pytest.raises(ValueError, match="SAFESTEER_CPU_DTYPE must be fp32"):
        compat.apply_cpu_dtype(args)


REWARD = '''
def reward_func(queries, prompts, labels, **kwargs):
    # A reward with variance on a tiny random model (which never refuses): the PPO arm must train on it.
    rewards = [float(len(q) % 3 == 0) for q in queries]
    one = len(rewards) == 1
    return {"rewards": rewards[0] if one else rewards, "scores": rewards[0] if one else rewards,
            "extra_logs": {}}
'''


def recount(samples: dict) -> dict:
    """A report entry's figures recounted from an evaluation's stored samples with the refusal judge: rates in
    [0, 1], general_score in percent, mean refusal scores; independent of compare.run's summarise()."""
    from openrlhf_safesteer.refusal import is_refusal

    def rate(name: str) -> float:
        return sum(is_refusal(s["reply"]) for s in samples[name]) / len(samples[name])

    def score(name: str) -> float:
        return sum(s["score"] for s in samples[name]) / len(samples[name])

    return {"harmful_refusal_rate": rate("harmful"), "harmful_asr": 1 - rate("harmful"),
            "harmless_refusal_rate": rate("harmless"),
            "general_score": 100 * sum(s["correct"] for s in samples["general"]) / len(samples["general"]),
            "harmful_refusal_score": score("harmful"), "harmless_refusal_score": score("harmless"),
            "empty_harmful_replies": sum(not s["reply"].strip() for s in samples["harmful"])}


def test_report_figures_are_each_evaluations_own(tmp_path):
    """build_report on hand-written evaluations whose rates differ per arm: each arm's entry holds its own rates
    and its score shifts against the base (worked out by hand below), so a swapped arm or base shows."""
    def evaluation(refused: list[bool], refused_harmless: list[bool], correct: list[bool], score: float) -> dict:
        def judged(flags, offset):
            return [{"prompt": f"p{i}", "reply": "I'm sorry, I cannot." if f else "Sure: step one.",
                     "refusal": f, "score": score + offset} for i, f in enumerate(flags)]
        samples = {"harmful": judged(refused, 0.0), "harmless": judged(refused_harmless, -1.0),
                   "general": [{"question": "q", "reply": "4", "correct": c} for c in correct]}
        harmful = sum(refused) / len(refused)
        return {"harmful_refusal_rate": harmful, "harmful_asr": 1 - harmful,
                "harmless_refusal_rate": sum(refused_harmless) / len(refused_harmless),
                "general_score": 100 * sum(correct) / len(correct), "harmful_refusal_score": score,
                "harmless_refusal_score": score - 1.0, "n": {"harmful": len(refused)}, "samples": samples}

    base = evaluation([True, False, False, False], [False, False], [True, False], 0.5)
    results = {"dpo": evaluation([True, True, True, False], [True, False], [True, True], 2.0),
               "ppo": evaluation([True, True, False, False], [False, False], [False, False], 1.0)}
    results = {arm: {"eval": ev, "train_seconds": 1.0, "peak_rss_mb": 200.0, "changed_tensors": 3}
               for arm, ev in results.items()}
    cfg = CompareConfig(out=str(tmp_path), demo=DemoConfig(progress=False))
    report = compare_run.build_report(cfg, "m", base, results, None, {}, {})
    assert report["base"] == pytest.approx(recount(base["samples"]))
    assert report["base"]["harmful_asr"] == 0.75
    dpo, ppo = report["arms"]["dpo"], report["arms"]["ppo"]
    assert (dpo["harmful_refusal_rate"], dpo["harmless_refusal_rate"], dpo["general_score"]) == (0.75, 0.5, 100.0)
    assert (ppo["harmful_refusal_rate"], ppo["harmless_refusal_rate"], ppo["general_score"]) == (0.5, 0.0, 0.0)
    assert (dpo["harmful_score_shift"], ppo["harmful_score_shift"]) == (1.5, 0.5)    # 2.0 - 0.5, 1.0 - 0.5
    assert (dpo["harmless_score_shift"], ppo["harmless_score_shift"]) == (1.5, 0.5)
    assert (dpo["empty_harmful_replies"], ppo["empty_harmful_replies"]) == (0, 0)


@pytest.mark.slow
@pytest.mark.ray
def test_compare_end_to_end_on_a_tiny_model(tiny_run, tmp_path, warm_python, monkeypatch):
    from transformers import AutoTokenizer

    # each arm's `python` is a fork of the warm interpreter (tests/conftest.py); it registers with the arm's memory
    # measurement (compare.run.timed_run), so peak_rss_mb stays the arm's own
    monkeypatch.setenv("PYTHON", warm_python)

    from openrlhf_safesteer.safety_tokens import SafetyTokenSet

    demo = tmp_path / "demo"
    demo.mkdir()
    os.symlink(tiny_run["vector"], demo / "vector")
    # A wide S, so that the sampled objective's few rollout tokens surely hit it (its advantage is 0 off S)
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    wide = list(range(20, 400, 2))
    SafetyTokenSet(ids=wide, tokens=tokenizer.convert_ids_to_tokens(wide), votes=[1] * len(wide),
                   model_name=tiny_run["model"], vocab_size=len(tokenizer)).save(demo / "safety_tokens.json")
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD)
    out = tmp_path / "cmp"
    argv = ["--out", str(out), "--from", str(demo), "--model", tiny_run["model"], "--steps", "2",
            "--prompts-per-step", "4", "--max-new-tokens", "6", "--warmup-ratio", "0", "--eval-limit", "2",
            "--ppo-reward", str(reward), "--no-progress",
            # a random tiny model never refuses and rarely ends a turn: unjudged pairs, short replies, 4 tries
            "--pair-filter", "none", "--pair-max-new-tokens", "12", "--pair-attempts", "4"]
    assert compare_run.main(argv) == 0

    report = json.loads((out / "report.json").read_text())
    assert set(report["arms"]) == set(ARMS)
    base_eval = json.loads((out / "artifacts" / "eval_base.json").read_text())
    # abs 1e-5: the stored per-reply scores are float32 values, averaged here in float64 (rates are k/n exactly)
    assert report["base"] == pytest.approx(recount(base_eval["samples"]), abs=1e-5)
    for arm, entry in report["arms"].items():
        assert entry["changed_tensors"] > 0, f"{arm} did not train: {entry}"
        for key in ("train_seconds", "needs"):
            assert key in entry, (arm, key)
        assert entry["peak_rss_mb"] > 100
        # every figure of the arm is its own evaluation's, recounted from the replies it stored
        samples = json.loads((out / "arms" / arm / "result.json").read_text())["eval"]["samples"]
        want = recount(samples)
        assert {k: entry[k] for k in want} == pytest.approx(want, abs=1e-5), arm
        assert entry["harmful_score_shift"] == pytest.approx(want["harmful_refusal_score"]
                                                             - report["base"]["harmful_refusal_score"], abs=1e-5)
        assert entry["harmless_score_shift"] == pytest.approx(want["harmless_refusal_score"]
                                                              - report["base"]["harmless_refusal_score"], abs=1e-5)
    # the plugin's first step and the local engine score the same rollouts alike
    assert report["parity"]["relative_error"] <= 1e-5, report["parity"]
    assert report["parity"]["teacher_logprobs_max_abs_diff"] <= 1e-5
    for name in ("report.md", "comparison.png"):
        assert (out / name).stat().st_size > 0
    assert "OpenRLHF DPO" in (out / "report.md").read_text()

    # A rerun skips every finished arm (their result files are not rewritten)
    stamps = {arm: (out / "arms" / arm / "result.json").stat().st_mtime_ns for arm in ARMS}
    assert compare_run.main(argv) == 0
    assert stamps == {arm: (out / "arms" / arm / "result.json").stat().st_mtime_ns for arm in ARMS}


def test_seed_table_gives_each_arms_range():
    from openrlhf_safesteer.compare.report import seed_table

    def report(seed: int, harmful: float, harmless: float) -> dict:
        arm = {"harmful_refusal_rate": harmful, "harmless_refusal_rate": harmless, "general_score": 80.0 + seed,
               "harmful_score_shift": 0.5, "harmless_score_shift": 0.25}
        return {"settings": {"demo": {"seed": seed}}, "arms": {"safesteer": arm}}

    text = seed_table([report(0, 0.75, 0.10), report(1, 0.625, 0.13), report(2, 0.8125, 0.09)])
    assert "| SafeSteer (plugin, exact) | 1 | 62.5% | 13.0% | 81.0 | +0.50 / +0.25 |" in text
    assert "range over 3** | | 62.5% - 81.2% | 9.0% - 13.0% | 80.0 - 82.0 |" in text


def test_keep_prompt_order_builds_the_prompt_loader_without_shuffling():
    from openrlhf_safesteer.plugin.config import split_argv
    from openrlhf_safesteer.plugin.experience import prompts_in_order

    calls = []

    class Strategy:
        def setup_dataloader(self, dataset, batch_size, pin_memory=False, shuffle=True, collate_fn=None):
            calls.append(shuffle)

    strategy = Strategy()
    with prompts_in_order(strategy, enabled=True):
        strategy.setup_dataloader("prompts", 1, True, True, None)
    strategy.setup_dataloader("replay buffer", 1, True, True, None)   # after the trainer is built: stock again
    with prompts_in_order(strategy, enabled=False):
        strategy.setup_dataloader("prompts", 1, True, True, None)
    assert calls == [False, True, True]

    config, rest = split_argv(["--safesteer.keep_prompt_order", "--data.max_samples", "8"])
    assert config.keep_prompt_order and rest == ["--data.max_samples", "8"]


def test_arms_start_the_python_the_recipes_were_given(monkeypatch):
    """compare_cpu.sh / compare_llama.sh pass $PYTHON on: the arms (and the frontier's stage recipes) run it."""
    import sys

    from openrlhf_safesteer.compare.arms import default_python

    monkeypatch.delenv("PYTHON", raising=False)
    assert CompareConfig(out="o").python == default_python() == sys.executable
    monkeypatch.setenv("PYTHON", "/opt/venv/bin/python")
    assert CompareConfig(out="o").python == default_python() == "/opt/venv/bin/python"


def test_dpo_accumulates_small_micro_batches_up_to_the_same_optimizer_batch(tiny_run, tmp_path):
    """DPO's rows are whole replies: its micro-batch is dpo_micro_batch_size (2), its optimizer batch the rollouts
    per step like every arm's; a micro-batch that does not divide that batch is refused before anything runs."""
    cfg = tiny_config(tiny_run, tmp_path, prompts_per_step=8, micro_batch_size=8)
    flags = flags_of(arm_command("dpo", cfg, tiny_run["model"], tmp_path, tmp_path / "arm", Path(tiny_run["vector"]),
                                 Path(tiny_run["tokens"])), "openrlhf_safesteer.plugin.stock")
    assert flags[flags.index("--train.batch_size") + 1] == "8"
    assert flags[flags.index("--train.micro_batch_size") + 1] == "2"
    cfg.dpo_micro_batch_size = 3
    with pytest.raises(ValueError, match="dpo_micro_batch_size must be >= 1 and divide the rollouts per step"):
        cfg.validate()
