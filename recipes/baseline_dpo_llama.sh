#!/usr/bin/env bash
# Baseline: OpenRLHF 0.11.2's DPO on PKU-SafeRLHF preference pairs, on the same Llama-3-8B-Instruct
# (the "DPO-Mix"-style baseline of the comparison table; ~100x SafeSteer's data).
#
#   bash recipes/baseline_dpo_llama.sh             # train with DeepSpeed on this node's 8 GPUs
#   bash recipes/baseline_dpo_llama.sh --dry-run   # print the command, check every flag with OpenRLHF's parser
#
# The dataset is OpenRLHF's mixture that includes the PKU-SafeRLHF safety pairs; set DATASET to a
# local copy or to another chosen/rejected dataset.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B-Instruct}
DATASET=${DATASET:-OpenRLHF/preference_dataset_mixture2_and_safe_pku}
WORK=${WORK:-./runs/baseline-dpo-llama3-8b}
PYTHON=${PYTHON:-python3}

parse_recipe_args "$@"   # --dry-run; any further flag of openrlhf.cli.train_dpo is passed through

FLAGS=(
  --model.model_name_or_path "$MODEL"
  --data.dataset "$DATASET" --data.chosen_key chosen --data.rejected_key rejected
  --data.apply_chat_template --data.max_len 2048 --data.max_samples 100000
  --train.batch_size 256 --train.micro_batch_size 1 --train.max_epochs 1 --train.seed 42
  --adam.lr 5e-7 --model.beta 0.1 --lr_warmup_ratio 0.03
  --ds.zero_stage 3 --ds.param_dtype bf16 --ds.attn_implementation flash_attention_2 --ds.packing_samples
  --model.gradient_checkpointing_enable
  --ckpt.output_dir "$WORK/final" --ckpt.path "$WORK/ckpt" --ckpt.save_steps -1
  --logger.tensorboard_dir "$WORK/tensorboard"
  "${EXTRA[@]}"
)
TRAIN=(deepspeed --module openrlhf.cli.train_dpo "${FLAGS[@]}")

if [[ $DRY_RUN == 1 ]]; then
  show_command "${TRAIN[@]}"
  exec "$PYTHON" -m openrlhf_safesteer.plugin.check_flags openrlhf.cli.train_dpo "${FLAGS[@]}"
fi

"${TRAIN[@]}"
