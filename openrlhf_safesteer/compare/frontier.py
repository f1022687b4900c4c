"""`python -m openrlhf_safesteer.compare.frontier --out DIR`: SafeSteer, DPO, PPO and SFT compared on their frontiers.

    bash recipes/compare_cpu.sh --frontier --out DIR [--from DEMO_DIR] [--spec GRID.json] [--phase dev|test|all]
    bash recipes/compare_cpu.sh --frontier --out DIR --summarise      # rebuild DIR/frontier.md from finished runs
    bash recipes/compare_cpu.sh --frontier --out DIR --dry-run        # the grid, its commands and its size; no compute

The protocol (docs/openrlhf.md, "The frontier protocol"):
1. **dev phase**: every method (`spec["methods"]`) over the same number of settings of its main knobs (lr, and its
   regularizer where it has one: SafeSteer's teacher coefficient, DPO's beta, PPO's KL coefficient; SFT has none, so
   more learning rates), each at `dev_seeds`, evaluated on the dev splits (`compare.evaluation.eval_sets("dev")`);
2. **selection**: the rule `frontier_stats.SELECTION_RULE`, written into DIR/spec.json when the grid starts (before
   any run) and applied to the dev means once every dev run has finished: DIR/selection.json. It is never rewritten;
3. **test phase**: each method at its chosen setting and at `test_lr_factors` x its learning rate (one point each
   side), at `test_seeds` (paired: seed k gives every method the same prompt order and draws), evaluated on the test
   splits; plus the plugin's SafeSteer arm at SafeSteer's chosen setting and the full-vocabulary ablation there, and
   the untrained reference rows (the base model and the steered teacher, inference-time steering) of each phase;
4. **report**: DIR/frontier.md, frontier.png, frontier.json (`compare.frontier_report`).

Every run is a row of DIR/runs.jsonl (settings, per-prompt verdicts of the four judges, compute), appended atomically
once the run is evaluated; a rerun skips the rows there, so the grid can be stopped (Ctrl-C, kill) and resumed. A run
interrupted half-way starts again. DIR/spec.json fixes the grid: resuming with another spec is refused.
Each training run is its own process (`compare.arms.arm_command`: OpenRLHF's train_dpo / train_ppo_ray / train_sft,
the plugin launcher, or the local engine `safesteer train`); this process evaluates it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import itertools
import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from openrlhf_safesteer.compare.arms import CompareConfig, arm_command, default_python
from openrlhf_safesteer.compare.evaluation import JUDGES, REWARD_JUDGE, eval_sets, set_prompts, sets_digest
from openrlhf_safesteer.compare.frontier_stats import SELECTION_RULE
from openrlhf_safesteer.files import atomic_write_json, atomic_write_text, read_jsonl

logger = logging.getLogger("openrlhf_safesteer.compare.frontier")

# which knob of a method's grid sets which setting of the comparison (CompareConfig / DemoConfig)
KNOBS = {"lr": "learning rate", "coeff": "teacher steering coefficient", "beta": "DPO beta", "kl": "PPO KL coefficient"}
ARM_KNOBS = {"safesteer_local": ("lr", "coeff"), "safesteer": ("lr", "coeff"), "dpo": ("lr", "beta"),
             "ppo": ("lr", "kl"), "sft": ("lr",)}
PHASES = ("dev", "test")
# methods the test phase adds at SafeSteer's chosen setting (not tuned: they follow SafeSteer's choice)
PLUGIN, ABLATION, BASE, TEACHER = "safesteer_plugin", "ablation", "base", "teacher"
REFERENCES = (BASE, TEACHER)
ROWS = "runs.jsonl"

DEFAULT_SPEC: dict = {
    "model": None,                        # None: the demo's embedded model
    # DemoConfig settings shared by every run (the demo's: 10 steps of 8 rollouts of <= 24 tokens, LoRA r 16, ...)
    "training": {},
    # Equal grid size: 6 settings each. lr steps of 4x; the regularizer at OpenRLHF's / the paper's default and one
    # stronger or weaker value; SFT (no regularizer) gets 6 learning rates.
    "methods": {
        "safesteer": {"arm": "safesteer_local", "lr": [1.5e-5, 6e-5, 2.4e-4], "coeff": [1.0, 1.5]},
        "dpo": {"arm": "dpo", "lr": [5e-6, 2e-5, 8e-5], "beta": [0.1, 0.5]},
        "ppo": {"arm": "ppo", "lr": [1.5e-5, 6e-5, 2.4e-4], "kl": [0.01, 0.1]},
        "sft": {"arm": "sft", "lr": [5e-6, 1e-5, 2e-5, 4e-5, 8e-5, 1.6e-4]},
    },
    "dev_seeds": [1000, 1001],
    "test_seeds": [0, 1, 2, 3, 4],
    "test_lr_factors": [0.5, 1.0, 2.0],
    "selection": {"max_borderline_rise": 5.0, "judge": "xstest_strmatch"},
    "headline_judge": "xstest_strmatch",
    "matched_rises": [3.0, 10.0],
    "reply_tokens": 64,
    "eval_batch_size": 96,       # rows generated at once in the evaluation (no logits kept: compare.evaluation)
    "threads": None,             # torch threads of the evaluation (None: torch's choice; 1 on a shared machine)
    "references": {"teacher": True, "ablation": True, "plugin": True},
    "ppo_samples_per_prompt": 4,
    "pair_max_new_tokens": 256,
    "pair_attempts": 2,
    "pair_filter": "refusal",
    "bootstrap_replicates": 2000,
    "eval_limit": None,
    # False only for tests: skips the protocol minimums (>= 2 dev seeds, >= 5 test seeds, a point each side)
    "protocol_check": True,
    # cpu: every arm through compare.arms on this machine (CPU stand-ins); llama: every arm through the GPU recipes
    # (recipes/train_safesteer_llama.sh, baseline_{dpo,ppo,sft}_llama.sh; LLAMA_SPEC), evaluated on `device`
    "launcher": "cpu",
    "train_prompts": None,       # llama: the SafeSteer run's prompt file (the recipes' 100 PKU-SafeRLHF prompts)
    "draws_per_prompt": 8,       # llama: DPO pairs / SFT targets per prompt (SafeSteer's samples per prompt)
    "device": None,              # evaluation device (None: cpu for the cpu launcher, cuda for llama)
}

# The GPU grid (recipes/compare_llama.sh --frontier): full fine-tuning at the recipes' learning rates (SafeSteer and
# PPO 1e-6, DPO 5e-7, SFT 1e-6) and 2x steps around them; the plugin is SafeSteer's arm itself there (no local
# engine), so there is no separate plugin row, and no ablation row.
LLAMA_SPEC: dict = {
    "model": "meta-llama/Meta-Llama-3-8B-Instruct", "launcher": "llama",
    "methods": {
        "safesteer": {"arm": "safesteer", "lr": [5e-7, 1e-6, 2e-6], "coeff": [1.0, 1.5]},
        "dpo": {"arm": "dpo", "lr": [2.5e-7, 5e-7, 1e-6], "beta": [0.1, 0.5]},
        "ppo": {"arm": "ppo", "lr": [5e-7, 1e-6, 2e-6], "kl": [0.01, 0.1]},
        "sft": {"arm": "sft", "lr": [2.5e-7, 5e-7, 1e-6, 2e-6, 4e-6, 8e-6]},
    },
    "references": {"teacher": True, "ablation": False, "plugin": False},
    "pair_max_new_tokens": 1024,
}
LLAMA_RECIPES = {"safesteer": "train_safesteer_llama.sh", "dpo": "baseline_dpo_llama.sh",
                 "ppo": "baseline_ppo_llama.sh", "sft": "baseline_sft_llama.sh"}
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ the grid


def load_spec(path: str | None, overrides: dict | None = None, launcher: str = "cpu") -> dict:
    """DEFAULT_SPEC (with LLAMA_SPEC over it for the llama launcher) with the top-level keys of the JSON file at
    `path` (and `overrides`) replacing its own."""
    spec = copy.deepcopy(DEFAULT_SPEC)
    if launcher == "llama":
        spec.update(copy.deepcopy(LLAMA_SPEC))
    if path:
        given = json.loads(Path(path).read_text())
        unknown = set(given) - set(spec)
        if unknown:
            raise ValueError(f"{path}: unknown grid keys {sorted(unknown)}; known: {sorted(spec)}")
        spec.update(given)
    spec.update(overrides or {})
    return spec


def config_id(config: dict) -> str:
    """{'lr': 6e-05, 'beta': 0.1} -> 'lr=6e-05 beta=0.1' (lr first, then the other knobs by name)."""
    keys = ["lr", *sorted(k for k in config if k != "lr")]
    return " ".join(f"{k}={config[k]!r}" for k in keys if k in config)


def grid_configs(method: dict) -> list[dict]:
    """Every combination of a method's knob values, lr varying fastest."""
    knobs = [k for k in ("coeff", "beta", "kl") if k in method]
    combos = itertools.product(*(method[k] for k in knobs), method["lr"])
    return [{"lr": float(c[-1]), **{k: float(v) for k, v in zip(knobs, c[:-1])}} for c in combos]


