#!/usr/bin/env bash
# The GPU version of the comparison: SafeSteer, OpenRLHF's DPO and OpenRLHF's PPO on Llama-3-8B-Instruct,
# then the safety evaluation of the three checkpoints side by side.
#
#   bash recipes/compare_llama.sh             # run the four stages one after the other
#   bash recipes/compare_llama.sh --dry-run   # check every stage's flags with OpenRLHF's (or safesteer's)
#                                             # parser, print the commands, train nothing
#
# Stages (each is its own recipe; their variables apply: MODEL, PYTHON, SAFETY_JUDGE_URL, ...):
#   1. recipes/train_safesteer_llama.sh    WORK=$ROOT/safesteer
#   2. recipes/baseline_dpo_llama.sh       WORK=$ROOT/dpo
#   3. recipes/baseline_ppo_llama.sh       WORK=$ROOT/ppo   (needs its judge: see that recipe)
#   4. recipes/eval_safety.sh base=MODEL safesteer=... dpo=... ppo=...
# ROOT defaults to ./runs/compare-llama3-8b. The CPU comparison (recipes/compare_cpu.sh) trains every arm
# with the same budget; these recipes keep each method's published setting (DPO on the PKU mixture).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT=$(realpath -m "${ROOT:-./runs/compare-llama3-8b}")
MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B-Instruct}
export MODEL

DRY=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=(--dry-run) ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument '$arg' (only --dry-run; set variables for the stage recipes)" >&2; exit 2 ;;
  esac
done

stage() {
  local name=$1; shift
  echo "== $name"
  "$@"
}

stage "1/4 SafeSteer" env WORK="$ROOT/safesteer" bash "$HERE/train_safesteer_llama.sh" "${DRY[@]}"
stage "2/4 DPO (OpenRLHF)" env WORK="$ROOT/dpo" bash "$HERE/baseline_dpo_llama.sh" "${DRY[@]}"
stage "3/4 PPO (OpenRLHF)" env WORK="$ROOT/ppo" bash "$HERE/baseline_ppo_llama.sh" "${DRY[@]}"
stage "4/4 evaluation" bash "$HERE/eval_safety.sh" "${DRY[@]}" "base=$MODEL" "safesteer=$ROOT/safesteer/final" \
  "dpo=$ROOT/dpo/final" "ppo=$ROOT/ppo/final"
