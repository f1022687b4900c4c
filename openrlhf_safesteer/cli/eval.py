"""`safesteer eval`: score checkpoints on safety, over-refusal and general benchmarks.

    safesteer eval --models base=Qwen/Qwen2.5-7B-Instruct safesteer=runs/qwen/final \
        --benchmarks advbench harmbench xstest=data/xstest_prompts.csv --judge llama_guard_1b \
        --general gsm8k mmlu_generative --limit 100 --out eval/qwen
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from openrlhf_safesteer.helpformat import HelpFormatter

logger = logging.getLogger(__name__)

# the project's own sets: harmful, over-refusal, and the borderline-safe set with its harmful contrast (selectivity)
DEFAULT_BENCHMARKS = ["safesteer_harmful", "safesteer_xstest", "safesteer_borderline", "safesteer_borderline_contrast"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    from openrlhf_safesteer.eval.benchmarks import BENCHMARKS
    from openrlhf_safesteer.eval.general import GENERAL_TASKS
    from openrlhf_safesteer.eval.judges import JUDGES

    p = subparsers.add_parser(
        "eval", help="evaluate checkpoints on safety, over-refusal and general benchmarks",
        description="Generate replies (greedy, the model's chat template, no system prompt), judge them, run "
                    "lm-eval tasks, and write results.json, table.md (benchmarks x checkpoints) and chart.png. "
                    "Re-running with the same settings and --out resumes from the cache.",
        formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=PATH",
                   help="checkpoints to compare: NAME=PATH (HF directory, hub id, LoRA adapter directory, or an "
                        "embedded demo model such as qwen2.5-coder-0.5b); a bare PATH uses its basename as NAME")
    p.add_argument("--out", required=True, help="output directory (results, caches, table, chart)")
    p.add_argument("--benchmarks", nargs="*", default=DEFAULT_BENCHMARKS, metavar="NAME[=FILE]",
                   help=f"benchmarks by name ({', '.join(BENCHMARKS)}), NAME=FILE for a local CSV/JSON/JSONL copy "
                        "in the upstream layout, or a bare FILE")
    p.add_argument("--limit", type=int, default=None, help="keep the first N prompts of each benchmark (all when unset)")
    p.add_argument("--judge", default="refusal",
                   help=f"judge for attack success: {', '.join(JUDGES)}, or NAME=MODEL_DIR to use a local copy; "
                        "the refusal rate (string judge) is always reported beside it")
    p.add_argument("--judge-for", nargs="*", default=[], metavar="BENCHMARK=JUDGE",
                   help="per-benchmark judge, e.g. sorry_bench=sorry_bench harmbench=harmbench")
    p.add_argument("--general", nargs="*", default=[], metavar="TASK",
                   help=f"lm-eval tasks on the same model ({', '.join(GENERAL_TASKS)} or any lm-eval task)")
    p.add_argument("--general-limit", type=float, default=None,
                   help="lm-eval --limit: examples per task (a float < 1 is a fraction)")
    p.add_argument("--general-include-path", default=None, help="directory of extra lm-eval task YAMLs")
    p.add_argument("--general-batch-size", type=int, default=8, help="lm-eval batch size")
    p.add_argument("--no-general-chat-template", action="store_true",
                   help="score lm-eval tasks without the chat template (base models)")
    p.add_argument("--allow-code-eval", action="store_true",
                   help="allow humaneval tasks, which execute model-written code (sets HF_ALLOW_CODE_EVAL=1)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per reply")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (only when temperature > 0)")
    p.add_argument("--system-prompt", default=None, help="system prompt (none by default, as in the paper)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per HF generate call")
    p.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto",
                   help="generation backend: auto = vLLM when installed with a GPU, else HF")
    p.add_argument("--steer", nargs="*", default=[], metavar="NAME=VECTOR_DIR",
                   help="attach a steering vector (safesteer direction --out) to checkpoint NAME: scores the "
                        "steered teacher")
    p.add_argument("--steer-coeff", type=float, default=None, help="steering coefficient (default: the vector's)")
    p.add_argument("--skip-unavailable", action="store_true",
                   help="log and skip benchmarks/judges that cannot be loaded instead of stopping (exit code 1)")
    p.add_argument("--no-plot", action="store_true", help="do not write chart.png")
    return p


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key or not val:
            raise SystemExit(f"safesteer eval: bad {what} {value!r}; use NAME=VALUE")
        out[key] = val
    return out


def run(args: argparse.Namespace) -> int:
    from openrlhf_safesteer.eval.benchmarks import parse_benchmark_arg
    from openrlhf_safesteer.eval.generation import (
        GenerationSettings,
        parse_checkpoint_arg,
    )
    from openrlhf_safesteer.eval.runner import EvalConfig, EvalError, evaluate, summary

    checkpoints = [parse_checkpoint_arg(m) for m in args.models]
    steer = _pairs(args.steer, "--steer")
    unknown = set(steer) - {c.name for c in checkpoints}
    if unknown:
        raise SystemExit(f"safesteer eval: --steer names unknown checkpoint(s) {sorted(unknown)}")
    for ckpt in checkpoints:
        ckpt.steer, ckpt.steer_coeff = steer.get(ckpt.name), args.steer_coeff if ckpt.name in steer else None
    general_limit = args.general_limit
    if general_limit is not None and general_limit >= 1:
        general_limit = int(general_limit)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, system_prompt=args.system_prompt, batch_size=args.batch_size,
                                  backend=args.backend)
    config = EvalConfig(judge=args.judge, judge_overrides=_pairs(args.judge_for, "--judge-for"), limit=args.limit,
                        general=args.general, general_limit=general_limit,
                        general_include_path=args.general_include_path,
                        general_chat_template=not args.no_general_chat_template,
                        general_batch_size=args.general_batch_size, allow_code_eval=args.allow_code_eval,
                        skip_unavailable=args.skip_unavailable, plot=not args.no_plot)
    try:
        results = evaluate(checkpoints, [parse_benchmark_arg(b) for b in args.benchmarks], args.out, settings, config)
    except EvalError as err:
        logger.error("safesteer eval stopped: %s (results written so far are in %s)", err, args.out)
        return 1
    except ValueError as err:  # bad arguments, found by the preflight before any generation (CheckpointError
        # wraps a missing path, a tokenizer without chat template and an unfit or unreadable --steer vector)
        logger.error("safesteer eval: %s", err)
        return 2
    logger.info("results in %s (results.json, table.md%s)\n%s", args.out, "" if args.no_plot else ", chart.png",
                summary(results))
    print(Path(args.out, "table.md").read_text(encoding="utf-8"))
    return 1 if results.get("errors") else 0
