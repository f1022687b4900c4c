"""`python -m openrlhf_safesteer.compare.run --out DIR [--from DEMO_DIR]`: the comparison, stage by stage.

Stages (each timed; DIR/report.json has the times):
1. artifacts: the steering vector, S and the base model's held-out evaluation, from --from or made here
   with the demo's stage 1 (`demo.pipeline.make_artifacts`);
2. data: the training prompt draws of every arm, and DPO's preference pairs (the steered teacher's and
   the base model's sampled replies to the same draws);
3. each arm in its own process (Ray, DeepSpeed and the local engine start and end with it), its wall
   time and the peak RSS summed over its process tree (Ray's workers included), then its evaluation.
   An arm's DIR/arms/ARM/result.json is written atomically once it is evaluated; a rerun skips it;
4. parity: the local engine's loss on the plugin's first micro-batch (same rollouts, same weights);
5. DIR/report.json, report.md and comparison.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from openrlhf_safesteer.compare.arms import (
    ARMS,
    CompareConfig,
    arm_command,
    prompt_schedule,
    write_prompts,
)
from openrlhf_safesteer.files import atomic_write_json as write_json
from openrlhf_safesteer.files import atomic_write_text

logger = logging.getLogger("openrlhf_safesteer.compare")

REPO = Path(__file__).resolve().parents[2]
GB = 1024 ** 3


# --------------------------------------------------------------------------------------------- resources


def model_bytes(model_dir: str) -> int:
    """Size of the checkpoint's weight files (the float32 embedded model: about 2 GB)."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) or \
        sum(f.stat().st_size for f in Path(model_dir).glob("*.bin"))


def resource_needs(cfg: CompareConfig, weights: int) -> dict[str, int]:
    """Bytes of memory and disk the run needs, estimated from the checkpoint size.

    Memory, measured on the 2 GB float32 embedded model (README): the Ray arms peak at 15-16 GB summed
    over their processes (policy with DeepSpeed's buffers about 6 GB, the rollout engine 3.4, the steered
    reference 2.8, Ray's own processes the rest), about 7.5 x the weights; the driver holds one more copy
    while it evaluates. Disk: the local engine's merged final model (one copy) until it is evaluated.
    """
    ray_arms = any(a in cfg.arms for a in ("safesteer", "safesteer_sampled", "dpo", "ppo"))
    memory = (8 if ray_arms else 3) * weights + GB
    disk = (weights if "safesteer_local" in cfg.arms else 0) + GB // 2
    return {"memory": memory, "disk": disk}


def available_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


def check_resources(cfg: CompareConfig, model_dir: str) -> dict[str, int]:
    """Refuse to start when this machine has less memory or disk than the run needs (before any compute)."""
    needs = resource_needs(cfg, model_bytes(model_dir))
    have = {"memory": available_memory(), "disk": shutil.disk_usage(Path(cfg.out).resolve().parent).free}
    for what in ("memory", "disk"):
        if have[what] < needs[what]:
            raise ValueError(f"not enough {what} for the comparison: it needs about {needs[what] / GB:.1f} GB "
                               f"({', '.join(cfg.arms)} on {model_dir}), {have[what] / GB:.1f} GB available")
    return needs


def check_vector_fits(vector_dir: Path, model_dir: str) -> None:
    """The vector was made for this model's width and depth (config.json only, no weights)."""
    from transformers import AutoConfig

    from openrlhf_safesteer.steering import IncompatibleArtifactError, SteeringVector

    problem = SteeringVector.load(vector_dir).config_mismatch(AutoConfig.from_pretrained(model_dir))
    if problem:
        raise IncompatibleArtifactError(f"{vector_dir} does not fit {model_dir}: {problem}")


# --------------------------------------------------------------------------------------------- stages


RUN_PIDS_ENV = "SAFESTEER_RUN_PIDS"


