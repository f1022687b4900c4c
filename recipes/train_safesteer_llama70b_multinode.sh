#!/usr/bin/env bash
# SafeSteer on Llama-3-70B-Instruct: 4 nodes x 8 GPUs, ZeRO-3, the steered reference offloaded to CPU,
# vLLM engines with tensor parallelism 8, all colocated (hybrid engine). Paper settings as in
# train_safesteer_llama.sh (100 prompts, 4 x 8 samples per step, 512 new tokens, lr 1e-6, horizon 5).
#
# 1. Start the Ray cluster (same venv, same paths on every node; a shared file system for $WORK, whose
#    path is made absolute below):
#      head:      bash recipes/train_safesteer_llama70b_multinode.sh --start-head
#      3 workers: bash recipes/train_safesteer_llama70b_multinode.sh --start-worker HEAD_IP
#    (equivalently: `ray start --head --node-ip-address HEAD_IP --num-gpus 8 --dashboard-host 0.0.0.0`
#     and `ray start --address HEAD_IP:6379 --num-gpus 8`)
# 2. On the head:  bash recipes/train_safesteer_llama70b_multinode.sh            (or --dry-run)
set -euo pipefail

MODEL=${MODEL:-meta-llama/Meta-Llama-3-70B-Instruct}
# Absolute paths: `ray job submit` runs the entrypoint in the job supervisor's directory, not this shell's, and
# each actor writes checkpoints relative to its own working directory on whichever node it runs.
WORK=$(realpath -m "${WORK:-./runs/safesteer-llama3-70b}")
if [[ -d "$MODEL" ]]; then MODEL=$(realpath "$MODEL"); fi  # a local model folder, read on every node
NODES=${NODES:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HORIZON=${HORIZON:-5}
LR=${LR:-1e-6}
RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

DRY_RUN=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --start-head)
      exec ray start --head --node-ip-address "$(hostname -I | awk '{print $1}')" --num-gpus "$GPUS_PER_NODE" \
        --dashboard-host 0.0.0.0 ;;
    --start-worker)
      exec ray start --address "$2:6379" --num-gpus "$GPUS_PER_NODE" ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

VECTOR="$WORK/vector"
TOKENS="$WORK/safety_tokens.json"
PROMPTS="$WORK/pku_saferlhf_unsafe_100.jsonl"

# ---- stage 1 (on the head, once): a 70B direction search in bf16 spread over the node's GPUs ----
# Llama-3-70B in bf16 is ~141 GB of weights: more than one 80 GB GPU. --device-map auto (accelerate) loads
# the layers straight onto the head node's visible GPUs (then CPU RAM); stage 1 needs ~141 GB of GPU memory
# for the weights plus a few GB of activations and KV cache at batch 4, i.e. at least 2 x 80 GB GPUs (the 8 of
# a node hold ~18 GB each). Cap a device with STAGE1_MAX_MEMORY='0=70GiB,1=70GiB,...'.
STAGE1_PLACEMENT=(--device-map auto)
if [[ -n "${STAGE1_MAX_MEMORY:-}" ]]; then STAGE1_PLACEMENT+=(--max-memory "$STAGE1_MAX_MEMORY"); fi
DIRECTION=(safesteer direction --model "$MODEL" --out "$VECTOR" --dtype bfloat16 --batch-size 4
           "${STAGE1_PLACEMENT[@]}")
SAFETY_TOKENS=(safesteer tokens --model "$MODEL" --vector "$VECTOR" --out "$TOKENS" --horizon "$HORIZON"
               --dtype bfloat16 --batch-size 4 "${STAGE1_PLACEMENT[@]}")
PREPARE_PROMPTS=("$PYTHON" "$HERE/prepare_pku_prompts.py" --out "$PROMPTS" --n 100 --seed 0)

# ---- stage 2: SafeSteer through OpenRLHF on the whole cluster ---------------------------------
RAY_FLAGS=(
  --ref.num_nodes "$NODES" --ref.num_gpus_per_node "$GPUS_PER_NODE" --ref.offload
  --actor.num_nodes "$NODES" --actor.num_gpus_per_node "$GPUS_PER_NODE"
  --vllm.num_engines "$NODES" --vllm.tensor_parallel_size "$GPUS_PER_NODE" --vllm.gpu_memory_utilization 0.6
  --vllm.enable_sleep --ds.enable_sleep
  --train.colocate_all
)
MODEL_FLAGS=(
  --actor.model_name_or_path "$MODEL"
  --ds.zero_stage 3 --ds.param_dtype bf16 --ds.attn_implementation flash_attention_2
  --ds.adam_offload --actor.gradient_checkpointing_enable
  # Packing needs flash-attn's varlen kernels (the plugin reads the packed (B, T, 1, V) logits correctly;
  # tests/openrlhf/test_openrlhf_packing.py checks that on CPU, with sdpa's packed-sequence mask).
  --ds.packing_samples
)
DATA_FLAGS=(
  --data.prompt_dataset "$PROMPTS" --data.input_key prompt --data.apply_chat_template
  --data.max_samples 100 --data.max_len 1024
)
ROLLOUT_FLAGS=(
  --rollout.batch_size 4 --rollout.n_samples_per_prompt 8 --rollout.max_new_tokens 512
  --rollout.temperature 1.0 --rollout.top_p 1.0 --rollout.micro_batch_size 1
)
TRAIN_FLAGS=(
  --train.batch_size 32 --train.micro_batch_size 1 --train.max_epochs 1 --train.num_episodes 1
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
# Ship the plugin to every node's workers (skip if it is installed in every node's venv).
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
