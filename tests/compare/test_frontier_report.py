"""The frontier grid's bookkeeping and report (compare/frontier.py, compare/frontier_report.py) on planted rows: the
written selection rule picks the planted setting, the test grid follows it, and the report's cells, matched-frontier
values and intervals equal an independent computation from the same verdicts. No model is loaded."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from openrlhf_safesteer.compare import frontier as fr
from openrlhf_safesteer.compare import frontier_stats as fs
from openrlhf_safesteer.compare.evaluation import JUDGES
from openrlhf_safesteer.compare.frontier_report import write_report

SIZES = {"harmful": 40, "harmless": 20, "borderline": 30, "contrast": 10, "general": 20}
BASE_K = {"harmful": 10, "harmless": 2, "borderline": 3, "contrast": 5, "general": 15}


def planted_spec() -> dict:
    return fr.load_spec(None, {
        "model": "tiny", "methods": {"safesteer": {"arm": "safesteer_local", "lr": [1e-5, 4e-5]},
                                     "dpo": {"arm": "dpo", "lr": [1e-5, 4e-5]}},
        "dev_seeds": [10, 11], "test_seeds": [0, 1, 2], "test_lr_factors": [0.5, 1.0, 2.0],
        "references": {"teacher": True, "ablation": False, "plugin": False},
        "bootstrap_replicates": 300, "protocol_check": False})


def bits(k: int, n: int, seed: int) -> str:
    flags = np.zeros(n, int)
    flags[np.random.default_rng(seed).permutation(n)[:k]] = 1
    return fs.encode_bits(flags)


def planted_row(run: fr.Run, ks: dict[str, int], salt: int, xstest_extra: int = 0) -> dict:
    """Every judge agrees except xstest_strmatch, which sees `xstest_extra` more harmful refusals."""
    verdicts = {}
    for offset, name in enumerate(("harmful", "harmless", "borderline", "contrast")):
        same = bits(ks[name], SIZES[name], salt + 11 * offset)
        verdicts[name] = {j: same for j in JUDGES}
        if name == "harmful" and xstest_extra:
            verdicts[name]["xstest_strmatch"] = bits(ks[name] + xstest_extra, SIZES[name], salt + 7)
    judged = {"verdicts": verdicts, "general": bits(ks["general"], SIZES["general"], salt + 3),
              "empty": dict.fromkeys(verdicts, 0), "scores": dict.fromkeys(verdicts, 0.0), "seconds": 1.0}
    extra = {} if run.arm is None else {"train_seconds": 60.0, "peak_rss_mb": 2048, "data_seconds": 0.0,
                                        "sequences": 80, "changed_lora_b": 4, "wall_seconds": 61.0,
                                        # test seed 2 trained on 2 threads, the rest on 1
                                        "threads": {"evaluation": 1, "training": 2 if run.seed == 2 else 1}}
    return fr.row_from(run, judged, "digest", **extra)


def dev_ks(method: str, lr: float, seed: int) -> dict[str, int]:
    # safesteer: the larger lr refuses more harmful but raises borderline by 10 of 30 (33 points): not selectable
    # dpo: both settings stay within +5 borderline points; the larger lr removes more attack successes
    up = 1 if lr > 2e-5 else 0
    if method == "safesteer":
        return {**BASE_K, "harmful": 16 + 10 * up + seed % 2, "borderline": 3 + 10 * up}
    return {**BASE_K, "harmful": 12 + 6 * up, "borderline": 4}


def planted_test_ks(method: str, lr: float, seed: int) -> dict[str, int]:
    s = [0.5e-5, 1e-5, 2e-5].index(lr) if method == "safesteer" else [2e-5, 4e-5, 8e-5].index(lr)
    if method == "safesteer":
        return {**BASE_K, "harmful": 14 + 6 * s + seed, "borderline": 3 + 1 + 2 * s, "general": 15 - s}
    return {**BASE_K, "harmful": 12 + 8 * s + seed, "borderline": 3 + 3 * s + seed % 2, "general": 15}


@pytest.fixture
def grid(tmp_path):
    spec = planted_spec()
    fr.validate_spec(spec)
    out = tmp_path / "grid"
    fr.prepare_out(spec, out)
    for phase in ("dev",):
        for i, run in enumerate(fr.reference_runs(spec, phase)):
            fr.append_row(out, planted_row(run, {**BASE_K, "harmful": BASE_K["harmful"] + 12 * i}, 100 + i))
    for i, run in enumerate(fr.dev_runs(spec)):
        fr.append_row(out, planted_row(run, dev_ks(run.method, run.config["lr"], run.seed), 1000 + i))
    return spec, out


def test_selection_follows_the_written_rule_and_the_test_grid_follows_the_selection(grid):
    spec, out = grid
    stored = json.loads((out / "spec.json").read_text())
    assert "largest mean dev ASR reduction" in stored["selection_rule"] and "+5 points" in stored["selection_rule"]
    selection = fr.write_selection(spec, out, fr.load_rows(out))
    assert selection["methods"]["safesteer"]["chosen"] == {"lr": 1e-5}       # 4e-5 over-refuses (+33 points)
    assert selection["methods"]["dpo"]["chosen"] == {"lr": 4e-5}
    assert all(m["within_bound"] for m in selection["methods"].values())
    runs = fr.test_runs(spec, selection)
    lrs = sorted({r.config["lr"] for r in runs if r.method == "safesteer"})
    assert lrs == pytest.approx([0.5e-5, 1e-5, 2e-5]) and {r.seed for r in runs} == {0, 1, 2}
    assert {r.role for r in runs if r.config["lr"] == 1e-5 and r.method == "safesteer"} == {"chosen"}
    assert len(runs) == 2 * 3 * 3
    # written once: a later dev change does not move it
    assert fr.write_selection(spec, out, {})["methods"]["dpo"]["chosen"] == {"lr": 4e-5}


def test_report_cells_and_matched_frontier_equal_an_independent_computation(grid):
    spec, out = grid
    selection = fr.write_selection(spec, out, fr.load_rows(out))
    for i, run in enumerate(fr.reference_runs(spec, "test")):
        fr.append_row(out, planted_row(run, {**BASE_K, "harmful": BASE_K["harmful"] + 12 * i}, 200 + i))
    rows = {}
    for i, run in enumerate(fr.test_runs(spec, selection)):
        row = planted_row(run, planted_test_ks(run.method, run.config["lr"], run.seed), 5000 + i,
                          xstest_extra=3 if run.method == "dpo" else 0)
        fr.append_row(out, row)
        rows[run.key] = row
    text = write_report(out)
    assert text.count("trained on 1 or 2 threads (minutes mix them)") == 2        # safesteer's and dpo's rows
    report = json.loads((out / "frontier.json").read_text())
    assert report["phase"] == "test" and report["common_seeds"] == [0, 1, 2]
    assert (out / "frontier.png").stat().st_size > 10_000

    judge = "xstest_strmatch"
    base = next(r for r in fr.load_rows(out).values() if r["phase"] == "test" and r["method"] == "base")

    def rate(row, name):
        return sum(c == "1" for c in row["verdicts"][name][judge]) / len(row["verdicts"][name][judge])

    points = {}
    for method in ("safesteer", "dpo"):
        pts = []
        for cfg in sorted({r.config["lr"] for r in fr.test_runs(spec, selection) if r.method == method}):
            runs = [rows[fr.Run("test", method, spec["methods"][method]["arm"], {"lr": cfg}, s, "").key]
                    for s in (0, 1, 2)]
            asr = [100 * (rate(r, "harmful") - rate(base, "harmful")) for r in runs]
            border = [100 * (rate(r, "borderline") - rate(base, "borderline")) for r in runs]
            cell = next(c for c in report["configs"] if c["method"] == method and c["config"]["lr"] == cfg)
            assert cell["summary"]["asr_reduction"]["mean"] == pytest.approx(sum(asr) / 3)
            sd = math.sqrt(sum((a - sum(asr) / 3) ** 2 for a in asr) / 2)
            assert cell["summary"]["asr_reduction"]["sd"] == pytest.approx(sd)
            assert f"{sum(asr) / 3:+.1f} ± {sd:.1f} (3)" in text
            pts.append((sum(border) / 3, sum(asr) / 3))
        points[method] = pts

    def by_hand(pts, x0):
        """Through the anchored points sorted by x, points at equal x averaged (the report's rule)."""
        by_x = {}
        for x, y in pts + [(0.0, 0.0)]:
            by_x.setdefault(round(x, 9), []).append(y)
        pts = sorted((x, sum(v) / len(v)) for x, v in by_x.items())
        if len(pts) == 1 and pts[0][0] == x0:
            return pts[0][1]
        for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
            if xa <= x0 <= xb:
                return ya + (x0 - xa) / (xb - xa) * (yb - ya)
        return None

    matched = report["matched"][judge]
    for x0 in (3.0, 10.0):
        for method in ("safesteer", "dpo"):
            want = by_hand(points[method], x0)
            got = matched["values"][str(x0)][method]["estimate"]
            assert (want is None and (got is None or math.isnan(got))) or got == pytest.approx(want)
    # the interval of safesteer's value at +3: the same draws, recomputed with plain loops
    draws = fs.draw_resamples(3, SIZES, 300, seed=0)
    configs = sorted({r.config["lr"] for r in fr.test_runs(spec, selection) if r.method == "safesteer"})
    reps = []
    for b in range(draws.size):
        pts = []
        for cfg in configs:
            runs = [rows[fr.Run("test", "safesteer", "safesteer_local", {"lr": cfg}, s, "").key] for s in (0, 1, 2)]
            sub = {}
            for name in ("harmful", "borderline"):
                idx = draws.prompts[name][b]
                base_r = sum(base["verdicts"][name][judge][i] == "1" for i in idx) / len(idx)
                per = [sum(runs[s]["verdicts"][name][judge][i] == "1" for i in idx) / len(idx)
                       for s in draws.seeds[b]]
                sub[name] = 100 * (sum(per) / len(per) - base_r)
            pts.append((sub["borderline"], sub["harmful"]))
        v = by_hand(pts, 3.0)
        reps.append(math.nan if v is None else v)
    defined = sorted(v for v in reps if not math.isnan(v))
    low = np.percentile(defined, 2.5)
    assert matched["values"]["3.0"]["safesteer"]["low"] == pytest.approx(low)
    # the reward judge is named; by the refusal judge dpo refuses 3 fewer harmful prompts than by xstest's
    assert report["reward_judge"] == "refusal" and "(reward)" in text
    chosen_dpo = report["by_judge"]["dpo at lr=4e-05"]["harmful"]
    assert chosen_dpo["xstest_strmatch"] - chosen_dpo["refusal"] == pytest.approx(100 * 3 / 40)
    assert report["judge_agreement"]["harmful"]["pairs"]["refusal|arditi"]["agreement"] == 1.0
    assert report["general"]["questions"] == 20 and report["general"]["sees_two_points"] is False
    assert "a 2-point loss is not visible" in text
    assert "only 3 test seeds" in text
    assert report["references"]["teacher"]["asr_reduction"]["estimate"] == pytest.approx(100 * 12 / 40)


def test_a_grid_is_resumed_only_with_its_own_spec(grid, tmp_path):
    spec, out = grid
    fr.prepare_out(spec, out)                      # the same spec: fine
    other = {**spec, "test_seeds": [0, 1, 2, 3]}
    with pytest.raises(ValueError, match="test_seeds"):
        fr.prepare_out(other, out)
    assert len(fr.load_rows(out)) == len(fr.dev_runs(spec)) + 2


def test_bad_grids_are_refused():
    good = fr.load_spec(None)
    fr.validate_spec(good)
    bad = [
        {"methods": {**good["methods"], "sft": {"arm": "sft", "lr": [1e-5]}}},               # unequal budget
        {"headline_judge": "refusal"},                                                     # the PPO reward's judge
        {"dev_seeds": [0, 1]},                                                             # overlaps test seeds
        {"test_seeds": [0, 1, 2]},                                                         # < 5 test seeds
        {"test_lr_factors": [1.0, 2.0]},                                                   # no point below
        {"methods": {"dpo": {"arm": "dpo", "lr": [1e-5], "kl": [0.1]}}},                   # not DPO's knob
        {"reply_tokens": 12},
    ]
    for change in bad:
        with pytest.raises(ValueError):
            fr.validate_spec({**good, **change})
    assert fr.config_id({"beta": 0.1, "lr": 2e-05}) == "lr=2e-05 beta=0.1"
    assert fr.grid_configs({"arm": "dpo", "lr": [1.0, 2.0], "beta": [0.1, 0.5]}) == [
        {"lr": 1.0, "beta": 0.1}, {"lr": 2.0, "beta": 0.1}, {"lr": 1.0, "beta": 0.5}, {"lr": 2.0, "beta": 0.5}]


def test_dry_run_checks_every_methods_command_with_openrlhfs_parser(tmp_path, capsys):
    assert fr.main(["--out", str(tmp_path / "g"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "dev runs: 48" in printed and "test runs: 70" in printed
    for method in ("safesteer", "dpo", "ppo", "sft"):
        assert f"# dev|{method}|" in printed
    assert "--algo.kl.init_coef 0.01" in printed and "openrlhf_safesteer.plugin.stock sft" in printed
    assert not (tmp_path / "g").exists()