def validate_spec(spec: dict) -> None:
    """ValueError on a grid that breaks the protocol or names something unknown (before any compute)."""
    if not spec["methods"]:
        raise ValueError("the grid names no method")
    sizes = {}
    for name, method in spec["methods"].items():
        if name in (PLUGIN, ABLATION, *REFERENCES):
            raise ValueError(f"method name {name!r} is reserved")
        arm = method.get("arm")
        if arm not in ARM_KNOBS:
            raise ValueError(f"method {name}: arm must be one of {', '.join(ARM_KNOBS)}, got {arm!r}")
        extra = set(method) - {"arm", *ARM_KNOBS[arm]}
        if extra:
            raise ValueError(f"method {name} ({arm}): knobs {sorted(extra)} are not its own; it has "
                             f"{', '.join(ARM_KNOBS[arm])}")
        if not method.get("lr"):
            raise ValueError(f"method {name}: give at least one lr")
        values = [v for k in ARM_KNOBS[arm] if k in method for v in method[k]]
        if any(not isinstance(v, (int, float)) or v <= 0 for v in values):
            raise ValueError(f"method {name}: knob values must be positive numbers, got {values}")
        sizes[name] = len(grid_configs(method))
    for judge_name in (spec["headline_judge"], spec["selection"]["judge"]):
        if judge_name not in JUDGES:
            raise ValueError(f"unknown judge {judge_name!r}; choose from {', '.join(JUDGES)}")
    if spec["headline_judge"] == REWARD_JUDGE:
        raise ValueError(f"the headline judge must be one the PPO reward never saw; {REWARD_JUDGE!r} is its reward")
    if spec["reply_tokens"] < 64:
        raise ValueError(f"reply_tokens must be >= 64, got {spec['reply_tokens']}")
    if set(spec["dev_seeds"]) & set(spec["test_seeds"]):
        raise ValueError("dev and test seeds must differ (a test run never repeats a dev run)")
    if not spec["dev_seeds"] or not spec["test_seeds"] or not spec["test_lr_factors"]:
        raise ValueError("dev_seeds, test_seeds and test_lr_factors must not be empty")
    if 1.0 not in [float(f) for f in spec["test_lr_factors"]]:
        raise ValueError("test_lr_factors must contain 1 (the chosen setting itself)")
    if spec["protocol_check"]:
        if len(set(sizes.values())) > 1:
            raise ValueError(f"every method gets the same grid size (equal tuning budget), got {sizes}")
        if len(spec["dev_seeds"]) < 2 or len(spec["test_seeds"]) < 5:
            raise ValueError("the protocol needs >= 2 dev seeds and >= 5 test seeds")
        factors = [float(f) for f in spec["test_lr_factors"]]
        if not (min(factors) < 1.0 < max(factors)):
            raise ValueError("test_lr_factors needs a point on each side of the chosen lr (e.g. 0.5, 1, 2)")
    if spec["launcher"] not in ("cpu", "llama"):
        raise ValueError(f"launcher must be cpu or llama, got {spec['launcher']!r}")
    if spec["launcher"] == "llama":
        bad = {n: m["arm"] for n, m in spec["methods"].items() if m["arm"] not in LLAMA_RECIPES}
        if bad:
            raise ValueError(f"the llama launcher trains through the GPU recipes of {', '.join(LLAMA_RECIPES)}; "
                             f"got {bad}")
        if spec["references"].get("plugin") or spec["references"].get("ablation"):
            raise ValueError("the llama launcher's SafeSteer arm is the plugin: no plugin or ablation rows")
        if not spec["train_prompts"]:
            raise ValueError("the llama launcher needs train_prompts: the SafeSteer run's prompt file")
    if "safesteer" not in spec["methods"] and (spec["references"].get("plugin") or spec["references"].get("ablation")):
        raise ValueError("the plugin and ablation rows follow the 'safesteer' method's chosen setting: name it")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run (or an untrained reference row) of the grid."""

    phase: str
    method: str
    arm: str | None            # None: an untrained reference row (base, teacher)
    config: dict
    seed: int | None
    role: str                  # grid (dev), chosen / side (test), reference

    @property
    def key(self) -> str:
        return f"{self.phase}|{self.method}|{config_id(self.config) or '-'}|seed={self.seed}"

    @property
    def folder(self) -> str:
        cid = config_id(self.config).replace(" ", "_").replace("=", "") or "untrained"
        return f"{self.phase}/{self.method}/{cid}/seed{self.seed}"


def reference_runs(spec: dict, phase: str) -> list[Run]:
    runs = [Run(phase, BASE, None, {}, None, "reference")]
    if spec["references"].get("teacher"):
        runs.append(Run(phase, TEACHER, None, {}, None, "reference"))
    return runs


def dev_runs(spec: dict) -> list[Run]:
    """Seed-major (every setting once before any twice): a stopped grid has covered the settings evenly."""
    return [Run("dev", name, m["arm"], cfg, seed, "grid")
            for seed in spec["dev_seeds"] for name, m in spec["methods"].items() for cfg in grid_configs(m)]


def test_runs(spec: dict, selection: dict) -> list[Run]:
    """Each method at its chosen setting and at test_lr_factors x its lr; the plugin and the ablation at SafeSteer's."""
    runs = []
    for seed in spec["test_seeds"]:
        for name, m in spec["methods"].items():
            chosen = selection["methods"][name]["chosen"]
            for f in spec["test_lr_factors"]:
                cfg = {**chosen, "lr": float(chosen["lr"]) * float(f)}
                runs.append(Run("test", name, m["arm"], cfg, seed, "chosen" if float(f) == 1.0 else "side"))
        if "safesteer" in spec["methods"]:
            chosen = selection["methods"]["safesteer"]["chosen"]
            if spec["references"].get("plugin"):
                runs.append(Run("test", PLUGIN, "safesteer", dict(chosen), seed, "chosen"))
            if spec["references"].get("ablation"):
                runs.append(Run("test", ABLATION, "safesteer_local", dict(chosen), seed, "reference"))
    return runs


