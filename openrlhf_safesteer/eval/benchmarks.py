"""Safety benchmarks: a registry by name, loaders from the Hugging Face hub or local files.

    items = load_benchmark("advbench", limit=100)                  # hub (walledai/AdvBench)
    items = load_benchmark("advbench", path="harmful_behaviors.csv")  # upstream goal,target CSV
    items = load_benchmark("data.jsonl")                            # any file with a prompt column
    items = load_benchmark("safesteer_harmful")                     # slice shipped with the package
    items = load_benchmark("safesteer_borderline")                  # a split of the package's data sets

Every loader returns a list of `EvalItem` (one user prompt plus what the judges need). Local files
may be CSV, JSON (a list, or {"items": [...]}) or JSONL in the benchmark's upstream column layout;
the prompt column is found by name (`goal`, `Behavior`, `forbidden_prompt`, `turns`, ...).

No network here is a normal condition: when the hub cannot be reached the loader fails at once
with an error that names the benchmark and says how to pass a local file, instead of retrying.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).with_name("data")


class BenchmarkUnavailableError(RuntimeError):
    """A benchmark could not be loaded (hub unreachable, file missing, no prompt column)."""


@dataclass
class EvalItem:
    """One prompt of a benchmark.

    label: "harmful" for prompts a safe model refuses; XSTest uses "safe"/"unsafe".
    behavior/context: what HarmBench's classifier is shown (behavior defaults to the prompt).
    """

    id: str
    prompt: str
    category: str = ""
    label: str = "harmful"
    behavior: str = ""
    context: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "category": self.category, "label": self.label,
                "behavior": self.behavior, "context": self.context, "meta": self.meta}


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives and how to read it.

    kind: "harmful" (attack success rate + refusal rate), "overrefusal" (XSTest: refusal rate on
    safe prompts) or "instructions" (AlpacaEval: outputs only, no judge).
    """

    name: str
    title: str
    kind: str
    hub_id: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    prompt_fields: tuple[str, ...] = ("prompt",)
    category_fields: tuple[str, ...] = ("category",)
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (column, allowed values): keep matching rows
    dedupe: bool = False
    builtin: str | None = None  # file under eval/data, or "SET:SPLIT" of openrlhf_safesteer.data (PACKAGE_SETS)
    note: str = ""
    more_hub_configs: tuple[str, ...] = ()  # further configs of hub_id, loaded after hub_config and joined
    hub_file: str | None = None  # a file in the hub dataset repo read directly (no loading script)
    response_labels: bool = False  # PKU-SafeRLHF: harm categories and safety are labels of the responses
    keep: str = "all"  # "all" prompts, or "unsafe_response": only those with a response labelled unsafe
    refusal_judge: str = "refusal"  # the string judge that measures refusal on this benchmark
    metric_note: str = ""  # said beside the number in results.json and the table


# Common prompt columns across upstream layouts, in the order they are tried for local files.
PROMPT_COLUMNS = ("prompt", "goal", "Goal", "Behavior", "behavior", "forbidden_prompt", "question",
                  "instruction", "turns", "text", "query", "input")
CATEGORY_COLUMNS = ("category", "Category", "SemanticCategory", "semantic_category", "type", "topic", "focus")

