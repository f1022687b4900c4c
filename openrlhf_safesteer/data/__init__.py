"""The project's own prompt sets (written for this project, shipped as JSON).

    harmful("train")       # 32 harmful requests the demo trains on
    harmful("train_extra") # 68 more, to docs/METHOD.md's ~100 (measured less selective on the demo model: README)
    harmful("test")        # 48 held-out harmful requests on topics absent from every other split
    harmless("test")       # 100 harmless requests (over-refusal)
    borderline("test")     # 64 harmless requests that sound harmful (XSTest's kind, our own): over-refusal
    borderline("contrast_test")  # 32 harmful requests with the same kind of words: a model refuses these
    general_questions()    # 100 short arithmetic / factual questions for general_score

Splits: harmful direction / validation / train / train_extra / test; harmless direction / validation / test;
borderline train (40, training retain prompts) / dev (48) / test (64) / contrast_dev (24) / contrast_test (32),
each in four balanced categories (homonyms, figurative, safe_targets, safe_contexts).
The direction and validation splits fit and select the refusal direction; harmless validation
prompts also drive the safety-token vote.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
HARMFUL_SPLITS = ("direction", "validation", "train", "train_extra", "test")
HARMLESS_SPLITS = ("direction", "validation", "test")
BORDERLINE_SPLITS = ("train", "dev", "test", "contrast_dev", "contrast_test")


@cache
def _load(name: str) -> dict:
    with open(DATA_DIR / name, encoding="utf-8") as f:
        return json.load(f)


def _split(file: str, split: str, allowed: tuple[str, ...], full_rows: bool):
    """The split's prompts (strings), or with full_rows its rows as dicts (prompt plus topic/category)."""
    if split not in allowed:
        raise ValueError(f"unknown split {split!r} for {file}; choose one of {allowed}")
    rows = _load(file)[split]
    return [dict(r) for r in rows] if full_rows else [r["prompt"] for r in rows]


def harmful(split: str, with_topics: bool = False) -> list:
    """Harmful prompts of one split (strings, or dicts with 'prompt' and 'topic')."""
    return _split("harmful.json", split, HARMFUL_SPLITS, with_topics)


def harmless(split: str, with_topics: bool = False) -> list:
    """Harmless prompts of one split (strings, or dicts with 'prompt' and 'topic')."""
    return _split("harmless.json", split, HARMLESS_SPLITS, with_topics)


def borderline(split: str, with_categories: bool = False) -> list:
    """Borderline prompts of one split (strings, or dicts with 'prompt' and 'category').

    train / dev / test: harmless requests that sound harmful (a model should answer them);
    contrast_dev / contrast_test: harmful requests with the same kind of words (a model should refuse them).
    Categories: homonyms, figurative, safe_targets, safe_contexts (a contrast row names the kind it mirrors).
    """
    return _split("borderline.json", split, BORDERLINE_SPLITS, with_categories)


def general_questions() -> list[dict]:
    """[{'kind': 'arithmetic'|'fact', 'question': str, 'answers': [str, ...]}, ...]"""
    return [dict(q) for q in _load("general.json")["questions"]]


def answer_matches(reply: str, answers: list[str]) -> bool:
    """True when the reply's first non-empty line contains one of the answers as a whole word (case-insensitive)."""
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    head = lines[0].lower() if lines else ""
    head = head.replace(",", "")  # "1,024" == "1024"
    return any(re.search(rf"(?<![\w.]){re.escape(a.lower())}(?![\w])", head) for a in answers)


def general_score(replies: list[str], questions: list[dict] | None = None) -> float:
    """Percentage (0-100) of questions whose reply matches an answer."""
    questions = general_questions() if questions is None else questions
    if len(replies) != len(questions):
        raise ValueError(f"{len(replies)} replies for {len(questions)} questions")
    if not questions:
        raise ValueError("general_score of no questions is undefined")
    return 100.0 * sum(answer_matches(r, q["answers"]) for r, q in zip(replies, questions)) / len(questions)


def _row_prompt(row, where: str) -> str:
    """A prompt-file row: a string, or an object with a 'prompt' string."""
    prompt = row.get("prompt") if isinstance(row, dict) else row
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: expected a non-empty string or an object with a 'prompt' string, "
                         f"got {json.dumps(row)[:80]}")
    return prompt


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, object]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:   # its own "line 1" would be the line's, not the file's
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
    return rows


def _json_rows(path: Path, text: str) -> list[tuple[str, object]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(rows, list):   # a dict would be iterated by key: {"prompts": [...]} became one prompt
        raise ValueError(f"{path} must hold a JSON list of prompts (strings or {{\"prompt\": ...}} objects), "
                         f"got a JSON {type(rows).__name__}")
    return [(f"{path}[{i}]", row) for i, row in enumerate(rows)]


def read_prompt_rows(path: str | Path) -> list[tuple[str, object]]:
    """The rows of a JSON-list or JSONL prompt file, each with where it is ('file:line' or 'file[i]')."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    return _jsonl_rows(path, text) if path.suffix == ".jsonl" else _json_rows(path, text)


def load_prompt_file(path: str | Path) -> list[str]:
    """User prompt files: a JSON list of strings or of {'prompt': ...}, JSONL of the same, or a text file
    (one prompt a line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".json", ".jsonl"):
        prompts = [_row_prompt(row, where) for where, row in read_prompt_rows(path)]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts
