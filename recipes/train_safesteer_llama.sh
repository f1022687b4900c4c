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
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

MODEL=$(absolute_model "${MODEL:-meta-llama/Meta-Llama-3-8B-Instruct}")
# Absolute paths: `ray job submit` runs the entrypoint in the job supervisor's directory, not this shell's, and
# each actor writes checkpoints relative to its own working directory on whichever node it runs.
WORK=$(realpath -m "${WORK:-./runs/safesteer-llama3-8b}")
HORIZON=${HORIZON:-5}
LR=${LR:-1e-6}
RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
PYTHON=${PYTHON:-python3}
# The cluster's shape (train_safesteer_llama70b_multinode.sh sets these): NODES x GPUS_PER_NODE GPUs shared by
# the actor, the steered reference and NODES x GPUS_PER_NODE / VLLM_TP vLLM engines of tensor parallelism VLLM_TP.
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
VLLM_TP=${VLLM_TP:-1}
VLLM_GPU_MEMORY=${VLLM_GPU_MEMORY:-0.5}
MICRO_BATCH=${MICRO_BATCH:-4}             # rollout and training micro-batch per GPU
read -r -a STAGE1_FLAGS <<< "${STAGE1_FLAGS:-}"   # more flags for `safesteer direction` and `safesteer tokens`

parse_recipe_args "$@"   # --dry-run; any further OpenRLHF or --safesteer.* flag is passed through

VECTOR="$WORK/vector"
TOKENS="$WORK/safety_tokens.json"
PROMPTS="$WORK/pku_saferlhf_unsafe_100.jsonl"

# ---- stage 1: steering vector, safety tokens, training prompts (each skipped if it exists) ----
DIRECTION=(safesteer direction --model "$MODEL" --out "$VECTOR" --dtype bfloat16 "${STAGE1_FLAGS[@]}")
SAFETY_TOKENS=(safesteer tokens --model "$MODEL" --vector "$VECTOR" --out "$TOKENS" --horizon "$HORIZON"
               --dtype bfloat16 "${STAGE1_FLAGS[@]}")
PREPARE_PROMPTS=("$PYTHON" "$HERE/prepare_pku_prompts.py" --out "$PROMPTS" --n 100 --seed 0)

# ---- stage 2: SafeSteer through OpenRLHF ------------------------------------------------------
RAY_FLAGS=(
  --ref.num_nodes "$NODES" --ref.num_gpus_per_node "$GPUS_PER_NODE"
  --actor.num_nodes "$NODES" --actor.num_gpus_per_node "$GPUS_PER_NODE"
  --vllm.num_engines "$((NODES * GPUS_PER_NODE / VLLM_TP))" --vllm.tensor_parallel_size "$VLLM_TP"
  --vllm.gpu_memory_utilization "$VLLM_GPU_MEMORY"
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
  --rollout.temperature 1.0 --rollout.top_p 1.0 --rollout.micro_batch_size "$MICRO_BATCH"
)
TRAIN_FLAGS=(
  --train.batch_size 32 --train.micro_batch_size "$MICRO_BATCH" --train.max_epochs 1 --train.num_episodes 1
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
  show_command "${DIRECTION[@]}"
  show_command "${SAFETY_TOKENS[@]}"
  show_command "${PREPARE_PROMPTS[@]}"
  echo "# stage 2:"
  show_command ray job submit --address="$RAY_ADDRESS" --runtime-env-json="$RUNTIME_ENV" -- "${LAUNCH[@]}"
  exec "${LAUNCH[@]}" --safesteer.dry_run
fi

mkdir -p "$WORK"
[[ -f "$VECTOR/steering_vector.json" ]] || "${DIRECTION[@]}"
[[ -f "$TOKENS" ]] || "${SAFETY_TOKENS[@]}"
[[ -f "$PROMPTS" ]] || "${PREPARE_PROMPTS[@]}"
# STAGE1_ONLY=1: stop after stage 1 (recipes/compare_llama.sh --frontier makes the grid's vector, S and prompts so)
if [[ ${STAGE1_ONLY:-0} == 1 ]]; then exit 0; fi

ray job submit --address="$RAY_ADDRESS" --runtime-env-json="$RUNTIME_ENV" -- "${LAUNCH[@]}"