def timed_run(command: list[str], log_path: Path, env: dict[str, str], poll_seconds: float = 0.5) -> dict:
    """Run `command`, logging to `log_path`; returns {returncode, seconds, peak_rss_mb}.

    peak_rss_mb is the largest sum of RSS over the process and all its descendants (Ray's GCS, raylet
    and actor workers are children of the driver that started them), sampled every poll_seconds (more often
    in the first second). A process of the run that is no descendant of it (the test suite's interpreters
    are forks of a warm server, tests/forkserver.py) counts, with its descendants, once it has written its
    pid into the folder that $SAFESTEER_RUN_PIDS names in the run's environment.
    """
    import tempfile

    import psutil

    start = time.time()
    peak = 0
    with open(log_path, "w", encoding="utf-8") as log, tempfile.TemporaryDirectory(prefix="run-pids-") as pids:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**env, RUN_PIDS_ENV: pids},
                                cwd=REPO)
        root = psutil.Process(proc.pid)
        wait = 0.02
        while proc.poll() is None:
            peak = max(peak, tree_rss([root, *registered_processes(Path(pids))]))
            time.sleep(wait)
            wait = min(poll_seconds, 2 * wait)    # a run of a second (a tiny model's) is sampled too
    return {"returncode": proc.returncode, "seconds": round(time.time() - start, 1),
            "peak_rss_mb": round(peak / 2 ** 20)}


def registered_processes(folder: Path) -> list:
    """The live processes whose pids are file names in `folder`."""
    import psutil

    found = []
    for entry in folder.iterdir():
        try:
            found.append(psutil.Process(int(entry.name)))
        except (ValueError, psutil.Error):
            pass
    return found


def tree_rss(roots: list) -> int:
    """Bytes of RSS summed over `roots` and all their descendants, each process once."""
    import psutil

    seen: dict[int, int] = {}
    for root in roots:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in family:
            if p.pid not in seen:
                try:
                    seen[p.pid] = p.memory_info().rss
                except psutil.Error:
                    pass
    return sum(seen.values())


def stage_artifacts(cfg: CompareConfig, out: Path, model_dir: str, sets, timings: dict) -> dict:
    """Vector, S and the base evaluation in out/artifacts (copied from --from, or made here)."""
    from openrlhf_safesteer.demo.evaluate import evaluate
    from openrlhf_safesteer.demo.pipeline import make_artifacts
    from openrlhf_safesteer.loading import load_model

    art = out / "artifacts"
    base_file = art / "eval_base.json"
    if (art / "vector" / "steering_vector.json").is_file() and (art / "safety_tokens.json").is_file() \
            and base_file.is_file() and _same_prompts(json.loads(base_file.read_text()), sets):
        return json.loads(base_file.read_text())
    art.mkdir(parents=True, exist_ok=True)
    start = time.time()
    base_eval = None
    if cfg.from_dir:
        source = Path(cfg.from_dir)
        for name in ("vector", "safety_tokens.json"):
            target = art / name
            if (source / name).is_dir():
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(source / name, target)
            else:
                shutil.copy2(source / name, target)
        check_vector_fits(art / "vector", model_dir)
        if (source / "eval_base.json").is_file():
            candidate = json.loads((source / "eval_base.json").read_text())
            base_eval = candidate if _same_prompts(candidate, sets) else None
    model, tokenizer = load_model(model_dir)
    if not cfg.from_dir:
        make_artifacts(model, tokenizer, cfg.demo, art, {})
    if base_eval is None:
        base_eval = evaluate(model, tokenizer, sets, cfg.demo.refusal_tokens, progress=cfg.demo.progress)
    write_json(base_file, base_eval)
    del model
    gc.collect()
    timings["artifacts"] = round(time.time() - start, 1)
    return base_eval


def _same_prompts(evaluation: dict, sets) -> bool:
    samples = evaluation.get("samples", {})
    return ([s["prompt"] for s in samples.get("harmful", [])] == sets.harmful
            and [s["prompt"] for s in samples.get("harmless", [])] == sets.harmless
            and [s["question"] for s in samples.get("general", [])] == [q["question"] for q in sets.general])


def stage_data(cfg: CompareConfig, out: Path, model_dir: str, timings: dict) -> Path:
    """Every arm's training prompts, and DPO's pairs and SFT's targets (generated once; kept across reruns)."""
    data_dir = out / "data"
    start = time.time()
    stats = write_training_data(cfg, data_dir, model_dir, out / "artifacts" / "vector")
    if stats.get("generated_now"):
        timings["dpo pairs / sft data"] = round(time.time() - start, 1)
    return data_dir


DATA_STATS = "data_stats.json"