BENCHMARKS: dict[str, BenchmarkSpec] = {s.name: s for s in (
    # The paper's seven safety benchmarks.
    BenchmarkSpec("advbench", "AdvBench", "harmful", "walledai/AdvBench", None, "train",
                  ("prompt", "goal"), note="upstream: llm-attacks harmful_behaviors.csv (goal,target)"),
    BenchmarkSpec("pku_saferlhf", "PKU-SafeRLHF (test)", "harmful", "PKU-Alignment/PKU-SafeRLHF", "default",
                  "test", ("prompt",), (), dedupe=True, response_labels=True,
                  note="every test-split prompt, deduplicated (each appears with several response pairs); "
                       "categories: the union of the harm labels of its responses"),
    BenchmarkSpec("pku_saferlhf_unsafe", "PKU-SafeRLHF (test, prompts with an unsafe response)", "harmful",
                  "PKU-Alignment/PKU-SafeRLHF", "default", "test", ("prompt",), (), dedupe=True,
                  response_labels=True, keep="unsafe_response",
                  note="test-split prompts with at least one response labelled unsafe (is_response_*_safe "
                       "false in any of its rows), deduplicated"),
    BenchmarkSpec("harmbench", "HarmBench", "harmful", "walledai/HarmBench", "standard", "train",
                  ("prompt", "Behavior"), ("category", "SemanticCategory"),
                  filters=(("FunctionalCategory", ("standard", "contextual")),), more_hub_configs=("contextual",),
                  note="hub: walledai/HarmBench standard (200) + contextual (100) = HarmBench's val+test "
                       "text behaviours without copyright; its own test split is harmbench_behaviors_text_test.csv "
                       "(pass it as a file: 159 standard + 81 contextual kept). Copyright behaviours need "
                       "HarmBench's hash judge and are left out"),
    BenchmarkSpec("harmbench_standard", "HarmBench (standard only)", "harmful", "walledai/HarmBench", "standard",
                  "train", ("prompt", "Behavior"), ("category", "SemanticCategory"),
                  filters=(("FunctionalCategory", ("standard",)),),
                  note="the 200 standard behaviours only (walledai/HarmBench config standard)"),
    BenchmarkSpec("jailbreakbench", "JailbreakBench", "harmful", "JailbreakBench/JBB-Behaviors", "behaviors",
                  "harmful", ("Goal", "goal", "prompt"), ("Category", "category")),
    BenchmarkSpec("sorry_bench", "SORRY-Bench", "harmful", "sorry-bench/sorry-bench-202406", None, "train",
                  ("turns", "prompt"), ("category",), filters=(("prompt_style", ("base",)),),
                  note="gated on the hub: accept its terms and log in, or pass the local question.jsonl"),
    BenchmarkSpec("harmfulqa", "HarmfulQA", "harmful", "declare-lab/HarmfulQA", None, "train",
                  ("question", "prompt"), ("topic", "subtopic")),
    BenchmarkSpec("alert", "ALERT", "harmful", "Babelscape/ALERT", "alert", "test", ("prompt",), ("category",),
                  note="ALERT wraps prompts in '### Instruction: ... ### Response:'; the wrapper is removed"),
    # Over-refusal and StrongREJECT.
    BenchmarkSpec("xstest", "XSTest", "overrefusal", "walledai/XSTest", None, "test", ("prompt",),
                  ("type", "focus"), refusal_judge="xstest_strmatch",
                  note="upstream: xstest_prompts.csv (id,prompt,type,label,focus,note); refusal by XSTest's "
                       "string-match classifier unless --judge-for xstest=JUDGE"),
    BenchmarkSpec("strongreject", "StrongREJECT", "harmful", "walledai/StrongREJECT", None, "train",
                  ("prompt", "forbidden_prompt"), ("category",),
                  note="upstream: strongreject_dataset.csv (category,source,forbidden_prompt)",
                  metric_note="an ASR by the run's judge, not StrongREJECT's rubric / fine-tuned score"),
    # Instruction following (outputs for AlpacaEval's own judge). The hub repo's loading script no
    # longer runs under `datasets` >= 4, so its JSON file is read directly.
    BenchmarkSpec("alpaca_eval", "AlpacaEval", "instructions", "tatsu-lab/alpaca_eval", None, "eval",
                  ("instruction",), ("dataset",), hub_file="alpaca_eval.json"),
    # Slices written by this project (tests, demo, smoke runs).
    BenchmarkSpec("safesteer_harmful", "SafeSteer harmful slice", "harmful", builtin="harmful_slice.json"),
    BenchmarkSpec("safesteer_xstest", "SafeSteer over-refusal slice", "overrefusal", builtin="xstest_slice.json",
                  category_fields=("type",)),
    BenchmarkSpec("safesteer_alpaca", "SafeSteer instruction slice", "instructions", builtin="alpaca_slice.json",
                  prompt_fields=("instruction",), category_fields=("dataset",)),
    BenchmarkSpec("safesteer_borderline", "SafeSteer borderline (test)", "overrefusal", builtin="borderline:test",
                  note="the project's own XSTest-kind prompts (data/borderline.json, split test): harmless "
                       "requests that sound harmful; categories homonyms, figurative, safe_targets, safe_contexts"),
    BenchmarkSpec("safesteer_borderline_contrast", "SafeSteer borderline contrasts (test)", "harmful",
                  builtin="borderline:contrast_test",
                  note="data/borderline.json, split contrast_test: harmful requests with the borderline set's "
                       "kind of words; the category names the borderline kind each mirrors"),
)}

