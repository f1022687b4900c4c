"""Results on disk: JSON (atomic), the markdown table (benchmarks x checkpoints), the bar chart,
and AlpacaEval-ready output files.

Headline numbers, all in percent:
- harmful benchmarks: attack success rate (ASR, lower is safer), from the run's judge (named in the
  row label); unparseable verdicts count as no success over all items, as HarmBench counts them;
- over-refusal benchmarks (XSTest): refusal rate on the safe prompts (lower is better), from the
  benchmark's string judge (XSTest: its own string match);
- general tasks: lm-eval's headline metric (higher is better).
"Safety avg" is the mean ASR over harmful benchmarks; "General avg" the mean general score.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from openrlhf_safesteer.files import atomic_write_json


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """An evaluation result file: indented JSON, non-ASCII text kept as written, replaced atomically."""
    atomic_write_json(path, obj, indent=2, ensure_ascii=False)


def headline_value(entry: dict[str, Any]) -> float | None:
    """The number a table cell shows for one benchmark result (a fraction, or None)."""
    kind = entry.get("kind")
    if kind == "harmful":
        return entry.get("asr")
    if kind == "overrefusal":
        return entry.get("over_refusal")
    if kind == "general":
        return entry.get("score")
    return None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def judges_of(results: dict[str, Any], bench: str, key: str = "judge") -> list[str]:
    """The judges (or refusal judges, key="refusal_judge") behind a benchmark's results, in checkpoint order."""
    names = [entry.get("safety", {}).get(bench, {}).get(key) for entry in results.get("checkpoints", {}).values()]
    return list(dict.fromkeys(n for n in names if n))


def summary_rows(results: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, dict[str, float | None]]]]:
    """(checkpoint names, rows) with rows = (label, unit hint, {checkpoint: fraction or None})."""
    checkpoints = list(results.get("checkpoints", {}))
    harmful, overrefusal, general = [], [], []
    for ckpt in checkpoints:
        entry = results["checkpoints"][ckpt]
        for bench, res in entry.get("safety", {}).items():
            target = {"harmful": harmful, "overrefusal": overrefusal}.get(res.get("kind"))
            if target is not None and bench not in target:
                target.append(bench)
        for task in entry.get("general", {}):
            if task not in general:
                general.append(task)

    def row(section: str, name: str) -> dict[str, float | None]:
        return {c: headline_value(results["checkpoints"][c].get(section, {}).get(name, {})) for c in checkpoints}

    def judged(metric: str, bench: str, key: str = "judge") -> str:
        """'ASR ↓, judge llama_guard': which judge made the number is part of its label."""
        names = judges_of(results, bench, key)
        return f"{bench} ({metric}, judge {'/'.join(names)})" if names else f"{bench} ({metric})"

    rows = [(judged("ASR ↓", b), "harmful", row("safety", b)) for b in harmful]
    rows += [(judged("over-refusal ↓", b), "overrefusal", row("safety", b)) for b in overrefusal]
    rows += [(f"{t} (↑)", "general", row("general", t)) for t in general]
    if harmful:
        rows.append(("**Safety avg (ASR ↓)**", "avg", {
            c: _mean([v for v in (headline_value(results["checkpoints"][c].get("safety", {}).get(b, {}))
                                  for b in harmful) if v is not None]) for c in checkpoints}))
    if general:
        rows.append(("**General avg (↑)**", "avg", {
            c: _mean([v for v in (headline_value(results["checkpoints"][c].get("general", {}).get(t, {}))
                                  for t in general) if v is not None]) for c in checkpoints}))
    return checkpoints, rows


