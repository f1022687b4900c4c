"""DIR/frontier.md, frontier.png and frontier.json of a frontier grid (`compare.frontier`), from its finished rows.

Everything is recomputed from DIR/runs.jsonl (per-prompt verdicts), DIR/spec.json and DIR/selection.json; a partial
grid gives a partial report that says what is missing. The arithmetic is `compare.frontier_stats`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from openrlhf_safesteer.compare import frontier_stats as fs
from openrlhf_safesteer.compare.evaluation import JUDGES, REFUSAL_SETS, REWARD_JUDGE
from openrlhf_safesteer.files import atomic_savefig, atomic_write_json, atomic_write_text

ABLATION, PLUGIN, BASE, TEACHER = "ablation", "safesteer_plugin", "base", "teacher"
LABELS = {"safesteer": "SafeSteer (local engine)", "dpo": "OpenRLHF DPO", "ppo": "OpenRLHF PPO (REINFORCE++-baseline)",
          "sft": "OpenRLHF SFT (teacher's replies)", PLUGIN: "SafeSteer (OpenRLHF plugin)",
          ABLATION: "full-vocabulary ablation", TEACHER: "steered teacher (no training)", BASE: "base"}
METRIC_LABELS = {"asr_reduction": "ASR reduction", "harmless_rise": "harmless refusal rise",
                 "borderline_rise": "borderline-safe refusal rise", "contrast_rise": "contrast refusal rise",
                 "general_change": "general_score change"}
COLORS = {"safesteer": "tab:blue", "dpo": "tab:orange", "ppo": "tab:green", "sft": "tab:purple"}


def label(method: str) -> str:
    return LABELS.get(method, method)


def arrays_of(row: dict, judge: str) -> dict[str, np.ndarray]:
    """A row's 0/1 verdicts under `judge` per refusal set, and its general answers."""
    out = {name: fs.decode_bits(v[judge]) for name, v in row["verdicts"].items()}
    out["general"] = fs.decode_bits(row["general"])
    return out


def effects_of(base: dict, row: dict, judge: str) -> dict[str, float]:
    return fs.run_effects(arrays_of(base, judge), arrays_of(row, judge))


def _stack(rows: list[dict], judge: str) -> dict[str, np.ndarray]:
    arrays = [arrays_of(r, judge) for r in rows]
    return {name: np.stack([a[name] for a in arrays]) for name in arrays[0]}


