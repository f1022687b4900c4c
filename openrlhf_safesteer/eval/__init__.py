"""Evaluation: safety benchmarks, judges, general capability (lm-eval), reports.

    from openrlhf_safesteer.eval import Checkpoint, EvalConfig, GenerationSettings, evaluate
    evaluate([Checkpoint("base", "Qwen/Qwen2.5-0.5B-Instruct")], [("advbench", None)], "eval/")

See `openrlhf_safesteer.eval.runner` for the phases and the output layout, and `safesteer eval --help`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EvalItem": "openrlhf_safesteer.eval.benchmarks",
    "BENCHMARKS": "openrlhf_safesteer.eval.benchmarks",
    "PAPER_SAFETY_BENCHMARKS": "openrlhf_safesteer.eval.benchmarks",
    "BenchmarkUnavailableError": "openrlhf_safesteer.eval.benchmarks",
    "load_benchmark": "openrlhf_safesteer.eval.benchmarks",
    "Checkpoint": "openrlhf_safesteer.eval.generation",
    "GenerationSettings": "openrlhf_safesteer.eval.generation",
    "make_judge": "openrlhf_safesteer.eval.judges",
    "JudgeUnavailableError": "openrlhf_safesteer.eval.judges",
    "run_lm_eval": "openrlhf_safesteer.eval.general",
    "GENERAL_TASKS": "openrlhf_safesteer.eval.general",
    "markdown_table": "openrlhf_safesteer.eval.report",
    "plot_results": "openrlhf_safesteer.eval.report",
    "EvalConfig": "openrlhf_safesteer.eval.runner",
    "EvalError": "openrlhf_safesteer.eval.runner",
    "evaluate": "openrlhf_safesteer.eval.runner",
}

__all__ = [
    "BENCHMARKS",
    "GENERAL_TASKS",
    "PAPER_SAFETY_BENCHMARKS",
    "BenchmarkUnavailableError",
    "Checkpoint",
    "EvalConfig",
    "EvalError",
    "EvalItem",
    "GenerationSettings",
    "JudgeUnavailableError",
    "evaluate",
    "load_benchmark",
    "make_judge",
    "markdown_table",
    "plot_results",
    "run_lm_eval",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'openrlhf_safesteer.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