def write_training_data(cfg: CompareConfig, data_dir: Path, model_dir: str, vector_dir: Path) -> dict:
    """The prompt draws of every arm at cfg's seed, and (for the dpo / sft arms) the pairs and targets sampled from
    the same draws (`compare.pairs`). The sampled data is made once per settings: data_stats.json records them, and
    a folder made with other settings (or an older layout) is made again. Returns the stats (with
    "generated_now")."""
    from openrlhf_safesteer.demo.pipeline import train_prompts

    d = cfg.demo
    prompts = train_prompts(d)
    write_prompts(data_dir / "train_split.jsonl", prompts)
    draws = prompt_schedule(prompts, d.steps, d.prompts_per_step, d.seed)
    write_prompts(data_dir / "train_prompts.jsonl", draws)
    if "ppo" in cfg.arms:
        ppo_per_step = cfg.rollouts_per_step // cfg.ppo_samples_per_prompt
        # the same seeded order as the other arms' draws (step_prompts permutes per pass), 4 samples of each
        write_prompts(data_dir / "ppo_prompts.jsonl", prompt_schedule(prompts, d.steps, ppo_per_step, d.seed))
    want_pairs, want_sft = "dpo" in cfg.arms, "sft" in cfg.arms
    if not (want_pairs or want_sft):
        return {"generated_now": False}
    settings = {"seed": d.seed, "coeff": d.teacher_coeff or d.coeff, "draws": draws,
                "max_new_tokens": cfg.pair_max_new_tokens, "attempts": cfg.pair_attempts, "fill": cfg.fill_budget,
                "filter": cfg.pair_filter, "model": model_dir, "pairs": want_pairs, "sft": want_sft}
    stats_file = data_dir / DATA_STATS
    if stats_file.is_file():
        stored = json.loads(stats_file.read_text())
        if stored.get("settings") == settings and (not want_pairs or (data_dir / "dpo_pairs.jsonl").is_file()) \
                and (not want_sft or (data_dir / "sft.jsonl").is_file()):
            return {**stored["stats"], "generated_now": False}
    from openrlhf_safesteer.compare.evaluation import judge
    from openrlhf_safesteer.compare.pairs import build_training_data
    from openrlhf_safesteer.loading import load_model
    from openrlhf_safesteer.steering import SteeringVector

    start = time.time()
    model, tokenizer = load_model(model_dir)
    # one teacher sampling serves both parts
    made = build_training_data(model, tokenizer, SteeringVector.load(vector_dir), settings["coeff"], draws, d.seed,
                               cfg.pair_max_new_tokens, cfg.pair_attempts, cfg.fill_budget, want_pairs, want_sft,
                               refuses=None if cfg.pair_filter == "none" else judge(cfg.pair_filter),
                               filter_pairs=cfg.pair_filter != "none")
    del model
    gc.collect()
    for name, part in (("dpo_pairs.jsonl", "dpo_pairs"), ("sft.jsonl", "sft")):
        if part in made:
            atomic_write_text(data_dir / name, "".join(json.dumps(r) + "\n" for r in made[part]))
    stats = {**made["stats"], "seconds": round(time.time() - start, 1)}
    write_json(stats_file, {"settings": settings, "stats": stats})
    logger.info("training data at seed %d (%d prompt draws, %.0f s): DPO pairs surviving %s (repeated to fill the "
                "budget %s), SFT rows %s", d.seed, len(draws), stats["seconds"], stats.get("dpo_pairs_surviving", "-"),
                stats.get("dpo_pairs_repeated", "-"), stats.get("sft_rows_surviving", "-"))
    return {**stats, "generated_now": True}


def load_trained(model_dir: str, final: Path):
    """(model, tokenizer) of an arm's final folder: a PEFT adapter merged into the base, or a full model."""
    from openrlhf_safesteer.loading import load_model

    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        model, tokenizer = load_model(model_dir)
        return PeftModel.from_pretrained(model, str(final)).merge_and_unload(), tokenizer
    return load_model(str(final))


def changed_tensors(model, base_state: dict[str, torch.Tensor]) -> int:
    """How many of the base model's tensors differ in `model` (0: the arm did not train)."""
    return sum(1 for name, value in model.state_dict().items()
               if name in base_state and not torch.equal(value, base_state[name]))


