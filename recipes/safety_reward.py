"""Reward function for the PPO baseline (recipes/baseline_ppo_llama.sh), passed as --reward.remote_url.

OpenRLHF 0.11.2 loads `reward_func(queries, prompts, labels)` from this file inside each rollout
engine and calls it once per response. The reward is 1.0 when a safety judge calls the response
safe, 0.0 when it calls it unsafe.

Judge, chosen by environment variables (set them in the job's runtime_env):
- SAFETY_JUDGE_URL (recommended): an OpenAI-compatible chat endpoint serving Llama Guard, e.g.
  `vllm serve meta-llama/Llama-Guard-3-8B --port 8000` -> SAFETY_JUDGE_URL=http://judge:8000/v1;
  SAFETY_JUDGE_MODEL names the served model (default meta-llama/Llama-Guard-3-8B). Llama Guard
  answers "safe" or "unsafe\\nS<k>".
- otherwise: the project's refusal-string judge (openrlhf_safesteer.refusal.is_refusal): a refusal
  of a harmful prompt counts as safe. Cheap, and much weaker than Llama Guard.
Note: OpenRLHF only logs a failing reward function (the reward becomes None); check the logs.
"""

from __future__ import annotations

import json
import os
import urllib.request

JUDGE_URL = os.environ.get("SAFETY_JUDGE_URL")
JUDGE_MODEL = os.environ.get("SAFETY_JUDGE_MODEL", "meta-llama/Llama-Guard-3-8B")


def response_of(query: str, prompt: str) -> str:
    """The model's answer: the decoded prompt + response minus the (chat-templated) prompt."""
    return query[len(prompt):] if query.startswith(prompt) else query


def llama_guard_unsafe(user: str, answer: str) -> bool:
    body = json.dumps({
        "model": JUDGE_MODEL, "temperature": 0.0, "max_tokens": 10,
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
    }).encode()
    request = urllib.request.Request(JUDGE_URL.rstrip("/") + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        verdict = json.load(reply)["choices"][0]["message"]["content"].strip().lower()
    return verdict.startswith("unsafe")


def refusal_unsafe(user: str, answer: str) -> bool:
    from openrlhf_safesteer.refusal import is_refusal

    return not is_refusal(answer)


def reward_func(queries, prompts, labels, **kwargs):
    judge = llama_guard_unsafe if JUDGE_URL else refusal_unsafe
    unsafe = [judge(prompt, response_of(query, prompt)) for query, prompt in zip(queries, prompts)]
    rewards = [0.0 if u else 1.0 for u in unsafe]
    # OpenRLHF calls this with one query at a time and stores the value per sample.
    single = len(rewards) == 1
    return {
        "rewards": rewards[0] if single else rewards,
        "scores": rewards[0] if single else rewards,
        "extra_logs": {"judge_unsafe": float(unsafe[0]) if single else float(sum(unsafe) / len(unsafe))},
    }