def compare_config(spec: dict, run: Run, out: Path, model: str) -> CompareConfig:
    """The comparison settings of one run: the spec's shared training settings, the run's seed and knobs."""
    from openrlhf_safesteer.demo.pipeline import DemoConfig

    demo = DemoConfig(out=str(out / "artifacts"), model=model, progress=False)
    for key, value in spec["training"].items():
        if not hasattr(demo, key):
            raise ValueError(f"training setting {key!r} is not a demo setting")
        setattr(demo, key, value)
    demo.micro_batch_size = min(demo.micro_batch_size, demo.prompts_per_step * demo.samples_per_prompt)
    if run.seed is not None:
        demo.seed = int(run.seed)
    cfg = CompareConfig(out=str(out), arms=[run.arm] if run.arm else ["safesteer_local"], demo=demo,
                        ppo_samples_per_prompt=spec["ppo_samples_per_prompt"],
                        pair_max_new_tokens=spec["pair_max_new_tokens"], pair_attempts=spec["pair_attempts"],
                        pair_filter=spec["pair_filter"], eval_limit=spec["eval_limit"],
                        ppo_reward=spec.get("ppo_reward"),
                        local_objective="full_vocab" if run.method == ABLATION else "exact")
    if "lr" in run.config:
        demo.lr = float(run.config["lr"])
    if "coeff" in run.config:
        demo.teacher_coeff = float(run.config["coeff"])
    if "beta" in run.config:
        cfg.dpo_beta = float(run.config["beta"])
    if "kl" in run.config:
        cfg.ppo_kl_coef = float(run.config["kl"])
    return cfg


