#!/usr/bin/env bash
# SafeSteer beside OpenRLHF's own DPO, PPO and SFT on a CPU machine, in one command (after `make setup`).
#
#   bash recipes/compare_cpu.sh --out DIR [--from DEMO_DIR] [--arms ...] [--dry-run] [more flags: --help]
#   bash recipes/compare_cpu.sh --frontier --out DIR [--from DEMO_DIR] [--spec GRID.json] [--phase dev|test|all]
#   bash recipes/compare_cpu.sh --frontier --out DIR --summarise     # rebuild DIR/frontier.md from finished runs
#   bash recipes/compare_cpu.sh --frontier --out DIR --dry-run       # the grid, its size and commands; no compute
#
# Without --frontier: one run per arm at one seed (an anecdote, not a comparison of methods), on the embedded
# Qwen2.5-Coder-0.5B-Instruct model through OpenRLHF 0.11.2's real entry points (Ray actors, DeepSpeed's CPU
# accelerator, HF-generate rollout engines in place of vLLM), with the demo's prompts, seed, steps, LoRA adapter and
# schedule: safesteer (the plugin, exact loss), dpo (openrlhf.cli.train_dpo on complete, judge-filtered teacher-vs-base
# pairs), ppo (openrlhf.cli.train_ppo_ray, REINFORCE++-baseline, 4 samples per prompt, KL 0.01 to the base,
# refusal-judge reward), sft (openrlhf.cli.train_sft on the steered teacher's replies), safesteer_sampled (the
# plugin's per-token advantage) and safesteer_local (the local engine). DIR/report.md has the table.
# --from reuses a finished demo's vector, S and base evaluation; without it stage 1 runs here first.
# A rerun with the same --out skips the arms that finished.
#
# With --frontier (python -m openrlhf_safesteer.compare.frontier): the comparison a reviewer accepts. An equal
# tuning grid per method on the dev splits at 2 seeds, the selection rule written into DIR/spec.json before any run,
# then each method at its chosen setting and at half and twice its lr over 5 paired seeds on the test splits, the
# plugin and the full-vocabulary ablation at SafeSteer's chosen setting, the base and the steered teacher as
# references; replies judged at 64 tokens by four string judges. DIR/frontier.md, frontier.png, frontier.json.
# It takes many hours on 2 cores (docs/openrlhf.md, "The frontier protocol"): run it in the background; it resumes
# where it stopped (every finished run is a row of DIR/runs.jsonl).
# --dry-run checks the settings and every command with OpenRLHF's parsers; it loads, trains and writes nothing.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
cd "$HERE/.."
FRONTIER=0
ARGS=()
for arg in "$@"; do
  if [[ $arg == --frontier ]]; then FRONTIER=1; else ARGS+=("$arg"); fi
done
parse_recipe_args "${ARGS[@]+"${ARGS[@]}"}"   # --dry-run; every other argument goes to the Python module
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ $FRONTIER == 1 ]]; then
  CMD=("$PYTHON" -m openrlhf_safesteer.compare.frontier "${EXTRA[@]+"${EXTRA[@]}"}")
else
  CMD=("$PYTHON" -m openrlhf_safesteer.compare.run "${EXTRA[@]+"${EXTRA[@]}"}")
fi
if [[ $DRY_RUN == 1 ]]; then
  show_command "${CMD[@]}"
  exec "${CMD[@]}" --dry-run
fi
exec "${CMD[@]}"
