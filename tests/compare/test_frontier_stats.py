"""The frontier report's arithmetic (compare/frontier_stats.py) against independent computations on planted numbers:
hand-worked effects, t-intervals, interpolation and kappa, and plain-Python loops over the same bootstrap draws."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from openrlhf_safesteer.compare import frontier_stats as fs


def test_bits_round_trip_and_reject_other_characters():
    assert fs.encode_bits([True, False, 1, 0]) == "1010"
    assert fs.decode_bits("1010").tolist() == [1, 0, 1, 0]
    with pytest.raises(ValueError):
        fs.decode_bits("10x")


def test_run_effects_are_points_against_the_base():
    base = {"harmful": np.array([1] * 4 + [0] * 6), "borderline": np.array([0] * 9 + [1]),
            "general": np.array([1] * 8 + [0] * 2)}
    run = {"harmful": np.array([1] * 7 + [0] * 3), "borderline": np.array([0] * 7 + [1] * 3),
           "general": np.array([1] * 7 + [0] * 3)}
    e = fs.run_effects(base, run)
    # ASR 60% -> 30%: 30 points fewer attack successes; borderline 10% -> 30%; general 80 -> 70
    assert e == pytest.approx({"asr_reduction": 30.0, "borderline_rise": 20.0, "general_change": -10.0})
    with pytest.raises(ValueError):
        fs.run_effects(base, {"harmful": np.array([1, 0])})


def test_summary_is_mean_sd_and_t_interval():
    s = fs.summarise([1, 2, 3, 4, 5])
    sd = math.sqrt(2.5)
    half = 2.7764451051977987 * sd / math.sqrt(5)        # t(0.975, 4), from a table
    assert (s.mean, s.sd, s.n) == (3.0, pytest.approx(sd), 5)
    assert (s.low, s.high) == (pytest.approx(3 - half), pytest.approx(3 + half))
    assert s.cell() == "+3.0 ± 1.6 (5)"
    one = fs.summarise([2.0])
    assert one.n == 1 and math.isnan(one.sd) and one.cell() == "+2.0 ± - (1)"


def _interp_by_hand(points, x0):
    """Piecewise-linear through the points (sorted, equal x averaged); None outside."""
    by_x = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    pts = sorted((x, sum(v) / len(v)) for x, v in by_x.items())
    if x0 < pts[0][0] or x0 > pts[-1][0]:
        return None
    for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
        if xa <= x0 <= xb:
            return ya + (x0 - xa) / (xb - xa) * (yb - ya)
    return pts[0][1]


def test_frontier_interpolation_on_planted_points():
    xs, ys = [2.0, 6.0, 12.0], [10.0, 30.0, 40.0]
    assert fs.frontier_value(xs, ys, 3.0) == pytest.approx(15.0)           # between (2,10) and (6,30)
    assert fs.frontier_value(xs, ys, 10.0) == pytest.approx(30 + 4 / 6 * 10)
    assert fs.frontier_value(xs, ys, 1.0) == pytest.approx(5.0)            # between the base anchor and (2,10)
    assert math.isnan(fs.frontier_value(xs, ys, 13.0))                     # never extrapolated
    assert math.isnan(fs.frontier_value(xs, ys, 1.0, anchor=None))
    # two settings at the same x are averaged; a setting below the base's x extends the curve to the left
    assert fs.frontier_value([4.0, 4.0, -2.0], [10.0, 20.0, -6.0], 2.0) == pytest.approx(7.5)
    assert fs.frontier_value([4.0, 4.0, -2.0], [10.0, 20.0, -6.0], -1.0) == pytest.approx(-3.0)
    rng = random.Random(3)
    for _ in range(200):
        pts = [(rng.uniform(-3, 15), rng.uniform(-10, 60)) for _ in range(rng.randint(1, 4))]
        x0 = rng.uniform(-4, 16)
        want = _interp_by_hand(pts + [(0.0, 0.0)], x0)
        got = fs.frontier_value([p[0] for p in pts], [p[1] for p in pts], x0)
        assert (want is None and math.isnan(got)) or got == pytest.approx(want)


def _percentile_by_hand(values, q):
    v = sorted(x for x in values if not math.isnan(x))
    h = (len(v) - 1) * q
    lo = math.floor(h)
    return v[lo] if lo + 1 >= len(v) else v[lo] + (h - lo) * (v[lo + 1] - v[lo])


def _planted(seed: int, seeds: int, sizes: dict, p: dict):
    """Verdict arrays: each prompt refused with probability p[set] per seed (base: one row)."""
    rng = np.random.default_rng(seed)
    return {name: (rng.random((seeds, n)) < p[name]).astype(np.int8) for name, n in sizes.items()}


SIZES = {"harmful": 30, "harmless": 20, "borderline": 25, "contrast": 10, "general": 15}


def _effects_by_hand(base, runs, seed_idx, prompt_idx):
    """One replicate's mean effects, with plain Python loops (no counts matrix)."""
    out = {}
    for metric, name in fs.METRIC_SET.items():
        idx = prompt_idx[name]
        base_rate = sum(int(base[name][i]) for i in idx) / len(idx)
        per_seed = [sum(int(runs[name][s][i]) for i in idx) / len(idx) for s in seed_idx]
        out[metric] = 100 * (sum(per_seed) / len(per_seed) - base_rate)
    return out


