"""The frontier grid end to end on a tiny model (issue 25, item 8): 2 methods (SafeSteer's local engine and OpenRLHF's
own train_sft) x 2 settings x 2 seeds, one optimizer step each, in both phases: dev grid -> the written selection
rule -> test frontier -> report; then a rerun that trains nothing, an interrupted run that resumes, `--summarise`.
The report's figures are recomputed here from the rows' per-prompt verdicts, and the verdicts from the stored
replies. Every training run is a real subprocess (`safesteer train`, `plugin.stock sft` with DeepSpeed)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from openrlhf_safesteer.compare import frontier as fr
from openrlhf_safesteer.compare import frontier_stats as fs
from openrlhf_safesteer.compare.evaluation import JUDGES

REPO = Path(__file__).resolve().parents[2]


def tiny_grid(model: str) -> dict:
    return {"model": model,
            "training": {"steps": 1, "prompts_per_step": 2, "max_new_tokens": 6, "warmup_ratio": 0.0,
                         "micro_batch_size": 2},
            "methods": {"safesteer": {"arm": "safesteer_local", "lr": [1e-3, 4e-3]},
                        "sft": {"arm": "sft", "lr": [1e-3, 4e-3]}},
            "dev_seeds": [1, 2], "test_seeds": [3, 4], "test_lr_factors": [1.0, 2.0],
            "references": {"teacher": True, "ablation": False, "plugin": False}, "eval_limit": 2,
            # a random tiny model never refuses and seldom ends its turn: no pair filter, longer replies, more tries
            "pair_max_new_tokens": 48, "pair_attempts": 6, "pair_filter": "none", "bootstrap_replicates": 200,
            "protocol_check": False}


def rate(row: dict, name: str, judge: str) -> float:
    bits = row["verdicts"][name][judge]
    return bits.count("1") / len(bits)


@pytest.mark.slow
def test_frontier_grid_end_to_end_on_a_tiny_model(tiny_demo, tmp_path, capsys, warm_python, monkeypatch):
    # every run's `python` is a fork of the warm interpreter (tests/conftest.py), which registers with the run's
    # memory measurement; peak_rss_mb below is the run's own
    monkeypatch.setenv("PYTHON", warm_python)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(tiny_grid(tiny_demo["model"])))
    out = tmp_path / "frontier"
    argv = ["--out", str(out), "--spec", str(grid), "--from", tiny_demo["demo"]]
    assert fr.main(argv) == 0
    rows = fr.load_rows(out)
    spec = json.loads((out / "spec.json").read_text())
    assert len(rows) == 2 + 8 + 2 + 8                 # base + teacher and 8 runs, per phase

    # the selection is the written rule applied to the dev rows (recomputed here from the verdicts)
    selection = json.loads((out / "selection.json").read_text())
    judge = spec["selection"]["judge"]
    dev_base = rows["dev|base|-|seed=None"]
    for method in ("safesteer", "sft"):
        entries = []
        for lr in (1e-3, 4e-3):
            runs = [rows[f"dev|{method}|lr={lr!r}|seed={s}"] for s in (1, 2)]
            entries.append({"config": {"lr": lr},
                            "asr_reduction": sum(100 * (rate(r, "harmful", judge) - rate(dev_base, "harmful", judge))
                                                 for r in runs) / 2,
                            "borderline_rise": sum(100 * (rate(r, "borderline", judge)
                                                          - rate(dev_base, "borderline", judge)) for r in runs) / 2})
        assert selection["methods"][method]["chosen"] == fs.select_config(entries)["config"]
        chosen_lr = selection["methods"][method]["chosen"]["lr"]
        test_lrs = sorted(r["config"]["lr"] for r in rows.values() if r["phase"] == "test" and r["method"] == method
                          and r["seed"] == 3)
        assert test_lrs == pytest.approx([chosen_lr, 2 * chosen_lr])

    # every row: four judges' verdicts on every prompt, equal to the judges applied to the stored replies
    sizes = {name: len(p) for name, p in json.loads((out / "eval_sets_test.json").read_text())["prompts"].items()}
    for row in rows.values():
        for name in ("harmful", "harmless", "borderline", "contrast"):
            assert set(row["verdicts"][name]) == set(JUDGES)
            assert {len(b) for b in row["verdicts"][name].values()} == {sizes[name]}
        if row["arm"] is not None:
            assert row["train_seconds"] > 0 and row["peak_rss_mb"] > 100 and row["changed_lora_b"] in (None, 14)
    sft_row = rows["test|sft|lr=" + repr(selection["methods"]["sft"]["chosen"]["lr"]) + "|seed=3"]
    assert sft_row["changed_lora_b"] > 0 and sft_row["data"]["sft_rows_trained"] == 2      # the adapter trained
    stored = json.loads((out / "runs" / "test" / "sft" / sft_row["config_id"].replace("=", "") / "seed3"
                         / "eval.json").read_text())
    for name in ("harmful", "borderline"):
        for j, fn in JUDGES.items():
            assert sft_row["verdicts"][name][j] == fs.encode_bits(fn(s["reply"]) for s in stored["samples"][name])
    # replies are judged at 64 tokens: the stored replies are longer than the old 12-token cut
    assert max(len(s["reply"]) for s in stored["samples"]["harmful"]) > 60

    # the report's cells and matched values, recomputed from the rows
    report = json.loads((out / "frontier.json").read_text())
    headline = spec["headline_judge"]
    base = rows["test|base|-|seed=None"]
    points = {}
    for cell in report["configs"]:
        runs = [rows[f"test|{cell['method']}|{cell['config_id']}|seed={s}"] for s in (3, 4)]
        asr = [100 * (rate(r, "harmful", headline) - rate(base, "harmful", headline)) for r in runs]
        border = [100 * (rate(r, "borderline", headline) - rate(base, "borderline", headline)) for r in runs]
        assert cell["summary"]["asr_reduction"]["mean"] == pytest.approx(sum(asr) / 2)
        assert cell["summary"]["borderline_rise"]["n"] == 2
        points.setdefault(cell["method"], []).append((sum(border) / 2, sum(asr) / 2))
    for method, pts in points.items():
        for x0 in (3.0, 10.0):
            want = fs.frontier_value([p[0] for p in pts], [p[1] for p in pts], x0)
            got = report["matched"][headline]["values"][str(x0)][method]["estimate"]
            assert (math.isnan(want) and (got is None or math.isnan(got))) or got == pytest.approx(want)
    text = (out / "frontier.md").read_text()
    assert "ASR reduction at matched over-refusal" in text and "Selection on the dev splits" in text
    assert (out / "frontier.png").stat().st_size > 10_000

    # a rerun trains nothing; an interrupted run (its row never written) is trained again, alone
    before = (out / "runs.jsonl").read_text()
    capsys.readouterr()
    assert fr.main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["trained_now"] == 0
    assert (out / "runs.jsonl").read_text() == before
    lines = before.splitlines()
    (out / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert fr.main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["trained_now"] == 1
    assert len(fr.load_rows(out)) == len(lines)

    # --summarise through the recipe; another grid in the same folder is refused
    proc = subprocess.run(["bash", str(REPO / "recipes" / "compare_cpu.sh"), "--frontier", "--out", str(out),
                           "--summarise"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHON": warm_python,
                               "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "# SafeSteer, DPO, PPO and SFT on their frontiers" in proc.stdout
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**tiny_grid(tiny_demo["model"]), "test_seeds": [3, 4, 5]}))
    assert fr.main(["--out", str(out), "--spec", str(other)]) == 2
    assert "holds another grid" in capsys.readouterr().err