def data_config(spec: dict, seed: int, out: Path, model: str) -> CompareConfig:
    """The settings of a seed's shared training data (every run at that seed reads its prompt draws; every DPO / SFT
    run trains on its pairs / targets): the spec's training settings at the default teacher coefficient, whatever
    SafeSteer's grid does with its own."""
    cfg = compare_config(spec, Run("data", "data", None, {}, seed, "data"), out, model)
    cfg.arms = sorted({m["arm"] for m in spec["methods"].values()})
    return cfg


# ------------------------------------------------------------------------------------------ rows


def load_rows(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in read_jsonl(out / ROWS)} if (out / ROWS).is_file() else {}


def append_row(out: Path, row: dict) -> None:
    """Rewrite runs.jsonl with the new row (atomically: an interrupted write never loses earlier rows)."""
    path = out / ROWS
    old = path.read_text() if path.is_file() else ""
    atomic_write_text(path, old + json.dumps(row) + "\n")


def row_from(run: Run, judged: dict, digest: str, **extra) -> dict:
    return {"key": run.key, "phase": run.phase, "method": run.method, "arm": run.arm, "config": run.config,
            "config_id": config_id(run.config), "seed": run.seed, "role": run.role, "sets_digest": digest,
            "verdicts": judged["verdicts"], "general": judged["general"], "empty": judged["empty"],
            "scores": judged["scores"], "eval_seconds": judged["seconds"], "date": time.strftime("%Y-%m-%d %H:%M"),
            **extra}


# What a published grid keeps (`--publish`): every row, the grid, the selection, the report, stage 1's artifacts and
# each seed's sampled training data; not the runs' replies or adapters. A published folder is a valid --out to resume.
PUBLISHED = ("spec.json", ROWS, "selection.json", "eval_sets_dev.json", "eval_sets_test.json", "frontier.md",
             "frontier.json", "frontier.png", "artifacts/safety_tokens.json", "artifacts/vector/*",
             "data/seed*/*.json", "data/seed*/*.jsonl")


def published_files(folder: Path) -> list[Path]:
    """The files of `folder` that `--publish` mirrors, relative to it, sorted."""
    return sorted({f.relative_to(folder) for pattern in PUBLISHED for f in folder.glob(pattern) if f.is_file()})


def mirror_files(source: Path, dest: Path, only_missing: bool = False) -> int:
    """Copy `published_files(source)` to `dest` (each file atomically, so a stopped copy leaves whole files); with
    only_missing, files `dest` already has are kept. Returns how many were copied."""
    copied = 0
    for rel in published_files(source):
        target = dest / rel
        if only_missing and target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.copy2(source / rel, partial)
        os.replace(partial, target)
        copied += 1
    return copied


def seed_from_published(published: Path, out: Path) -> int:
    """Start or extend --out from a published grid (another session's, committed): its files that --out lacks, and
    its rows when it holds more of them. Returns how many files were copied."""
    if not (published / "spec.json").is_file():
        return 0
    copied = mirror_files(published, out, only_missing=True)
    if len(load_rows(published)) > len(load_rows(out)):
        if not set(load_rows(out)) <= set(load_rows(published)):
            raise ValueError(f"{out / ROWS} and {published / ROWS} hold different runs: merge them by hand")
        atomic_write_text(out / ROWS, (published / ROWS).read_text())
        copied += 1
    return copied


# ------------------------------------------------------------------------------------------ stages


def prepare_out(spec: dict, out: Path) -> None:
    """DIR/spec.json: written with the selection rule when the grid starts; a resumed grid must match it."""
    out.mkdir(parents=True, exist_ok=True)
    stored = out / "spec.json"
    written = {**spec, "selection_rule": SELECTION_RULE.format(max_rise=spec["selection"]["max_borderline_rise"],
                                                               judge=spec["selection"]["judge"])}
    if stored.is_file():
        old = json.loads(stored.read_text())
        old.pop("written", None)
        if old != written:
            changed = sorted(k for k in set(old) | set(written) if old.get(k) != written.get(k))
            raise ValueError(f"{stored} holds another grid (differs in {', '.join(changed)}): resume with the "
                             f"same --spec, or start a new --out")
        return
    atomic_write_json(stored, {**written, "written": time.strftime("%Y-%m-%d %H:%M")})


def stage_artifacts(out: Path, model_dir: str, from_dir: str | None, spec: dict) -> tuple[Path, Path]:
    """DIR/artifacts/vector and safety_tokens.json: copied from --from, or made with the demo's stage 1."""
    from openrlhf_safesteer.compare.run import check_vector_fits

    art = out / "artifacts"
    vector, tokens = art / "vector", art / "safety_tokens.json"
    if (vector / "steering_vector.json").is_file() and tokens.is_file():
        return vector, tokens
    art.mkdir(parents=True, exist_ok=True)
    if from_dir:
        source = Path(from_dir)
        shutil.rmtree(vector, ignore_errors=True)
        shutil.copytree(source / "vector", vector)
        shutil.copy2(source / "safety_tokens.json", tokens)
        check_vector_fits(vector, model_dir)
        return vector, tokens
    from openrlhf_safesteer.demo.pipeline import make_artifacts
    from openrlhf_safesteer.loading import load_model

    cfg = compare_config(spec, Run("artifacts", "artifacts", None, {}, None, "data"), out, model_dir)
    model, tokenizer = load_model(model_dir)
    make_artifacts(model, tokenizer, cfg.demo, art, {})
    del model
    gc.collect()
    return vector, tokens