def _groups(rows: list[dict], phase: str) -> dict[tuple[str, str], dict[int, dict]]:
    """(method, config id) -> {seed: row} for the phase's trained rows."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        if r["phase"] == phase and r["arm"] is not None:
            out.setdefault((r["method"], r["config_id"]), {})[r["seed"]] = r
    return out


def _fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


# ------------------------------------------------------------------------------------------ the report dict


def build_report(out: Path) -> dict:
    from openrlhf_safesteer.compare.frontier import ROWS, dev_runs, load_rows, test_runs

    spec = json.loads((out / "spec.json").read_text())
    rows = list(load_rows(out).values())
    selection = json.loads((out / "selection.json").read_text()) if (out / "selection.json").is_file() else None
    judge = spec["headline_judge"]
    methods = list(spec["methods"])
    report: dict = {"headline_judge": judge, "reward_judge": REWARD_JUDGE, "judges": list(JUDGES),
                    "selection": selection, "matched_rises": spec["matched_rises"], "rows_file": ROWS,
                    "progress": {"dev": {"done": sum(r["phase"] == "dev" and r["arm"] is not None for r in rows),
                                         "planned": len(dev_runs(spec))}}}
    if selection:
        report["progress"]["test"] = {"done": sum(r["phase"] == "test" and r["arm"] is not None for r in rows),
                                      "planned": len(test_runs(spec, selection))}
    bases = {r["phase"]: r for r in rows if r["method"] == BASE}
    teachers = {r["phase"]: r for r in rows if r["method"] == TEACHER}
    phase = "test" if "test" in bases and any(r["phase"] == "test" and r["arm"] for r in rows) else "dev"
    report["phase"] = phase
    if phase not in bases:
        report["note"] = "no base evaluation yet: nothing to compare"
        return report
    base = bases[phase]
    report["base"] = {name: {j: float(fs.decode_bits(v[j]).mean()) for j in JUDGES}
                      for name, v in base["verdicts"].items()}
    report["base"]["general_score"] = 100 * float(fs.decode_bits(base["general"]).mean())
    groups = _groups(rows, phase)

    # every run a dot; every configuration mean +- sd (n)
    report["runs"] = [{"method": m, "config_id": c, "seed": s, "effects": effects_of(base, r, judge)}
                      for (m, c), by_seed in groups.items() for s, r in sorted(by_seed.items())]
    configs = []
    for (m, c), by_seed in groups.items():
        rs = [by_seed[s] for s in sorted(by_seed)]
        eff = [effects_of(base, r, judge) for r in rs]
        configs.append({"method": m, "config_id": c, "config": rs[0]["config"], "role": rs[0]["role"],
                        "seeds": sorted(by_seed), "lr": rs[0]["config"].get("lr"),
                        "summary": {k: dataclasses.asdict(fs.summarise([e[k] for e in eff])) for k in eff[0]}})
    report["configs"] = configs

    # the paired bootstrap: every configuration over the seeds every one of them has
    seed_sets = [set(by_seed) for by_seed in groups.values()]
    common = sorted(set.intersection(*seed_sets)) if seed_sets else []
    report["common_seeds"] = common
    sizes = {name: fs.decode_bits(v[judge]).size for name, v in base["verdicts"].items()}
    sizes["general"] = fs.decode_bits(base["general"]).size
    if common:
        draws = fs.draw_resamples(len(common), sizes, spec["bootstrap_replicates"], seed=0)
        _bootstrap_sections(report, spec, groups, base, teachers.get(phase), common, draws, methods, phase)
    report["judge_agreement"] = _judge_agreement(rows, phase)
    report["by_judge"] = _rates_by_judge(groups, base, selection, methods, phase)
    report["compute"] = _compute(groups)
    report["general"] = _general(base, groups, report)
    report["dev"] = _dev_table(spec, rows, bases.get("dev"), teachers.get("dev"))
    report["protocol"] = _protocol_notes(spec, report)
    return report


def _bootstrap_sections(report, spec, groups, base, teacher, common, draws, methods, phase) -> None:
    judge = spec["headline_judge"]
    base_arrays = arrays_of(base, judge)

    def runs_of(m: str, c: str, j: str = judge) -> dict[str, np.ndarray]:
        return _stack([groups[(m, c)][s] for s in common], j)

    for cfg in report["configs"]:
        if set(common) <= set(cfg["seeds"]):
            cfg["interval"] = {k: v.to_dict() for k, v in
                               fs.config_intervals(base_arrays, runs_of(cfg["method"], cfg["config_id"]),
                                                   draws).items()}
    # each method's frontier: its test configurations, by lr
    frontier_methods = {m: sorted([c for c in report["configs"] if c["method"] == m and "interval" in c],
                                  key=lambda c: c["lr"] or 0.0) for m in methods}
    frontier_methods = {m: cs for m, cs in frontier_methods.items() if cs}
    matched = {}
    for j in JUDGES:
        fm = {m: [(c["config"], runs_of(m, c["config_id"], j)) for c in cs] for m, cs in frontier_methods.items()}
        if not fm:
            continue
        result = fs.matched_frontier(fm, arrays_of(base, j), draws, x0s=tuple(spec["matched_rises"]))
        matched[j] = {"values": {str(x): {m: v.to_dict() for m, v in d.items()} for x, d in result["values"].items()},
                      "differences": {str(x): {k: v.to_dict() for k, v in d.items()}
                                      for x, d in result["differences"].items()}}
    report["matched"] = matched
    # every method difference at the chosen settings (paired)
    chosen = {m: next((c for c in cs if c["role"] == "chosen"), None) for m, cs in frontier_methods.items()}
    chosen = {m: c for m, c in chosen.items() if c is not None}
    names = list(chosen)
    report["chosen_differences"] = {
        f"{a} - {b}": {k: v.to_dict() for k, v in fs.difference_intervals(
            base_arrays, runs_of(a, chosen[a]["config_id"]), runs_of(b, chosen[b]["config_id"]), draws).items()}
        for i, a in enumerate(names) for b in names[i + 1:]}
    refs = {}
    if teacher is not None:
        t = arrays_of(teacher, judge)
        same = {k: np.repeat(v[None, :], len(common), axis=0) for k, v in t.items()}   # no seed: prompts only
        refs[TEACHER] = {k: v.to_dict() for k, v in fs.config_intervals(base_arrays, same, draws).items()}
    for m in (PLUGIN, ABLATION):
        cfgs = [c for c in report["configs"] if c["method"] == m and "interval" in c]
        if cfgs:
            refs[m] = cfgs[0]["interval"]
    if "safesteer" in chosen:
        plugin = next((c for c in report["configs"] if c["method"] == PLUGIN and "interval" in c), None)
        if plugin is not None:
            refs["plugin - local engine"] = {k: v.to_dict() for k, v in fs.difference_intervals(
                base_arrays, runs_of(PLUGIN, plugin["config_id"]), runs_of("safesteer", chosen["safesteer"]["config_id"]),
                draws).items()}
    report["references"] = refs


def _judge_agreement(rows: list[dict], phase: str) -> dict:
    """Per set, over every row of the phase (trained and untrained), each judge's refusal share and the pairwise
    agreement and kappa."""
    out = {}
    for name in REFUSAL_SETS:
        per_judge = {j: [] for j in JUDGES}
        for r in rows:
            if r["phase"] == phase and name in r["verdicts"]:
                for j in JUDGES:
                    per_judge[j].append(fs.decode_bits(r["verdicts"][name][j]))
        if per_judge[next(iter(JUDGES))]:
            out[name] = fs.judge_agreement({j: np.concatenate(v) for j, v in per_judge.items()})
    return out


def _rates_by_judge(groups, base, selection, methods, phase) -> dict:
    """Harmful and borderline-safe refusal (%) of each method at its chosen setting, by judge: a method that games its
    reward's judge refuses more by that judge than by the others."""
    out = {"base": {name: {j: 100 * float(fs.decode_bits(base["verdicts"][name][j]).mean()) for j in JUDGES}
                    for name in ("harmful", "borderline") if name in base["verdicts"]}}
    for (m, c), by_seed in groups.items():
        role = next(iter(by_seed.values()))["role"]
        if role != "chosen" and phase == "test":
            continue
        if phase == "dev" and selection and config_of(selection, m) != c:
            continue
        out[f"{m} at {c}"] = {name: {j: 100 * float(np.mean([fs.decode_bits(r["verdicts"][name][j]).mean()
                                                             for r in by_seed.values()])) for j in JUDGES}
                             for name in ("harmful", "borderline")}
    return out


