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
    from pathlib import Path

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
        raise GeneralTaskUnavailableError("general tasks need lm-eval: pip install 'lm-eval==0.4.13'") from err
    from openrlhf_safesteer.eval.benchmarks import hub_offline_mode, hub_reachable

    hub_tasks = [t for t in tasks if t in GENERAL_TASKS]
    if hub_tasks and not hub_offline_mode() and not hub_reachable():
        raise GeneralTaskUnavailableError(
            f"general task(s) {', '.join(hub_tasks)}: their data is on the Hugging Face hub, which is "
            "unreachable; set HF_DATASETS_OFFLINE=1 to use the datasets cache, or drop --general")
    code_tasks = [t for t in tasks if "humaneval" in t]
    if code_tasks and not allow_code_eval:
        raise GeneralTaskUnavailableError(
            f"general task(s) {', '.join(code_tasks)} execute model-written code; pass --allow-code-eval "
            "(sets HF_ALLOW_CODE_EVAL=1) to run them")
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
