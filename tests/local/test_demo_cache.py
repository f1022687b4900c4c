"""The demo's stage cache (demo/cache.py): a rerun with the same inputs reuses the base evaluation and stage 1 and
reports what a run that computes them reports; any changed input computes afresh; an entry is whole or absent."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from openrlhf_safesteer.demo import cache
from openrlhf_safesteer.demo.pipeline import DemoConfig, run_demo
from openrlhf_safesteer.testing import save_tiny_checkpoint

TINY = dict(layers=[1], positions=[-1], kl_threshold=1e9, token_prompts=2, token_samples=1, k=5, steps=1, prompts_per_step=2,
            samples_per_prompt=1, max_new_tokens=3, lora_r=2, eval_limit=2, refusal_tokens=3, teacher_check_prompts=1,
            progress=False)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESTEER_DEMO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "model"), "qwen2", layers=3, hidden=32)


def _without_run_facts(report: dict) -> dict:
    """The report less what differs between two runs of the same computation: times, folders, what was reused."""
    kept = {k: v for k, v in report.items() if k not in ("timings_seconds", "reused", "settings")}
    kept["training"] = {name: [{k: v for k, v in step.items() if not k.endswith("seconds")} for step in steps]
                        for name, steps in report["training"].items()}
    return kept


def test_a_rerun_reuses_both_stages_and_reports_the_same(tiny_model, tmp_path, store, caplog):
    torch.set_num_threads(1)
    first = run_demo(DemoConfig(out=str(tmp_path / "a"), model=tiny_model, **TINY))
    assert first["reused"] == {}
    assert sorted(p.name.split("-")[0] for p in store.iterdir()) == ["base_eval", "stage1"]
    with caplog.at_level(logging.INFO, logger="openrlhf_safesteer.demo.pipeline"):
        second = run_demo(DemoConfig(out=str(tmp_path / "b"), model=tiny_model, **TINY))
    assert set(second["reused"]) == {"evaluate base", "stage 1"}
    assert "evaluate base: reused" in caplog.text and "safety tokens: reused" in caplog.text
    assert _without_run_facts(second) == json.loads(json.dumps(_without_run_facts(first)))
    for name in ("vector/steering_vector.json", "vector/vector.safetensors", "safety_tokens.json", "teacher_check.json", "eval_base.json"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    # another seed: the same base evaluation, a stage 1 of its own (the vote samples with the seed)
    third = run_demo(DemoConfig(out=str(tmp_path / "c"), model=tiny_model, **{**TINY, "seed": 1}))
    assert set(third["reused"]) == {"evaluate base"}
    # other prompts: the base model is evaluated again, stage 1 (which never sees the eval sets) reused
    fifth = run_demo(DemoConfig(out=str(tmp_path / "e"), model=tiny_model, **{**TINY, "eval_limit": 1}))
    assert set(fifth["reused"]) == {"stage 1"} and fifth["n"]["harmful"] == 1
    # --no-cache: computed again, nothing read
    fourth = run_demo(DemoConfig(out=str(tmp_path / "d"), model=tiny_model, cache=False, **TINY))
    assert fourth["reused"] == {} and fourth["base"] == first["base"]


def test_every_input_is_in_the_key():
    env = {"torch": "2", "transformers": "5", "threads": 2, "onednn": True}
    base = cache.stage_key("base_eval", "m", {"sets": ["a"], "refusal_tokens": 12}, env, "code")
    assert base == cache.stage_key("base_eval", "m", {"refusal_tokens": 12, "sets": ["a"]}, dict(env), "code")
    for changed in (cache.stage_key("stage1", "m", {"sets": ["a"], "refusal_tokens": 12}, env, "code"),
                    cache.stage_key("base_eval", "m2", {"sets": ["a"], "refusal_tokens": 12}, env, "code"),
                    cache.stage_key("base_eval", "m", {"sets": ["b"], "refusal_tokens": 12}, env, "code"),
                    cache.stage_key("base_eval", "m", {"sets": ["a"], "refusal_tokens": 16}, env, "code"),
                    cache.stage_key("base_eval", "m", {"sets": ["a"], "refusal_tokens": 12}, {**env, "threads": 1},
                                    "code"),
                    cache.stage_key("base_eval", "m", {"sets": ["a"], "refusal_tokens": 12}, env, "code2")):
        assert changed != base


def test_model_fingerprint_follows_the_weights(tmp_path, tiny_model):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    assert cache.model_fingerprint(str(copy)) == cache.model_fingerprint(tiny_model)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1                                          # one bit of one weight
    weights.write_bytes(bytes(data))
    assert cache.model_fingerprint(str(copy)) != cache.model_fingerprint(tiny_model)
    assert cache.model_fingerprint("Qwen/some-hub-id") is None
    (copy / "safesteer_source.json").write_text(json.dumps({"sha256": "ab" * 32}))
    assert cache.model_fingerprint(str(copy)) == "gguf-sha256:" + "ab" * 32


def test_an_interrupted_store_leaves_no_entry(store):
    def write(folder):
        (folder / "eval_base.json").write_text("{")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.store_entry("base_eval", "k" * 24, write)
    assert cache.load_entry("base_eval", "k" * 24) is None
    assert list(store.iterdir()) == []                     # no temporary folder left either
    assert cache.store_entry("base_eval", "k" * 24, lambda f: (f / "x").write_text("1")) is not None
    assert (cache.load_entry("base_eval", "k" * 24) / "x").read_text() == "1"
