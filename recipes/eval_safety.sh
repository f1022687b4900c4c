#!/usr/bin/env bash
# Score one or more checkpoints on the paper's seven safety benchmarks, XSTest (over-refusal),
# StrongREJECT and the general tasks, into one table (benchmarks x checkpoints) and one chart.
#
#   bash recipes/eval_safety.sh runs/safesteer-llama3-8b/final
#   bash recipes/eval_safety.sh base=meta-llama/Meta-Llama-3-8B-Instruct safesteer=runs/ss/final \
#        dpo=runs/dpo/final ppo=runs/ppo/final
#   bash recipes/eval_safety.sh --dry-run CKPT      # print the command, run nothing
#   bash recipes/eval_safety.sh CKPT -- --steer base=runs/ss/vector   # extra flags after --
#
# Settings (environment):
#   OUT=outputs/eval          results.json, table.md, chart.png, caches (re-running resumes)
#   JUDGE=llama_guard         Llama-Guard-4-12B as in the paper; llama_guard_1b for cheap runs;
#                             NAME=DIR for a local copy (no hub); string judges: refusal (the
#                             project's), jbb_string, arditi, xstest_strmatch (docs/eval.md)
#   OWN_JUDGES=0              1: HarmBench with its classifier, SORRY-Bench with its own judge
#                             (XSTest always uses its own string match; StrongREJECT's column is an
#                             ASR by JUDGE, not the StrongREJECT rubric score)
#   PKU=pku_saferlhf          every PKU-SafeRLHF test prompt; pku_saferlhf_unsafe: only prompts
#                             with a response labelled unsafe
#   LIMIT=                    prompts per benchmark (empty = all)
#   GENERAL="mmlu_generative gsm8k minerva_math500 humaneval_instruct"   ("" to skip)
#   GENERAL_LIMIT=            examples per lm-eval task (empty = all)
#   MAX_NEW_TOKENS=512        greedy, the model's chat template, no system prompt
#   DATA_DIR=                 local benchmark copies: DATA_DIR/<name>.{csv,json,jsonl} replaces the
#                             hub download for that benchmark (e.g. DATA_DIR/xstest.csv)
#   BACKEND=auto              vLLM when installed with a GPU, else HF generate
#   SAFESTEER=safesteer       the CLI (falls back to `python -m openrlhf_safesteer.cli.main`)
set -euo pipefail

OUT=${OUT:-outputs/eval}
JUDGE=${JUDGE:-llama_guard}
OWN_JUDGES=${OWN_JUDGES:-0}
PKU=${PKU:-pku_saferlhf}
LIMIT=${LIMIT:-}
GENERAL=${GENERAL-mmlu_generative gsm8k minerva_math500 humaneval_instruct}
GENERAL_LIMIT=${GENERAL_LIMIT:-}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-512}
DATA_DIR=${DATA_DIR:-}
BACKEND=${BACKEND:-auto}
PYTHON=${PYTHON:-python3}

if [[ -n ${SAFESTEER:-} ]]; then
  read -r -a CLI <<< "$SAFESTEER"
elif command -v safesteer > /dev/null; then
  CLI=(safesteer)
else
  CLI=("$PYTHON" -m openrlhf_safesteer.cli.main)
fi

DRY_RUN=0
MODELS=()
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,28p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *=*) MODELS+=("$1") ;;
    *) MODELS+=("$(basename "${1%/}")=$1") ;;
  esac
  shift
done
if [[ $PKU != pku_saferlhf && $PKU != pku_saferlhf_unsafe ]]; then
  echo "PKU must be pku_saferlhf or pku_saferlhf_unsafe, got '$PKU'" >&2
  exit 2
fi
if [[ ${#MODELS[@]} -eq 0 ]]; then
  echo "usage: bash recipes/eval_safety.sh [--dry-run] CKPT|NAME=CKPT ... [-- extra safesteer eval flags]" >&2
  exit 2
fi

BENCHMARKS=()
for name in advbench "$PKU" harmbench jailbreakbench sorry_bench harmfulqa alert xstest strongreject; do
  spec=$name
  if [[ -n $DATA_DIR ]]; then
    for ext in csv json jsonl; do
      if [[ -f $DATA_DIR/$name.$ext ]]; then spec="$name=$DATA_DIR/$name.$ext"; break; fi
    done
  fi
  BENCHMARKS+=("$spec")
done

ARGS=(eval --models "${MODELS[@]}" --out "$OUT" --benchmarks "${BENCHMARKS[@]}" --judge "$JUDGE"
      --max-new-tokens "$MAX_NEW_TOKENS" --backend "$BACKEND")
if [[ $OWN_JUDGES == 1 ]]; then
  ARGS+=(--judge-for harmbench=harmbench sorry_bench=sorry_bench)
fi
if [[ -n $LIMIT ]]; then
  ARGS+=(--limit "$LIMIT")
fi
if [[ -n $GENERAL ]]; then
  read -r -a GENERAL_TASKS <<< "$GENERAL"
  ARGS+=(--general "${GENERAL_TASKS[@]}" --allow-code-eval)
  if [[ -n $GENERAL_LIMIT ]]; then
    ARGS+=(--general-limit "$GENERAL_LIMIT")
  fi
fi
ARGS+=("${EXTRA[@]}")

echo "+ ${CLI[*]} ${ARGS[*]}"
if [[ $DRY_RUN == 1 ]]; then
  exit 0
fi
exec "${CLI[@]}" "${ARGS[@]}"
