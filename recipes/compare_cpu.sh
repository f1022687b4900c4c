#!/usr/bin/env bash
# SafeSteer beside OpenRLHF's own DPO and PPO on a CPU machine, in one command (after `make setup`).
#
#   bash recipes/compare_cpu.sh --out DIR [--from DEMO_DIR] [--arms ...] [more flags: --help]
#
# On the embedded Qwen2.5-Coder-0.5B-Instruct model, through OpenRLHF 0.11.2's real entry points (Ray
# actors, DeepSpeed's CPU accelerator, HF-generate rollout engines in place of vLLM), five arms with the
# demo's prompts, seed, steps, LoRA adapter and schedule: safesteer (the plugin, exact loss), dpo
# (openrlhf.cli.train_dpo on teacher-vs-base pairs), ppo (openrlhf.cli.train_ppo_ray, REINFORCE++-baseline,
# refusal-judge reward), safesteer_sampled (the plugin's per-token advantage) and safesteer_local (the
# local engine). Each is evaluated like the demo; DIR/report.md has the table, DIR/comparison.png the plot.
# --from reuses a finished demo's vector, S and base evaluation; without it stage 1 runs here first.
# A rerun with the same --out skips the arms that finished. Measured: README ("SafeSteer beside DPO and PPO").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m openrlhf_safesteer.compare.run "$@"