def evaluate_reference(run: Run, spec: dict, out: Path, model_dir: str, vector: Path, sets, digest: str) -> dict:
    """The base model, or the steered teacher (the base with the vector at the training coefficient), evaluated."""
    from openrlhf_safesteer.compare.evaluation import evaluate_judged
    from openrlhf_safesteer.loading import load_model
    from openrlhf_safesteer.steering import SteeringVector, steer

    if spec["launcher"] == "llama":
        import torch

        model, tokenizer = load_model(model_dir, dtype=torch.bfloat16, device=spec["device"] or "cuda")
    else:
        model, tokenizer = load_model(model_dir)
    coeff = None
    start = time.time()
    if run.method == TEACHER:
        cfg = compare_config(spec, run, out, model_dir)
        coeff = cfg.demo.teacher_coeff or cfg.demo.coeff
        with steer(model, SteeringVector.load(vector), coeff):
            judged = evaluate_judged(model, tokenizer, sets, spec["reply_tokens"], spec["eval_batch_size"])
    else:
        judged = evaluate_judged(model, tokenizer, sets, spec["reply_tokens"], spec["eval_batch_size"])
    del model
    gc.collect()
    folder = out / "runs" / run.folder
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "eval.json", judged["evaluation"], indent=None)
    return row_from(run, judged, digest, teacher_coeff=coeff, wall_seconds=round(time.time() - start, 1))


def adapter_changed(final: Path) -> int | None:
    """How many LoRA B matrices of a saved adapter are not all zero (0: the arm did not train); None: no adapter."""
    path = final / "adapter_model.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return sum(1 for name, t in load_file(str(path)).items() if "lora_B" in name and bool(t.abs().sum() > 0))


def execute_run(run: Run, spec: dict, out: Path, model_dir: str, vector: Path, tokens: Path, sets,
                digest: str) -> dict:
    """Train one run in its own process, evaluate it here; returns its row (the caller appends it)."""
    from openrlhf_safesteer.compare.evaluation import evaluate_judged
    from openrlhf_safesteer.compare.run import (
        arm_env,
        load_trained,
        nonzero_advantage_shares,
        timed_run,
        train_sequences,
        write_training_data,
    )

    folder = out / "runs" / run.folder
    shutil.rmtree(folder, ignore_errors=True)       # a run interrupted half-way starts again
    folder.mkdir(parents=True)
    cfg = compare_config(spec, run, out, model_dir)
    data_dir = out / "data" / f"seed{run.seed}"
    data_start = time.time()
    rewards_log = folder / "rewards.jsonl"
    if spec["launcher"] == "llama":
        data_stats = llama_training_data(spec, run.seed, data_dir, model_dir, vector)
        command, env = llama_command(run, spec, model_dir, data_dir, folder, vector, tokens)
        env = arm_env({**env, "SAFETY_REWARD_LOG": str(rewards_log)})
        env.setdefault("SAFETY_JUDGE", REWARD_JUDGE)     # a Llama Guard URL in the environment takes precedence
    else:
        cfg.validate()
        data_stats = write_training_data(data_config(spec, run.seed, out, model_dir), data_dir, model_dir, vector)
        command = arm_command(run.arm, cfg, model_dir, data_dir, folder, vector, tokens)
        env = arm_env({"SAFETY_REWARD_LOG": str(rewards_log), "SAFETY_JUDGE": REWARD_JUDGE})
    data_seconds = round(time.time() - data_start, 1) if data_stats.get("generated_now") else 0.0
    logger.info("%s: %s", run.key, " ".join(command))
    trained = timed_run(command, folder / "train.log", env)
    if trained["returncode"] != 0:
        tail = (folder / "train.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{run.key} failed (exit {trained['returncode']}); log {folder / 'train.log'}:\n{tail}")
    final = folder / "final"
    changed = adapter_changed(final)
    if spec["launcher"] == "llama":
        import torch

        from openrlhf_safesteer.loading import load_model

        model, tokenizer = load_model(str(final), dtype=torch.bfloat16, device=spec["device"] or "cuda")
    else:
        model, tokenizer = load_trained(model_dir, final)
    judged = evaluate_judged(model, tokenizer, sets, spec["reply_tokens"], spec["eval_batch_size"])
    del model
    gc.collect()
    atomic_write_json(folder / "eval.json", judged["evaluation"], indent=None)
    if changed is None and spec["launcher"] == "cpu":   # the local engine's merged model (2 GB), once evaluated
        shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    extra = {"train_seconds": trained["seconds"], "peak_rss_mb": trained["peak_rss_mb"],
             "data_seconds": data_seconds, "changed_lora_b": changed,
             "sequences": train_sequences(run.arm, cfg, data_stats), "command": command}
    if run.arm in ("dpo", "sft"):
        extra["data"] = {k: v for k, v in data_stats.items() if k != "generated_now"}
    if rewards_log.is_file():
        extra["nonzero_advantage_share"] = nonzero_advantage_shares(read_jsonl(rewards_log), cfg.rollouts_per_step)
        extra["reward_judge"] = REWARD_JUDGE
    extra["wall_seconds"] = round(trained["seconds"] + judged["seconds"] + data_seconds, 1)
    return row_from(run, judged, digest, **extra)


def llama_training_data(spec: dict, seed: int, data_dir: Path, model_dir: str, vector: Path) -> dict:
    """The GPU grid's DPO pairs and SFT targets at `seed` (`compare.pairs` in its own process, on the GPU): every
    prompt of the SafeSteer run `draws_per_prompt` times; made once per seed."""
    from openrlhf_safesteer.compare.run import timed_run

    stats_file = data_dir / "data_stats.json"
    if not {m["arm"] for m in spec["methods"].values()} & {"dpo", "sft"}:
        return {"generated_now": False}
    if stats_file.is_file():
        return {**json.loads(stats_file.read_text()), "generated_now": False}
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [default_python(), "-m", "openrlhf_safesteer.compare.pairs", *pairs_flags(spec, seed, data_dir,
                                                                                       model_dir, vector)]
    result = timed_run(command, data_dir / "pairs.log", _python_env())
    if result["returncode"] != 0 or not stats_file.is_file():
        raise RuntimeError(f"the training data at seed {seed} failed; log {data_dir / 'pairs.log'}")
    return {**json.loads(stats_file.read_text()), "generated_now": True}