# Builtins read from the package's own prompt sets (one home for the prompts: openrlhf_safesteer/data).
PACKAGE_SETS = ("harmful", "harmless", "borderline")

PAPER_SAFETY_BENCHMARKS = ("advbench", "pku_saferlhf", "harmbench", "jailbreakbench", "sorry_bench",
                           "harmfulqa", "alert")


def resolve_spec(name: str) -> BenchmarkSpec:
    key = name.lower().replace("-", "_")
    if key not in BENCHMARKS:
        raise BenchmarkUnavailableError(
            f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}, or pass a local "
            "CSV/JSON/JSONL file (NAME=PATH or a bare path)")
    return BENCHMARKS[key]


def parse_benchmark_arg(arg: str) -> tuple[str, str | None]:
    """'advbench' -> ('advbench', None); 'advbench=f.csv' -> ('advbench', 'f.csv'); 'f.jsonl' -> ('f', 'f.jsonl')."""
    if "=" in arg:
        name, path = arg.split("=", 1)
        return name.strip(), path.strip()
    if os.path.sep in arg or Path(arg).suffix.lower() in (".csv", ".json", ".jsonl"):
        return Path(arg).stem, arg
    return arg, None


# ---------------------------------------------------------------------------------------------
# Reading rows


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a CSV (header row), JSON (list or {"items"/"data"/"rows": list}) or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [dict(row) for row in csv.DictReader(f)]
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
        return rows
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            for key in ("items", "data", "rows", "examples"):
                if isinstance(data.get(key), list):
                    return data[key]
            raise ValueError(f"{path}: JSON object without an 'items' list")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows")
        return data
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv, .json or .jsonl")


def _first(row: dict[str, Any], fields: tuple[str, ...]) -> tuple[str | None, Any]:
    for name in fields:
        if name in row and row[name] not in (None, ""):
            return name, row[name]
    return None, None


def _as_text(value: Any) -> str:
    if isinstance(value, list):  # SORRY-Bench `turns`: the first user turn
        value = value[0] if value else ""
    return str(value).strip()


def _strip_alert_wrapper(text: str) -> str:
    text = text.strip()
    text = text.removeprefix("### Instruction:")
    if "### Response:" in text:
        text = text[:text.rindex("### Response:")]
    return text.strip()


def read_builtin(builtin: str) -> list[dict[str, Any]]:
    """Rows of a builtin: a file under eval/data, or "SET:SPLIT", one split of a prompt set of
    openrlhf_safesteer.data (ids SET-SPLIT-NNN; label "unsafe" for contrast splits, else "safe", which only
    the overrefusal kind reads)."""
    if ":" not in builtin:
        return read_rows(DATA_DIR / builtin)
    from openrlhf_safesteer import data

    name, split = builtin.split(":", 1)
    if name not in PACKAGE_SETS:
        raise ValueError(f"builtin {builtin!r}: unknown prompt set {name!r}; choose one of {PACKAGE_SETS}")
    rows = getattr(data, name)(split, True)
    label = "unsafe" if split.startswith("contrast") else "safe"
    return [{"id": f"{name}-{split}-{i:03d}", "label": label, **row} for i, row in enumerate(rows, 1)]


def _xstest_label(row: dict[str, Any]) -> str:
    label = str(row.get("label", "")).strip().lower()
    if label in ("safe", "unsafe"):
        return label
    # XSTest v1 files have no label column: contrast prompts are the unsafe ones.
    return "unsafe" if str(row.get("type", "")).startswith("contrast") else "safe"


# PKU-SafeRLHF labels each of a row's two responses, not its prompt.
PKU_SAFE_COLUMNS = ("is_response_0_safe", "is_response_1_safe")
PKU_CATEGORY_COLUMNS = ("response_0_harm_category", "response_1_harm_category")


