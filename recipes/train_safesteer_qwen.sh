#!/usr/bin/env bash
# SafeSteer on Qwen2.5-7B-Instruct: one node of 8 GPUs, OpenRLHF 0.11.2's colocated hybrid engine.
# The same pipeline and flags as train_safesteer_llama.sh (read that recipe for every flag), with the
# paper's Qwen settings: lr 1e-5 and safety tokens with horizon 7.
#
#   bash recipes/train_safesteer_qwen.sh             # stage 1 (vector, tokens, prompts) if missing, then train
#   bash recipes/train_safesteer_qwen.sh --dry-run   # print the command, check every flag, start nothing
set -euo pipefail

export MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}
export WORK=${WORK:-./runs/safesteer-qwen2.5-7b}
export HORIZON=${HORIZON:-7}
export LR=${LR:-1e-5}

exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/train_safesteer_llama.sh" "$@"
