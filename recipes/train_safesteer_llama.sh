#!/usr/bin/env bash
# SafeSteer on Llama-3-8B-Instruct: one node of 8 GPUs, OpenRLHF 0.11.2's colocated hybrid engine
# (vLLM + DeepSpeed actor + steered reference share the GPUs). The paper's settings:
# 100 PKU-SafeRLHF unsafe prompts, 4 prompts x 8 samples per step, 512 new tokens, lr 1e-6,
# cosine schedule with 10% warm-up, 1 epoch; safety tokens with horizon 5 (Llama).
#
#   bash recipes/train_safesteer_llama.sh             # stage 1 (vector, tokens, prompts) if missing, then train
#   bash recipes/train_safesteer_llama.sh --dry-run   # print the command, check every flag, start nothing
#
# Needs: a Ray head on this node (`ray start --head --num-gpus 8`), openrlhf==0.11.2, vllm, and this
# package installed (`pip install -e '.[openrlhf,vllm]'`); the runtime_env below also ships it.
set -euo pipefail

MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B-Instruct}
# Absolute paths: `ray job submit` runs the entrypoint in the job supervisor's directory, not this shell's, and
# each actor writes checkpoints relative to its own working directory on whichever node it runs.
WORK=$(realpath -m "${WORK:-./runs/safesteer-llama3-8b}")
if [[ -d "$MODEL" ]]; then MODEL=$(realpath "$MODEL"); fi  # a local model folder, read on every node
HORIZON=${HORIZON:-5}
LR=${LR:-1e-6}
RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

DRY_RUN=0
EXTRA=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) EXTRA+=("$arg") ;;  # any further OpenRLHF or --safesteer.* flag, passed through
  esac
done

VECTOR="$WORK/vector"
TOKENS="$WORK/safety_tokens.json"
PROMPTS="$WORK/pku_saferlhf_unsafe_100.jsonl"

# ---- stage 1: steering vector, safety tokens, training prompts (each skipped if it exists) ----
DIRECTION=(safesteer direction --model "$MODEL" --out "$VECTOR" --dtype bfloat16)
SAFETY_TOKENS=(safesteer tokens --model "$MODEL" --vector "$VECTOR" --out "$TOKENS" --horizon "$HORIZON"
               --dtype bfloat16)
PREPARE_PROMPTS=("$PYTHON" "$HERE/prepare_pku_prompts.py" --out "$PROMPTS" --n 100 --seed 0)

# ---- stage 2: SafeSteer through OpenRLHF ------------------------------------------------------
RAY_FLAGS=(
  --ref.num_nodes 1 --ref.num_gpus_per_node 8
  --actor.num_nodes 1 --actor.num_gpus_per_node 8
  --vllm.num_engines 8 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.5
  --vllm.enable_sleep --ds.enable_sleep
  --train.colocate_all
)
MODEL_FLAGS=(
  --actor.model_name_or_path "$MODEL"
  --ds.zero_stage 3 --ds.param_dtype bf16 --ds.attn_implementation flash_attention_2
  --actor.gradient_checkpointing_enable
)
DATA_FLAGS=(
  --data.prompt_dataset "$PROMPTS" --data.input_key prompt --data.apply_chat_template
  --data.max_samples 100 --data.max_len 1024
)
ROLLOUT_FLAGS=(
  --rollout.batch_size 4 --rollout.n_samples_per_prompt 8 --rollout.max_new_tokens 512
  --rollout.temperature 1.0 --rollout.top_p 1.0 --rollout.micro_batch_size 4
)
TRAIN_FLAGS=(
  --train.batch_size 32 --train.micro_batch_size 4 --train.max_epochs 1 --train.num_episodes 1
  --actor.adam.lr "$LR" --actor.adam.weight_decay 0.0 --actor.lr_scheduler cosine
  --actor.lr_warmup_ratio 0.1 --actor.max_norm 1.0
  --ckpt.output_dir "$WORK/final" --ckpt.path "$WORK/ckpt" --ckpt.save_steps 5 --ckpt.save_hf
  --logger.tensorboard_dir "$WORK/tensorboard"
)
SAFESTEER_FLAGS=(
  --safesteer.vector "$VECTOR" --safesteer.tokens "$TOKENS"
  --safesteer.objective exact --safesteer.rollout vllm
)
FLAGS=("${RAY_FLAGS[@]}" "${MODEL_FLAGS[@]}" "${DATA_FLAGS[@]}" "${ROLLOUT_FLAGS[@]}" "${TRAIN_FLAGS[@]}"
       "${SAFESTEER_FLAGS[@]}" "${EXTRA[@]}")
LAUNCH=("$PYTHON" -m openrlhf_safesteer.cli.train_safesteer_ray "${FLAGS[@]}")
# Ship the plugin to every Ray worker (not needed where the package is installed on all nodes).
RUNTIME_ENV="{\"py_modules\": [\"$(cd "$HERE/.." && pwd)/openrlhf_safesteer\"]}"

if [[ $DRY_RUN == 1 ]]; then
  echo "# stage 1 (each step skipped when its output exists):"
  printf ' %q' "${DIRECTION[@]}"; echo
  printf ' %q' "${SAFETY_TOKENS[@]}"; echo
  printf ' %q' "${PREPARE_PROMPTS[@]}"; echo
  echo "# stage 2:"
  printf ' %q' ray job submit --address="$RAY_ADDRESS" --runtime-env-json="$RUNTIME_ENV" -- "${LAUNCH[@]}"; echo
  exec "${LAUNCH[@]}" --safesteer.dry_run
fi

mkdir -p "$WORK"
[[ -f "$VECTOR/steering_vector.json" ]] || "${DIRECTION[@]}"
[[ -f "$TOKENS" ]] || "${SAFETY_TOKENS[@]}"
[[ -f "$PROMPTS" ]] || "${PREPARE_PROMPTS[@]}"

ray job submit --address="$RAY_ADDRESS" --runtime-env-json="$RUNTIME_ENV" -- "${LAUNCH[@]}"