def config_of(selection: dict, method: str) -> str | None:
    from openrlhf_safesteer.compare.frontier import config_id

    entry = selection["methods"].get(method)
    return config_id(entry["chosen"]) if entry else None


def _compute(groups) -> dict:
    out = {}
    by_method: dict[str, list[dict]] = {}
    for (m, _), by_seed in groups.items():
        by_method.setdefault(m, []).extend(by_seed.values())
    for m, rs in by_method.items():
        entry = {"runs": len(rs),
                 "train_minutes": float(np.mean([r["train_seconds"] for r in rs])) / 60,
                 "eval_minutes": float(np.mean([r["eval_seconds"] for r in rs])) / 60,
                 "data_minutes_total": float(np.sum([r.get("data_seconds", 0.0) for r in rs])) / 60,
                 "sequences": float(np.mean([r["sequences"] for r in rs])),
                 "peak_rss_gb": float(np.max([r["peak_rss_mb"] for r in rs])) / 1024}
        threads = sorted({r["threads"]["training"] for r in rs if r.get("threads")})
        if threads:      # rows from before threads were recorded ran on the grid's own setting
            entry["training_threads"] = threads
        shares = [np.mean(r["nonzero_advantage_share"]) for r in rs if r.get("nonzero_advantage_share")]
        if shares:
            entry["nonzero_advantage_share"] = float(np.mean(shares))
            entry["nonzero_advantage_share_per_step"] = np.mean(
                [r["nonzero_advantage_share"] for r in rs if r.get("nonzero_advantage_share")], axis=0).tolist() \
                if len({len(r["nonzero_advantage_share"]) for r in rs if r.get("nonzero_advantage_share")}) == 1 \
                else None
        pairs = [r["data"]["dpo_pairs_surviving"] for r in rs if r.get("data", {}).get("dpo_pairs_surviving")]
        if pairs and rs[0]["arm"] == "dpo":
            entry["dpo_pairs_surviving"] = {"min": int(min(pairs)), "max": int(max(pairs)),
                                            "of": int(rs[0]["data"]["draws"])}
        sft = [r["data"]["sft_rows_surviving"] for r in rs if r.get("data", {}).get("sft_rows_surviving")]
        if sft and rs[0]["arm"] == "sft":
            entry["sft_rows_surviving"] = {"min": int(min(sft)), "max": int(max(sft)), "of": int(rs[0]["data"]["draws"])}
        out[m] = entry
    return out


