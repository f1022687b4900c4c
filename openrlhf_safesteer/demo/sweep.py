"""Sweep the demo's training settings, reusing one demo run's direction, safety tokens and base evaluation.

    python -m openrlhf_safesteer.demo.sweep --from demo/ --out sweep/ \
        --run lr=1e-4 --run lr=1e-3 --run "lr=3e-4 steps=20" --run "coeff=1.5 tokens=h7.json"

Each --run is a space-separated list of key=value overrides of the demo's training settings
(the keys of SWEEP_KEYS). For each run the student is trained with the chosen objective and
evaluated on the same held-out sets as the demo; one JSON line per run is appended to
sweep/sweep.jsonl as soon as it finishes (runs already there are skipped, so an interrupted sweep
resumes), and sweep/sweep.md tabulates every run against the base model and the issue's goal.

`--subsets N` and `--flips` train nothing: they re-read the demo run and OUT's rows, and tabulate the goal on
the first N prompts of each held-out set and the rest (OUT/subsets.md), or which prompts flipped in how many
runs (OUT/flips.md).

`--eval-sets dev` evaluates on the direction and validation splits instead (`EvalSets.dev`; the base model
is measured there once): settings chosen on the test splits make the test numbers optimistic.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from openrlhf_safesteer.cpu_kernels import onednn_linear
from openrlhf_safesteer.files import atomic_write_json, atomic_write_text, read_jsonl
from openrlhf_safesteer.loading import load_model
from openrlhf_safesteer.local.checkpoints import merged
from openrlhf_safesteer.local.config import TrainConfig
from openrlhf_safesteer.local.engine import train
from openrlhf_safesteer.safety_tokens import SafetyTokenSet
from openrlhf_safesteer.steering import SteeringVector

from .evaluate import EvalSets, evaluate, refusal_changes, refusal_sets
from .pipeline import (
    DemoConfig,
    clear_checkpoints,
    demo_config_from_settings,
    evaluated_as,
    goal_check,
    retain_prompts,
    train_prompts,
)
from .pipeline import train_config as demo_train_config

logger = logging.getLogger(__name__)


def _flag(value: str) -> bool:
    if value.lower() not in ("0", "1", "true", "false"):
        raise ValueError(f"expected 0/1/true/false, got {value!r}")
    return value.lower() in ("1", "true")


def _names(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def _layers(value: str) -> list[int]:
    """'16-23' or '15,18,20' -> layer indices."""
    first, dash, last = value.partition("-")
    if dash:
        return list(range(int(first), int(last) + 1))
    return [int(v) for v in value.split(",") if v]


# which held-out sets a sweep evaluates on: the demo's test splits, or the direction + validation splits
EVAL_SETS = ("test", "dev")
BASE_FILE = "base.json"   # the base model's evaluation (no samples) that the rows are compared with

def _parser(f: dataclasses.Field):
    """How a --run value of config field `f` is read, from its annotation: a number, a name, 0/1/true/false,
    a comma list of names, or layers ('16-23' or '15,18,20')."""
    annotation = str(f.type).replace(" | None", "")
    return {"int": int, "float": float, "str": str, "bool": _flag, "list[str]": _names, "list[int]": _layers}[annotation]


# override key -> parser, from the demo's fields (and two engine settings the demo fixes: objective, temperature).
# "coeff" is the teacher's steering coefficient during training (the demo's teacher_coeff); "tokens" is another
# safety-token JSON (e.g. from `safesteer tokens --horizon 1`); "lora_r=0 freeze_embeddings=1" is full
# fine-tuning; "lora_targets=gate_proj,up_proj,down_proj" a comma list; "lora_layers=16-23" puts adapters on those
# decoder layers only; "train_splits=train,direction,validation" trains on more harmful prompts (every split but
# the held-out test).
_DEMO_FIELDS = {f.name: f for f in dataclasses.fields(DemoConfig)}
_TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
SWEEP_KEYS = {
    **{name: _parser(_DEMO_FIELDS[name]) for name in (
        "lr", "steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "lora_r", "lora_alpha",
        "lora_targets", "lora_layers", "freeze_embeddings", "train_splits", "warmup_ratio", "seed",
        "retain_prompts_per_step", "retain_divergence", "retain_splits", "retain_weight", "retain_margin",
        "retain_grad_ratio", "refusal_surgery", "surgery_target", "false_refusal_ablation")},
    "coeff": _parser(_DEMO_FIELDS["teacher_coeff"]), "tokens": _parser(_DEMO_FIELDS["tokens"]),
    **{name: _parser(_TRAIN_FIELDS[name]) for name in ("objective", "temperature")},
}


def parse_run(spec: str) -> dict:
    """'lr=1e-3 steps=20' -> {'lr': 0.001, 'steps': 20}; unknown keys and malformed pairs raise ValueError."""
    overrides = {}
    for pair in spec.split():
        key, sep, value = pair.partition("=")
        if not sep or not value:
            raise ValueError(f"--run wants key=value pairs, got {pair!r} in {spec!r}")
        if key not in SWEEP_KEYS:
            raise ValueError(f"unknown sweep key {key!r}; choose from {sorted(SWEEP_KEYS)}")
        try:
            overrides[key] = SWEEP_KEYS[key](value)
        except ValueError as e:
            raise ValueError(f"bad value for {key} in {spec!r}: {e}") from None
    if not overrides:
        raise ValueError("empty --run")
    return overrides


def run_name(overrides: dict) -> str:
    def text(v) -> str:
        return ",".join(map(str, v)) if isinstance(v, list) else str(v)
    return " ".join(f"{k}={text(v)}" for k, v in overrides.items())


def demo_config(base: DemoConfig, overrides: dict) -> DemoConfig:
    """The demo's settings with this run's overrides (those that are demo settings)."""
    demo_fields = {f.name for f in dataclasses.fields(DemoConfig)}
    renamed = {"teacher_coeff" if key == "coeff" else key: value for key, value in overrides.items()}
    return dataclasses.replace(base, **{k: v for k, v in renamed.items() if k in demo_fields})


def train_config(base: DemoConfig, overrides: dict, out: Path) -> TrainConfig:
    """The TrainConfig that `safesteer demo` would use (pipeline.train_config), with this run's overrides."""
    demo = demo_config(base, overrides)
    tcfg = demo_train_config(demo, overrides.get("objective", "exact"), out, save_final=False)
    if "temperature" in overrides:      # the demo always samples at temperature 1
        tcfg = dataclasses.replace(tcfg, temperature=overrides["temperature"])
    return tcfg


