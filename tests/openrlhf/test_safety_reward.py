"""recipes/safety_reward.py, the PPO baseline's reward function: what the judge sees (the raw user text and
the reply without special tokens, from exactly what OpenRLHF 0.11.2 hands over), the explicit judge choice,
and a judge that is down stopping the run (an error OpenRLHF's `except Exception` cannot swallow).

The Llama Guard server is a real HTTP server in a thread (http.server), answering like vLLM's
OpenAI-compatible chat endpoint; it records the messages it was sent."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from openrlhf_safesteer.testing import tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
REWARD_FILE = REPO / "recipes" / "safety_reward.py"


def load_reward_module():
    """The file as OpenRLHF loads it (spec_from_file_location, utils/agent.py)."""
    spec = importlib.util.spec_from_file_location("reward_func", REWARD_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def reward():
    return load_reward_module()


def openrlhf_inputs(tokenizer, user: str, reply_ids: list[int]) -> tuple[str, str]:
    """(query, prompt) as OpenRLHF 0.11.2 builds them: the prompt after apply_chat_template
    (datasets/prompts_dataset.py), tokenised without special tokens, + the reply's ids, decoded with
    skip_special_tokens=False (utils/agent.py)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(text=prompt, add_special_tokens=False)["input_ids"]
    query = tokenizer.decode(prompt_ids + reply_ids, skip_special_tokens=False)
    return query, prompt


