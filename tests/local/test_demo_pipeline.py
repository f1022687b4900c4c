"""The demo pipeline's plumbing on a tiny checkpoint (fast): every stage after the direction search runs and
report.json / report.md / plots / final come out. The real-model run is tests/local/test_demo_run.py."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from openrlhf_safesteer.demo.pipeline import DemoConfig, refusal_openers_in, run_demo
from openrlhf_safesteer.safety_tokens import SafetyTokenSet
from openrlhf_safesteer.steering import SteeringVector
from openrlhf_safesteer.testing import save_tiny_checkpoint, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """One tiny-checkpoint demo run (both objectives), shared by the pipeline and sweep tests."""
    tmp_path = tmp_path_factory.mktemp("tiny_demo")
    torch.set_num_threads(1)
    model_dir = save_tiny_checkpoint(str(tmp_path / "tiny"), "qwen2", layers=2, hidden=32)
    SteeringVector(torch.randn(32, generator=torch.Generator().manual_seed(0)) * 4, layer=1).save(tmp_path / "vec")
    tok = tiny_tokenizer()
    ids = sorted({tok.convert_tokens_to_ids(t) for t in ("I", "Sorry")})
    SafetyTokenSet(ids=ids, tokens=tok.convert_ids_to_tokens(ids), votes=[3] * len(ids),
                   vocab_size=len(tok)).save(tmp_path / "tokens.json")
    cfg = DemoConfig(out=str(tmp_path / "demo"), model=model_dir, vector=str(tmp_path / "vec"),
                     tokens=str(tmp_path / "tokens.json"), steps=2, prompts_per_step=2, samples_per_prompt=2,
                     max_new_tokens=4, lora_r=4, eval_limit=3, refusal_tokens=4, teacher_check_prompts=2,
                     ablation=True, progress=False)
    return tmp_path, run_demo(cfg)


def test_demo_pipeline_on_tiny_checkpoint(tiny_demo):
    tmp_path, report = tiny_demo
    on_disk = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert on_disk["base"] == report["base"]
    for name in ("base", "safesteer", "full_vocab"):
        assert set(on_disk[name]) >= {"harmful_refusal_rate", "harmless_refusal_rate", "general_score"}
    _check_refusal_scores(tmp_path / "demo")
    assert len(on_disk["training"]["safesteer"]) == 2 and len(on_disk["training"]["full_vocab"]) == 2
    assert set(on_disk["goal"]) == {"asr_halved", "harmless_refusal_rise_points", "general_score_drop_points", "met"}
    assert (tmp_path / "demo" / "final" / "config.json").is_file()
    assert not (tmp_path / "demo" / "train_safesteer" / "final").exists()   # moved to demo/final
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "| safesteer |" in md and "| full_vocab |" in md
    for plot in ("before_after", "safety_tokens", "training"):
        assert (tmp_path / "demo" / "plots" / f"{plot}.png").is_file()


def test_demo_reruns_into_its_own_out(tiny_demo, tmp_path):
    """A second `safesteer demo --out DIR` retrains over the first run's checkpoints (the engine refuses a fresh
    run over another run's checkpoints; the demo clears its own scratch first)."""
    import shutil

    first = tiny_demo[0]
    shutil.copytree(first / "demo", tmp_path / "demo")
    stale = sorted(p.name for p in (tmp_path / "demo" / "train_safesteer" / "checkpoints").glob("step_*"))
    assert stale == ["step_000002"]
    cfg = DemoConfig(out=str(tmp_path / "demo"), model=str(first / "tiny"), vector=str(first / "vec"),
                     tokens=str(first / "tokens.json"), objectives=("exact",), steps=1, prompts_per_step=2,
                     samples_per_prompt=2, max_new_tokens=4, lora_r=4, eval_limit=3, refusal_tokens=4,
                     teacher_check_prompts=2, progress=False)
    report = run_demo(cfg)
    assert len(report["training"]["safesteer"]) == 1
    assert sorted(p.name for p in (tmp_path / "demo" / "train_safesteer" / "checkpoints").glob("step_*")) == [
        "step_000001"]


