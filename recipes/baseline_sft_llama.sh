#!/usr/bin/env bash
# Baseline: OpenRLHF 0.11.2's SFT on the steered teacher's own replies (the baseline any distillation method is
# compared with), on the same Llama-3-8B-Instruct and prompts as SafeSteer.
#
#   bash recipes/baseline_sft_llama.sh             # train with DeepSpeed on this node's 8 GPUs
#   bash recipes/baseline_sft_llama.sh --dry-run   # print the command, check every flag with OpenRLHF's parser
#
# DATASET is a JSONL of {"prompt", "response"} rows: the steered teacher's complete replies to SafeSteer's prompt
# draws, made by `python -m openrlhf_safesteer.compare.pairs` (recipes/compare_llama.sh stage 2 makes it).
# The batch (32) and the one epoch over 800 rows (100 prompts x 8 draws) give SafeSteer's 25 optimizer steps.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B-Instruct}
WORK=${WORK:-./runs/baseline-sft-llama3-8b}
DATASET=${DATASET:-./runs/compare-llama3-8b/teacher_data/sft.jsonl}
PYTHON=${PYTHON:-python3}

parse_recipe_args "$@"   # --dry-run; any further flag of openrlhf.cli.train_sft is passed through

FLAGS=(
  --model.model_name_or_path "$MODEL"
  --data.dataset "$DATASET" --data.input_key prompt --data.output_key response --data.apply_chat_template
  --data.max_len 2048
  --train.batch_size 32 --train.micro_batch_size 2 --train.max_epochs 1 --train.seed 42
  --adam.lr 1e-6 --lr_warmup_ratio 0.1 --lr_scheduler cosine_with_min_lr --min_lr_ratio 0.0
  --ds.zero_stage 3 --ds.param_dtype bf16 --ds.attn_implementation flash_attention_2
  --model.gradient_checkpointing_enable
  --ckpt.output_dir "$WORK/final" --ckpt.path "$WORK/ckpt" --ckpt.save_steps -1
  --logger.tensorboard_dir "$WORK/tensorboard"
  "${EXTRA[@]}"
)
TRAIN=(deepspeed --module openrlhf.cli.train_sft "${FLAGS[@]}")

if [[ $DRY_RUN == 1 ]]; then
  show_command "${TRAIN[@]}"
  exec "$PYTHON" -m openrlhf_safesteer.plugin.check_flags openrlhf.cli.train_sft "${FLAGS[@]}"
fi

"${TRAIN[@]}"