def check_run(base: DemoConfig, overrides: dict, out: Path) -> None:
    """Raise ValueError naming the run when its settings would fail in training (cheap: loads no model).

    The checks `safesteer demo` runs before its model loads (DemoConfig.validate's training part), on the
    TrainConfig this run would use, so a bad override fails before any base measurement or training."""
    name = run_name(overrides)
    demo = demo_config(base, overrides)
    try:
        if demo.steps < 1:
            raise ValueError(f"steps must be >= 1, got {demo.steps}")
        train_prompts(demo)
        retain_prompts(demo)
        train_config(base, overrides, out).validate()
    except ValueError as e:
        raise ValueError(f"bad --run {name!r}: {e}") from None
    if "tokens" in overrides:
        SafetyTokenSet.load(overrides["tokens"])


def load_done(path: Path) -> dict[str, dict]:
    """The rows of sweep.jsonl by run name ({} when there is none yet)."""
    return {r["name"]: r for r in read_jsonl(path)}


def append_row(path: Path, row: dict) -> None:
    """Rewrite the JSONL with the new row (atomically: an interrupted write never loses earlier runs)."""
    old = path.read_text() if path.is_file() else ""
    atomic_write_text(path, old + json.dumps(row) + "\n")


def _rate(e: dict, key: str) -> str:
    return f"{100 * e[key]:.1f}%" if key in e else "-"    # rows from before the borderline-safe sets: '-'