def _true_keys(value: Any) -> list[str]:
    """The harm categories set in one PKU label dict ({"Violence": true, ...}; JSON text in a CSV)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return []
    if not isinstance(value, dict):
        return []
    return [key for key, flag in value.items() if flag is True or str(flag).strip().lower() == "true"]


def _is_false(value: Any) -> bool:
    return value is False or str(value).strip().lower() in ("false", "0")


def response_label_summary(rows: list[dict[str, Any]], prompts: list[str | None]
                           ) -> dict[str, tuple[list[str], bool]]:
    """Per prompt over all its rows: (sorted union of its responses' harm categories, whether any
    response is labelled unsafe). `prompts[i]` is row i's prompt text (None for rows without one)."""
    summary: dict[str, tuple[set[str], bool]] = {}
    for row, prompt in zip(rows, prompts):
        if prompt is None:
            continue
        categories, unsafe = summary.get(prompt, (set(), False))
        for column in PKU_CATEGORY_COLUMNS:
            categories.update(_true_keys(row.get(column)))
        unsafe = unsafe or any(_is_false(row[column]) for column in PKU_SAFE_COLUMNS if column in row)
        summary[prompt] = (categories, unsafe)
    return {prompt: (sorted(cats), unsafe) for prompt, (cats, unsafe) in summary.items()}


def _row_prompt(row: dict[str, Any], spec: BenchmarkSpec, prompt_fields: tuple[str, ...]) -> str | None:
    _, value = _first(row, prompt_fields)
    if value is None:
        return None
    prompt = _as_text(value)
    return _strip_alert_wrapper(prompt) if spec.name == "alert" else prompt


def rows_to_items(rows: list[dict[str, Any]], spec: BenchmarkSpec, source: str) -> list[EvalItem]:
    """Turn raw rows (any upstream layout) into EvalItems, applying the spec's filters and dedupe."""
    prompt_fields = tuple(dict.fromkeys(spec.prompt_fields + PROMPT_COLUMNS))
    category_fields = tuple(dict.fromkeys(spec.category_fields + CATEGORY_COLUMNS))
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BenchmarkUnavailableError(f"benchmark {spec.name!r}: row {index} of {source} is not an object")
    labels: dict[str, tuple[list[str], bool]] = {}
    if spec.response_labels:
        if spec.keep == "unsafe_response" and not any(c in row for row in rows for c in PKU_SAFE_COLUMNS):
            raise BenchmarkUnavailableError(
                f"benchmark {spec.name!r}: keeping prompts with an unsafe response needs the columns "
                f"{', '.join(PKU_SAFE_COLUMNS)}, which {source} does not have")
        labels = response_label_summary(rows, [_row_prompt(row, spec, prompt_fields) for row in rows])
    items: list[EvalItem] = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        if any(col in row and str(row[col]) not in allowed for col, allowed in spec.filters):
            continue
        prompt = _row_prompt(row, spec, prompt_fields)
        if prompt is None:
            raise BenchmarkUnavailableError(
                f"benchmark {spec.name!r}: row {index} of {source} has no prompt column; looked for "
                f"{', '.join(prompt_fields)}; found {', '.join(map(str, row))}")
        if spec.keep == "unsafe_response" and not labels[prompt][1]:
            continue
        if spec.dedupe:
            if prompt in seen:
                continue
            seen.add(prompt)
        behavior, context = prompt, ""
        if row.get("ContextString"):  # HarmBench contextual behaviours: context, then the request
            context = str(row["ContextString"]).strip()
            behavior = str(row.get("Behavior", prompt)).strip()
            prompt = f"{context}\n\n---\n\n{behavior}"
        elif row.get("context"):  # walledai/HarmBench "contextual" config
            context = str(row["context"]).strip()
            prompt = f"{context}\n\n---\n\n{behavior}"
        _, category = _first(row, category_fields)
        meta = {k: v for k, v in row.items() if k in ("target", "Target", "source", "Source", "note", "dataset",
                                                        "FunctionalCategory", "prompt_style", "hub_config")}
        if spec.response_labels:  # several categories per prompt: each counts in the per-category table
            meta["categories"] = labels[prompt][0]
            category = ", ".join(labels[prompt][0])
        item_id = row.get("id") or row.get("BehaviorID") or row.get("question_id") or row.get("Index") or index
        label = _xstest_label(row) if spec.kind == "overrefusal" else "harmful"
        items.append(EvalItem(id=str(item_id), prompt=prompt, category=_as_text(category or ""), label=label,
                              behavior=behavior, context=context, meta=meta))
    return items


# ---------------------------------------------------------------------------------------------
# The hub


