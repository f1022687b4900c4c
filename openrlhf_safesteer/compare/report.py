"""report.md and comparison.png of a comparison (from the report dict that run.py writes as report.json)."""

from __future__ import annotations

from pathlib import Path

from openrlhf_safesteer.files import atomic_savefig, atomic_write_text

LABELS = {"safesteer": "SafeSteer (plugin, exact)", "safesteer_sampled": "SafeSteer (plugin, sampled)",
          "dpo": "OpenRLHF DPO", "ppo": "OpenRLHF PPO (REINFORCE++-baseline)",
          "safesteer_local": "SafeSteer (local engine)"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table(report: dict) -> str:
    """The markdown table: one row for the base model, one per arm."""
    base = report["base"]
    lines = ["| model | harmful refusal (ASR) | harmless refusal | general_score | refusal-score shift harmful / "
             "harmless | empty harmful replies | train time | peak RSS |",
             "|---|---|---|---|---|---|---|---|",
             f"| base | {_pct(base['harmful_refusal_rate'])} ({_pct(base['harmful_asr'])}) | "
             f"{_pct(base['harmless_refusal_rate'])} | {base['general_score']:.1f} | - | "
             f"{base['empty_harmful_replies']} | - | - |"]
    for arm, r in report["arms"].items():
        lines.append(
            f"| {LABELS.get(arm, arm)} | {_pct(r['harmful_refusal_rate'])} ({_pct(r['harmful_asr'])}) | "
            f"{_pct(r['harmless_refusal_rate'])} | {r['general_score']:.1f} | "
            f"{r['harmful_score_shift']:+.2f} / {r['harmless_score_shift']:+.2f} | {r['empty_harmful_replies']} | "
            f"{r['train_seconds'] / 60:.1f} min | {r['peak_rss_mb'] / 1024:.1f} GB |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Harmful refusal against harmless refusal, one point per model: up is safer, right over-refuses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    points = {"base": report["base"], **report["arms"]}
    # A legend, not labels at the points: arms often land on the same spot (e.g. base and a weak arm).
    for (name, r), marker in zip(points.items(), "os^vDPX*"):
        x, y = 100 * r["harmless_refusal_rate"], 100 * r["harmful_refusal_rate"]
        ax.scatter([x], [y], s=70, marker=marker, alpha=0.8, label=f"{LABELS.get(name, name)} ({y:.1f}, {x:.1f})")
    ax.legend(fontsize=7, loc="lower right", title="model (harmful %, harmless %)", title_fontsize=7)
    ax.set_xlabel("harmless prompts refused (%)  (lower is better)")
    ax.set_ylabel("harmful prompts refused (%)  (higher is better)")
    ax.set_title(f"{report['model']}: held-out refusal after {report['settings']['demo']['steps']} steps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def write_report(out: Path, report: dict) -> None:
    plot(report, out / "comparison.png")
    d = report["settings"]["demo"]
    lines = [
        f"# SafeSteer beside OpenRLHF's DPO and PPO ({report['date']})", "",
        f"Model `{report['model']}`; held-out sets: {report['n']['harmful']} harmful, {report['n']['harmless']} "
        f"harmless, {report['n']['general']} general questions; greedy replies of {d['refusal_tokens']} tokens "
        "judged by the refusal-string judge. Every arm: LoRA r = "
        f"{d['lora_r']} (alpha {d['lora_alpha']}) on {', '.join(d['lora_targets'])}, lr {d['lr']}, cosine to 0 "
        f"with {d['warmup_ratio']:.0%} warm-up, {d['steps']} optimizer steps of {d['prompts_per_step']} rollouts "
        f"of up to {d['max_new_tokens']} tokens, seed {d['seed']}, float32.", "",
        table(report), "",
        "The refusal-score shift is the change of the mean refusal score of docs/METHOD.md §1 (log-odds of the refusal "
        "openers at the end of the prompt) against the base model: a signal that no arm's training signal "
        "reads (PPO's reward is the same refusal-string judge as the evaluation, so its refusal rate alone "
        "could be gamed).", "",
        "![comparison](comparison.png)", "",
        "## What each arm needed", "",
    ]
    lines += [f"- **{LABELS.get(a, a)}**: {r['needs']}; {r['changed_tensors']} weight tensors changed"
              for a, r in report["arms"].items()]
    parity = report.get("parity")
    if parity:
        lines += ["", "## Parity of the plugin with the local engine", "",
                  f"On the plugin's first micro-batch ({parity['sequences']} rollouts, initial weights), the local "
                  f"engine's loss is {parity['local_engine_loss']:.8g} and the plugin's "
                  f"{parity['plugin_loss']:.8g}: relative error {parity['relative_error']:.2e}; the teacher "
                  f"log-probs on S differ by at most {parity['teacher_logprobs_max_abs_diff']:.2e}."]
    lines += ["", "## Stage times (seconds)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["timings_seconds"].items()]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def seed_table(reports: list[dict]) -> str:
    """One row per (arm, run) across comparison runs (e.g. seeds), then each arm's range: the spread that
    tells whether two arms differ by more than the seed does."""
    lines = ["| arm | seed | harmful refusal | harmless refusal | general_score | score shift harmful / harmless |",
             "|---|---|---|---|---|---|"]
    by_arm: dict[str, list[dict]] = {}
    for report in reports:
        seed = report["settings"]["demo"]["seed"]
        for arm, r in report["arms"].items():
            by_arm.setdefault(arm, []).append(r)
            lines.append(f"| {LABELS.get(arm, arm)} | {seed} | {_pct(r['harmful_refusal_rate'])} | "
                         f"{_pct(r['harmless_refusal_rate'])} | {r['general_score']:.1f} | "
                         f"{r['harmful_score_shift']:+.2f} / {r['harmless_score_shift']:+.2f} |")
    for arm, rows in by_arm.items():
        def span(key: str, pct: bool = True) -> str:
            values = [r[key] for r in rows]
            fmt = _pct if pct else (lambda v: f"{v:.1f}")
            return f"{fmt(min(values))} - {fmt(max(values))}"
        lines.append(f"| **{LABELS.get(arm, arm)}: range over {len(rows)}** | | {span('harmful_refusal_rate')} | "
                     f"{span('harmless_refusal_rate')} | {span('general_score', pct=False)} | |")
    return "\n".join(lines)