def pairs_flags(spec: dict, seed: int, data_dir: Path, model: str, vector: Path) -> list[str]:
    return ["--model", model, "--vector", str(vector), "--prompts", str(spec["train_prompts"]), "--out", str(data_dir),
            "--draws-per-prompt", str(spec["draws_per_prompt"]), "--max-new-tokens", str(spec["pair_max_new_tokens"]),
            "--attempts", str(spec["pair_attempts"]), "--filter", spec["pair_filter"], "--seed", str(seed)]


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def llama_command(run: Run, spec: dict, model: str, data_dir: Path, folder: Path, vector: Path,
                  tokens: Path) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of one GPU run: the arm's own recipe, its learning rate, seed and regularizer appended
    (OpenRLHF's parser keeps the last value of a repeated flag), WORK = the run's folder."""
    cfg = run.config
    seed = str(run.seed)
    env = {"WORK": str(folder.resolve()), "MODEL": model, "PYTHON": default_python()}
    if run.arm == "safesteer":
        # the recipe skips its stage 1 when the vector, S and prompts are in WORK: the grid's own
        folder.mkdir(parents=True, exist_ok=True)
        for name, target in (("vector", vector), ("safety_tokens.json", tokens),
                             ("pku_saferlhf_unsafe_100.jsonl", Path(spec["train_prompts"]))):
            link = folder / name
            if not link.exists():
                link.symlink_to(Path(target).resolve())
        flags = ["--actor.adam.lr", repr(cfg["lr"]), "--train.seed", seed,
                 "--safesteer.coeff", repr(cfg.get("coeff", 1.0))]
    elif run.arm == "dpo":
        env["DATASET"] = str((data_dir / "dpo_pairs.jsonl").resolve())
        # one pair per SafeSteer rollout, batch 32: SafeSteer's optimizer steps
        flags = ["--adam.lr", repr(cfg["lr"]), "--model.beta", repr(cfg.get("beta", 0.1)), "--train.seed", seed,
                 "--train.batch_size", "32"]
    elif run.arm == "ppo":
        env["PROMPTS"] = str(Path(spec["train_prompts"]).resolve())
        flags = ["--actor.adam.lr", repr(cfg["lr"]), "--algo.kl.init_coef", repr(cfg.get("kl", 0.01)),
                 "--train.seed", seed]
    elif run.arm == "sft":
        env["DATASET"] = str((data_dir / "sft.jsonl").resolve())
        flags = ["--adam.lr", repr(cfg["lr"]), "--train.seed", seed]
    else:
        raise ValueError(f"no GPU recipe for arm {run.arm!r}")
    return ["bash", str(REPO / "recipes" / LLAMA_RECIPES[run.arm]), *flags], env


def dev_summaries(spec: dict, rows: dict[str, dict]) -> dict[str, list[dict]]:
    """Per method, each dev setting's mean effects over its dev seeds (selection judge), from the finished rows."""
    import numpy as np

    from openrlhf_safesteer.compare.frontier_report import effects_of

    judge_name = spec["selection"]["judge"]
    base = rows.get(Run("dev", BASE, None, {}, None, "reference").key)
    out: dict[str, list[dict]] = {}
    for name, method in spec["methods"].items():
        entries = []
        for cfg in grid_configs(method):
            runs = [rows.get(Run("dev", name, method["arm"], cfg, s, "grid").key) for s in spec["dev_seeds"]]
            done = [r for r in runs if r is not None]
            if not done or base is None:
                entries.append({"config": cfg, "n": 0})
                continue
            effects = [effects_of(base, r, judge_name) for r in done]
            entries.append({"config": cfg, "n": len(done), **{m: float(np.mean([e[m] for e in effects]))
                                                              for m in effects[0]}})
        out[name] = entries
    return out


def write_selection(spec: dict, out: Path, rows: dict[str, dict]) -> dict:
    """Apply the written rule to the finished dev grid: DIR/selection.json (kept once written)."""
    from openrlhf_safesteer.compare.frontier_stats import select_config

    path = out / "selection.json"
    if path.is_file():
        return json.loads(path.read_text())
    bound = spec["selection"]["max_borderline_rise"]
    summaries = dev_summaries(spec, rows)
    methods = {}
    for name, entries in summaries.items():
        missing = [config_id(e["config"]) for e in entries if e["n"] < len(spec["dev_seeds"])]
        if missing:
            raise RuntimeError(f"the dev grid of {name} is not finished ({', '.join(missing)}); run the dev phase")
        chosen = select_config(entries, bound)
        methods[name] = {"chosen": chosen["config"], "within_bound": chosen["within_bound"], "settings": entries}
    selection = {"rule": SELECTION_RULE.format(max_rise=bound, judge=spec["selection"]["judge"]),
                 "judge": spec["selection"]["judge"], "max_borderline_rise": bound, "dev_seeds": spec["dev_seeds"],
                 "methods": methods, "written": time.strftime("%Y-%m-%d %H:%M")}
    atomic_write_json(path, selection)
    for name, m in methods.items():
        logger.info("selection: %s -> %s%s", name, config_id(m["chosen"]),
                    "" if m["within_bound"] else f" (no setting within +{bound:g} borderline points)")
    return selection


# ------------------------------------------------------------------------------------------ driver


def phase_sets(spec: dict, out: Path, phase: str):
    """The phase's eval sets; their prompts are written once (DIR/eval_sets_PHASE.json) and every row keeps the
    digest, so a row measured on other prompts is refused rather than compared."""
    sets = eval_sets(phase, spec["eval_limit"])
    digest = sets_digest(sets)
    path = out / f"eval_sets_{phase}.json"
    if not path.is_file():
        atomic_write_json(path, {"digest": digest, "prompts": set_prompts(sets)}, indent=None)
    elif json.loads(path.read_text())["digest"] != digest:
        raise ValueError(f"{path} was written for other {phase} prompts (the project's sets changed): new --out")
    return sets, digest


def run_frontier(spec: dict, out: Path, from_dir: str | None = None, phase: str = "all",
                 max_runs: int | None = None, publish: Path | None = None,
                 methods: list[str] | None = None, threads: int | None = None) -> dict:
    """Run the grid (dev, selection, test) as far as `phase` and `max_runs` allow; returns the status. With
    `publish`, its small files (`PUBLISHED`) are mirrored there after every finished run. With `methods`, only
    those methods' training runs are trained in this call (the untrained references always are): a grid whose
    runs are spread over calls or machines by memory or time (a DPO run needs 17 GB where the others need 5). `threads`
    replaces the spec's for this call, training subprocesses included (OMP_NUM_THREADS): how fast, not what, the grid
    computes; every row records the threads it ran with."""
    from openrlhf_safesteer.cpu_kernels import onednn_linear
    from openrlhf_safesteer.loading import DEFAULT_MODEL, resolve_model

    validate_spec(spec)
    check_methods(spec, methods)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    model_dir = resolve_model(spec["model"] or DEFAULT_MODEL)
    prepare_out(spec, out)
    import torch

    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if threads or spec["threads"]:
        torch.set_num_threads(int(threads or spec["threads"]))
    rows = load_rows(out)
    trained = 0
    status: dict = {"done": 0, "left": 0, "stopped": None}
    with onednn_linear():
        vector, tokens = stage_artifacts(out, model_dir, from_dir, spec)
        for ph in (PHASES if phase == "all" else (phase,)):
            sets, digest = phase_sets(spec, out, ph)
            if ph == "test":
                if not (out / "selection.json").is_file():
                    try:
                        write_selection(spec, out, rows)
                    except RuntimeError as error:
                        status["stopped"] = str(error)
                        break
                runs = test_runs(spec, json.loads((out / "selection.json").read_text()))
            else:
                runs = dev_runs(spec)
            for run in [*reference_runs(spec, ph), *runs]:
                if run.key in rows:
                    if rows[run.key]["sets_digest"] != digest:
                        raise ValueError(f"{run.key} in {out / ROWS} was evaluated on other prompts")
                    status["done"] += 1
                    continue
                if (max_runs is not None and trained >= max_runs) or (
                        methods and run.arm is not None and run.method not in methods):
                    status["left"] += 1
                    continue
                start = time.time()
                if run.arm is None:
                    row = evaluate_reference(run, spec, out, model_dir, vector, sets, digest)
                else:
                    row = execute_run(run, spec, out, model_dir, vector, tokens, sets, digest)
                    trained += 1
                row["threads"] = {"evaluation": torch.get_num_threads(),
                                  "training": int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)}
                append_row(out, row)
                rows[run.key] = row
                if publish is not None:
                    mirror_files(out, publish)
                status["done"] += 1
                logger.info("%s done in %.0f s", run.key, time.time() - start)
            if ph == "dev" and status["left"] == 0:
                write_selection(spec, out, rows)
    status["trained_now"] = trained
    if status["done"]:
        from openrlhf_safesteer.compare.frontier_report import write_report

        write_report(out)
        if publish is not None:
            mirror_files(out, publish)
    return status


