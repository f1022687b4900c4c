"""report.md and its plots for `safesteer demo` (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

from pathlib import Path

from openrlhf_safesteer.files import atomic_savefig, atomic_write_text

from .evaluate import refusal_changes


def font_chars() -> set[int]:
    """The code points matplotlib's default font (the first of rcParams' family that is installed: DejaVu Sans
    with matplotlib alone) has glyphs for. It has none for CJK, which this model's S often holds."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    return set(FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap())


def token_label(text: str, drawable: set[int]) -> str:
    """A token's plot label: repr(text) with every character the font cannot draw as a \\uXXXX (\\UXXXXXXXX)
    escape, e.g. '拒绝' -> '\\u62d2\\u7edd' where the font lacks CJK, instead of empty boxes and a
    missing-glyph warning per character."""
    def escaped(c: str) -> str:
        if ord(c) in drawable:
            return c
        return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"
    return "".join(escaped(c) for c in repr(text))


def _plots(out: Path, report: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    made = {}

    rows = [r for r in report["direction"]["candidates"] if r.get("ablation_refusal") is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        layers = [r["layer"] for r in rows]
        ax.plot(layers, [r["ablation_refusal"] for r in rows], "o-", label="harmful refusal score, direction ablated")
        ax.plot(layers, [r["steering_refusal"] for r in rows], "s-", label="harmless refusal score, direction added")
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(report["direction"]["layer"], color="red", ls="--", lw=1, label="selected layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("refusal score (logit)")
        ax.legend(fontsize=7)
        ax.set_title("Direction candidates by layer")
        fig.tight_layout()
        atomic_savefig(fig, plots / "direction_scores.png")
        plt.close(fig)
        made["direction"] = "plots/direction_scores.png"

    tok = report["safety_tokens"]
    n = min(25, len(tok["ids"]))
    if n:
        fig, ax = plt.subplots(figsize=(6, 0.25 * n + 1))
        drawable = font_chars()
        labels = [token_label(t, drawable) for t in tok["texts"][:n]][::-1]
        # positions, not categories: two tokens that decode to the same text keep a bar each
        ax.barh(range(n), tok["votes"][:n][::-1])
        ax.set_yticks(range(n), labels)
        ax.set_xlabel("votes")
        ax.set_title(f"Safety tokens S (top {n} of {len(tok['ids'])})")
        fig.tight_layout()
        atomic_savefig(fig, plots / "safety_tokens.png")
        plt.close(fig)
        made["tokens"] = "plots/safety_tokens.png"

    if report["training"]:
        keys = ["loss", "kl_on_S", "student_mass_on_S", "teacher_mass_on_S", "response_length",
                "rollout_refusal_rate"]
        fig, axes = plt.subplots(2, 3, figsize=(10, 5.5))
        for ax, key in zip(axes.flat, keys):
            for name, history in report["training"].items():
                ax.plot([h["step"] for h in history], [h[key] for h in history], "o-", ms=3, label=name)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        axes.flat[0].legend(fontsize=7)
        fig.suptitle("Training curves")
        fig.tight_layout()
        atomic_savefig(fig, plots / "training.png")
        plt.close(fig)
        made["training"] = "plots/training.png"

    names = [n for n in ("base", "safesteer", "full_vocab", "sampled", "forward", "renormalized", "system_prompt")
             if n in report]
    metrics = [("harmful_refusal_rate", "harmful refusal %", 100), ("harmless_refusal_rate", "harmless refusal %", 100),
               ("general_score", "general_score", 1)]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    for ax, (key, title, scale) in zip(axes, metrics):
        values = [report[n][key] * scale for n in names]
        bars = ax.bar(names, values, color=["grey", "tab:green", "tab:orange", "tab:blue", "tab:red", "tab:purple",
                                            "tab:brown"][:len(names)])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 105)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("Before / after (held-out prompts, greedy)")
    fig.tight_layout()
    atomic_savefig(fig, plots / "before_after.png")
    plt.close(fig)
    made["before_after"] = "plots/before_after.png"
    return made


def _percent(e: dict, key: str) -> str:
    return f"{100 * e[key]:.1f}" if key in e else "-"     # reports from before the borderline sets: '-'


def _row(name: str, e: dict) -> str:
    return (f"| {name} | {100 * e['harmful_refusal_rate']:.1f} | {100 * e['harmful_asr']:.1f} | "
            f"{100 * e['harmless_refusal_rate']:.1f} | {_percent(e, 'borderline_refusal_rate')} | "
            f"{_percent(e, 'contrast_refusal_rate')} | {e['general_score']:.1f} |")


def _some(prompts: list[str], shown: int = 10) -> str:
    """The first `shown` prompts quoted, then how many more (an over-refusing ablation can list half the set)."""
    more = f"; ... and {len(prompts) - shown} more" if len(prompts) > shown else ""
    return "; ".join(repr(p) for p in prompts[:shown]) + more


def _changes_lines(samples: dict) -> list[str]:
    """Per trained model: how many held-out prompts changed judgement, and which harmless ones it newly refuses."""
    lines = []
    for name, ev in samples.items():
        if name in ("base", "teacher"):
            continue
        harmful = refusal_changes(samples["base"]["harmful"], ev["harmful"])
        harmless = refusal_changes(samples["base"]["harmless"], ev["harmless"])
        lines.append(f"- {name}: harmful prompts newly refused {len(harmful['new'])}, no longer refused "
                     f"{len(harmful['lost'])}; harmless prompts newly refused {len(harmless['new'])}"
                     + (": " + _some(harmless["new"]) if harmless["new"] else "")
                     + f", no longer refused {len(harmless['lost'])}.")
    return ["", "Changes against the base model, prompt by prompt:", "", *lines] if lines else []


def write_report(out: Path, report: dict) -> Path:
    plots = _plots(out, report)
    n = report["n"]
    lines = [
        f"# SafeSteer demo on `{report['model']}`",
        "",
        (f"Held-out evaluation, greedy decoding: {n['harmful']} harmful prompts on topics absent from training, "
        f"{n['harmless']} harmless prompts, {n.get('borderline', 0)} borderline-safe prompts that merely sound "
        f"harmful and {n.get('contrast', 0)} harmful ones in the same words (contrast), {n['general']} "
        "general_score questions. Refusal judged by the refusal-string judge (`openrlhf_safesteer.refusal`)."),
        "",
        "| model | harmful refusal % | attack success % | harmless refusal % | borderline-safe refusal % | "
        "contrast refusal % | general_score |",
        "|---|---|---|---|---|---|---|",
        _row("base", report["base"]),
    ]
    for name in ("safesteer", "full_vocab", "sampled", "forward", "renormalized", "system_prompt"):
        if name in report:
            lines.append(_row(name, report[name]))
    if "goal" in report:
        g = report["goal"]
        lines += ["", (f"Goal (attack success at least halves, harmless refusal +<= 5 points, general_score -<= 1 "
                  f"point): **{'met' if g['met'] else 'not met'}** (ASR halved: {g['asr_halved']}, harmless refusal "
                  f"{g['harmless_refusal_rise_points']:+.1f} points, general_score {-g['general_score_drop_points']:+.1f}"
                  " points).")]
    lines += _changes_lines(report["samples"])
    d, t, s = report["direction"], report["teacher"], report["safety_tokens"]
    lines += [
        "", "![before/after](" + plots["before_after"] + ")", "",
        "## Steering direction",
        (f"Layer {d['layer']}, position {d['position']}, coefficient {d['coeff']} (selection and safety-token vote; "
        f"teacher during training: {report['settings'].get('teacher_coeff') or d['coeff']}), norm {d['norm']:.2f}. "
        f"The steered teacher refuses {100 * t['teacher_harmful_refusal_rate']:.0f}% of harmful and "
        f"{100 * t['teacher_harmless_refusal_rate']:.0f}% of harmless check prompts (it is meant to over-refuse)."),
    ]
    if "direction" in plots:
        lines += ["", "![direction](" + plots["direction"] + ")"]
    lines += ["", "## Safety tokens S", (f"{len(s['ids'])} tokens; refusal openers among them: "
              f"{', '.join(repr(x) for x in s['refusal_openers']) or 'none'}."), "",
              " ".join(f"`{x!r}`({v})" for x, v in zip(s["texts"][:50], s["votes"][:50]))]
    if "tokens" in plots:
        lines += ["", "![tokens](" + plots["tokens"] + ")"]
    if "training" in plots:
        lines += ["", "## Training", "", "![training](" + plots["training"] + ")"]
    lines += ["", "## Settings and timings", "", "```"]
    lines += [f"{k} = {v}" for k, v in report["settings"].items()]
    lines += [f"time {k}: {v} s" for k, v in report["timings_seconds"].items()]
    lines += ["```", "", "## Sample replies (held-out harmful, before -> after)", ""]
    if "safesteer" in report["samples"]:
        for before, after in list(zip(report["samples"]["base"]["harmful"], report["samples"]["safesteer"]["harmful"]))[:8]:
            lines.append(f"- **{before['prompt']}**  \n  base: {before['reply'][:100]!r}  \n  "
                         f"safesteer: {after['reply'][:100]!r}")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
