#!/usr/bin/env bash
# The GPU version of the comparison: SafeSteer, OpenRLHF's DPO, PPO and SFT on Llama-3-8B-Instruct, the same arms as
# recipes/compare_cpu.sh, then the safety evaluation of the checkpoints side by side; with --frontier, the frontier
# protocol and its report (the one compare_cpu.sh --frontier writes).
#
#   bash recipes/compare_llama.sh                       # one run per arm, the stages one after the other
#   bash recipes/compare_llama.sh --dry-run             # check every stage's flags with OpenRLHF's (or safesteer's)
#                                                       # parser, print the commands, train nothing
#   bash recipes/compare_llama.sh --frontier [--dry-run] [frontier flags: --phase dev|test|all, --summarise, ...]
#
# One run per arm (each stage is its own recipe; their variables apply: MODEL, PYTHON, SAFETY_JUDGE_URL, ...):
#   1. recipes/train_safesteer_llama.sh    WORK=$ROOT/safesteer (stage 1 there: vector, S, 100 PKU-SafeRLHF prompts)
#   2. python -m openrlhf_safesteer.compare.pairs: the steered teacher's complete replies to 8 draws of each prompt
#      (SafeSteer's 8 samples) -> DPO pairs (refusing chosen vs the base's complying reply, judge-filtered) and SFT rows
#   3. recipes/baseline_dpo_llama.sh       WORK=$ROOT/dpo DATASET=teacher pairs, batch 32 (SafeSteer's 25 steps);
#      DPO_DATASET=OpenRLHF/preference_dataset_mixture2_and_safe_pku gives the published PKU-mixture setting instead
#   4. recipes/baseline_ppo_llama.sh       WORK=$ROOT/ppo (REINFORCE++-baseline, 8 samples, KL 0.01 k3; needs its judge)
#   5. recipes/baseline_sft_llama.sh       WORK=$ROOT/sft DATASET=teacher replies
#   6. recipes/eval_safety.sh base=MODEL safesteer=... dpo=... ppo=... sft=...
# --frontier: SafeSteer's stage 1 in $ROOT/stage1 (STAGE1_ONLY=1), then python -m openrlhf_safesteer.compare.frontier
#   --launcher llama --out $ROOT/frontier: the dev grid (equal size per method), the selection rule, the test frontier
#   over 5 paired seeds, every run through the recipes above; $ROOT/frontier/frontier.md, .png, .json. It needs a Ray
#   head (`ray start --head --num-gpus 8`) for the SafeSteer and PPO runs, and resumes where it stopped.
# ROOT defaults to ./runs/compare-llama3-8b.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT=$(realpath -m "${ROOT:-./runs/compare-llama3-8b}")
MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B-Instruct}
PYTHON=${PYTHON:-python3}
export MODEL PYTHON

DRY=()
FRONTIER=0
FRONTIER_ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=(--dry-run) ;;
    --frontier) FRONTIER=1 ;;
    -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *)
      if [[ $FRONTIER == 1 ]]; then FRONTIER_ARGS+=("$arg"); else
        echo "unknown argument '$arg' (--dry-run, --frontier [its flags]; set variables for the stage recipes)" >&2
        exit 2
      fi ;;
  esac
done

stage() {
  local name=$1; shift
  echo "== $name"
  "$@"
}

SAFESTEER_PROMPTS="$ROOT/safesteer/pku_saferlhf_unsafe_100.jsonl"
if [[ $FRONTIER == 1 ]]; then
  STAGE1="$ROOT/stage1"
  if [[ ${#DRY[@]} == 0 ]]; then
    stage "1/2 SafeSteer's stage 1 (vector, S, prompts)" env WORK="$STAGE1" STAGE1_ONLY=1 \
      bash "$HERE/train_safesteer_llama.sh"
  fi
  stage "2/2 the frontier grid" "$PYTHON" -m openrlhf_safesteer.compare.frontier --launcher llama --model "$MODEL" \
    --out "$ROOT/frontier" --from "$STAGE1" --train-prompts "$STAGE1/pku_saferlhf_unsafe_100.jsonl" \
    "${DRY[@]}" "${FRONTIER_ARGS[@]+"${FRONTIER_ARGS[@]}"}"
  exit 0
fi

PAIRS=("$PYTHON" -m openrlhf_safesteer.compare.pairs --model "$MODEL" --vector "$ROOT/safesteer/vector"
       --prompts "$SAFESTEER_PROMPTS" --out "$ROOT/teacher_data" --draws-per-prompt 8 --max-new-tokens 1024)
stage "1/6 SafeSteer" env WORK="$ROOT/safesteer" bash "$HERE/train_safesteer_llama.sh" "${DRY[@]}"
stage "2/6 teacher replies: DPO pairs and SFT rows" "${PAIRS[@]}" "${DRY[@]}"
stage "3/6 DPO (OpenRLHF)" env WORK="$ROOT/dpo" DATASET="${DPO_DATASET:-$ROOT/teacher_data/dpo_pairs.jsonl}" \
  bash "$HERE/baseline_dpo_llama.sh" --train.batch_size 32 "${DRY[@]}"
stage "4/6 PPO (OpenRLHF)" env WORK="$ROOT/ppo" PROMPTS="$SAFESTEER_PROMPTS" bash "$HERE/baseline_ppo_llama.sh" "${DRY[@]}"
stage "5/6 SFT (OpenRLHF)" env WORK="$ROOT/sft" DATASET="$ROOT/teacher_data/sft.jsonl" \
  bash "$HERE/baseline_sft_llama.sh" "${DRY[@]}"
stage "6/6 evaluation" bash "$HERE/eval_safety.sh" "${DRY[@]}" "base=$MODEL" "safesteer=$ROOT/safesteer/final" \
  "dpo=$ROOT/dpo/final" "ppo=$ROOT/ppo/final" "sft=$ROOT/sft/final"