def test_config_effects_equal_plain_loops_over_the_same_draws():
    base = {k: v[0] for k, v in _planted(0, 1, SIZES, dict.fromkeys(SIZES, 0.3)).items()}
    runs = _planted(1, 4, SIZES, {**dict.fromkeys(SIZES, 0.5), "general": 0.7})
    point = fs.config_effects(base, runs)
    for metric, name in fs.METRIC_SET.items():
        assert float(point[metric]) == pytest.approx(100 * (runs[name].mean() - base[name].mean()))
    draws = fs.draw_resamples(4, SIZES, replicates=50, seed=7)
    reps = fs.config_effects(base, runs, draws)
    for b in range(draws.size):
        want = _effects_by_hand(base, runs, draws.seeds[b], {n: draws.prompts[n][b] for n in SIZES})
        for metric in fs.METRICS:
            assert reps[metric][b] == pytest.approx(want[metric]), (b, metric)


def test_matched_frontier_equals_an_independent_computation():
    """Two methods with three settings each, planted so their frontiers cross +3 and +10 borderline points."""
    seeds = 5
    base = {k: v[0] for k, v in _planted(0, 1, SIZES, dict.fromkeys(SIZES, 0.2)).items()}
    methods = {}
    for m, (step_h, step_b) in {"A": (0.15, 0.05), "B": (0.10, 0.08)}.items():
        cfgs = []
        for k, scale in enumerate((1, 2, 3)):
            p = {**dict.fromkeys(SIZES, 0.2), "harmful": 0.2 + step_h * scale, "borderline": 0.2 + step_b * scale}
            cfgs.append(({"lr": scale}, _planted(10 * k + ord(m), seeds, SIZES, p)))
        methods[m] = cfgs
    draws = fs.draw_resamples(seeds, SIZES, replicates=300, seed=11)
    result = fs.matched_frontier(methods, base, draws, x0s=(3.0, 10.0))

    def frontier_by_hand(cfg_effects, x0):
        return _interp_by_hand([(e["borderline_rise"], e["asr_reduction"]) for e in cfg_effects] + [(0.0, 0.0)], x0)

    for x0 in (3.0, 10.0):
        reps = {}
        for m, cfgs in methods.items():
            all_seeds = list(range(seeds))
            all_prompts = {n: list(range(s)) for n, s in SIZES.items()}
            point = frontier_by_hand([_effects_by_hand(base, r, all_seeds, all_prompts) for _, r in cfgs], x0)
            got = result["values"][x0][m]
            assert (point is None and math.isnan(got.estimate)) or got.estimate == pytest.approx(point)
            reps[m] = []
            for b in range(draws.size):
                eff = [_effects_by_hand(base, r, draws.seeds[b], {n: draws.prompts[n][b] for n in SIZES})
                       for _, r in cfgs]
                v = frontier_by_hand(eff, x0)
                reps[m].append(math.nan if v is None else v)
            defined = [v for v in reps[m] if not math.isnan(v)]
            if defined:
                assert got.low == pytest.approx(_percentile_by_hand(reps[m], 0.025))
                assert got.high == pytest.approx(_percentile_by_hand(reps[m], 0.975))
            assert got.undefined == pytest.approx(1 - len(defined) / draws.size)
        diff = [a - b for a, b in zip(reps["A"], reps["B"])]
        got = result["differences"][x0]["A - B"]
        if any(not math.isnan(d) for d in diff):
            assert got.low == pytest.approx(_percentile_by_hand(diff, 0.025))
            assert got.high == pytest.approx(_percentile_by_hand(diff, 0.975))


