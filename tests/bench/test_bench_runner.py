"""The benchmark runner's bookkeeping: ratio 5 from a demo report, subset reruns merged into results.json."""

import json

import pytest

from benchmarks.common import alternating_medians
from benchmarks.run import main


def _report(tmp_path, timings):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"timings_seconds": timings}))
    return path


def test_ratio_5_is_direction_plus_tokens_over_the_whole_demo_and_update_keeps_other_rows(tmp_path, capsys):
    report = _report(tmp_path, {"load model": 40.0, "direction": 120.0, "teacher check": 10.0,
                                "safety tokens": 30.0, "train safesteer": 600.0, "total": 1000.0})
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"ratios": [{"number": 1, "name": "steered", "model": "tiny", "candidate": 1.0,
                                           "baseline": 1.0, "unit": "ms", "goal": "", "note": "", "seconds": 0.0,
                                           "value": 1.0}], "runs": [{"command": "earlier"}]}))
    assert main(["--models", "demo", "--only", "5", "--demo-report", str(report), "--out", str(out), "--update"]) == 0
    saved = json.loads(out.read_text())
    rows = {(r["number"], r["model"]): r for r in saved["ratios"]}
    assert rows[(5, "demo")]["value"] == pytest.approx(0.15)
    assert (1, "tiny") in rows  # kept from the earlier run
    assert saved["runs"][0]["command"] == "earlier" and len(saved["runs"]) == 2
    assert "| 5 | direction + safety tokens / whole demo | demo |" in capsys.readouterr().out


def test_missing_demo_report_is_recorded_as_skipped_not_invented(tmp_path):
    out = tmp_path / "results.json"
    assert main(["--models", "demo", "--only", "5", "--demo-report", str(tmp_path / "none.json"),
                 "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["ratios"]
    assert row["note"].startswith("skipped") and row["value"] != row["value"]  # NaN


def test_alternating_medians_runs_sides_in_turn():
    calls = []
    medians = alternating_medians([lambda: calls.append("a"), lambda: calls.append("b")], repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and len(medians) == 2


def test_llama_1b_is_refused_on_cpu(tmp_path):
    with pytest.raises(SystemExit):
        main(["--models", "llama-1b", "--device", "cpu", "--out", str(tmp_path / "r.json")])
