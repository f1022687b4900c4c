"""The baselines as their users run them (issue 25, item 1): PPO with a KL anchor and 4 samples per prompt, SFT on the
teacher's replies through OpenRLHF's own train_sft, DPO pairs from complete, judge-filtered replies; the share of
PPO's prompt groups with a non-zero advantage; the reward log it is counted from. Pure or parser-only (no training)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from openrlhf_safesteer.compare.arms import CompareConfig, arm_command
from openrlhf_safesteer.compare.pairs import Reply, choose_pairs, fill_rows
from openrlhf_safesteer.compare.run import nonzero_advantage_shares, train_sequences
from openrlhf_safesteer.demo.pipeline import DemoConfig
from openrlhf_safesteer.refusal import is_refusal

REPO = Path(__file__).resolve().parents[2]


def _flags(command: list[str]) -> list[str]:
    start = command.index("openrlhf_safesteer.plugin.stock") + 2
    return command[start:]


def _cfg(tmp_path, **kw) -> CompareConfig:
    return CompareConfig(out=str(tmp_path), demo=DemoConfig(model="m", progress=False), **kw)


def test_ppo_has_the_recipes_kl_anchor_and_four_samples_and_sft_parses_with_openrlhf(tmp_path):
    from openrlhf_safesteer.plugin.install import parse_openrlhf_flags

    cfg = _cfg(tmp_path)
    cfg.validate()
    model = str(tmp_path / "model")
    ppo = parse_openrlhf_flags("openrlhf.cli.train_ppo_ray",
                               _flags(arm_command("ppo", cfg, model, tmp_path, tmp_path / "ppo", tmp_path, tmp_path)))
    assert ppo.algo.kl.init_coef == 0.01 and ppo.algo.kl.use_loss and ppo.algo.kl.estimator == "k3"
    assert ppo.rollout.n_samples_per_prompt == 4 and ppo.rollout.batch_size == 2      # 8 rollouts a step
    assert ppo.ref.num_gpus_per_node == 1
    cfg.ppo_kl_coef = 0.0
    none = arm_command("ppo", cfg, model, tmp_path, tmp_path / "ppo", tmp_path, tmp_path)
    assert "--algo.kl.use_loss" not in none and none[none.index("--algo.kl.init_coef") + 1] == "0.0"

    sft = parse_openrlhf_flags("openrlhf.cli.train_sft",
                               _flags(arm_command("sft", cfg, model, tmp_path, tmp_path / "sft", tmp_path, tmp_path)))
    assert sft.data.dataset == str(tmp_path / "sft.jsonl") and sft.data.output_key == "response"
    assert sft.train.batch_size == 8 and sft.adam.lr == cfg.demo.lr and tuple(sft.adam.betas) == (0.9, 0.999)
    assert sft.ds.lora.rank == cfg.demo.lora_r and sft.train.max_epochs == 1

    cfg.local_objective = "full_vocab"
    local = arm_command("safesteer_local", cfg, model, tmp_path, tmp_path / "a", tmp_path, tmp_path)
    assert local[local.index("--safesteer.objective") + 1] == "full_vocab"
    for bad in (dict(ppo_kl_coef=-1.0), dict(pair_filter="llama"), dict(pair_attempts=0)):
        with pytest.raises(ValueError):
            _cfg(tmp_path, **bad).validate()


def test_dpo_pairs_are_complete_refusal_vs_complete_compliance():
    refuse, comply = "I'm sorry, but I can't help with that.", "Sure, here is how: first, mix the two."
    draws = ["p0", "p1", "p2", "p3"]
    chosen = [[Reply(refuse, True)],                                   # good
              [Reply(refuse, False), Reply(refuse, True)],             # the first is cut: the second try counts
              [Reply(comply, True)],                                   # the teacher complied: dropped
              [Reply(refuse, True)]]
    rejected = [[Reply(comply, True)], [Reply(comply, True)], [Reply(comply, True)],
                [Reply(comply, False), Reply(refuse, True)]]           # cut, then a refusal: dropped
    pairs, why = choose_pairs(draws, chosen, rejected, is_refusal)
    assert [p is not None for p in pairs] == [True, True, False, False]
    assert pairs[1] == {"chosen": [{"role": "user", "content": "p1"}, {"role": "assistant", "content": refuse}],
                        "rejected": [{"role": "user", "content": "p1"}, {"role": "assistant", "content": comply}]}
    assert why == {"no complete refusing chosen": 1, "no complete complying rejected": 1}
    unjudged, _ = choose_pairs(draws, chosen, rejected, None)          # tests on random models: complete only
    assert [p is not None for p in unjudged] == [True, True, True, True]
    assert fill_rows(["a", "b"], 5, True) == (["a", "b", "a", "b", "a"], 3)
    assert fill_rows(["a", "b"], 5, False) == (["a", "b"], 0)
    assert fill_rows([], 5, True) == ([], 0)


def test_nonzero_advantage_share_per_step():
    rows = [{"user": u, "reward": r} for u, r in
            [("a", 1), ("a", 1), ("b", 0), ("b", 1),       # step 1: group a constant, b mixed -> 0.5
             ("c", 0), ("c", 1), ("d", 1), ("d", 0),       # step 2: both mixed -> 1.0
             ("e", 1), ("e", 1), ("f", 0), ("f", 0),       # step 3: none -> 0.0
             ("g", 1)]]                                     # a partial step is left out
    assert nonzero_advantage_shares(rows, 4) == [0.5, 1.0, 0.0]


def test_train_sequences_count_each_arms_work(tmp_path):
    cfg = _cfg(tmp_path)
    assert train_sequences("safesteer_local", cfg) == 80 == train_sequences("ppo", cfg)
    assert train_sequences("dpo", cfg, {"generated_sequences": 170}) == 160 + 170
    assert train_sequences("sft", cfg, {"generated_sequences": 170}) == 80 + 170


def test_reward_function_logs_each_judged_reply(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("safety_reward_log", REPO / "recipes" / "safety_reward.py")
    reward = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward)
    log = tmp_path / "rewards.jsonl"
    monkeypatch.setenv("SAFETY_JUDGE", "refusal")
    monkeypatch.setenv("SAFETY_REWARD_LOG", str(log))
    prompt = "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"
    for reply in ("I'm sorry, I can't help with that.<|im_end|>", "Sure: insert the pick.<|im_end|>"):
        reward.reward_func([prompt + reply], [prompt], [None])
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows == [{"user": "How do I pick a lock?", "reward": 1.0}, {"user": "How do I pick a lock?", "reward": 0.0}]
    monkeypatch.delenv("SAFETY_REWARD_LOG")
    reward.reward_func([prompt + "Sure.<|im_end|>"], [prompt], [None])
    assert len(log.read_text().splitlines()) == 2                      # no log without the variable
