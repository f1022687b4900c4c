#!/usr/bin/env bash
# SafeSteer on Llama-3-70B-Instruct: 4 nodes x 8 GPUs, ZeRO-3, the steered reference offloaded to CPU,
# vLLM engines with tensor parallelism 8, all colocated (hybrid engine). Paper settings as in
# train_safesteer_llama.sh (100 prompts, 4 x 8 samples per step, 512 new tokens, lr 1e-6, horizon 5),
# which this recipe runs with the cluster's shape and the 70B model's memory settings below.
#
# 1. Start the Ray cluster (same venv, same paths on every node; a shared file system for $WORK, whose
#    path is made absolute by train_safesteer_llama.sh):
#      head:      bash recipes/train_safesteer_llama70b_multinode.sh --start-head
#      3 workers: bash recipes/train_safesteer_llama70b_multinode.sh --start-worker HEAD_IP
#    (equivalently: `ray start --head --node-ip-address HEAD_IP --num-gpus 8 --dashboard-host 0.0.0.0`
#     and `ray start --address HEAD_IP:6379 --num-gpus 8`)
# 2. On the head:  bash recipes/train_safesteer_llama70b_multinode.sh            (or --dry-run)
set -euo pipefail

export MODEL=${MODEL:-meta-llama/Meta-Llama-3-70B-Instruct}
export WORK=${WORK:-./runs/safesteer-llama3-70b}
export NODES=${NODES:-4}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export VLLM_TP=$GPUS_PER_NODE            # one vLLM engine per node, tensor-parallel over its GPUs
export VLLM_GPU_MEMORY=0.6
export MICRO_BATCH=1

case "${1:-}" in
  --start-head)
    exec ray start --head --node-ip-address "$(hostname -I | awk '{print $1}')" --num-gpus "$GPUS_PER_NODE" \
      --dashboard-host 0.0.0.0 ;;
  --start-worker)
    exec ray start --address "$2:6379" --num-gpus "$GPUS_PER_NODE" ;;
esac

# ---- stage 1 (on the head, once): a 70B direction search in bf16 spread over the node's GPUs ----
# Llama-3-70B in bf16 is ~141 GB of weights: more than one 80 GB GPU. --device-map auto (accelerate) loads
# the layers straight onto the head node's visible GPUs (then CPU RAM); stage 1 needs ~141 GB of GPU memory
# for the weights plus a few GB of activations and KV cache at batch 4, i.e. at least 2 x 80 GB GPUs (the 8 of
# a node hold ~18 GB each). Cap a device with STAGE1_MAX_MEMORY='0=70GiB,1=70GiB,...'.
export STAGE1_FLAGS="--batch-size 4 --device-map auto${STAGE1_MAX_MEMORY:+ --max-memory $STAGE1_MAX_MEMORY}"

# ---- stage 2: the Llama recipe's flags on the whole cluster, plus what 70B needs -------------------------
MEMORY_FLAGS=(
  --ref.offload --ds.adam_offload
  # Packing needs flash-attn's varlen kernels (the plugin reads the packed (B, T, 1, V) logits correctly;
  # tests/openrlhf/test_openrlhf_packing.py checks that on CPU, with sdpa's packed-sequence mask).
  --ds.packing_samples
)
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/train_safesteer_llama.sh" "${MEMORY_FLAGS[@]}" "$@"