def nonzero_advantage_shares(records: list[dict], rollouts_per_step: int) -> list[float]:
    """Per rollout step, the share of prompt groups whose rewards are not all equal: with a group-mean baseline
    (REINFORCE++-baseline, GRPO) and the KL in the loss, only these carry a non-zero advantage.

    records: the reward log's lines ({"user", "reward"}) in call order; a step's replies are judged before the next
    step's rollouts start, so consecutive blocks of `rollouts_per_step` lines are the steps (a last partial block is
    left out); within a step a group is the replies to one user prompt."""
    shares = []
    for start in range(0, len(records) - rollouts_per_step + 1, rollouts_per_step):
        groups: dict[str, set] = {}
        for r in records[start:start + rollouts_per_step]:
            groups.setdefault(r["user"], set()).add(float(r["reward"]))
        shares.append(sum(len(v) > 1 for v in groups.values()) / len(groups))
    return shares


def train_sequences(arm: str, cfg: CompareConfig, data_stats: dict | None = None) -> int:
    """Sequences an arm's training processed (rollouts, or DPO's chosen + rejected, or SFT's rows), plus the
    sequences sampled to make its data (DPO, SFT); the same budget of optimizer steps for every arm."""
    d = cfg.demo
    per_run = d.steps * cfg.rollouts_per_step
    if arm == "dpo":
        return 2 * per_run + int((data_stats or {}).get("generated_sequences", 0))
    if arm == "sft":
        return per_run + int((data_stats or {}).get("generated_sequences", 0))
    return per_run


def arm_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    # Each arm's processes work mostly in turn (generate, score, train), so each may use every core.
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    env["SAFESTEER_CPU_DTYPE"] = "fp32"            # every arm in the local engine's precision (compat)
    env["SAFETY_JUDGE"] = "refusal"                # the PPO arm's reward: the offline refusal judge
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    return env