@functools.lru_cache(maxsize=4)
def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    host = urlparse(endpoint).hostname or "huggingface.co"
    port = urlparse(endpoint).port or 443
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_offline_mode() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers (one quick TCP connect, cached)."""
    return _hub_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def _load_from_hub(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    if not hub_offline_mode() and not hub_reachable():
        raise BenchmarkUnavailableError(
            f"benchmark {spec.name!r}: the Hugging Face hub is unreachable, so {spec.hub_id} cannot be "
            f"downloaded. Pass a local copy instead ({spec.name}=PATH.csv|.json|.jsonl), or set "
            "HF_DATASETS_OFFLINE=1 to read it from the datasets cache.")
    try:
        import datasets
    except ImportError as err:
        raise BenchmarkUnavailableError(
            f"benchmark {spec.name!r}: loading from the hub needs `datasets` (pip install datasets) or a "
            f"local file ({spec.name}=PATH)") from err
    rows: list[dict[str, Any]] = []
    for config in (spec.hub_config, *spec.more_hub_configs):
        try:
            dataset = datasets.load_dataset(spec.hub_id, config, split=spec.hub_split)
        except Exception as err:
            raise BenchmarkUnavailableError(
                f"benchmark {spec.name!r}: could not load {spec.hub_id} (config {config}, split "
                f"{spec.hub_split}) from the Hugging Face hub: {err}. Pass a local file instead "
                f"({spec.name}=PATH).") from err
        # The config is kept: walledai/HarmBench's configs have no FunctionalCategory column.
        rows += [{**dict(row), "hub_config": config} if spec.more_hub_configs else dict(row) for row in dataset]
    return rows


def _load_hub_file(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """Rows of one JSON/JSONL/CSV file of a hub dataset repo, fetched with huggingface_hub (its cache
    and HF_HUB_OFFLINE apply), for repos whose loading script `datasets` no longer runs."""
    from huggingface_hub import hf_hub_download

    if not hub_offline_mode() and not hub_reachable():
        raise BenchmarkUnavailableError(
            f"benchmark {spec.name!r}: the Hugging Face hub is unreachable, so {spec.hub_id}/{spec.hub_file} "
            f"cannot be downloaded. Pass a local copy instead ({spec.name}=PATH.json), or set HF_HUB_OFFLINE=1 "
            "to read it from the hub cache.")
    try:
        path = hf_hub_download(spec.hub_id, spec.hub_file, repo_type="dataset")
        return read_rows(path)
    except Exception as err:
        raise BenchmarkUnavailableError(
            f"benchmark {spec.name!r}: could not read {spec.hub_file} of {spec.hub_id} from the Hugging Face "
            f"hub: {err}. Pass a local file instead ({spec.name}=PATH).") from err


def load_benchmark(name: str, path: str | os.PathLike | None = None, limit: int | None = None) -> list[EvalItem]:
    """Load a benchmark by registry name (hub or built-in slice), or from a local file.

    name: a registry name ("advbench", ...) or any label when `path` is given; a name that is not
    in the registry with a path is read as a generic harmful-prompt file.
    limit: keep the first `limit` prompts (after filters and dedupe); None keeps all.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    key = name.lower().replace("-", "_")
    spec = BENCHMARKS.get(key) or (BenchmarkSpec(key, name, "harmful") if path else resolve_spec(name))
    if path is not None:
        try:
            rows = read_rows(path)
        except (OSError, ValueError) as err:
            raise BenchmarkUnavailableError(f"benchmark {spec.name!r}: cannot read {path}: {err}") from err
        source = str(path)
    elif spec.builtin:
        rows, source = read_builtin(spec.builtin), spec.builtin
    elif spec.hub_file:
        rows, source = _load_hub_file(spec), f"{spec.hub_id}/{spec.hub_file}"
    else:
        rows, source = _load_from_hub(spec), spec.hub_id
    items = rows_to_items(rows, spec, source)
    if not items:
        raise BenchmarkUnavailableError(f"benchmark {spec.name!r}: {source} holds no prompts")
    if limit is not None:
        items = items[:limit]
    logger.info("benchmark %s: %d prompts from %s", spec.name, len(items), source)
    return items


def benchmark_kind(name: str) -> str:
    key = name.lower().replace("-", "_")
    return BENCHMARKS[key].kind if key in BENCHMARKS else "harmful"


def benchmark_spec(name: str) -> BenchmarkSpec | None:
    """The registry entry of a benchmark name, or None for a file given under a name of its own."""
    return BENCHMARKS.get(name.lower().replace("-", "_"))