def markdown_table(results: dict[str, Any]) -> str:
    """Benchmarks as rows, checkpoints as columns, values in percent; refusal rates in a second table."""
    checkpoints, rows = summary_rows(results)

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    lines = ["| benchmark | " + " | ".join(checkpoints) + " |", "|---|" + "---:|" * len(checkpoints)]
    lines += [f"| {label} | " + " | ".join(fmt(vals[c]) for c in checkpoints) + " |" for label, _, vals in rows]
    harmful = [label.split(" (")[0] for label, kind, _ in rows if kind == "harmful"]
    refusal = [(b, {c: results["checkpoints"][c].get("safety", {}).get(b, {}).get("refusal_rate")
                    for c in checkpoints}) for b in harmful]
    text = "\n".join(lines) + "\n"
    if refusal:
        text += "\nRefusal rate (string judge in brackets, %):\n\n"
        text += "| benchmark | " + " | ".join(checkpoints) + " |\n|---|" + "---:|" * len(checkpoints) + "\n"
        text += "".join(f"| {b} ({'/'.join(judges_of(results, b, 'refusal_judge')) or 'refusal'}) | "
                        + " | ".join(fmt(vals[c]) for c in checkpoints) + " |\n" for b, vals in refusal)
    notes = table_notes(results, harmful)
    if notes:
        text += "\nNotes:\n\n" + "".join(f"- {note}\n" for note in notes)
    errors = results.get("errors") or []
    if errors:
        text += "\nNot evaluated:\n\n" + "".join(f"- {e.get('checkpoint') or '*'} / {e['benchmark']}: {e['error']}\n"
                                                 for e in errors)
    return text


def table_notes(results: dict[str, Any], harmful: list[str]) -> list[str]:
    """What a reader must know to compare a cell with a paper: metric caveats (StrongREJECT) and
    unparseable judge verdicts (counted as no attack success in the ASR, as HarmBench does)."""
    notes = []
    for bench in harmful:
        entries = {c: e.get("safety", {}).get(bench, {}) for c, e in results.get("checkpoints", {}).items()}
        caveat = next((e["metric_note"] for e in entries.values() if e.get("metric_note")), "")
        if caveat:
            notes.append(f"{bench}: {caveat}")
        for ckpt, entry in entries.items():
            if entry.get("n_invalid"):
                notes.append(f"{bench} / {ckpt}: {entry['n_invalid']} of {entry.get('n')} judge verdicts unparseable, "
                             "counted as no attack success (ASR over parsed verdicts only: "
                             f"{100 * (entry.get('asr_parsed') or 0):.1f})")
    return notes


def plot_results(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Grouped bar chart (one group per table row, one bar per checkpoint) written to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openrlhf_safesteer.files import atomic_savefig

    checkpoints, rows = summary_rows(results)
    if not rows:
        raise ValueError("no results to plot")
    width = 0.8 / max(1, len(checkpoints))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) * max(1, len(checkpoints)) ** 0.5 + 2), 4.2))
    for i, ckpt in enumerate(checkpoints):
        xs = [r + (i - (len(checkpoints) - 1) / 2) * width for r in range(len(rows))]
        ys = [100 * (vals[ckpt] or 0.0) for _, _, vals in rows]
        bars = ax.bar(xs, ys, width, label=ckpt)
        for bar, (_, _, vals) in zip(bars, rows):
            if vals[ckpt] is None:  # not evaluated: say so rather than draw a zero
                ax.text(bar.get_x() + bar.get_width() / 2, 1, "n/a", ha="center", va="bottom", fontsize=7,
                        rotation=90)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([label.replace("**", "") for label, _, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title("Safety (ASR, over-refusal: lower is better) and general capability (higher is better)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def alpaca_eval_records(instructions: list[str], outputs: list[str], generator: str,
                        datasets: list[str] | None = None) -> list[dict[str, str]]:
    """AlpacaEval's model_outputs.json format: [{"instruction", "output", "generator", "dataset"}]."""
    if len(instructions) != len(outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(outputs)} outputs")
    datasets = datasets or ["helpful_base"] * len(instructions)
    return [{"instruction": i, "output": o, "generator": generator, "dataset": d or "helpful_base"}
            for i, o, d in zip(instructions, outputs, datasets)]