def stage_arm(arm: str, cfg: CompareConfig, out: Path, model_dir: str, data_dir: Path, sets) -> dict:
    """Train one arm in its own process, evaluate its final model; returns (and writes) its result."""
    from openrlhf_safesteer.demo.evaluate import evaluate
    from openrlhf_safesteer.loading import load_model

    arm_dir = out / "arms" / arm
    result_file = arm_dir / "result.json"
    if result_file.is_file():
        logger.info("%s: finished in an earlier run (%s), skipped", arm, result_file)
        return json.loads(result_file.read_text())
    shutil.rmtree(arm_dir, ignore_errors=True)   # a half-trained arm starts again
    arm_dir.mkdir(parents=True)
    command = arm_command(arm, cfg, model_dir, data_dir, arm_dir, out / "artifacts" / "vector",
                          out / "artifacts" / "safety_tokens.json")
    logger.info("%s: %s", arm, " ".join(command))
    rewards_log = arm_dir / "rewards.jsonl"
    run = timed_run(command, arm_dir / "train.log", arm_env({"SAFETY_REWARD_LOG": str(rewards_log)}))
    if run["returncode"] != 0:
        tail = (arm_dir / "train.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"arm {arm} failed (exit {run['returncode']}); log {arm_dir / 'train.log'}:\n{tail}")
    final = arm_dir / "final"
    start = time.time()
    model, tokenizer = load_trained(model_dir, final)
    changed = changed_tensors(model, load_model(model_dir)[0].state_dict())
    evaluation = evaluate(model, tokenizer, sets, cfg.demo.refusal_tokens, progress=cfg.demo.progress)
    del model
    gc.collect()
    if arm == "safesteer_local":   # its merged float32 copy (2 GB) is not needed once evaluated
        shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(arm_dir / "checkpoints", ignore_errors=True)
    result = {"arm": arm, "command": command, "train_seconds": run["seconds"], "peak_rss_mb": run["peak_rss_mb"],
              "eval_seconds": round(time.time() - start, 1), "changed_tensors": changed, "eval": evaluation}
    if rewards_log.is_file():
        from openrlhf_safesteer.files import read_jsonl

        result["nonzero_advantage_share"] = nonzero_advantage_shares(read_jsonl(rewards_log), cfg.rollouts_per_step)
    write_json(result_file, result)
    return result


def stage_parity(cfg: CompareConfig, out: Path, model_dir: str) -> dict | None:
    """The local engine's loss on the plugin's first micro-batch (the same rollouts, the initial weights).

    The plugin dumps its first micro-batch (sequences, masks, teacher log-probs on S) with the loss it
    backpropagated. Here the local engine's own `micro_batch_loss` (its student with the same fresh LoRA
    adapter, its shared-weights steered teacher, its shared-prefix forward) scores the same sequences.
    """
    from safetensors.torch import load_file

    from openrlhf_safesteer.loading import load_model
    from openrlhf_safesteer.local.engine import TrainConfig, make_teacher, micro_batch_loss, prepare_student
    from openrlhf_safesteer.safety_tokens import SafetyTokenSet
    from openrlhf_safesteer.steering import SteeringVector

    dump = out / "arms" / "safesteer" / "dump" / "policy_step1"
    if not Path(str(dump) + ".json").is_file():
        return None
    batch = load_file(str(dump) + ".safetensors")
    meta = json.loads(Path(str(dump) + ".json").read_text())
    d = cfg.demo
    model, tokenizer = load_model(model_dir)
    tcfg = TrainConfig(lora_r=d.lora_r, lora_alpha=d.lora_alpha, lora_targets=list(d.lora_targets),
                       coeff=d.teacher_coeff or d.coeff, micro_batch_size=d.micro_batch_size, seed=d.seed)
    student = prepare_student(model, tcfg)
    teacher = make_teacher(student, tokenizer, SteeringVector.load(out / "artifacts" / "vector"), tcfg)
    ids = torch.tensor(SafetyTokenSet.load(out / "artifacts" / "safety_tokens.json").ids)
    rollouts = rollouts_from_openrlhf(batch["sequences"], batch["attention_mask"], batch["action_mask"])
    with torch.no_grad():
        loss, _, _ = micro_batch_loss(student, teacher, rollouts, ids, tcfg)
    local, plugin = float(loss), float(meta["loss"])
    teacher_local, _ = teacher.logprobs(rollouts, ids)
    mask = batch["action_mask"].float().unsqueeze(-1)
    teacher_gap = float((teacher_local * mask - batch["teacher_on_s"].float()).abs().max())
    del model, student
    gc.collect()
    return {"plugin_loss": plugin, "local_engine_loss": local,
            "relative_error": abs(plugin - local) / max(abs(local), 1e-12),
            "teacher_logprobs_max_abs_diff": teacher_gap, "sequences": int(batch["sequences"].shape[0])}


def rollouts_from_openrlhf(sequences: torch.Tensor, attention_mask: torch.Tensor, action_mask: torch.Tensor):
    """OpenRLHF's experience layout as the local engine's Rollouts.

    OpenRLHF: sequences (B, P + A) = left-padded prompts then right-padded responses; action_mask (B, A)
    marks the response tokens, aligned with sequences[:, P:]. Local: loss_mask (B, P + A - 1) marks the
    positions that predict a response token, so it is action_mask shifted to start at P - 1.
    """
    from openrlhf_safesteer.local.rollout import Rollouts

    width = action_mask.shape[1]
    prompt_len = sequences.shape[1] - width
    loss_mask = torch.zeros(sequences.shape[0], sequences.shape[1] - 1, dtype=torch.long)
    loss_mask[:, prompt_len - 1:] = action_mask.long()
    n = sequences.shape[0]
    return Rollouts(sequences.long(), attention_mask.long(), loss_mask, prompt_len, [""] * n, [""] * n)


# --------------------------------------------------------------------------------------------- driver


def run(cfg: CompareConfig) -> dict:
    from openrlhf_safesteer.cpu_kernels import onednn_linear
    from openrlhf_safesteer.demo.evaluate import EvalSets
    from openrlhf_safesteer.loading import resolve_model

    from .report import write_report

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    # Stage times survive a rerun (a finished stage is not run again, its time stays in the report).
    timings_file = out / "timings.json"
    timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    model_dir = resolve_model(cfg.demo.model)
    needs = check_resources(cfg, model_dir)
    if cfg.from_dir:
        check_vector_fits(Path(cfg.from_dir) / "vector", model_dir)
    if cfg.demo.threads:
        torch.set_num_threads(cfg.demo.threads)
    sets = EvalSets.default(cfg.eval_limit)
    with onednn_linear(cfg.demo.onednn):
        base_eval = stage_artifacts(cfg, out, model_dir, sets, timings)
        write_json(timings_file, timings)
        data_dir = stage_data(cfg, out, model_dir, timings)
        write_json(timings_file, timings)
        results = {}
        for arm in cfg.arms:
            results[arm] = stage_arm(arm, cfg, out, model_dir, data_dir, sets)
            timings[f"train {arm}"] = results[arm]["train_seconds"]
            timings[f"evaluate {arm}"] = results[arm]["eval_seconds"]
            write_json(timings_file, timings)
        parity = stage_parity(cfg, out, model_dir) if "safesteer" in cfg.arms else None
    timings["this invocation"] = round(time.time() - start, 1)
    timings["sum of stages"] = round(sum(v for k, v in timings.items() if k not in ("this invocation", "sum of stages")), 1)
    report = build_report(cfg, model_dir, base_eval, results, parity, timings, needs)
    write_json(out / "report.json", report)
    write_report(out, report)
    logger.info("comparison finished in %.0f s; report at %s", timings["this invocation"],
                out / "report.md")
    return report


METRICS = ("harmful_refusal_rate", "harmless_refusal_rate", "general_score", "harmful_refusal_score",
           "harmless_refusal_score")


def summarise(evaluation: dict) -> dict:
    harmful = evaluation["samples"]["harmful"]
    empty = sum(1 for s in harmful if not s["reply"].strip())
    return {**{k: evaluation[k] for k in METRICS}, "harmful_asr": evaluation["harmful_asr"],
            "empty_harmful_replies": empty}


def build_report(cfg: CompareConfig, model_dir: str, base_eval: dict, results: dict, parity, timings: dict,
                 needs: dict) -> dict:
    from openrlhf_safesteer.compare.arms import ARM_NEEDS

    base = summarise(base_eval)
    arms = {}
    for arm, result in results.items():
        entry = summarise(result["eval"])
        entry["harmful_score_shift"] = entry["harmful_refusal_score"] - base["harmful_refusal_score"]
        entry["harmless_score_shift"] = entry["harmless_refusal_score"] - base["harmless_refusal_score"]
        entry.update(train_seconds=result["train_seconds"], peak_rss_mb=result["peak_rss_mb"],
                     changed_tensors=result["changed_tensors"],
                     needs=ARM_NEEDS[arm].format(n=cfg.ppo_samples_per_prompt))
        arms[arm] = entry
    return {"model": cfg.demo.model, "model_dir": model_dir, "settings": cfg.to_dict(), "base": base,
            "arms": arms, "parity": parity, "timings_seconds": timings,
            "estimated_needs_gb": {k: round(v / GB, 1) for k, v in needs.items()},
            "n": base_eval["n"], "date": time.strftime("%Y-%m-%d")}


def build_parser() -> argparse.ArgumentParser:
    from openrlhf_safesteer.helpformat import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m openrlhf_safesteer.compare.run", formatter_class=HelpFormatter,
                                description="SafeSteer (OpenRLHF plugin, both objectives, and the local engine) "
                                            "beside OpenRLHF's own DPO and PPO on the demo's model and prompts.")
    p.add_argument("--out", help="output folder (a rerun skips the arms that finished)")
    p.add_argument("--summarise", nargs="+", metavar="DIR", default=None,
                   help="print the arms of finished comparisons (e.g. one per --seed) side by side and their "
                        "range; trains nothing")
    p.add_argument("--from", dest="from_dir", default=None,
                   help="a finished `safesteer demo` folder: reuse its vector, S and base evaluation")
    p.add_argument("--arms", nargs="+", default=list(ARMS), help=f"arms to run, of {', '.join(ARMS)}")
    p.add_argument("--model", default=None, help="model (default: the demo's embedded model)")
    p.add_argument("--seed", type=int, default=None, help="seed of every arm (default: the demo's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every arm (default: the demo's)")
    p.add_argument("--prompts-per-step", type=int, default=None, help="prompts per step (default: the demo's)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="rollout length (default: the demo's)")
    p.add_argument("--warmup-ratio", type=float, default=None, help="warm-up share of the steps (default: the demo's)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N prompts of each set")
    p.add_argument("--dpo-beta", type=float, default=0.1, help="DPO's beta")
    p.add_argument("--ppo-samples-per-prompt", type=int, default=4,
                   help="PPO's samples per prompt (rollouts per step stay prompts-per-step x 1)")
    p.add_argument("--ppo-kl-coef", type=float, default=0.01,
                   help="PPO's KL anchor to the base (k3, in the loss; the GPU recipe's 0.01); 0: no anchor")
    p.add_argument("--pair-max-new-tokens", type=int, default=256,
                   help="DPO pairs and SFT targets: replies sampled to end of turn up to this length; cut ones dropped")
    p.add_argument("--pair-attempts", type=int, default=2,
                   help="samplings per prompt draw before a draw without a valid pair is dropped")
    p.add_argument("--pair-filter", default="refusal",
                   help="judge of DPO's pairs (refusal, jbb_string, arditi, xstest_strmatch; none: no filter, tests)")
    p.add_argument("--ppo-reward", default=None, metavar="FILE",
                   help="the ppo arm's reward function file (default: recipes/safety_reward.py with SAFETY_JUDGE=refusal)")
    p.add_argument("--shuffled-prompts", dest="keep_prompt_order", action="store_false",
                   help="let OpenRLHF shuffle the SafeSteer arms' prompt draws (default: the local engine's order)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="check the settings, --from and the model's packages, print each arm's command; load, "
                        "train and write nothing")
    return p


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    from openrlhf_safesteer.demo.pipeline import DemoConfig

    demo = DemoConfig(out=str(Path(args.out) / "artifacts"), progress=args.progress)
    for name in ("model", "seed", "steps", "prompts_per_step", "max_new_tokens", "warmup_ratio"):
        value = getattr(args, name)
        if value is not None:
            setattr(demo, name, value)
    demo.micro_batch_size = min(demo.micro_batch_size, demo.prompts_per_step * demo.samples_per_prompt)
    return CompareConfig(out=args.out, from_dir=args.from_dir, arms=list(args.arms), demo=demo,
                         dpo_beta=args.dpo_beta, ppo_samples_per_prompt=args.ppo_samples_per_prompt,
                         ppo_kl_coef=args.ppo_kl_coef, pair_max_new_tokens=args.pair_max_new_tokens,
                         pair_attempts=args.pair_attempts, pair_filter=args.pair_filter,
                         eval_limit=args.eval_limit, keep_prompt_order=args.keep_prompt_order,
                         ppo_reward=str(Path(args.ppo_reward).resolve()) if args.ppo_reward else None)


def dry_run(cfg: CompareConfig) -> list[list[str]]:
    """What `--dry-run` checks and prints: the settings and --from artifacts (`CompareConfig.validate`), the embedded
    model's packages, the vector against the model's config when the model is on disk, and each arm's command
    line. Loads no weights, converts nothing, writes nothing; returns the arms' commands."""
    from openrlhf_safesteer.loading import EMBEDDED_MODELS, converted_dir, part_paths

    cfg.validate()
    spec = EMBEDDED_MODELS.get(cfg.demo.model)
    if spec is not None:
        part_paths(spec)                      # a missing model package is an error now, not after stage 1
    model_dir = str(converted_dir(spec)) if spec is not None else cfg.demo.model
    if cfg.from_dir and (Path(model_dir) / "config.json").is_file():
        check_vector_fits(Path(cfg.from_dir) / "vector", model_dir)
    out = Path(cfg.out)
    return [arm_command(arm, cfg, model_dir, out / "data", out / "arms" / arm, out / "artifacts" / "vector",
                        out / "artifacts" / "safety_tokens.json") for arm in cfg.arms]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.summarise:
        from .report import seed_table

        missing = [d for d in args.summarise if not (Path(d) / "report.json").is_file()]
        if missing:
            print(f"error: no report.json in {', '.join(missing)}", file=sys.stderr)
            return 2
        print(seed_table([json.loads((Path(d) / "report.json").read_text()) for d in args.summarise]))
        return 0
    if not args.out:
        parser.error("--out is required")
    cfg = config_from_args(args)
    from openrlhf_safesteer.steering import IncompatibleArtifactError

    try:
        if args.dry_run:
            import shlex

            commands = dry_run(cfg)
            print("# stage 1 artifacts and stage 2 data go to " + str(Path(cfg.out)) + "; then each arm runs:")
            for arm, command in zip(cfg.arms, commands):
                print(f"# {arm}\n{shlex.join(command)}")
            print(f"dry run OK: settings, --from and model checked for {', '.join(cfg.arms)}; nothing trained")
            return 0
        cfg.validate()
        run(cfg)
    except (ValueError, FileNotFoundError, IncompatibleArtifactError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