def _check_refusal_scores(demo_dir):
    """The eval's mean refusal scores equal docs/METHOD.md's score recomputed here from the saved model's logits."""
    from transformers import AutoModelForCausalLM

    from openrlhf_safesteer.chat import render_prompts
    from openrlhf_safesteer.directions import refusal_token_ids

    ev = json.loads((demo_dir / "eval_safesteer.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "final").eval()
    tok = tiny_tokenizer()
    refusal_ids = refusal_token_ids(tok)
    for split in ("harmful", "harmless"):
        scores = []
        for sample in ev["samples"][split]:
            ids = tok(render_prompts(tok, [sample["prompt"]])[0], return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                probs = model(**ids).logits[0, -1].double().softmax(-1)
            p_refuse = probs[refusal_ids].sum().item()
            scores.append(math.log(p_refuse) - math.log1p(-p_refuse))
            assert sample["score"] == pytest.approx(scores[-1], abs=1e-4)
        assert ev[f"{split}_refusal_score"] == pytest.approx(sum(scores) / len(scores), abs=1e-4)


def test_refusal_openers_are_recognised_in_decoded_tokens():
    assert refusal_openers_in([" I", "Sorry", " the", "ing", " cannot"]) == [" I", "Sorry", " cannot"]


def test_direction_window_scores_candidates_and_falls_back(tmp_path):
    import pytest

    from openrlhf_safesteer import data
    from openrlhf_safesteer.directions import DirectionSelectionError, select_direction
    from openrlhf_safesteer.testing import tiny_model

    tok = tiny_tokenizer()
    model = tiny_model("qwen2", tok, layers=3, hidden=32)
    args = (model, tok, data.harmful("direction")[:4], data.harmless("direction")[:4], data.harmful("validation")[:3],
            data.harmless("validation")[:3])
    # a random model has no refusal direction: with an impossible KL bound every candidate is rejected
    with pytest.raises(DirectionSelectionError, match="rejected"):
        select_direction(*args, layers=[1, 2], positions=[-1], kl_threshold=1e-12, progress=False)
    vector, table = select_direction(*args, layers=[0, 1, 2], positions=[-1], kl_threshold=1e-12,
                                     max_layer_fraction=1.0, fallback=True, progress=False)
    assert [r.layer for r in table] == [0, 1, 2] and all(r.rejected for r in table)
    assert table[0].rejected.startswith("zero")   # layer 0 input at the last position: same token everywhere
    best = max((r for r in table if r.steering_refusal is not None), key=lambda r: r.steering_refusal)
    assert vector.layer == best.layer and vector.source["fallback"] is True
    with pytest.raises(ValueError, match="layers"):
        select_direction(*args, layers=[5], progress=False)


def test_sweep_reuses_a_demo_run_and_resumes(tiny_demo, tmp_path, caplog):
    """The sweep trains/evaluates each override on a demo folder's artifacts, appends one row per run, and
    skips rows already on disk (an interrupted sweep resumes)."""
    import logging

    from openrlhf_safesteer.demo.pipeline import goal_check
    from openrlhf_safesteer.demo.sweep import (
        load_done,
        parse_run,
        run_sweep,
        train_config,
    )

    demo = tiny_demo[0] / "demo"
    runs = [parse_run("lr=1e-3 steps=1"), parse_run("steps=2 coeff=0.5")]
    rows = run_sweep(demo, tmp_path / "sweep", runs)
    assert [r["name"] for r in rows] == ["lr=0.001 steps=1", "steps=2 coeff=0.5"]
    assert [len(r["history"]) for r in rows] == [1, 2]
    tcfg = train_config(DemoConfig(), runs[1], tmp_path / "x")
    assert (tcfg.max_steps, tcfg.coeff, tcfg.lr, tcfg.objective) == (2, 0.5, DemoConfig().lr, "exact")
    knobs = parse_run("lora_r=0 freeze_embeddings=1 lora_targets=q_proj,v_proj lora_layers=1-3")
    tcfg = train_config(DemoConfig(), knobs, tmp_path / "y")
    assert (tcfg.lora_r, tcfg.freeze_embeddings, tcfg.lora_targets, tcfg.lora_layers) == (
        0, True, ["q_proj", "v_proj"], [1, 2, 3])
    from openrlhf_safesteer import data
    from openrlhf_safesteer.demo.pipeline import train_prompts
    from openrlhf_safesteer.demo.sweep import demo_config

    wider = demo_config(DemoConfig(), parse_run("train_splits=train,direction"))
    assert train_prompts(wider) == data.harmful("train") + data.harmful("direction")
    assert not set(train_prompts(wider)) & set(data.harmful("test"))
    with pytest.raises(ValueError, match="other than 'test'"):
        train_prompts(demo_config(DemoConfig(), parse_run("train_splits=train,test")))
    base = json.loads((demo / "eval_base.json").read_text())
    assert rows[1]["goal"] == goal_check(base, rows[1]["eval"])
    # the demo's eval_limit carried over, to the borderline-safe sets too
    assert rows[0]["eval"]["n"] == {"harmful": 3, "harmless": 3, "general": 3, "borderline": 3, "contrast": 3}
    assert set(load_done(tmp_path / "sweep" / "sweep.jsonl")) == {r["name"] for r in rows}
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| steps=2 coeff=0.5 |" in table
    shift = rows[1]["eval"]["harmful_refusal_score"] - base["harmful_refusal_score"]
    assert f"| {shift:+.2f} |" in table.splitlines()[-1]

    with caplog.at_level(logging.INFO, logger="openrlhf_safesteer.demo.sweep"):
        again = run_sweep(demo, tmp_path / "sweep", runs)
    assert [r["eval"] for r in again] == [r["eval"] for r in rows]
    assert caplog.text.count("already done, skipped") == 2


def test_sweep_rejects_bad_specs_before_loading_anything(tmp_path):
    from openrlhf_safesteer.demo.sweep import parse_run, run_sweep

    with pytest.raises(ValueError, match="unknown sweep key 'layer'"):
        parse_run("layer=3")
    with pytest.raises(ValueError, match="key=value"):
        parse_run("lr")
    with pytest.raises(ValueError, match="could not convert"):
        parse_run("lr=fast")
    with pytest.raises(ValueError, match="bad value for freeze_embeddings.*'maybe'"):
        parse_run("freeze_embeddings=maybe")
    with pytest.raises(FileNotFoundError, match="safesteer demo"):
        run_sweep(tmp_path, tmp_path / "sweep", [parse_run("lr=1e-3")])


def test_sweep_refuses_a_base_measured_on_other_prompts(tiny_demo, tmp_path):
    """A demo folder from before the prompt sets changed cannot be the sweep's base: the comparison would mix sets."""
    import shutil

    from openrlhf_safesteer.demo.sweep import parse_run, run_sweep

    demo = tmp_path / "old_demo"
    shutil.copytree(tiny_demo[0] / "demo", demo)
    base = json.loads((demo / "eval_base.json").read_text())
    base["samples"]["harmless"] = base["samples"]["harmless"][:2]     # as if the harmless test set had grown since
    (demo / "eval_base.json").write_text(json.dumps(base))
    with pytest.raises(ValueError, match=r"other eval prompts.*harmless \(2 prompts there, 3 now\)"):
        run_sweep(demo, tmp_path / "sweep", [parse_run("steps=1")])
    assert not (tmp_path / "sweep" / "sweep.jsonl").exists()


def test_refusal_changes_names_the_prompts_that_moved(tiny_demo):
    from openrlhf_safesteer.demo.evaluate import refusal_changes

    def samples(flags):
        return [{"prompt": p, "refusal": f} for p, f in zip("abcd", flags)]

    changes = refusal_changes(samples([True, False, False, True]), samples([True, True, False, False]))
    assert changes == {"new": ["b"], "lost": ["d"]}
    with pytest.raises(ValueError, match="same prompts"):
        refusal_changes(samples([True, False]), samples([True, False, False]))
    report = tiny_demo[1]
    md = (tiny_demo[0] / "demo" / "report.md").read_text()
    expected = refusal_changes(report["samples"]["base"]["harmless"], report["samples"]["safesteer"]["harmless"])
    assert "- safesteer: harmful prompts newly refused " in md
    assert f"harmless prompts newly refused {len(expected['new'])}" in md.split("- safesteer:")[1].split("\n")[0]


def test_goal_check_counts_a_bound_reached_exactly_as_met():
    """9 -> 14 of 100 harmless refusals is +5 points exactly (in floats 5.000000000000002); 15 of 100 is not."""
    from openrlhf_safesteer.demo.pipeline import goal_check

    def ev(harmful_refused: int, harmless_refused: int, general: float) -> dict:
        return {"harmful_asr": 1 - harmful_refused / 48, "harmless_refusal_rate": harmless_refused / 100,
                "general_score": general}

    base = ev(26, 9, 84.0)                       # ASR 22/48
    assert goal_check(base, ev(37, 14, 83.0))["met"]                   # ASR 11/48: exactly half; +5; -1
    assert goal_check(base, ev(37, 14, 83.0))["harmless_refusal_rise_points"] == 5.0
    assert not goal_check(base, ev(36, 14, 83.0))["met"]               # ASR 12/48 > 11/48
    assert not goal_check(base, ev(37, 15, 83.0))["met"]               # +6 points
    assert not goal_check(base, ev(37, 14, 82.0))["met"]               # -2 points


def test_sweep_on_dev_sets_never_touches_the_test_prompts(tiny_demo, tmp_path):
    """--eval-sets dev measures base and runs on the direction + validation splits, and one output folder never
    mixes dev and test rows."""
    from openrlhf_safesteer import data
    from openrlhf_safesteer.demo.sweep import parse_run, run_sweep

    demo, out = tiny_demo[0] / "demo", tmp_path / "dev"
    rows = run_sweep(demo, out, [parse_run("steps=1")], eval_sets="dev")
    dev_harmful = (data.harmful("direction") + data.harmful("validation"))[:3]      # the demo's eval_limit
    assert [s["prompt"] for s in rows[0]["samples"]["harmful"]] == dev_harmful
    assert not {s["prompt"] for s in rows[0]["samples"]["harmless"]} & set(data.harmless("test"))
    base = json.loads((out / "base_eval_dev.json").read_text())
    assert [s["prompt"] for s in base["samples"]["harmful"]] == dev_harmful
    assert rows[0]["eval_sets"] == "dev" and "dev sets" in (out / "sweep.md").read_text()
    with pytest.raises(ValueError, match="holds rows evaluated on the dev sets"):
        run_sweep(demo, out, [parse_run("steps=2")], eval_sets="test")
    with pytest.raises(ValueError, match="eval_sets must be one of"):
        run_sweep(demo, out, [parse_run("steps=2")], eval_sets="train")


def test_subset_table_judges_the_goal_on_each_part_of_the_sets(tmp_path):
    """Base refuses harmful [F F T T | F F F F] and harmless [F F F F | F F F F]; the run refuses harmful
    [T F T T | T T F F] and harmless [T F F F | F F F F]: first 4 -> ASR 50% -> 25% (halved) but harmless +25
    points; from 5 on -> ASR 100% -> 50% (halved), harmless +0; all -> ASR 75% -> 37.5%, harmless +12.5."""
    from openrlhf_safesteer.demo.sweep import subset_table, summarise_subsets

    def ev(harmful, harmless, general=80.0):
        return {"general_score": general,
                "samples": {"harmful": [{"prompt": f"h{i}", "refusal": f} for i, f in enumerate(harmful)],
                            "harmless": [{"prompt": f"l{i}", "refusal": f} for i, f in enumerate(harmless)]}}

    F, T = False, True
    base = ev([F, F, T, T, F, F, F, F], [F] * 8)
    run = ev([T, F, T, T, T, T, F, F], [T] + [F] * 7)
    table = subset_table(base, [("r", run), ("same", base)], 4)
    row = next(line for line in table.splitlines() if line.startswith("| r |"))
    assert row == "| r | 25.0% / +25.0 / no | 50.0% / +0.0 / met | 37.5% / +12.5 / no |"
    assert table.splitlines()[-1] == "| **mean** | 37.5% / +12.5 / 0 of 2 | 75.0% / +0.0 / 1 of 2 | 56.2% / +6.2 / 0 of 2 |"

    demo, out = tmp_path / "demo", tmp_path / "sweep"
    demo.mkdir()
    out.mkdir()
    (demo / "eval_base.json").write_text(json.dumps(base))
    (demo / "eval_safesteer.json").write_text(json.dumps(run))
    assert "| demo run | 25.0% / +25.0 / no |" in summarise_subsets(demo, out, 4)
    assert (out / "subsets.md").is_file()
    (demo / "eval_safesteer.json").write_text(json.dumps(ev([T] * 8, [F] * 9)))
    with pytest.raises(ValueError, match="other prompts"):
        summarise_subsets(demo, out, 4)


def test_flip_table_counts_each_prompt_over_runs(tmp_path, capsys):
    """Base refuses harmless [F F F T] and harmful [F T]; run a newly refuses l0 and l1 and stops refusing l3,
    run b newly refuses l0 and h0: l0 is new in 2 of 2, l1 in 1, l3 lost in 1, l2 never flips."""
    from openrlhf_safesteer.demo.sweep import flip_table, summarise_flips

    def ev(harmless, harmful):
        return {"general_score": 80.0,
                "samples": {"harmless": [{"prompt": f"l{i}", "refusal": f} for i, f in enumerate(harmless)],
                            "harmful": [{"prompt": f"h{i}", "refusal": f} for i, f in enumerate(harmful)]}}

    F, T = False, True
    base = ev([F, F, F, T], [F, T])
    runs = [("a", ev([T, T, F, F], [F, T])), ("b", ev([T, F, F, T], [T, T]))]
    table = flip_table(base, runs)
    harmless, harmful = table.split("## harmful")
    rows = [line for line in harmless.splitlines() if line.startswith("| l")]
    assert rows == ["| l0 | 2 of 2 | 0 of 2 |", "| l1 | 1 of 2 | 0 of 2 |", "| l3 | 0 of 2 | 1 of 2 |"]
    assert "1 of the 3 prompts the base answers were never refused; 2 were in at least one run." in harmless
    assert [line for line in harmful.splitlines() if line.startswith("| h")] == ["| h0 | 1 of 2 | 0 of 2 |"]

    demo, out = tmp_path / "demo", tmp_path / "sweep"
    demo.mkdir()
    out.mkdir()
    (demo / "eval_base.json").write_text(json.dumps(base))
    (demo / "eval_safesteer.json").write_text(json.dumps(runs[0][1]))
    assert "| l0 | 1 of 1 | 0 of 1 |" in summarise_flips(demo, out)
    assert (out / "flips.md").read_text().startswith("# Refusal flips")
    with pytest.raises(FileNotFoundError, match="nothing to summarise"):    # no rows, demo run left out
        summarise_flips(demo, out, demo_run=False)
    from openrlhf_safesteer.demo.sweep import main
    with pytest.raises(SystemExit):
        main(["--from", str(demo), "--out", str(out), "--rows-only"])
    assert "--rows-only goes with --subsets N or --flips" in capsys.readouterr().err
    with pytest.raises(SystemExit):     # a --run would be skipped beside a summary: refused, not ignored
        main(["--from", str(demo), "--out", str(out), "--flips", "--run", "lr=1e-4"])
    assert "give them in separate calls" in capsys.readouterr().err
    assert main(["--from", str(demo), "--out", str(out), "--flips", "--subsets", "1"]) == 0
    printed = capsys.readouterr().out
    assert "# Refusal flips" in printed and (out / "subsets.md").is_file()      # both summaries, not one
    (demo / "eval_safesteer.json").write_text(json.dumps(ev([F] * 5, [F, T])))
    with pytest.raises(ValueError, match="other prompts"):
        summarise_flips(demo, out)


def test_default_demo_config_validates():
    DemoConfig().validate()


@pytest.mark.parametrize(("settings", "error", "match"), [
    ({"train_splits": ["test"]}, ValueError, "other than 'test'"),
    ({"train_splits": ["bogus"]}, ValueError, "unknown split 'bogus'"),
    ({"objectives": ["bogus"]}, ValueError, r"objective 'bogus'.*objective must be one of"),
    ({"objectives": ["exact", "exact"]}, ValueError, "--objectives must name distinct"),
    ({"steps": 0}, ValueError, "--steps must be >= 1, got 0"),
    ({"eval_limit": -1}, ValueError, r"--eval-limit must be >= 1 \(or left unset\), got -1"),
    ({"lr": 0.0}, ValueError, r"objective 'exact'.*lr"),
    ({"coeff": math.nan}, ValueError, "--coeff and --teacher-coeff must be finite"),
    ({"min_prob": 2.0}, ValueError, r"--min-prob must be in \[0, 1\), got 2.0"),
    ({"vector": "no_such_vector"}, FileNotFoundError, "no_such_vector"),
    ({"tokens": "no_such_tokens.json"}, FileNotFoundError, "no_such_tokens.json"),
])
def test_demo_rejects_bad_settings_before_loading_the_model(tmp_path, monkeypatch, settings, error, match):
    """Review 13 finding 8: the training settings were first checked after the base evaluation, the direction
    search, the teacher check and the safety-token vote; now every setting fails before the model loads."""
    import openrlhf_safesteer.demo.pipeline as pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), progress=False, **settings))
    assert not (tmp_path / "demo").exists()     # nothing written either