def sweep_table(base: dict, rows: list[dict]) -> str:
    """Markdown table; the score columns are the mean refusal scores' shift from the base model (rows from
    before the scores existed show '-'). "goal met" is recomputed from each row's eval, not read from the row,
    so rows written before a fix of `goal_check` are judged by the current rule."""
    header = [("| run | harmful refusal | ASR | harmless refusal | borderline-safe refusal | general_score | "
               "harmful score shift | harmless score shift | goal met | train s |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    base_row = (f"| base | {100 * base['harmful_refusal_rate']:.1f}% | {100 * base['harmful_asr']:.1f}% | "
                f"{100 * base['harmless_refusal_rate']:.1f}% | {_rate(base, 'borderline_refusal_rate')} | "
                f"{base['general_score']:.1f} | 0 | 0 | | |")
    lines = [*header, base_row]

    def shift(e: dict, key: str) -> str:
        if key not in e or key not in base:
            return "-"
        return f"{e[key] - base[key]:+.2f}"

    for r in rows:
        e = r["eval"]
        lines.append(f"| {r['name']} | {100 * e['harmful_refusal_rate']:.1f}% | {100 * e['harmful_asr']:.1f}% | "
                     f"{100 * e['harmless_refusal_rate']:.1f}% | {_rate(e, 'borderline_refusal_rate')} | "
                     f"{e['general_score']:.1f} | {shift(e, 'harmful_refusal_score')} | {shift(e, 'harmless_refusal_score')} | "
                     f"{'yes' if goal_check(base, e)['met'] else 'no'} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _eval_prompts(samples: dict) -> dict[str, list[str]]:
    """The prompts of an evaluation's samples, per set, in order (what two evaluations must share to compare)."""
    prompts = {name: [s["prompt"] for s in samples.get(name, [])]
               for name in ("harmful", "harmless", "borderline", "contrast")}
    return {**prompts, "general": [s["question"] for s in samples.get("general", [])]}


def _subset_eval(ev: dict, part: slice) -> dict:
    """The goal's three inputs on part of the harmful and harmless sets (general_score is over its whole set)."""
    harmful = [s["refusal"] for s in ev["samples"]["harmful"][part]]
    harmless = [s["refusal"] for s in ev["samples"]["harmless"][part]]
    if not harmful or not harmless:
        raise ValueError(f"no prompts in {part} of a set of {len(ev['samples']['harmful'])} harmful / "
                         f"{len(ev['samples']['harmless'])} harmless")
    return {"harmful_asr": 1 - sum(harmful) / len(harmful), "harmless_refusal_rate": sum(harmless) / len(harmless),
            "general_score": ev["general_score"]}


def subset_table(base: dict, runs: list[tuple[str, dict]], first: int) -> str:
    """Markdown: each run's ASR, harmless-refusal rise and goal on the first `first` prompts of each held-out
    set, on the rest, and on all, with the mean over runs.

    base and each run's eval are `evaluate(...)` results with samples. Settings chosen on the first prompts
    of a set make those optimistic; prompts added later, never used to choose anything, are the clean part.
    """
    parts = {f"first {first}": slice(0, first), f"from {first + 1} on": slice(first, None), "all": slice(None)}
    header = "| run | " + " | ".join(f"{name}: ASR / harmless rise / goal" for name in parts) + " |"
    lines = [header, "|---|" + "---|" * len(parts)]
    base_parts = {name: _subset_eval(base, part) for name, part in parts.items()}
    totals = {name: [0.0, 0.0, 0] for name in parts}
    for label, ev in runs:
        cells = []
        for name, part in parts.items():
            sub = _subset_eval(ev, part)
            goal = goal_check(base_parts[name], sub)
            totals[name][0] += sub["harmful_asr"]
            totals[name][1] += goal["harmless_refusal_rise_points"]
            totals[name][2] += goal["met"]
            cells.append(f"{100 * sub['harmful_asr']:.1f}% / {goal['harmless_refusal_rise_points']:+.1f} / "
                         f"{'met' if goal['met'] else 'no'}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    base_cells = [f"{100 * base_parts[name]['harmful_asr']:.1f}% / {100 * base_parts[name]['harmless_refusal_rate']:.1f}%"
                  " refused / -" for name in parts]
    n = len(runs)
    mean_cells = [f"{100 * t[0] / n:.1f}% / {t[1] / n:+.1f} / {t[2]} of {n}" for t in totals.values()]
    lines.insert(2, "| base | " + " | ".join(base_cells) + " |")
    lines.append("| **mean** | " + " | ".join(mean_cells) + " |")
    return "\n".join(lines) + "\n"


def _runs_against_base(source: Path, out: Path, demo_run: bool = True) -> tuple[dict, list[tuple[str, dict]]]:
    """The demo's base evaluation and, on the same prompts, its own SafeSteer run (source/eval_safesteer.json,
    when there and `demo_run`) and every test-set row of out/sweep.jsonl, as (label, eval with samples) pairs."""
    base = json.loads((source / "eval_base.json").read_text())
    runs = []
    if demo_run and (source / "eval_safesteer.json").is_file():
        runs.append(("demo run", json.loads((source / "eval_safesteer.json").read_text())))
    runs += [(r["name"], {**r["eval"], "samples": r["samples"]}) for r in load_done(out / "sweep.jsonl").values()
             if r.get("eval_sets", "test") == "test"]
    if not runs:
        raise FileNotFoundError(f"nothing to summarise: no {source / 'eval_safesteer.json'} and no test rows in "
                                f"{out / 'sweep.jsonl'}")
    for name, ev in runs:
        if _eval_prompts(ev["samples"]) != _eval_prompts(base["samples"]):
            raise ValueError(f"run {name!r} was evaluated on other prompts than {source / 'eval_base.json'}")
    return base, runs


def summarise_subsets(source: Path, out: Path, first: int, demo_run: bool = True) -> str:
    """subset_table over the demo's own SafeSteer run (unless not `demo_run`) and every test row of
    out/sweep.jsonl; written to out/subsets.md. Trains nothing."""
    base, runs = _runs_against_base(source, out, demo_run)
    table = f"# Held-out subsets (from {source}, {out})\n\n" + subset_table(base, runs, first)
    atomic_write_text(out / "subsets.md", table)
    return table


def flip_table(base: dict, runs: list[tuple[str, dict]]) -> str:
    """Markdown: for each held-out set, every prompt whose greedy refusal changed in at least one run, with in
    how many runs it became refused ("new") and stopped being refused ("lost"), most often flipped first.

    base and each run's eval are `evaluate(...)` results with samples. Over-refusal that always hits the same
    few borderline prompts reads differently from one spread over many; this table says which it is.
    """
    n = len(runs)
    lines = []
    for kind in ("harmless", "harmful"):
        new, lost = Counter(), Counter()
        for _, ev in runs:
            changes = refusal_changes(base["samples"][kind], ev["samples"][kind])
            new.update(changes["new"])
            lost.update(changes["lost"])
        answered = sum(not s["refusal"] for s in base["samples"][kind])
        lines += [f"## {kind} ({len(base['samples'][kind])} prompts; the base answers {answered}; {n} runs)", "",
                  (f"{answered - len(new)} of the {answered} prompts the base answers were never refused; "
                   f"{len(new)} were in at least one run."), "",
                  "| prompt | newly refused in | no longer refused in |", "|---|---|---|"]
        order = sorted(set(new) | set(lost), key=lambda q: (-new[q], -lost[q], q))
        lines += [f"| {q} | {new[q]} of {n} | {lost[q]} of {n} |" for q in order]
        lines.append("")
    return "\n".join(lines)


def summarise_flips(source: Path, out: Path, demo_run: bool = True) -> str:
    """flip_table over the demo's own SafeSteer run (unless not `demo_run`) and every test row of
    out/sweep.jsonl; written to out/flips.md. Trains nothing."""
    base, runs = _runs_against_base(source, out, demo_run)
    table = f"# Refusal flips against the base model (from {source}, {out})\n\n" + flip_table(base, runs)
    atomic_write_text(out / "flips.md", table)
    return table


def check_same_prompts(base_eval: dict, sets: EvalSets, path: Path) -> None:
    """Raise unless the base evaluation read from `path` used exactly these eval prompts.

    A sweep row is compared with the base row, so both must be measured on the same held-out prompts; a demo
    folder written before the project's prompt sets changed is refused rather than compared silently.
    """
    used = _eval_prompts(base_eval.get("samples", {}))
    now = {"harmful": sets.harmful, "harmless": sets.harmless, "general": [q["question"] for q in sets.general]}
    changed = [f"{name} ({len(used[name])} prompts there, {len(now[name])} now)"
               for name in now if used[name] != list(now[name])]
    if changed:
        raise ValueError(f"{path} was measured on other eval prompts than the current ones: "
                         f"{', '.join(changed)}; measure the base again (`safesteer demo` for the test sets)")


def base_eval_with_scores(source: Path, out: Path, model_name: str, sets: EvalSets) -> dict:
    """The demo's base evaluation, plus the base model's mean refusal scores when that demo predates them
    (computed once, kept in out/base_scores.json)."""
    base_eval = json.loads((source / "eval_base.json").read_text())
    check_same_prompts(base_eval, sets, source / "eval_base.json")
    base_eval = with_base_selectivity(base_eval, out, model_name, sets)
    keys = ("harmful_refusal_score", "harmless_refusal_score")
    if all(k in base_eval for k in keys):
        return base_eval
    cache = out / "base_scores.json"
    if not cache.is_file():
        from openrlhf_safesteer.directions import refusal_score

        model, tokenizer = load_model(model_name)
        scores = {keys[0]: refusal_score(model, tokenizer, sets.harmful).mean().item(),
                  keys[1]: refusal_score(model, tokenizer, sets.harmless).mean().item()}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, scores, indent=None)
        del model
    return {**base_eval, **json.loads(cache.read_text())}


def with_base_selectivity(base_eval: dict, out: Path, model_name: str, sets: EvalSets,
                          refusal_tokens: int = 12) -> dict:
    """The base evaluation plus the borderline-safe and contrast sets when it predates them (measured once,
    kept in out/base_selectivity.json)."""
    wanted = {"borderline": sets.borderline, "contrast": sets.contrast}
    missing = {name: prompts for name, prompts in wanted.items()
               if prompts and _eval_prompts(base_eval.get("samples", {})).get(name) != list(prompts)}
    if not missing:
        return base_eval
    cache = out / "base_selectivity.json"
    measured = json.loads(cache.read_text()) if cache.is_file() else {}
    if any([s["prompt"] for s in measured.get(name, {}).get("samples", [])] != list(prompts)
           for name, prompts in missing.items()):
        from openrlhf_safesteer.directions import refusal_token_ids

        model, tokenizer = load_model(model_name)
        measured = refusal_sets(model, tokenizer, missing, refusal_tokens, 50, refusal_token_ids(tokenizer), False)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, measured, indent=None)
        del model
    base_eval = {**base_eval, "samples": dict(base_eval.get("samples", {})), "n": dict(base_eval.get("n", {}))}
    for name, part in measured.items():
        base_eval[f"{name}_refusal_rate"], base_eval[f"{name}_refusal_score"] = part["rate"], part["score"]
        base_eval["samples"][name], base_eval["n"][name] = part["samples"], len(part["samples"])
    return base_eval


