"""General capability through lm-evaluation-harness, on the same model object (or a path).

    scores = run_lm_eval(model, tokenizer, ["gsm8k", "mmlu_generative"], limit=100)
    scores["gsm8k"]  # {"metric": "exact_match,flexible-extract", "score": 0.71, "n": 100, "metrics": {...}}

The model is wrapped in lm-eval's own `HFLM` (in memory: no second copy, no reload), so the same
weights that were just judged for safety are scored here. Instruction-tuned checkpoints are
scored with their chat template (few-shot examples as turns), as lm-eval recommends for them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GENERAL_TASKS = ("mmlu_generative", "gsm8k", "minerva_math500", "humaneval_instruct")

# Headline metric of each task (lm-eval's "metric,filter" keys).
HEADLINE_METRICS = {
    "mmlu_generative": "exact_match,get_response",
    "gsm8k": "exact_match,flexible-extract",
    "minerva_math500": "math_verify,none",
    "humaneval_instruct": "pass@1,create_test",
}
_PREFERRED = ("acc,none", "exact_match,none", "acc_norm,none", "pass@1,none")


class GeneralTaskUnavailableError(RuntimeError):
    """An lm-eval task cannot run (its data is on the hub and the hub is unreachable, ...)."""


LM_EVAL_VERSION = "0.4.13"
# What lm-eval's minerva_math/utils.py checks at import (it raises without them): lm-eval[math].
MATH_REQUIREMENTS = (("sympy", "sympy", ""), ("math_verify", "math-verify", ""),
                     ("antlr4", "antlr4-python3-runtime", "4.11"))
CODE_EVAL_METRIC = "evaluate-metric--code_eval"


def _distribution_version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def missing_math_requirements() -> list[str]:
    """The packages minerva_math tasks need that are missing here, or present at the wrong version."""
    import importlib.util

    missing = []
    for module, distribution, prefix in MATH_REQUIREMENTS:
        found = _distribution_version(distribution) if importlib.util.find_spec(module) else None
        if found is None:
            missing.append(f"{distribution}{'==' + prefix if prefix else ''} (not installed)")
        elif prefix and not found.startswith(prefix):
            missing.append(f"{distribution}=={prefix} (found {found})")
    return missing


def code_eval_cached() -> bool:
    """Whether `evaluate`'s code_eval metric (loaded from the hub when humaneval's utils are imported)
    is in the local modules cache, where evaluate falls back to when the hub cannot be reached."""
    try:
        from evaluate import config
    except ImportError:
        return False
    folder = Path(config.HF_MODULES_CACHE) / config.MODULE_NAME_FOR_DYNAMIC_MODULES / "metrics" / CODE_EVAL_METRIC
    return folder.is_dir() and any(len(child.name) == 64 for child in folder.iterdir())


def task_problems(tasks: Sequence[str], allow_code_eval: bool = False) -> dict[str, list[str]]:
    """What keeps each lm-eval task from running in this environment, by task; {} when all can run.

    Checked before any generation, without building lm-eval's task index (about a minute): the
    lm-eval install, hub access for the registered tasks' data, the packages minerva_math imports,
    and humaneval's permission to execute code and its code_eval metric.
    """
    problems: dict[str, list[str]] = {}

    def add(task: str, problem: str) -> None:
        problems.setdefault(task, []).append(problem)

    from openrlhf_safesteer.eval.benchmarks import hub_offline_mode, hub_reachable

    installed = _distribution_version("lm-eval") or _distribution_version("lm_eval")
    online = not hub_offline_mode() and hub_reachable()
    for task in tasks:
        if installed is None:
            add(task, f"lm-eval is not installed (pip install 'lm-eval[math]=={LM_EVAL_VERSION}', or the "
                      "project's `eval` extra)")
        if task in GENERAL_TASKS and not hub_offline_mode() and not online:
            add(task, "its data is on the Hugging Face hub, which is unreachable; set HF_DATASETS_OFFLINE=1 to "
                      "use the datasets cache")
        if task.startswith("minerva_math"):
            missing = missing_math_requirements()
            if missing:
                add(task, f"lm-eval's math extra is missing: {', '.join(missing)} (pip install "
                          f"'lm-eval[math]=={LM_EVAL_VERSION}')")
        if "humaneval" in task:
            if not allow_code_eval:
                add(task, "it executes model-written code; pass --allow-code-eval (sets HF_ALLOW_CODE_EVAL=1)")
            if _distribution_version("evaluate") is None:
                add(task, "it needs the `evaluate` package (pip install evaluate)")
            elif not online and not code_eval_cached():
                add(task, "its code_eval metric is loaded from the Hugging Face hub, which is unreachable, and is "
                          "not in the evaluate modules cache (run evaluate.load('code_eval') once online)")
    return problems


def describe_problems(problems: dict[str, list[str]]) -> str:
    return "; ".join(f"general task {task}: {' and '.join(why)}" for task, why in problems.items())


def headline(task: str, metrics: dict[str, Any]) -> tuple[str, float] | None:
    """(metric key, value) reported for a task: the known headline, else acc / exact_match / first number."""
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k
               and not isinstance(v, bool)}
    for key in (HEADLINE_METRICS.get(task), *_PREFERRED):
        if key and key in numeric:
            return key, float(numeric[key])
    if numeric:
        key = min(numeric)
        return key, float(numeric[key])
    return None


def local_task_names(include_path: str | None) -> set[str]:
    """Task names defined by the YAMLs under include_path (indexing lm-eval's own ~10k task files
    takes about a minute, so it is skipped when every requested task is local)."""
    import re

    if not include_path:
        return set()
    names = set()
    for path in Path(include_path).rglob("*.yaml"):
        names.update(re.findall(r"^(?:task|group):\s*['\"]?([\w.\-]+)", path.read_text(errors="ignore"), re.MULTILINE))
    return names


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: float | None = None,
    batch_size: int = 8,
    apply_chat_template: bool = True,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    max_gen_tokens: int | None = None,
    allow_code_eval: bool = False,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Score `model` on lm-eval tasks; returns {task: {"metric", "score", "n", "metrics"}}.

    model: an in-memory HF causal LM (wrapped in HFLM) or a path / hub name (loaded by HFLM).
    include_path: a directory of extra task YAMLs (local tasks).
    allow_code_eval: humaneval executes model-written code; it runs only when this is True.
    """
    if not tasks:
        raise ValueError("no lm-eval tasks given")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise GeneralTaskUnavailableError(f"general tasks need lm-eval: pip install 'lm-eval[math]=={LM_EVAL_VERSION}'") from err
    problems = task_problems(tasks, allow_code_eval)
    if problems:
        raise GeneralTaskUnavailableError(describe_problems(problems))
    code_tasks = [t for t in tasks if "humaneval" in t]
    if code_tasks:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"

    if isinstance(model, str):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  device=str(next(model.parameters()).device))
    gen_kwargs = {"max_gen_toks": max_gen_tokens} if max_gen_tokens else None
    results = simple_evaluate(
        model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
        task_manager=TaskManager(include_path=include_path,
                                 include_defaults=not set(tasks) <= local_task_names(include_path)),
        apply_chat_template=apply_chat_template, fewshot_as_multiturn=apply_chat_template,
        log_samples=False, bootstrap_iters=0, gen_kwargs=gen_kwargs,
        confirm_run_unsafe_code=bool(code_tasks),
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    if results is None:  # non-zero ranks in distributed runs
        return {}
    scores: dict[str, dict[str, Any]] = {}
    samples = results.get("n-samples", {})
    for task in tasks:
        metrics = results["results"].get(task) or results.get("groups", {}).get(task)
        if metrics is None:
            raise GeneralTaskUnavailableError(f"lm-eval returned no result for task {task!r}")
        picked = headline(task, metrics)
        if picked is None:
            raise GeneralTaskUnavailableError(f"lm-eval task {task!r} gave no numeric metric: {metrics}")
        n = samples.get(task, {}).get("effective")
        scores[task] = {"metric": picked[0], "score": picked[1], "n": n,
                        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}
        logger.info("lm-eval %s: %s = %.4f", task, picked[0], picked[1])
    return scores