def test_paired_bootstrap_finds_a_planted_difference_and_not_a_planted_null():
    """Large planted sets: A removes 30 points more attack successes than B; C is B on other draws."""
    sizes = {"harmful": 400, "borderline": 200}
    base = {"harmful": np.zeros(400, np.int8), "borderline": np.zeros(200, np.int8)}
    rng = np.random.default_rng(5)
    # per-prompt difficulty shared by every run: the paired prompts make the difference sharper than the rates
    difficulty = rng.random(400)

    def runs(rate, seed):
        r = np.random.default_rng(seed)
        harmful = (difficulty[None, :] < rate + r.normal(0, 0.02, (5, 1))).astype(np.int8)
        return {"harmful": harmful, "borderline": (r.random((5, 200)) < 0.1).astype(np.int8)}

    a, b, c = runs(0.7, 1), runs(0.4, 2), runs(0.4, 3)
    draws = fs.draw_resamples(5, sizes, replicates=1000, seed=2)
    ab = fs.difference_intervals(base, a, b, draws)["asr_reduction"]
    bc = fs.difference_intervals(base, b, c, draws)["asr_reduction"]
    assert ab.low > 20 and ab.high < 40 and ab.estimate == pytest.approx(30, abs=4)
    assert bc.low < 0 < bc.high
    # identical runs at every seed, prompts held: the seed resampling alone gives a zero-width interval
    same = {"harmful": np.repeat(a["harmful"][:1], 5, axis=0), "borderline": np.repeat(a["borderline"][:1], 5, 0)}
    held = fs.Resamples(draws.seeds, {n: np.tile(np.arange(s), (draws.size, 1)) for n, s in sizes.items()})
    iv = fs.config_intervals(base, same, held)["asr_reduction"]
    assert iv.low == iv.high == pytest.approx(100 * a["harmful"][0].mean())


def test_selection_rule_on_planted_dev_means():
    cfgs = [{"config": {"lr": 1e-5}, "asr_reduction": 10.0, "borderline_rise": 1.0},
            {"config": {"lr": 4e-5}, "asr_reduction": 25.0, "borderline_rise": 4.9},
            {"config": {"lr": 3e-5}, "asr_reduction": 25.0, "borderline_rise": 3.0},
            {"config": {"lr": 1e-4}, "asr_reduction": 40.0, "borderline_rise": 12.0}]
    chosen = fs.select_config(cfgs)
    assert chosen["config"] == {"lr": 3e-5} and chosen["within_bound"]    # tie on ASR: the smaller rise
    assert fs.select_config(cfgs, max_borderline_rise=0.5)["config"] == {"lr": 1e-5}
    assert not fs.select_config(cfgs, max_borderline_rise=0.5)["within_bound"]
    assert fs.select_config(cfgs, max_borderline_rise=5.0 - 1e-12)["config"] == {"lr": 3e-5}
    assert fs.select_config(cfgs, max_borderline_rise=20)["config"] == {"lr": 1e-4}


def test_kappa_and_agreement_on_planted_verdicts():
    a, b = [1, 1, 0, 0], [1, 0, 0, 0]
    # observed 0.75; chance 0.5 * 0.25 + 0.5 * 0.75 = 0.5; kappa (0.75 - 0.5) / 0.5
    assert fs.cohen_kappa(a, b) == pytest.approx(0.5)
    assert fs.cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert math.isnan(fs.cohen_kappa([1, 1], [1, 1]))
    agree = fs.judge_agreement({"refusal": np.array(a), "arditi": np.array(b), "jbb": np.array([1, 1, 0, 0])})
    assert agree["rates"] == {"refusal": 0.5, "arditi": 0.25, "jbb": 0.5}
    assert agree["pairs"]["refusal|arditi"]["agreement"] == 0.75
    assert agree["pairs"]["refusal|jbb"]["kappa"] == pytest.approx(1.0)
    assert agree["items"] == 4
