"""Reward function for the PPO baseline (recipes/baseline_ppo_llama.sh), passed as --reward.remote_url.

OpenRLHF 0.11.2 loads `reward_func(queries, prompts, labels)` from this file inside each rollout
engine and calls it once per response (utils/agent.py, SingleTurnAgentExecutor). The reward is 1.0
when the safety judge calls the reply safe, 0.0 when it calls it unsafe.

What OpenRLHF hands over is not raw text: `prompts` are the dataset prompts AFTER the chat template
(`<|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|><|start_header_id|>assistant...`) and
`queries` are prompt + reply decoded with `skip_special_tokens=False` (the reply ends in
`<|eot_id|>`). The judge must see the user's own words and the reply without special tokens, so:
- the user text is cut out of the templated prompt between the template's user header and its
  post-instruction suffix (the assistant header). The markers come from the actor's tokenizer when
  SAFETY_REWARD_TOKENIZER names it (a model folder or hub name; the PPO recipe sets it to $MODEL):
  its own template is rendered around a sentinel. Without it, the known markers of Llama-3, ChatML
  (Qwen), Gemma and Llama-2/Mistral templates are tried; a prompt with template markers none of them
  explains is an error, never silently judged as is;
- the reply is what follows the prompt in the query, cut at its first end-of-turn token, with every
  remaining special token removed (the tokenizer's own special tokens, or `<|...|>`-style ones).

Judge, chosen EXPLICITLY by environment variables (set them in the job's runtime_env):
- SAFETY_JUDGE=llama-guard (the default when SAFETY_JUDGE_URL is set): an OpenAI-compatible chat
  endpoint serving Llama Guard, e.g. `vllm serve meta-llama/Llama-Guard-3-8B --port 8000` ->
  SAFETY_JUDGE_URL=http://judge:8000/v1; SAFETY_JUDGE_MODEL names the served model (default
  meta-llama/Llama-Guard-3-8B). Llama Guard answers "safe" or "unsafe\\nS<k>".
- SAFETY_JUDGE=refusal: the project's refusal-string judge (openrlhf_safesteer.refusal.is_refusal): a
  refusal counts as safe. Offline (no server), cheap, and much weaker than Llama Guard; for CPU runs
  and comparisons that must not depend on a judge model.
- neither set: every call raises JudgeConfigError; there is no silent fallback.

Judge failures stop the run. OpenRLHF catches every `Exception` a reward function raises, logs it at
INFO and stores reward None, and the run then dies later with an unrelated error. JudgeConfigError
and JudgeUnavailableError therefore derive from BaseException: they pass OpenRLHF's `except
Exception`, end the engine's `generate_responses` call, and reach the trainer as
`RayTaskError(JudgeUnavailableError)` with the judge's URL and model in the message. A judge call is
retried SAFETY_JUDGE_RETRIES times (default 3) with back-off before that.

SAFETY_REWARD_LOG=FILE appends one JSON line per judged reply, {"user": ..., "reward": ...}, in call order (the
comparison reads it back to count, per rollout step, the prompt groups whose rewards differ: with
REINFORCE++-baseline or GRPO only those carry a non-zero advantage).

Check a judge before starting Ray (the PPO recipe does):
    SAFETY_JUDGE_URL=http://judge:8000/v1 python recipes/safety_reward.py --check
"""

# No `from __future__ import annotations`: OpenRLHF execs this file without registering it in sys.modules,
# and dataclasses cannot resolve string annotations of such a module.
import argparse
import functools
import json
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Sequence

logger = logging.getLogger("safety_reward")

JUDGES = ("llama-guard", "refusal")
DEFAULT_JUDGE_MODEL = "meta-llama/Llama-Guard-3-8B"
# Unusual enough that no chat template contains it, plain enough that none rewrites it.
_SENTINEL = "Xq7 safety-reward sentinel zZ"


class JudgeConfigError(BaseException):
    """No judge chosen, or an inconsistent choice. BaseException: OpenRLHF must not swallow it."""


class JudgeUnavailableError(BaseException):
    """The judge server did not answer (or answered nonsense) after every retry. BaseException: see above."""


class TemplateError(BaseException):
    """A prompt or query this file cannot take apart; judging the raw template text would be wrong."""


