"""Run the performance benchmarks and print a table of ratios against the peers.

    python -m benchmarks.run                       # tiny + offline demo model, all ratios, CPU
    python -m benchmarks.run --models tiny --only 1,2,3
    python -m benchmarks.run --models tiny --only 4             # local engine vs TRL GKDTrainer
    python -m benchmarks.run --models demo --only 5,6 --demo-report outputs/demo/report.json
    python -m benchmarks.run --models llama-1b --only 1,2,4 --device cuda   # realistic size on a GPU

Writes the table to stdout and every measured number to --out (JSON, written atomically).
Timed ratios alternate candidate and baseline (ABAB...) so that load from other processes hits
both alike; the machine's load average is recorded next to every ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import platform
import sys
import time

import torch

from benchmarks.common import Ratio, format_table, random_llama
from openrlhf_safesteer.files import atomic_write_json

logger = logging.getLogger("benchmarks")

# name -> (builder, batch, length) ; batch/length sized for a 2-core CPU except llama-1b.
MODELS = {
    "tiny": (lambda: random_llama(vocab_size=32_000, hidden=256, layers=4, heads=8, intermediate=688), 8, 128),
    "demo": (None, 4, 128),  # the offline Qwen2.5-Coder-0.5B, loaded by openrlhf_safesteer.loading
    "llama-1b": (lambda: random_llama(vocab_size=128_256, hidden=2048, layers=16, heads=32, intermediate=8192,
                                      dtype=torch.bfloat16), 8, 512),
}


def load(name: str, device: str):
    builder, batch, length = MODELS[name]
    if builder is None:
        from openrlhf_safesteer.loading import load_model

        model, _ = load_model()
    else:
        model = builder()
    return model.to(device), batch, length


def run(models: list[str], only: set[int], repeats: int, device: str, demo_report: str) -> list[Ratio]:
    from benchmarks import core_ratios, engine_ratios

    ratios: list[Ratio] = []

    def measure(label: str, fn, *args, **kwargs) -> None:
        """Run one ratio; a failure is logged and recorded, and the other ratios still run."""
        started = time.time()
        try:
            result = fn(*args, **kwargs)
        except Exception as error:  # one broken ratio must not lose a 20-minute run
            logger.exception("%s failed", fn.__name__)
            number = int(fn.__doc__.strip().split(".")[0]) if fn.__doc__ else 0
            result = [Ratio(number, fn.__name__, label, float("nan"),
                            float("nan"), "", "", f"FAILED: {type(error).__name__}: {error}"[:300])]
        add(result if isinstance(result, list) else [result], started)

    def add(new: list[Ratio], started: float) -> None:
        load = os.getloadavg()[0]
        for r in new:
            r.note = (r.note + "; " if r.note else "") + f"load {load:.1f}"
            r.seconds = round(time.time() - started, 1)
            logger.info("ratio %d on %s: %.3f (%s)", r.number, r.model, r.value, r.note)
        ratios.extend(new)

    for name in models:
        if only & {1, 2, 3}:
            model, batch, length = load(name, device)
            logger.info("model %s: %.0fM parameters", name, sum(p.numel() for p in model.parameters()) / 1e6)
            if 1 in only:
                measure(name, core_ratios.ratio_steered_forward, model, name, batch, length, repeats)
            if 2 in only:
                measure(name, core_ratios.ratio_exact_step, model, name, batch, length, max(3, repeats // 2))
            if 3 in only:
                measure(name, core_ratios.ratio_teacher_bytes, model, name, batch, length)
            del model
            gc.collect()
        if 4 in only:
            measure(name, engine_ratios.ratio_engine_vs_trl, name, device, repeats=max(2, repeats // 2))
            gc.collect()
        if 5 in only:
            measure(name, engine_ratios.ratio_demo_share, name, device, demo_report)
        if 6 in only and device == "cpu":
            measure(name, engine_ratios.ratio_lora_memory, name, device)
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,demo", help="comma list from " + ",".join(MODELS))
    parser.add_argument("--only", default="1,2,3,4,5,6", help="comma list of ratio numbers to measure")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repetitions per side for ratios 1-2 (median reported; ratio 2 and 4 use half)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 when the load average exceeds the cores, else torch's "
                             "choice; on a shared, loaded CPU more threads only spin)")
    parser.add_argument("--demo-report", default="outputs/demo/report.json",
                        help="report.json of a finished `safesteer demo` run (ratio 5 reads its stage timings)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--out", default="benchmarks/results.json", help="JSON file for every measured number")
    parser.add_argument("--update", action="store_true",
                        help="keep the ratios already in --out that this run does not measure (subset reruns)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    only = {int(n) for n in args.only.split(",") if n}
    if "llama-1b" in models and args.device == "cpu":
        parser.error("llama-1b is for a GPU (--device cuda); on CPU use tiny and demo")
    load_before = os.getloadavg()
    threads = args.threads or (1 if load_before[0] > (os.cpu_count() or 1) else torch.get_num_threads())
    torch.set_num_threads(threads)
    started = time.time()
    ratios = run(models, only, args.repeats, args.device, args.demo_report)
    rows = [dataclasses.asdict(r) | {"value": r.value} for r in ratios]
    if args.update and os.path.isfile(args.out):
        with open(args.out) as handle:
            previous = json.load(handle)
        measured = {(r["number"], r["model"]) for r in rows}
        kept = [r for r in previous.get("ratios", []) if (r["number"], r["model"]) not in measured]
        rows = sorted(kept + rows, key=lambda r: (list(MODELS).index(r["model"]) if r["model"] in MODELS else 99,
                                                  r["number"]))
    table = format_table([Ratio(**{k: v for k, v in r.items() if k != "value"}) for r in rows])
    print(table)
    load_after = os.getloadavg()
    print(f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} "
          f"cores; torch threads {torch.get_num_threads()}; {time.time() - started:.0f} s")
    runs = []
    if args.update and os.path.isfile(args.out):
        runs = previous.get("runs", [])
    runs.append({
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": round(time.time() - started, 1),
        "threads": torch.get_num_threads(),
        "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
        "loadavg_1_5_15_after": [round(x, 2) for x in load_after],
    })
    atomic_write_json(args.out, indent=2, obj={
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": args.device,
                    "torch": torch.__version__},
        "runs": runs,
        "ratios": rows,
        "table": table,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