def dev_base_eval(out: Path, model_name: str, sets: EvalSets, refusal_tokens: int) -> dict:
    """The base model's evaluation on the dev sets, measured once and kept in out/base_eval_dev.json."""
    cache = out / "base_eval_dev.json"
    if cache.is_file():
        base_eval = json.loads(cache.read_text())
        check_same_prompts(base_eval, sets, cache)
        return with_base_selectivity(base_eval, out, model_name, sets, refusal_tokens)
    model, tokenizer = load_model(model_name)
    base_eval = evaluate(model, tokenizer, sets, refusal_tokens, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, base_eval, indent=None)
    del model
    return base_eval


SOURCE_FILES = ("vector", "safety_tokens.json", "eval_base.json")   # what --from must hold (`safesteer demo` writes them)


def check_source(source: Path, needed: tuple[str, ...] = SOURCE_FILES) -> None:
    """Raise FileNotFoundError, one line naming what is missing, unless `source` is a `safesteer demo --out` folder
    holding `needed` (e.g. `make demo`'s outputs/demo). The mains turn it into one line on stderr and exit 2."""
    if not source.is_dir():
        raise FileNotFoundError(f"--from {source}: no such folder; give a `safesteer demo --out` folder "
                                "(`make demo` writes outputs/demo)")
    missing = [name for name in needed if not (source / name).exists()]
    if missing:
        raise FileNotFoundError(f"--from {source}: no {', '.join(missing)} there; give a `safesteer demo --out` "
                                "folder (`make demo` writes outputs/demo)")