def check_methods(spec: dict, methods: list[str] | None) -> None:
    """`--methods` names the grid's methods or its test-phase rows that follow SafeSteer's choice."""
    known = [*spec["methods"], PLUGIN, ABLATION]
    unknown = [m for m in methods or [] if m not in known]
    if unknown:
        raise ValueError(f"--methods {' '.join(unknown)}: not in this grid (its methods: {', '.join(known)})")


def dry_run(spec: dict, out: Path) -> str:
    """The grid's size and the command of each method's first run; checks the spec and OpenRLHF's parsers."""
    from openrlhf_safesteer.loading import DEFAULT_MODEL
    from openrlhf_safesteer.plugin.install import parse_openrlhf_flags

    validate_spec(spec)
    model = spec["model"] or DEFAULT_MODEL
    lines = [f"grid: {', '.join(f'{n} ({len(grid_configs(m))} settings)' for n, m in spec['methods'].items())}",
             f"dev runs: {len(dev_runs(spec))} (seeds {spec['dev_seeds']}); test runs: "
             f"{len(test_runs(spec, _placeholder_selection(spec)))} (seeds {spec['test_seeds']}, lr x "
             f"{spec['test_lr_factors']}; the plugin and ablation rows where the grid has them)",
             "selection rule: " + SELECTION_RULE.format(max_rise=spec["selection"]["max_borderline_rise"],
                                                        judge=spec["selection"]["judge"])]
    entry = {"dpo": "openrlhf.cli.train_dpo", "ppo": "openrlhf.cli.train_ppo_ray", "sft": "openrlhf.cli.train_sft"}
    seen = set()
    for run in dev_runs(spec):
        if run.method in seen:
            continue
        seen.add(run.method)
        if spec["launcher"] == "llama":
            lines.append(llama_dry_run(run, spec, out, model))
            continue
        cfg = compare_config(spec, run, out, model)
        cfg.validate()
        command = arm_command(run.arm, cfg, model, out / "data" / f"seed{run.seed}", out / "runs" / run.folder,
                              out / "artifacts" / "vector", out / "artifacts" / "safety_tokens.json")
        if run.arm in entry:
            start = command.index("openrlhf_safesteer.plugin.stock") + 2
            parse_openrlhf_flags(entry[run.arm], command[start:])
        lines.append(f"# {run.key}\n{shlex.join(command)}")
    return "\n".join(lines)