def _general(base: dict, groups, report: dict) -> dict:
    g = fs.decode_bits(base["general"])
    rate = float(g.mean())
    se = fs.binomial_se_points(rate, g.size)
    widths = [c["interval"]["general_change"]["high"] - c["interval"]["general_change"]["low"]
              for c in report.get("configs", []) if "interval" in c and "general_change" in c["interval"]]
    half = float(np.median(widths)) / 2 if widths else math.nan
    return {"base_score": 100 * rate, "questions": int(g.size), "per_run_se_points": se,
            "median_ci_half_width_points": half,
            "sees_two_points": bool(half <= 2.0) if widths else None}


def _dev_table(spec, rows, dev_base, dev_teacher) -> dict | None:
    if dev_base is None:
        return None
    from openrlhf_safesteer.compare.frontier import dev_summaries

    return {"summaries": dev_summaries(spec, {r["key"]: r for r in rows}),
            "teacher": effects_of(dev_base, dev_teacher, spec["selection"]["judge"]) if dev_teacher else None}


def _protocol_notes(spec: dict, report: dict) -> list[str]:
    notes = []
    if len(spec["test_seeds"]) < 5:
        notes.append(f"only {len(spec['test_seeds'])} test seeds (the protocol asks >= 5)")
    if len(spec["dev_seeds"]) < 2:
        notes.append(f"only {len(spec['dev_seeds'])} dev seeds (the protocol asks >= 2)")
    factors = [float(f) for f in spec["test_lr_factors"]]
    if not (min(factors) < 1.0 < max(factors)):
        notes.append(f"test lr factors {factors}: no point on each side of the chosen lr")
    sizes = {n: len(m.get("lr", [])) * math.prod(len(m[k]) for k in ("coeff", "beta", "kl") if k in m)
             for n, m in spec["methods"].items()}
    if len(set(sizes.values())) > 1:
        notes.append(f"unequal grid sizes {sizes}")
    for phase, p in report["progress"].items():
        if p["done"] < p["planned"]:
            notes.append(f"{phase} phase: {p['done']} of {p['planned']} runs finished")
    if report.get("phase") != "test":
        notes.append("no test run yet: the tables below are on the dev splits")
    return notes


# ------------------------------------------------------------------------------------------ markdown + plot


def _cell(summary: dict) -> str:
    return fs.Summary(**summary).cell()


def _iv(d: dict | None) -> str:
    if not d:
        return "-"
    return fs.Interval(d["estimate"], d["low"], d["high"], d.get("undefined", 0.0)).text()