# --------------------------------------------------------------------------------- chat templates


@dataclass(frozen=True)
class TemplateMarkers:
    """Strings around the user's text in a rendered single-turn prompt, and the reply's special tokens.

    user_header: text right before the user's words (e.g. `<|start_header_id|>user<|end_header_id|>\\n\\n`);
    suffix: what follows them up to the end of the prompt (the post-instruction template, ending with
    the assistant header); end_of_turn: strings that end a reply; special: every special-token string.
    """

    name: str
    user_header: str
    suffix: str
    end_of_turn: tuple[str, ...]
    special: tuple[str, ...] = ()


KNOWN_MARKERS: tuple[TemplateMarkers, ...] = (
    TemplateMarkers("llama-3", "<|start_header_id|>user<|end_header_id|>\n\n",
                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                    ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")),
    TemplateMarkers("chatml", "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n",
                    ("<|im_end|>", "<|endoftext|>")),
    TemplateMarkers("gemma", "<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n",
                    ("<end_of_turn>", "<eos>")),
    TemplateMarkers("llama-2", "[INST] ", " [/INST]", ("</s>",)),
)
# Special tokens of the known templates that are not `<|...|>`-shaped.
_OTHER_SPECIAL = ("<s>", "</s>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>")
_PIPE_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>")
_LOOKS_TEMPLATED = re.compile(r"<\|[^<>|\s]{1,64}\|>|<start_of_turn>|\[INST\]")


def markers_from_tokenizer(tokenizer: Any) -> TemplateMarkers:
    """The tokenizer's own template markers: its chat template rendered around a sentinel user message.

    The user header is the part of the rendered head after its last end-of-turn string, so a system
    block before it (Llama-3.1's dated one, Qwen's default) does not have to match character for character.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                         add_generation_prompt=True)
    at = text.rfind(_SENTINEL)
    if at < 0:
        raise TemplateError("the chat template does not reproduce the user message verbatim")
    head, suffix = text[:at], text[at + len(_SENTINEL):]
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    special.update(tok.content for tok in getattr(tokenizer, "added_tokens_decoder", {}).values()
                   if getattr(tok, "special", False))
    end_names = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>", "<end_of_turn>",
                 "</s>", "<eos>")
    end_of_turn = {name for name in end_names if name in special}
    if getattr(tokenizer, "eos_token", None):
        end_of_turn.add(tokenizer.eos_token)
    cut = max((head.rfind(end) + len(end) for end in end_of_turn if end in head), default=0)
    bos = getattr(tokenizer, "bos_token", None)
    header = head[cut:]
    if bos and header.startswith(bos):
        header = header[len(bos):]
    # The longest first: a special token that contains another (e.g. "</s>" inside none) is removed whole.
    ordered = tuple(sorted(special, key=len, reverse=True))
    return TemplateMarkers("tokenizer", header, suffix, tuple(sorted(end_of_turn, key=len, reverse=True)), ordered)


def user_text(prompt: str, markers: Sequence[TemplateMarkers]) -> tuple[str, TemplateMarkers | None]:
    """The user's own words in a chat-templated prompt, and the markers that explained it.

    The user text lies between the LAST user header and the suffix the prompt ends with. A prompt
    with no template markers at all is returned as it is (markers None); one with markers that no
    entry explains raises TemplateError.
    """
    for marker in markers:
        if marker.user_header and marker.suffix and prompt.endswith(marker.suffix):
            start = prompt.rfind(marker.user_header, 0, len(prompt) - len(marker.suffix))
            if start >= 0:
                return prompt[start + len(marker.user_header): len(prompt) - len(marker.suffix)], marker
    if not _LOOKS_TEMPLATED.search(prompt):
        return prompt, None
    raise TemplateError(
        f"cannot find the user's text in the prompt {prompt[:200]!r}...: its chat template is none of "
        f"{[m.name for m in markers]}; set SAFETY_REWARD_TOKENIZER to the actor's model (folder or hub name)")


def reply_text(query: str, prompt: str, user: str, marker: TemplateMarkers | None) -> str:
    """The model's reply in `query` (prompt + reply, decoded with special tokens), without special tokens.

    The reply starts after the prompt (or, when OpenRLHF left-truncated a long prompt, after the user
    text + template suffix), ends at its first end-of-turn token, and loses every other special token.
    """
    at = query.find(prompt)
    if at >= 0:
        reply = query[at + len(prompt):]
    else:
        tail = user + (marker.suffix if marker else "")
        at = query.rfind(tail) if tail else -1
        if at < 0:
            raise TemplateError(f"the query does not contain its prompt: {query[:200]!r}...")
        reply = query[at + len(tail):]
    end_of_turn = marker.end_of_turn if marker else tuple({e for m in KNOWN_MARKERS for e in m.end_of_turn})
    cut = min((reply.find(end) for end in end_of_turn if end in reply), default=len(reply))
    reply = reply[:cut]
    if marker is not None and marker.special:
        for token in marker.special:
            reply = reply.replace(token, "")
    else:
        reply = _PIPE_TOKEN.sub("", reply)
        for token in _OTHER_SPECIAL:
            reply = reply.replace(token, "")
    return reply.strip()


@functools.lru_cache(maxsize=4)
def _tokenizer_markers(path: str) -> TemplateMarkers:
    from transformers import AutoTokenizer

    return markers_from_tokenizer(AutoTokenizer.from_pretrained(path, trust_remote_code=True))


def template_markers() -> tuple[TemplateMarkers, ...]:
    """The markers to try: the tokenizer's own (SAFETY_REWARD_TOKENIZER) first, then the known templates."""
    path = os.environ.get("SAFETY_REWARD_TOKENIZER")
    return ((_tokenizer_markers(path),) if path else ()) + KNOWN_MARKERS


def split_conversation(query: str, prompt: str) -> tuple[str, str]:
    """(user text, reply) of one OpenRLHF reward call, both free of template and special tokens."""
    user, marker = user_text(prompt, template_markers())
    return user.strip(), reply_text(query, prompt, user, marker)


# --------------------------------------------------------------------------------------------- judges


@dataclass(frozen=True)
class JudgeChoice:
    kind: str                 # "llama-guard" or "refusal"
    url: str | None = None
    model: str | None = None

    def describe(self) -> str:
        if self.kind == "refusal":
            return "refusal-string judge (openrlhf_safesteer.refusal, no server)"
        return f"Llama Guard judge {self.model} at {self.url}"


def judge_choice(env: dict[str, str] | None = None) -> JudgeChoice:
    """The judge the environment chooses (see the module docstring); JudgeConfigError when none or a bad one."""
    env = os.environ if env is None else env
    kind = (env.get("SAFETY_JUDGE") or "").strip().lower()
    url = (env.get("SAFETY_JUDGE_URL") or "").strip()
    if not kind:
        if not url:
            raise JudgeConfigError(
                "no safety judge chosen: set SAFETY_JUDGE_URL (Llama Guard behind an OpenAI-compatible server) or "
                "SAFETY_JUDGE=refusal (the offline refusal-string judge) in the job's environment")
        kind = "llama-guard"
    if kind not in JUDGES:
        raise JudgeConfigError(f"SAFETY_JUDGE={kind!r}: choose one of {', '.join(JUDGES)}")
    if kind == "refusal":
        return JudgeChoice("refusal")
    if not url:
        raise JudgeConfigError("SAFETY_JUDGE=llama-guard needs SAFETY_JUDGE_URL (e.g. http://judge:8000/v1)")
    return JudgeChoice("llama-guard", url.rstrip("/"), env.get("SAFETY_JUDGE_MODEL") or DEFAULT_JUDGE_MODEL)


def _post_chat(choice: JudgeChoice, user: str, answer: str | None, timeout: float) -> str:
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    body = json.dumps({"model": choice.model, "temperature": 0.0, "max_tokens": 10, "messages": messages}).encode()
    request = urllib.request.Request(choice.url + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.load(reply)["choices"][0]["message"]["content"]


def parse_verdict(content: str) -> bool:
    """True for Llama Guard's "unsafe...", False for "safe..."; ValueError for anything else."""
    verdict = content.strip().lower()
    if verdict.startswith("unsafe"):
        return True
    if verdict.startswith("safe"):
        return False
    raise ValueError(f"not a Llama Guard verdict: {content[:100]!r}")


def llama_guard_unsafe(choice: JudgeChoice, user: str, answer: str, retries: int | None = None,
                       timeout: float | None = None, sleep: Callable[[float], None] | None = None) -> bool:
    """Ask the Llama Guard server whether `answer` to `user` is unsafe; JudgeUnavailableError after `retries`."""
    retries = int(os.environ.get("SAFETY_JUDGE_RETRIES", "3")) if retries is None else retries
    timeout = float(os.environ.get("SAFETY_JUDGE_TIMEOUT", "120")) if timeout is None else timeout
    error: Exception | None = None
    for attempt in range(max(1, retries)):
        try:
            return parse_verdict(_post_chat(choice, user, answer, timeout))
        except (OSError, urllib.error.URLError, ValueError, KeyError, IndexError, TypeError) as caught:
            error = caught
            logger.warning("%s: attempt %d failed: %s", choice.describe(), attempt + 1, caught)
            if attempt + 1 < retries:
                (sleep or time.sleep)(2.0 ** attempt)  # looked up per call, so tests can stub time.sleep
    message = f"{choice.describe()} failed {max(1, retries)} times; last error: {error!r}"
    logger.error(message)
    raise JudgeUnavailableError(message)


def refusal_unsafe(user: str, answer: str) -> bool:
    from openrlhf_safesteer.refusal import is_refusal

    return not is_refusal(answer)


def judge_unsafe(choice: JudgeChoice, user: str, answer: str) -> bool:
    if choice.kind == "refusal":
        return refusal_unsafe(user, answer)
    return llama_guard_unsafe(choice, user, answer)


def reward_func(queries, prompts, labels, **kwargs) -> dict:
    """OpenRLHF's reward-function interface: 1.0 for a safe reply, 0.0 for an unsafe one.

    queries: prompt + reply as OpenRLHF decodes them (special tokens kept); prompts: the chat-templated
    prompts; labels: unused. Returns {"rewards", "scores", "extra_logs"}; a single value each when
    called with one query (as OpenRLHF 0.11.2 does), else lists.
    """
    choice = judge_choice()
    unsafe = []
    users = []
    for query, prompt in zip(queries, prompts):
        user, reply = split_conversation(query, prompt)
        users.append(user)
        unsafe.append(judge_unsafe(choice, user, reply))
    rewards = [0.0 if u else 1.0 for u in unsafe]
    log_rewards(users, rewards)
    single = len(rewards) == 1
    return {
        "rewards": rewards[0] if single else rewards,
        "scores": rewards[0] if single else rewards,
        "extra_logs": {"judge_unsafe": float(unsafe[0]) if single else float(sum(unsafe) / max(1, len(unsafe)))},
    }


def log_rewards(users: Sequence[str], rewards: Sequence[float], env: dict[str, str] | None = None) -> None:
    """Append {"user", "reward"} lines to SAFETY_REWARD_LOG when it is set (one write per call, flushed)."""
    path = (os.environ if env is None else env).get("SAFETY_REWARD_LOG")
    if not path:
        return
    lines = "".join(json.dumps({"user": u, "reward": r}) + "\n" for u, r in zip(users, rewards))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(lines)


def health_check(env: dict[str, str] | None = None, timeout: float = 30.0) -> str:
    """Check the chosen judge once (a Llama Guard server must answer a harmless exchange with "safe").

    Returns a one-line description; raises JudgeConfigError / JudgeUnavailableError.
    """
    choice = judge_choice(env)
    if choice.kind == "llama-guard":
        try:
            unsafe = parse_verdict(_post_chat(choice, "What is the capital of France?",
                                              "The capital of France is Paris.", timeout))
        except (OSError, urllib.error.URLError, ValueError, KeyError, IndexError, TypeError) as error:
            raise JudgeUnavailableError(f"{choice.describe()} does not answer: {error!r}") from None
        if unsafe:
            raise JudgeUnavailableError(f"{choice.describe()} calls a harmless exchange unsafe: is it Llama Guard?")
    return choice.describe()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the PPO baseline's safety judge (see the module docstring).")
    parser.add_argument("--check", action="store_true", help="check the judge chosen by SAFETY_JUDGE / _URL")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    if not args.check:
        parser.print_help()
        return 0
    try:
        print(f"judge OK: {health_check(timeout=args.timeout)}")
    except (JudgeConfigError, JudgeUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
