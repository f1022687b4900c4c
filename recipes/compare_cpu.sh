#!/usr/bin/env bash
# SafeSteer beside OpenRLHF's own DPO and PPO on a CPU machine, in one command (after `make setup`).
#
#   bash recipes/compare_cpu.sh --out DIR [--from DEMO_DIR] [--arms ...] [--dry-run] [more flags: --help]
#
# On the embedded Qwen2.5-Coder-0.5B-Instruct model, through OpenRLHF 0.11.2's real entry points (Ray
# actors, DeepSpeed's CPU accelerator, HF-generate rollout engines in place of vLLM), five arms with the
# demo's prompts, seed, steps, LoRA adapter and schedule: safesteer (the plugin, exact loss), dpo
# (openrlhf.cli.train_dpo on teacher-vs-base pairs), ppo (openrlhf.cli.train_ppo_ray, REINFORCE++-baseline,
# refusal-judge reward), safesteer_sampled (the plugin's per-token advantage) and safesteer_local (the
# local engine). Each is evaluated like the demo; DIR/report.md has the table, DIR/comparison.png the plot.
# --from reuses a finished demo's vector, S and base evaluation; without it stage 1 runs here first.
# A rerun with the same --out skips the arms that finished. --dry-run checks the settings, --from and the model's
# packages and prints every arm's command; it loads, trains and writes nothing.
# Measured: README ("Beside OpenRLHF's DPO and PPO") and docs/openrlhf.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
cd "$HERE/.."
parse_recipe_args "$@"   # --dry-run; every other argument goes to openrlhf_safesteer.compare.run
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
CMD=("$PYTHON" -m openrlhf_safesteer.compare.run "${EXTRA[@]}")
if [[ $DRY_RUN == 1 ]]; then
  show_command "${CMD[@]}"
  exec "${CMD[@]}" --dry-run
fi
exec "${CMD[@]}"
