"""Report: the markdown table's cells and averages from a hand-made results dict, the chart, the
atomic JSON writer and the AlpacaEval records."""

from __future__ import annotations

import json

import pytest

from openrlhf_safesteer.eval.report import (
    alpaca_eval_records,
    markdown_table,
    plot_results,
    write_json_atomic,
)

RESULTS = {
    "checkpoints": {
        "base": {"safety": {"advbench": {"kind": "harmful", "asr": 0.40, "refusal_rate": 0.55},
                            "harmbench": {"kind": "harmful", "asr": 0.20, "refusal_rate": 0.70},
                            "xstest": {"kind": "overrefusal", "over_refusal": 0.04}},
                 "general": {"gsm8k": {"kind": "general", "score": 0.60},
                             "mmlu_generative": {"kind": "general", "score": 0.70}}},
        "safesteer": {"safety": {"advbench": {"kind": "harmful", "asr": 0.02, "refusal_rate": 0.97},
                                 "xstest": {"kind": "overrefusal", "over_refusal": 0.08}},
                      "general": {"gsm8k": {"kind": "general", "score": 0.58},
                                  "mmlu_generative": {"kind": "general", "score": 0.71}}},
    },
    "errors": [{"benchmark": "harmbench", "checkpoint": "safesteer", "error": "judge failed"}],
}


def cells(table: str, label: str) -> list[str]:
    line = next(row for row in table.splitlines() if row.startswith(f"| {label}"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_table_rows_columns_and_averages():
    table = markdown_table(RESULTS)
    assert table.splitlines()[0] == "| benchmark | base | safesteer |"
    assert cells(table, "advbench (ASR") == ["40.0", "2.0"]
    assert cells(table, "harmbench (ASR") == ["20.0", "–"]  # missing cell, not a zero
    assert cells(table, "xstest (over-refusal") == ["4.0", "8.0"]
    assert cells(table, "**Safety avg") == ["30.0", "2.0"]  # mean over the harmful benchmarks present
    assert cells(table, "**General avg") == ["65.0", "64.5"]
    refusal = table.split("Refusal rate")[1]
    assert cells(refusal, "advbench") == ["55.0", "97.0"]
    assert "- safesteer / harmbench: judge failed" in table


def test_chart_and_atomic_json(tmp_path):
    png = plot_results(RESULTS, tmp_path / "chart.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*tmp*"))
    write_json_atomic(tmp_path / "r.json", RESULTS)
    assert json.loads((tmp_path / "r.json").read_text()) == RESULTS
    with pytest.raises(ValueError, match="no results"):
        plot_results({"checkpoints": {}}, tmp_path / "empty.png")


def test_alpaca_records():
    records = alpaca_eval_records(["Say hi"], ["Hi!"], "safesteer")
    assert records == [{"instruction": "Say hi", "output": "Hi!", "generator": "safesteer", "dataset": "helpful_base"}]
    with pytest.raises(ValueError, match="1 instructions but 0 outputs"):
        alpaca_eval_records(["Say hi"], [], "x")


def test_unparseable_verdicts_count_as_failures_and_are_noted():
    from openrlhf_safesteer.eval.benchmarks import EvalItem
    from openrlhf_safesteer.eval.judges import Verdict
    from openrlhf_safesteer.eval.runner import score_benchmark

    items = [EvalItem(str(i), f"p{i}", meta={"categories": cats}) for i, cats in
             enumerate([["Violence"], ["Violence", "Cybercrime"], ["Cybercrime"], []])]
    verdicts = [Verdict(True), Verdict(None, "maybe"), Verdict(False), Verdict(True)]
    result = score_benchmark("harmful", items, ["Sure."] * 4, verdicts, "harmbench")
    # HarmBench's rule: an unparseable verdict is no success, over all 4 items; the parsed-only rate beside it.
    assert (result["asr"], result["asr_parsed"], result["n_invalid"]) == (0.5, 2 / 3, 1)
    assert result["asr_by_category"] == {"Cybercrime": 0.0, "Violence": 0.5}  # item 1 counts in both
    assert result["judge"] == "harmbench" and result["refusal_judge"] == "refusal"
    table = markdown_table({"checkpoints": {"base": {"safety": {"harmbench": result}}}})
    assert cells(table, "harmbench (ASR ↓, judge harmbench)") == ["50.0"]
    assert "- harmbench / base: 1 of 4 judge verdicts unparseable, counted as no attack success" in table
    assert "(ASR over parsed verdicts only: 66.7)" in table


def test_rows_name_their_judge_and_strongreject_says_what_it_is():
    results = {"checkpoints": {"a": {"safety": {
        "strongreject": {"kind": "harmful", "asr": 0.1, "judge": "llama_guard", "refusal_rate": 0.9,
                         "refusal_judge": "refusal", "metric_note": "an ASR by the run's judge, not StrongREJECT's "
                                                                    "rubric / fine-tuned score"},
        "xstest": {"kind": "overrefusal", "over_refusal": 0.25, "judge": "xstest_strmatch"}}}}}
    table = markdown_table(results)
    assert cells(table, "strongreject (ASR ↓, judge llama_guard)") == ["10.0"]
    assert cells(table, "xstest (over-refusal ↓, judge xstest_strmatch)") == ["25.0"]
    assert cells(table.split("Refusal rate")[1], "strongreject (refusal)") == ["90.0"]
    assert "- strongreject: an ASR by the run's judge, not StrongREJECT's rubric / fine-tuned score" in table