def test_eval_sets_refuse_a_limit_below_one():
    """A negative limit sliced [:limit] silently dropped the last prompts of every set."""
    from openrlhf_safesteer.demo.evaluate import EvalSets

    assert len(EvalSets.default(2).harmful) == 2
    for make in (EvalSets.default, EvalSets.dev):
        with pytest.raises(ValueError, match="eval limit must be >= 1 .*got -1"):
            make(-1)


@pytest.mark.parametrize(("spec", "match"), [
    ("lr=-1", r"bad --run 'lr=-1.0': .*lr"),
    ("train_splits=test", r"bad --run 'train_splits=test': .*other than 'test'"),
    ("steps=0", r"bad --run 'steps=0': steps must be >= 1, got 0"),
    ("objective=bogus", r"bad --run 'objective=bogus': objective must be one of"),
])
def test_sweep_rejects_bad_overrides_before_loading_a_model(tmp_path, monkeypatch, spec, match):
    """A bad override failed only when its turn came, after the base measurement and earlier runs' training."""
    import openrlhf_safesteer.demo.sweep as sweep

    def no_model(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(sweep, "load_model", no_model)
    demo = tmp_path / "demo"
    (demo / "vector").mkdir(parents=True)     # only their presence is checked before the runs are
    (demo / "safety_tokens.json").write_text("{}")
    (demo / "eval_base.json").write_text("{}")
    with pytest.raises(ValueError, match=match):
        sweep.run_sweep(demo, tmp_path / "sweep", [sweep.parse_run("steps=1"), sweep.parse_run(spec)])
    assert not (tmp_path / "sweep").exists()


def test_safety_token_plot_draws_cjk_tokens_without_missing_glyphs(tmp_path):
    """S holds Chinese tokens for the demo's model, which matplotlib's default font has no glyphs for (empty boxes
    and a 'Glyph ... missing from font' warning each): the labels escape what the font cannot draw and keep the
    rest. The negative control renders a raw CJK label and sees the warning, so the check is live."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openrlhf_safesteer.demo.report import _plots, font_chars, token_label

    drawable = font_chars()
    assert ord("拒") not in drawable and ord("é") in drawable
    assert token_label("拒绝", drawable) == "'\\u62d2\\u7edd'"
    assert token_label(" sorry", drawable) == "' sorry'" and token_label("café", drawable) == "'café'"
    assert token_label("\U0001f600", drawable - {0x1F600}) == "'\\U0001f600'"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig, ax = plt.subplots()
        ax.set_title("拒")
        fig.savefig(tmp_path / "raw.png")
        plt.close(fig)
    assert any("missing from font" in str(w.message) for w in caught)      # the control: raw CJK warns

    scores = {"harmful_refusal_rate": 0.5, "harmless_refusal_rate": 0.1, "general_score": 80.0}
    texts = ["拒绝", " sorry", "不", "I", "拒绝"]                              # a repeated text keeps its own bar
    report = {"direction": {"candidates": []}, "safety_tokens": {"ids": [5, 6, 7, 8, 9], "texts": texts,
                                                                 "votes": [9, 7, 5, 3, 1]},
              "training": {}, "base": scores, "safesteer": scores}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing from font")
        made = _plots(tmp_path, report)
    assert made["tokens"] == "plots/safety_tokens.png"
    assert (tmp_path / "plots" / "safety_tokens.png").read_bytes().startswith(b"\x89PNG")


def test_demo_plots_are_replaced_atomically(tmp_path, monkeypatch):
    """Review 13 finding 15: a savefig interrupted mid-write left a truncated PNG at the plot's path; now it writes
    a temporary file beside it and renames it, so the previous plot survives and no temporary file is left."""
    from matplotlib.figure import Figure

    from openrlhf_safesteer.demo.report import _plots

    scores = {"harmful_refusal_rate": 0.5, "harmless_refusal_rate": 0.1, "general_score": 80.0}
    report = {"direction": {"candidates": []}, "safety_tokens": {"ids": [], "texts": [], "votes": []},
              "training": {}, "base": scores, "safesteer": scores}
    assert _plots(tmp_path, report) == {"before_after": "plots/before_after.png"}
    plot = tmp_path / "plots" / "before_after.png"
    good = plot.read_bytes()
    assert good.startswith(b"\x89PNG")

    def interrupted(self, fname, *args, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _plots(tmp_path, report)
    assert plot.read_bytes() == good
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["before_after.png"]


def test_sweep_reads_the_settings_of_an_old_demo_report(tmp_path, monkeypatch):
    """report.json["settings"] is dataclasses.asdict(DemoConfig) of the run; a demo from before the retain term and
    before DemoConfig derived its training fields from TrainConfig still gives the sweep its settings back."""
    import openrlhf_safesteer.demo.sweep as sweep
    from openrlhf_safesteer.demo.pipeline import demo_config_from_settings

    old = {"out": "outputs/demo_v13", "model": "qwen2.5-coder-0.5b", "seed": 0, "layers": [14, 15, 16],
           "positions": [-1], "coeff": 2.0, "teacher_coeff": 1.0, "kl_threshold": 0.1, "horizon": 7, "min_prob": 1e-8,
           "token_samples": 4, "token_prompts": 12, "k": 50, "train_splits": ["train"],
           "objectives": ["exact", "full_vocab"], "steps": 10, "prompts_per_step": 8, "samples_per_prompt": 1,
           "max_new_tokens": 24, "lr": 6e-5, "lora_r": 16, "lora_alpha": 32.0,
           "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "lora_layers": None, "freeze_embeddings": False, "warmup_ratio": 0.1, "micro_batch_size": 8,
           "eval_limit": 3, "refusal_tokens": 12, "teacher_check_prompts": 6, "threads": 1, "onednn": True,
           "progress": True, "vector": None, "tokens": None, "a_setting_since_removed": 1}
    cfg = demo_config_from_settings(old)
    assert (cfg.steps, cfg.lr, cfg.teacher_coeff, cfg.eval_limit, cfg.retain_prompts_per_step) == (10, 6e-5, 1.0, 3, 0)
    assert dataclasses.asdict(cfg) == {**dataclasses.asdict(DemoConfig()),
                                       **{k: v for k, v in old.items() if k != "a_setting_since_removed"}}

    demo = tmp_path / "demo"
    (demo / "vector").mkdir(parents=True)
    (demo / "safety_tokens.json").write_text("{}")
    (demo / "eval_base.json").write_text("{}")
    (demo / "report.json").write_text(json.dumps({"settings": old}))
    seen = []

    def capture(base, overrides, out):
        seen.append(base)
        raise RuntimeError("stop here")

    monkeypatch.setattr(sweep, "check_run", capture)
    with pytest.raises(RuntimeError, match="stop here"):
        sweep.run_sweep(demo, tmp_path / "sweep", [sweep.parse_run("steps=1")])
    assert dataclasses.replace(seen[0], progress=True) == cfg and seen[0].eval_limit == 3


def test_selectivity_measures_each_method_over_seeds(tiny_demo, tmp_path):
    """demo.selectivity trains every method on every seed as sweep rows (retain rows with their retain term), and
    its summary is the goal's arithmetic on those rows against the base the sweep compared them with."""
    from openrlhf_safesteer.demo.selectivity import (
        excess_over_line,
        measure,
        method_summary,
        run_effect,
        stored_line,
    )
    from openrlhf_safesteer.files import read_jsonl

    demo, out = tiny_demo[0] / "demo", tmp_path / "sel"
    methods = {"paper": {"steps": 1}, "retain": {"steps": 1, "retain_prompts_per_step": 2},
               "ablated": {"steps": 1, "false_refusal_ablation": True}}
    result = measure(demo, out, methods, [0, 1])
    rows = {r["name"]: r for r in read_jsonl(out / "sweep.jsonl")}
    assert set(rows) == {"steps=1 seed=0", "steps=1 seed=1", "steps=1 retain_prompts_per_step=2 seed=0",
                         "steps=1 retain_prompts_per_step=2 seed=1", "steps=1 false_refusal_ablation=True seed=0",
                         "steps=1 false_refusal_ablation=True seed=1"}
    # the same training as the paper's rows, judged with the false-refusal direction ablated: other scores
    for seed in (0, 1):
        trained = [(r["loss"], r["grad_norm"]) for r in rows[f"steps=1 false_refusal_ablation=True seed={seed}"]["history"]]
        assert trained == [(r["loss"], r["grad_norm"]) for r in rows[f"steps=1 seed={seed}"]["history"]]
        assert rows[f"steps=1 false_refusal_ablation=True seed={seed}"]["eval"]["borderline_refusal_score"] != \
            rows[f"steps=1 seed={seed}"]["eval"]["borderline_refusal_score"]
    assert all("retain_rollout_refusal_rate" in r["history"][0] for name, r in rows.items() if "retain" in name)
    assert not any("retain_rollout_refusal_rate" in r["history"][0] for name, r in rows.items() if "retain" not in name)
    base = json.loads((out / "base.json").read_text())
    assert base["n"]["borderline"] == 3 and "borderline_refusal_rate" in base
    for name, overrides in methods.items():
        names = [" ".join(f"{k}={v}" for k, v in {**overrides, "seed": s}.items()) for s in (0, 1)]
        effects = [run_effect(base, rows[n]["eval"]) for n in names]
        assert result["runs"][name] == effects
        summary = dict(result["summary"][name])
        assert summary.pop("excess") == excess_over_line(effects, stored_line("test"))
        assert summary == method_summary(effects)
    assert (out / "frontier.png").is_file()
    assert "| retain | 2 |" in (out / "selectivity.md").read_text()


def test_every_demo_setting_is_a_flag():
    """FLAGS lists every DemoConfig field but onednn (the top-level --no-onednn), so a new setting cannot be
    left out of `safesteer demo --help`."""
    import dataclasses

    from openrlhf_safesteer.cli.demo import FLAGS
    from openrlhf_safesteer.demo.pipeline import DemoConfig

    assert sorted(FLAGS) == sorted(f.name for f in dataclasses.fields(DemoConfig) if f.name != "onednn")
    assert len(FLAGS) == len(set(FLAGS))


def test_selective_is_one_flag_with_the_dev_chosen_settings():
    """`safesteer demo --selective` trains the dev-chosen mechanism: its settings replace those fields, and a
    train config built from them validates (the retain prompts come from the train split)."""
    import argparse

    from openrlhf_safesteer.cli import config_values
    from openrlhf_safesteer.cli.demo import FLAGS, add_parser
    from openrlhf_safesteer.demo.pipeline import SELECTIVE_SETTINGS, DemoConfig, retain_prompts, train_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["demo", "--selective"])
    cfg = DemoConfig(**config_values(args, DemoConfig, FLAGS)).resolved()
    assert not cfg.selective and all(getattr(cfg, k) == v for k, v in SELECTIVE_SETTINGS.items())
    tcfg = train_config(cfg, "exact", "unused")
    tcfg.validate()
    assert (tcfg.refusal_surgery, tcfg.surgery_target, tcfg.retain_divergence) == (True, "update", "refusal")
    assert retain_prompts(cfg) and DemoConfig().resolved() == DemoConfig()


def test_the_ablation_is_one_flag_away():
    """The default demo trains the method; --ablation adds the full-vocabulary ablation (once, after it)."""
    import argparse

    from openrlhf_safesteer.cli import config_values
    from openrlhf_safesteer.cli.demo import FLAGS, add_parser

    assert DemoConfig().trained_objectives() == ["exact"]
    assert DemoConfig(ablation=True).trained_objectives() == ["exact", "full_vocab"]
    assert DemoConfig(objectives=["full_vocab", "exact"], ablation=True).trained_objectives() == ["full_vocab", "exact"]
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["demo", "--ablation", "--no-cache"])
    cfg = DemoConfig(**config_values(args, DemoConfig, FLAGS))
    assert cfg.trained_objectives() == ["exact", "full_vocab"] and cfg.cache is False
