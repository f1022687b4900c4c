"""Shared pieces of the benchmarks: models to measure on, a paired timer, and table output."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable

import torch


@dataclasses.dataclass
class Ratio:
    """One line of the results table: `value` = candidate / baseline (lower is better unless noted)."""

    number: int
    name: str
    model: str
    candidate: float
    baseline: float
    unit: str
    goal: str
    note: str = ""
    seconds: float = 0.0  # wall time spent measuring this ratio

    @property
    def value(self) -> float:
        return self.candidate / self.baseline if self.baseline else float("nan")


def alternating_medians(fns: list[Callable[[], object]], repeats: int = 7, warmup: int = 2) -> list[float]:
    """Median wall time of each callable, measured in alternation (ABC ABC ...) so that load from
    other processes on a shared machine hits every side alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, series in zip(fns, times):
            gc.collect()
            _synchronize()
            start = time.perf_counter()
            fn()
            _synchronize()  # CUDA kernels run asynchronously: time their completion, not their launch
            series.append(time.perf_counter() - start)
    return [statistics.median(series) for series in times]


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def paired_median_seconds(candidate: Callable[[], object], baseline: Callable[[], object], repeats: int = 7,
                          warmup: int = 2) -> tuple[float, float]:
    """Median wall time of candidate and baseline, measured in alternation (ABAB...)."""
    t_candidate, t_baseline = alternating_medians([candidate, baseline], repeats, warmup)
    return t_candidate, t_baseline


def random_llama(vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
    """A randomly initialised Llama-shaped causal LM (for speed, weights do not matter)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                         intermediate_size=intermediate, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def format_table(ratios: list[Ratio]) -> str:
    lines = ["| # | ratio | model | candidate | baseline | ratio | goal | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ratios:
        value = f"{r.value:.2e}" if 0 < abs(r.value) < 0.01 else f"{r.value:.3f}"
        lines.append(f"| {r.number} | {r.name} | {r.model} | {r.candidate:.4g} {r.unit} | {r.baseline:.4g} {r.unit} "
                     f"| {value} | {r.goal} | {r.note} |")
    return "\n".join(lines)