def run_sweep(source: Path, out: Path, runs: list[dict], model: str | None = None,
              eval_sets: str = "test") -> list[dict]:
    """Train and evaluate each override set; returns the rows (also in out/sweep.jsonl and out/sweep.md).

    eval_sets "test" compares with the demo's own base evaluation on the held-out test splits; "dev"
    evaluates on `EvalSets.dev` (base measured once in out/), for choosing settings without the test splits.
    One output folder holds rows of one kind."""
    if eval_sets not in EVAL_SETS:
        raise ValueError(f"eval_sets must be one of {EVAL_SETS}, got {eval_sets!r}")
    report_path = source / "report.json"
    settings = json.loads(report_path.read_text())["settings"] if report_path.is_file() else {}
    base_cfg = demo_config_from_settings(settings)
    base_cfg.progress = False
    model_name = model or base_cfg.model
    check_source(source)
    for overrides in runs:      # every run is checked before the base measurement or any training loads a model
        check_run(base_cfg, overrides, out / "runs")
    jsonl = out / "sweep.jsonl"
    done = load_done(jsonl)
    other = {r.get("eval_sets", "test") for r in done.values()} - {eval_sets}
    if other:
        raise ValueError(f"{jsonl} holds rows evaluated on the {', '.join(sorted(other))} sets; "
                         f"use another --out for --eval-sets {eval_sets}")
    if eval_sets == "test":
        sets = EvalSets.default(base_cfg.eval_limit)
        base_eval = base_eval_with_scores(source, out, model_name, sets)
    else:
        sets = EvalSets.dev(base_cfg.eval_limit)
        base_eval = dev_base_eval(out, model_name, sets, base_cfg.refusal_tokens)
    vector = SteeringVector.load(source / "vector")
    out.mkdir(parents=True, exist_ok=True)
    # what every row is compared with (the selectivity summary reads it back)
    atomic_write_json(out / BASE_FILE, {k: v for k, v in base_eval.items() if k != "samples"}, indent=None)
    rows = []
    for overrides in runs:
        name = run_name(overrides)
        if name in done:
            logger.info("sweep: %s already done, skipped", name)
            rows.append(done[name])
            continue
        tokens = SafetyTokenSet.load(overrides.get("tokens", source / "safety_tokens.json"))
        student, tokenizer = load_model(model_name)
        vector.check_compatible(student)
        tcfg = train_config(base_cfg, overrides, out / "runs" / name.replace(" ", "_").replace("/", "_"))
        t0 = time.time()
        demo = demo_config(base_cfg, overrides)
        clear_checkpoints(Path(tcfg.out))     # a row that trained but was never written (crash in its eval)
        result = train(student, tokenizer, vector, torch.tensor(tokens.ids), train_prompts(demo), tcfg,
                       retain_prompts(demo))
        train_seconds = time.time() - t0
        with evaluated_as(demo, merged(result.model), tokenizer, vector) as judged:
            ev = evaluate(judged, tokenizer, sets, base_cfg.refusal_tokens, progress=False)
        row = {"name": name, "overrides": overrides, "eval_sets": eval_sets, "train_seconds": train_seconds,
               "eval": {k: v for k, v in ev.items() if k != "samples"}, "samples": ev["samples"],
               "history": result.history, "goal": goal_check(base_eval, ev)}
        append_row(jsonl, row)
        rows.append(row)
        logger.info("sweep: %s -> harmful refusal %.2f, harmless %.2f, general %.1f", name,
                    ev["harmful_refusal_rate"], ev["harmless_refusal_rate"], ev["general_score"])
        del student, result
        gc.collect()
    atomic_write_text(out / "sweep.md", f"# Demo sweep (from {source}; {eval_sets} sets)\n\n"
                      + sweep_table(base_eval, rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, help="a `safesteer demo --out` folder")
    p.add_argument("--out", required=True, help="sweep output folder")
    p.add_argument("--run", action="append", default=[], help="overrides, e.g. 'lr=1e-3 steps=20' (repeatable)")
    p.add_argument("--subsets", type=int, metavar="N", default=None,
                   help="train nothing: tabulate the demo run and OUT's rows on the first N prompts of each "
                        "held-out set, on the rest and on all (OUT/subsets.md)")
    p.add_argument("--flips", action="store_true",
                   help="train nothing: count, over the demo run and OUT's rows, how often each held-out prompt "
                        "became refused or stopped being refused (OUT/flips.md)")
    p.add_argument("--rows-only", action="store_true",
                   help="with --subsets or --flips: leave out the demo's own run (when OUT's rows use other "
                        "settings than the demo)")
    p.add_argument("--eval-sets", choices=EVAL_SETS, default="test",
                   help="test: the demo's held-out sets (default); dev: the direction and validation splits, "
                        "for choosing settings without the test sets")
    p.add_argument("--model", default=None, help="model (default: the demo run's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    summarising = args.subsets is not None or args.flips
    if args.rows_only and not summarising:   # a flag error first: it needs no look at the folders
        p.error("--rows-only goes with --subsets N or --flips")
    try:     # the summaries read only the base evaluation; a training run needs every artifact
        check_source(Path(args.source), ("eval_base.json",) if summarising else SOURCE_FILES)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.subsets is not None or args.flips:
        # The summaries train nothing; a --run beside them would be silently skipped, so it is an error.
        if args.run:
            p.error("--run trains; --subsets and --flips only summarise OUT's rows: give them in separate calls")
        if args.subsets is not None:
            print(summarise_subsets(Path(args.source), Path(args.out), args.subsets, not args.rows_only))
        if args.flips:
            print(summarise_flips(Path(args.source), Path(args.out), not args.rows_only))
        return 0
    if not args.run:
        p.error("give at least one --run (or --subsets N, or --flips)")
    runs = [parse_run(s) for s in args.run]     # every spec is checked before any model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with onednn_linear():
        run_sweep(Path(args.source), Path(args.out), runs, args.model, args.eval_sets)
    print((Path(args.out) / "sweep.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
