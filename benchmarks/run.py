"""Run the performance benchmarks and print a table of ratios against the peers.

    python -m benchmarks.run                       # tiny + offline demo model, all ratios, CPU
    python -m benchmarks.run --models tiny --only 1,2,3
    python -m benchmarks.run --models llama-1b --device cuda   # realistic size on a GPU

Writes the table to stdout and every measured number to --out (JSON, written atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import tempfile
import time

import torch

from benchmarks.common import Ratio, format_table, random_llama

logger = logging.getLogger("benchmarks")

# name -> (builder, batch, length) ; batch/length sized for a 2-core CPU except llama-1b.
MODELS = {
    "tiny": (lambda: random_llama(vocab_size=32_000, hidden=256, layers=4, heads=8, intermediate=688), 8, 128),
    "demo": (None, 4, 128),  # the offline Qwen2.5-Coder-0.5B, loaded by openrlhf_safesteer.demo.model
    "llama-1b": (lambda: random_llama(vocab_size=128_256, hidden=2048, layers=16, heads=32, intermediate=8192,
                                      dtype=torch.bfloat16), 8, 512),
}


def load(name: str, device: str):
    builder, batch, length = MODELS[name]
    if builder is None:
        from openrlhf_safesteer.demo.model import load_model

        model, _ = load_model()
    else:
        model = builder()
    return model.to(device), batch, length


def run(models: list[str], only: set[int], repeats: int, device: str) -> list[Ratio]:
    from benchmarks import core_ratios, engine_ratios

    ratios: list[Ratio] = []
    for name in models:
        model, batch, length = load(name, device)
        logger.info("model %s: %.0fM parameters", name, sum(p.numel() for p in model.parameters()) / 1e6)
        if 1 in only:
            ratios.append(core_ratios.ratio_steered_forward(model, name, batch, length, repeats))
        if 2 in only:
            ratios.append(core_ratios.ratio_exact_step(model, name, batch, length, max(3, repeats // 2)))
        if 3 in only:
            ratios.append(core_ratios.ratio_teacher_bytes(model, name, batch, length))
        del model
        for number in sorted(only & {4, 5, 6}):
            ratios.extend(engine_ratios.RATIOS[number](name, device))
    return ratios


def write_json_atomic(path: str, payload: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(handle.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,demo", help="comma list from " + ",".join(MODELS))
    parser.add_argument("--only", default="1,2,3,4,5,6", help="comma list of ratio numbers to measure")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per side (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--out", default="benchmarks/results.json", help="JSON file for every measured number")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    only = {int(n) for n in args.only.split(",") if n}
    started = time.time()
    ratios = run(models, only, args.repeats, args.device)
    table = format_table(ratios)
    print(table)
    write_json_atomic(args.out, {
        "command": "python -m benchmarks.run " + " ".join(argv or []),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": args.device,
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seconds": round(time.time() - started, 1),
        "ratios": [dataclasses.asdict(r) | {"value": r.value} for r in ratios],
        "table": table,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