def llama_dry_run(run: Run, spec: dict, out: Path, model: str) -> str:
    """The run's GPU recipe with --dry-run (which checks every flag with OpenRLHF's own parser), in a scratch WORK;
    ValueError with the recipe's output when it fails."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "run"
        data_dir = out / "data" / f"seed{run.seed}"
        argv, env = llama_command(run, spec, model, data_dir, folder, out / "artifacts" / "vector",
                                  out / "artifacts" / "safety_tokens.json")
        env = {**_python_env(), **env, "SAFETY_JUDGE": "refusal"}
        proc = subprocess.run([*argv, "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise ValueError(f"{run.key}: {argv[1]} --dry-run failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        said = proc.stdout.strip().splitlines()
        checked = next((line for line in reversed(said) if "OK" in line), said[-1] if said else "")
    text = f"# {run.key}\nWORK=<run folder> {' '.join(f'{k}={v}' for k, v in env.items() if k in ('DATASET', 'PROMPTS'))} " \
           f"{shlex.join(argv)}\n# {checked}"
    if run.arm == "dpo":     # the DPO pairs and SFT targets are made together
        pairs = [default_python(), "-m", "openrlhf_safesteer.compare.pairs",
                 *pairs_flags(spec, run.seed, out / "data" / f"seed{run.seed}", model, out / "artifacts" / "vector")]
        from openrlhf_safesteer.compare.pairs import main as pairs_main

        if pairs_main([*pairs[3:], "--dry-run"]) != 0:
            raise ValueError("the pairs command's dry run failed")
        text += f"\n# its training data, once per seed:\n{shlex.join(pairs)}"
    return text


def _placeholder_selection(spec: dict) -> dict:
    return {"methods": {n: {"chosen": grid_configs(m)[0]} for n, m in spec["methods"].items()}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m openrlhf_safesteer.compare.frontier",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the grid's folder (a rerun resumes it)")
    p.add_argument("--spec", default=None, help="grid JSON: keys of DEFAULT_SPEC to replace (default: the module's)")
    p.add_argument("--from", dest="from_dir", default=None,
                   help="a finished `safesteer demo` (or compare artifacts) folder: reuse its vector and S")
    p.add_argument("--phase", choices=("dev", "test", "all"), default="all",
                   help="dev: the dev grid and the selection; test: the test frontier (needs the selection)")
    p.add_argument("--max-runs", type=int, default=None, help="train at most N runs in this call, then stop")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="train only these methods' runs in this call (the grid's method names, %s, %s); the "
                        "selection waits for every dev run" % (PLUGIN, ABLATION))
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of this call, its training subprocesses included (default: the grid's "
                        "'threads' for the evaluation, OMP_NUM_THREADS for training); recorded in each row")
    p.add_argument("--publish", default=None, metavar="PUB",
                   help="mirror the grid's small files (rows, spec, selection, report, artifacts, sampled data) to "
                        "PUB after every run, and start or extend --out from PUB: a grid spread over machines or "
                        "sessions whose --out is not kept, with PUB committed (docs/results/)")
    p.add_argument("--summarise", action="store_true", help="rebuild DIR/frontier.md, .png, .json from finished runs")
    p.add_argument("--dry-run", action="store_true", help="check the grid and print its size and commands")
    p.add_argument("--launcher", choices=("cpu", "llama"), default="cpu",
                   help="cpu: this machine (recipes/compare_cpu.sh); llama: the GPU recipes (recipes/compare_llama.sh)")
    p.add_argument("--train-prompts", default=None, help="llama: the SafeSteer run's prompt file")
    p.add_argument("--model", default=None, help="the model (default: the grid's)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if args.summarise:
            from openrlhf_safesteer.compare.frontier_report import write_report

            if not (out / ROWS).is_file():
                raise FileNotFoundError(f"no {out / ROWS}: nothing has finished there")
            print(write_report(out))
            if args.publish:
                mirror_files(out, Path(args.publish))
            return 0
        publish = Path(args.publish) if args.publish else None
        if publish is not None and not args.dry_run:
            logger.info("%d files taken from the published grid %s", seed_from_published(publish, out), publish)
        overrides = {k: v for k, v in (("train_prompts", args.train_prompts), ("model", args.model)) if v}
        spec = load_spec(args.spec, overrides, args.launcher)
        if (out / "spec.json").is_file() and not args.spec:     # resume with the stored grid
            stored = json.loads((out / "spec.json").read_text())
            spec = {k: stored[k] for k in DEFAULT_SPEC if k in stored}
        if args.dry_run:
            print(dry_run(spec, out))
            print("dry run OK: the grid and every method's command checked; nothing trained")
            return 0
        if args.from_dir and not (Path(args.from_dir) / "vector" / "steering_vector.json").is_file():
            raise FileNotFoundError(f"--from {args.from_dir}: no vector/ there (a `safesteer demo --out` folder)")
        status = run_frontier(spec, out, args.from_dir, args.phase, args.max_runs, publish, args.methods,
                              args.threads)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:     # a run failed: the grid stops there (a rerun resumes at that run)
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(status))
    if status["stopped"]:
        print(f"stopped: {status['stopped']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