def markdown(report: dict, spec: dict) -> str:
    judge = report["headline_judge"]
    lines = ["# SafeSteer, DPO, PPO and SFT on their frontiers", ""]
    p = report["progress"]
    lines.append(f"Runs finished: dev {p['dev']['done']} of {p['dev']['planned']}"
                 + (f", test {p['test']['done']} of {p['test']['planned']}" if "test" in p else ", test not started")
                 + f". Phase tabled: **{report.get('phase', '-')}**. Headline judge: **{judge}** (the PPO reward and "
                 f"the DPO pairs' filter are the `{report['reward_judge']}` judge; the headline judge saw neither). "
                 f"Replies: greedy, {spec['reply_tokens']} tokens. Effects are points against the untrained base on "
                 "the same prompts; cells are mean ± sd (n seeds); intervals are 95% paired bootstrap intervals over "
                 f"seeds and prompts ({spec['bootstrap_replicates']} replicates"
                 + (f", seeds {report['common_seeds']}" if report.get("common_seeds") else "") + ").")
    lines.append("")
    for note in report.get("protocol", []):
        lines.append(f"- **note**: {note}")
    if report.get("note"):
        lines += ["", report["note"]]
        return "\n".join(lines) + "\n"
    lines += ["", "![frontier](frontier.png)", ""]
    if report.get("matched", {}).get(judge):
        m = report["matched"][judge]
        xs = list(m["values"])
        lines += [f"## Headline: ASR reduction at matched over-refusal ({judge})", "",
                  "Each method's frontier (its test settings, anchored at the base) read at a borderline-safe refusal "
                  "rise of " + " and ".join(f"+{float(x):g}" for x in xs) + " points; n/a: the method's settings do not "
                  "reach that rise (never extrapolated).", "",
                  "| method | " + " | ".join(f"ASR reduction at +{float(x):g} borderline points" for x in xs) + " |",
                  "|---|" + "---|" * len(xs)]
        for method in m["values"][xs[0]]:
            lines.append(f"| {label(method)} | " + " | ".join(_iv(m["values"][x][method]) for x in xs) + " |")
        lines += ["", "| difference | " + " | ".join(f"at +{float(x):g}" for x in xs) + " |", "|---|" + "---|" * len(xs)]
        for pair in m["differences"][xs[0]]:
            lines.append(f"| {pair} | " + " | ".join(_iv(m["differences"][x][pair]) for x in xs) + " |")
        others = [j for j in report["matched"] if j != judge]
        if others:
            lines += ["", "The same, by every judge (a method that games its reward's judge looks better by that one):",
                      "", "| judge | method | " + " | ".join(f"+{float(x):g}" for x in xs) + " |",
                      "|---|---|" + "---|" * len(xs)]
            for j in [judge, *others]:
                for method in report["matched"][j]["values"][xs[0]]:
                    lines.append(f"| {j}{' (reward)' if j == report['reward_judge'] else ''} | {label(method)} | "
                                 + " | ".join(_iv(report["matched"][j]["values"][x][method]) for x in xs) + " |")
    lines += ["", f"## Every setting ({report.get('phase')} splits, {judge})", "",
              "| method | setting | role | " + " | ".join(METRIC_LABELS.values()) + " |",
              "|---|---|---|" + "---|" * len(METRIC_LABELS)]
    for c in sorted(report.get("configs", []), key=lambda c: (c["method"], c["lr"] or 0)):
        cells = [_cell(c["summary"][k]) if k in c["summary"] else "-" for k in METRIC_LABELS]
        lines.append(f"| {label(c['method'])} | {c['config_id']} | {c['role']} | " + " | ".join(cells) + " |")
    if report.get("chosen_differences"):
        lines += ["", "## Differences at the chosen settings (paired)", "",
                  "| difference | " + " | ".join(METRIC_LABELS.values()) + " |", "|---|" + "---|" * len(METRIC_LABELS)]
        for pair, d in report["chosen_differences"].items():
            lines.append(f"| {pair} | " + " | ".join(_iv(d.get(k)) for k in METRIC_LABELS) + " |")
    if report.get("references"):
        lines += ["", "## Reference rows", "", "| row | " + " | ".join(METRIC_LABELS.values()) + " |",
                  "|---|" + "---|" * len(METRIC_LABELS)]
        base = report["base"]
        lines.append("| base (absolute) | "
                     + " | ".join([f"ASR {100 * (1 - base['harmful'][judge]):.1f}%",
                                   f"{100 * base['harmless'][judge]:.1f}% refused",
                                   f"{100 * base['borderline'][judge]:.1f}% refused",
                                   f"{100 * base['contrast'][judge]:.1f}% refused",
                                   f"{base['general_score']:.1f}"]) + " |")
        for name, d in report["references"].items():
            lines.append(f"| {label(name)} | " + " | ".join(_iv(d.get(k)) for k in METRIC_LABELS) + " |")
    if report.get("judge_agreement"):
        agreement = report["judge_agreement"]
        names = list(agreement)
        lines += ["", "## Judges", "",
                  f"Refusal share by judge over every reply of the phase (all runs and reference rows); "
                  f"`{report['reward_judge']}` is the PPO reward's judge and the DPO pairs' filter:", "",
                  "| set (replies) | " + " | ".join(JUDGES) + " |", "|---|" + "---|" * len(JUDGES)]
        for name, a in agreement.items():
            lines.append(f"| {name} ({a['items']}) | " + " | ".join(f"{100 * a['rates'][j]:.1f}%" for j in JUDGES)
                         + " |")
        lines += ["", "Agreement between judges (share of replies judged alike, Cohen's kappa):", "",
                  "| judges | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for pair in agreement[names[0]]["pairs"]:
            lines.append(f"| {pair.replace('|', ' / ')} | " + " | ".join(
                f"{agreement[n]['pairs'][pair]['agreement']:.2f} ({agreement[n]['pairs'][pair]['kappa']:.2f})"
                for n in names) + " |")
        lines += ["", "Refusal (%) at each method's chosen setting by judge (harmful / borderline-safe):", "",
                  "| row | " + " | ".join(JUDGES) + " |", "|---|" + "---|" * len(JUDGES)]
        for name, r in report.get("by_judge", {}).items():
            lines.append(f"| {name} | " + " | ".join(
                f"{r['harmful'][j]:.1f} / {r['borderline'][j]:.1f}" if "borderline" in r else f"{r['harmful'][j]:.1f}"
                for j in JUDGES) + " |")
    g = report.get("general")
    if g:
        sees = g["sees_two_points"]
        lines += ["", "## general_score", "",
                  f"Base {g['base_score']:.1f} on {g['questions']} questions; one run's standard error "
                  f"{g['per_run_se_points']:.1f} points; the median 95% interval half-width of a setting's mean change "
                  f"(paired over seeds and questions) is {g['median_ci_half_width_points']:.1f} points: "
                  + ("a 2-point loss is visible." if sees else
                     "**a 2-point loss is not visible** with this set (the project has one general set of "
                     f"{g['questions']} questions; more items are needed to see it)." if sees is not None else "-")]
    if report.get("compute"):
        lines += ["", "## Compute per run (means over the phase's runs)", "",
                  "| method | runs | train min | eval min | data min (all seeds) | sequences | peak RSS (GB, max) | notes |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, c in report["compute"].items():
            notes = []
            if len(c.get("training_threads", [])) > 1:
                notes.append(f"trained on {' or '.join(map(str, c['training_threads']))} threads (minutes mix them)")
            if "nonzero_advantage_share" in c:
                notes.append(f"prompt groups with a non-zero advantage {100 * c['nonzero_advantage_share']:.0f}% "
                             "(mean over steps and runs)")
            if "dpo_pairs_surviving" in c:
                d = c["dpo_pairs_surviving"]
                notes.append(f"{d['min']}-{d['max']} of {d['of']} DPO pairs survive (the rest repeated to the budget)")
            if "sft_rows_surviving" in c:
                d = c["sft_rows_surviving"]
                notes.append(f"{d['min']}-{d['max']} of {d['of']} teacher replies complete")
            lines.append(f"| {label(m)} | {c['runs']} | {c['train_minutes']:.1f} | {c['eval_minutes']:.1f} | "
                         f"{c['data_minutes_total']:.1f} | {c['sequences']:.0f} | {c['peak_rss_gb']:.1f} | "
                         f"{'; '.join(notes)} |")
    sel = report.get("selection")
    lines += ["", "## Selection on the dev splits", "", f"Rule (written in spec.json before any run): "
              f"{spec['selection_rule']}", ""]
    dev = report.get("dev")
    if dev:
        lines += ["| method | setting | dev seeds | ASR reduction | borderline-safe rise | harmless rise | chosen |",
                  "|---|---|---|---|---|---|---|"]
        for m, entries in dev["summaries"].items():
            chosen = config_of(sel, m) if sel else None
            from openrlhf_safesteer.compare.frontier import config_id

            for e in entries:
                cid = config_id(e["config"])
                lines.append(f"| {label(m)} | {cid} | {e['n']} | {_fmt(e.get('asr_reduction'))} | "
                             f"{_fmt(e.get('borderline_rise'))} | {_fmt(e.get('harmless_rise'))} | "
                             f"{'**chosen**' if cid == chosen else ''} |")
        if dev.get("teacher"):
            t = dev["teacher"]
            lines.append(f"| {label(TEACHER)} | - | - | {_fmt(t.get('asr_reduction'))} | "
                         f"{_fmt(t.get('borderline_rise'))} | {_fmt(t.get('harmless_rise'))} | |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Two panels: ASR reduction against borderline-safe rise, and against harmless rise. Every run a dot, each
    setting's mean with its 95% intervals, a line per method through its settings by lr, the reference rows marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    configs = report.get("configs", [])
    for ax, xk, xl in ((axes[0], "borderline_rise", "borderline-safe refusal rise (points)"),
                       (axes[1], "harmless_rise", "harmless refusal rise (points)")):
        for run in report.get("runs", []):
            m = run["method"]
            if m in COLORS:
                ax.scatter(run["effects"][xk], run["effects"]["asr_reduction"], s=10, alpha=0.3, color=COLORS[m])
        for m, color in COLORS.items():
            cs = sorted([c for c in configs if c["method"] == m], key=lambda c: c["lr"] or 0)
            if not cs:
                continue
            xs = [c["summary"][xk]["mean"] for c in cs]
            ys = [c["summary"]["asr_reduction"]["mean"] for c in cs]
            ax.plot(xs, ys, "-o", color=color, label=label(m))
            if xk == "borderline_rise":      # the frontier's anchor: the base (lr 0)
                first = int(np.argmin(xs))
                ax.plot([0, xs[first]], [0, ys[first]], ":", color=color, lw=1)
            for c, x, y in zip(cs, xs, ys):
                iv = c.get("interval")
                if iv:
                    ax.errorbar(x, y, xerr=[[x - iv[xk]["low"]], [iv[xk]["high"] - x]],
                                yerr=[[y - iv["asr_reduction"]["low"]], [iv["asr_reduction"]["high"] - y]],
                                color=color, alpha=0.6, capsize=2)
                if c["role"] == "chosen":
                    ax.scatter([x], [y], s=120, facecolors="none", edgecolors=color)
        ax.scatter([0], [0], marker="s", color="black", s=50, label="base")
        refs = report.get("references", {})
        for name, marker in ((TEACHER, "*"), (ABLATION, "X"), (PLUGIN, "D")):
            r = refs.get(name)
            if r and xk in r:
                ax.scatter([r[xk]["estimate"]], [r["asr_reduction"]["estimate"]], marker=marker, s=110,
                           color="gray", label=label(name))
        if xk == "borderline_rise":
            for x0 in report.get("matched_rises", []):
                ax.axvline(float(x0), color="gray", ls=":", lw=1)
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"ASR reduction (points; judge {report['headline_judge']})")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Frontiers on the {report.get('phase')} splits: each dot a run, lines join each method's settings "
                 "by lr, bars 95% paired bootstrap intervals, rings the chosen settings", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def write_report(out: Path) -> str:
    """Build the report from DIR's finished rows; writes frontier.json, frontier.md and frontier.png; returns md."""
    spec = json.loads((out / "spec.json").read_text())
    report = build_report(out)
    atomic_write_json(out / "frontier.json", report, indent=1)
    text = markdown(report, spec)
    atomic_write_text(out / "frontier.md", text)
    if report.get("configs"):
        plot(report, out / "frontier.png")
    return text