class JudgeServer:
    """A Llama-Guard-like chat endpoint: answers `verdict` and records every request body."""

    def __init__(self, verdict: str = "safe", status: int = 200):
        self.requests: list[dict] = []
        self.verdict, self.status = verdict, status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, **body})
                payload = json.dumps({"choices": [{"message": {"content": outer.verdict}}]}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("template", ["llama3", "chatml"])
@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_judge_sees_raw_user_text_and_reply_without_special_tokens(reward, template, with_tokenizer, tmp_path,
                                                                   monkeypatch):
    tokenizer = tiny_tokenizer(template=template)
    if with_tokenizer:
        tokenizer.save_pretrained(tmp_path / "tok")
        monkeypatch.setenv("SAFETY_REWARD_TOKENIZER", str(tmp_path / "tok"))
    else:
        monkeypatch.delenv("SAFETY_REWARD_TOKENIZER", raising=False)
    user = "How do I make a bomb?"
    answer = "Sorry, I can't help with that."
    # The reply as the engine returns it: the answer, its end-of-turn token, and (as a model may) more.
    reply_ids = (tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                 + tokenizer("Sure! Here is how", add_special_tokens=False)["input_ids"])
    query, prompt = openrlhf_inputs(tokenizer, user, reply_ids)
    assert tokenizer.eos_token in query and "<|" in prompt  # what OpenRLHF hands over is templated

    assert reward.split_conversation(query, prompt) == (user, answer)

    monkeypatch.delenv("SAFETY_JUDGE", raising=False)
    with JudgeServer("unsafe\nS9") as judge:
        monkeypatch.setenv("SAFETY_JUDGE_URL", judge.url)
        out = reward.reward_func([query], [prompt], [""])
    assert out == {"rewards": 0.0, "scores": 0.0, "extra_logs": {"judge_unsafe": 1.0}}
    (request,) = judge.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["model"] == "meta-llama/Llama-Guard-3-8B"
    assert request["messages"] == [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_tokenizer_markers_survive_a_system_block_before_the_user_turn(reward):
    """A template with a system block (Llama-3.1's dated one, Qwen's default) before the user turn: the user
    header is taken after the last end-of-turn of the rendered head, so the block need not match."""
    tokenizer = tiny_tokenizer(template="llama3")
    tokenizer.chat_template = (
        "{{ '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday is 4 Dec<|eot_id|>' }}"
        "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
        "+ message['content'] + '<|eot_id|>' }}{% endfor %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")
    markers = reward.markers_from_tokenizer(tokenizer)
    assert markers.user_header == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert markers.suffix == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    rendered_another_day = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday is 5 Dec<|eot_id|>"
                            "<|start_header_id|>user<|end_header_id|>\n\nWrite malware.<|eot_id|>"
                            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    user, marker = reward.user_text(rendered_another_day, (markers,))
    assert user == "Write malware." and marker is markers


def test_left_truncated_prompt_still_yields_the_reply(reward):
    """OpenRLHF left-truncates prompts longer than max_len - max_new_tokens: the query then lacks the prompt's
    head; the reply is found after the user text + assistant header."""
    prompt = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nExplain photosynthesis.<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    query = prompt[30:] + "Plants turn light into sugar.<|eot_id|>"
    assert reward.split_conversation(query, prompt) == ("Explain photosynthesis.", "Plants turn light into sugar.")


def test_raw_prompt_without_a_template_is_judged_as_is(reward, monkeypatch):
    monkeypatch.delenv("SAFETY_REWARD_TOKENIZER", raising=False)
    assert reward.split_conversation("Hello there! Hi.</s>", "Hello there!") == ("Hello there!", "Hi.")


def test_unknown_template_is_an_error_not_raw_text(reward, monkeypatch):
    monkeypatch.delenv("SAFETY_REWARD_TOKENIZER", raising=False)
    prompt = "<|user|>\nHow do I make poison?<|end|>\n<|assistant|>\n"
    with pytest.raises(reward.TemplateError, match="SAFETY_REWARD_TOKENIZER"):
        reward.split_conversation(prompt + "No.<|end|>", prompt)
    # A BaseException: OpenRLHF's `except Exception` around the reward call cannot turn it into reward None.
    assert not issubclass(reward.TemplateError, Exception)


def test_refusal_judge_is_chosen_explicitly_and_runs_offline(reward, monkeypatch):
    monkeypatch.setenv("SAFETY_JUDGE", "refusal")
    monkeypatch.delenv("SAFETY_JUDGE_URL", raising=False)
    monkeypatch.delenv("SAFETY_REWARD_TOKENIZER", raising=False)
    prompt = "<|im_start|>user\nHow can I steal a car?<|im_end|>\n<|im_start|>assistant\n"
    refusal = reward.reward_func([prompt + "I'm sorry, I cannot help with that.<|im_end|>"], [prompt], [""])
    compliance = reward.reward_func([prompt + "Sure! First, find an old car.<|im_end|>"], [prompt], [""])
    assert refusal["rewards"] == 1.0 and compliance["rewards"] == 0.0
    batch = reward.reward_func([prompt + "I'm sorry.<|im_end|>", prompt + "Sure.<|im_end|>"], [prompt] * 2, ["", ""])
    assert batch == {"rewards": [1.0, 0.0], "scores": [1.0, 0.0], "extra_logs": {"judge_unsafe": 0.5}}
    assert reward.health_check() == "refusal-string judge (openrlhf_safesteer.refusal, no server)"


@pytest.mark.parametrize("env, message", [
    ({}, "no safety judge chosen"),
    ({"SAFETY_JUDGE": "llama-guard"}, "needs SAFETY_JUDGE_URL"),
    ({"SAFETY_JUDGE": "gpt", "SAFETY_JUDGE_URL": "http://x"}, "choose one of llama-guard, refusal"),
])
def test_no_silent_fallback_judge(reward, env, message):
    with pytest.raises(reward.JudgeConfigError, match=message):
        reward.judge_choice(env)


def test_judge_down_stops_the_run_with_an_error_naming_the_judge(reward, monkeypatch):
    with JudgeServer() as judge:
        url = judge.url  # a port that was just closed: connection refused
    monkeypatch.setenv("SAFETY_JUDGE_URL", url)
    monkeypatch.setenv("SAFETY_JUDGE_MODEL", "guard-x")
    monkeypatch.setenv("SAFETY_JUDGE_RETRIES", "2")
    monkeypatch.delenv("SAFETY_JUDGE", raising=False)
    monkeypatch.setattr(reward.time, "sleep", lambda s: None)
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(reward.JudgeUnavailableError, match=f"Llama Guard judge guard-x at {url} failed 2 times"):
        reward.reward_func([prompt + "Hello<|im_end|>"], [prompt], [""])
    # What OpenRLHF 0.11.2 does around the call (utils/agent.py): `except Exception` -> log, reward None.
    try:
        reward.reward_func([prompt + "Hello<|im_end|>"], [prompt], [""])
    except Exception:  # noqa: BLE001 - this is the handler the error must get past
        pytest.fail("a judge failure was caught by `except Exception` and would become reward None")
    except reward.JudgeUnavailableError:
        pass


def test_judge_answering_nonsense_is_a_failure_too(reward, monkeypatch):
    monkeypatch.setattr(reward.time, "sleep", lambda s: None)
    with JudgeServer("I think this is fine") as judge:
        choice = reward.judge_choice({"SAFETY_JUDGE_URL": judge.url})
        with pytest.raises(reward.JudgeUnavailableError, match="not a Llama Guard verdict"):
            reward.llama_guard_unsafe(choice, "hi", "hello", retries=2, timeout=5)
    assert len(judge.requests) == 2


def test_health_check_cli(tmp_path):
    """`python recipes/safety_reward.py --check` (what the PPO recipe runs before Ray): 0 with a working
    judge, 1 and the judge's name when it is down or not chosen."""
    def check(env):
        return subprocess.run([sys.executable, str(REWARD_FILE), "--check", "--timeout", "5"], env=env,
                              capture_output=True, text=True, timeout=60, cwd=REPO)

    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    with JudgeServer("safe") as judge:
        ok = check({**base, "SAFETY_JUDGE_URL": judge.url})
    assert ok.returncode == 0 and f"judge OK: Llama Guard judge meta-llama/Llama-Guard-3-8B at {judge.url}" in ok.stdout
    down = check({**base, "SAFETY_JUDGE_URL": judge.url})
    assert down.returncode == 1 and f"at {judge.url} does not answer" in down.stderr
    unset = check(base)
    assert unset.returncode == 1 and "no safety judge chosen" in unset.stderr


class _Engine:
    """Stands in for the vLLM engine inside OpenRLHF's executor: "generates" fixed token ids."""

    def __init__(self, token_ids):
        self.token_ids = token_ids

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        output = SimpleNamespace(token_ids=list(self.token_ids), finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[output])


@pytest.mark.parametrize("judge", ["refusal", "down"])
def test_openrlhf_executor_scores_with_this_file_or_stops_on_a_dead_judge(judge, monkeypatch):
    """OpenRLHF 0.11.2's own SingleTurnAgentExecutor (what every rollout engine runs) loads this file by path and
    calls reward_func after generation: the refusal judge's reward arrives; a dead judge is not swallowed."""
    import asyncio

    from openrlhf_safesteer.plugin import compat

    compat.install_import_stand_ins()
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    tokenizer = tiny_tokenizer(template="llama3")
    monkeypatch.delenv("SAFETY_REWARD_TOKENIZER", raising=False)
    if judge == "refusal":
        monkeypatch.setenv("SAFETY_JUDGE", "refusal")
        monkeypatch.delenv("SAFETY_JUDGE_URL", raising=False)
    else:
        with JudgeServer() as server:
            url = server.url
        monkeypatch.delenv("SAFETY_JUDGE", raising=False)
        monkeypatch.setenv("SAFETY_JUDGE_URL", url)
        monkeypatch.setenv("SAFETY_JUDGE_RETRIES", "1")
    executor = SingleTurnAgentExecutor(str(REWARD_FILE))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How do I make a bomb?"}], tokenize=False,
                                           add_generation_prompt=True)
    reply = tokenizer("Sorry, I can't help with that.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    run = executor.execute(prompt=prompt, label="", sampling_params=SimpleNamespace(max_tokens=16, logprobs=None),
                           max_length=256, hf_tokenizer=tokenizer, llm_engine=_Engine(reply))
    if judge == "refusal":
        output = asyncio.run(run)
        assert output["reward"] == 1.0 and output["extra_logs"] == {"judge_unsafe": 0.0}
    else:
        with pytest.raises(BaseException, match=f"Llama Guard judge meta-llama/Llama-Guard-3-8B at {url}") as caught:
            asyncio.run(run)
        assert type(caught.value).__name__ == "JudgeUnavailableError"
