#!/usr/bin/env bash
# SafeSteer through OpenRLHF 0.11.2's real Ray path on a CPU: a tiny model, 2 steps, a few minutes.
#
#   bash recipes/train_safesteer_cpu.sh [--out DIR] [--dry-run] [extra OpenRLHF / --safesteer.* flags]
#
# What runs for real: Ray actors (policy, steered reference, HF-generate rollout engine, the PPO
# trainer), DeepSpeed with its CPU accelerator (gloo), OpenRLHF's trainer, experience maker base
# class, replay buffer and optimizer step, transformers models. Stand-ins (CPU only): the flash_attn
# and vllm *imports* (see openrlhf_safesteer/plugin/compat.py); the vLLM engine's role is played by
# the HF-generate rollout actor.
#
# Stage 1 (skipped for any of MODEL / VECTOR / TOKENS / PROMPTS you set): a toy model trained in
# memory to refuse harmful requests, then the real `safesteer direction` and `safesteer tokens`.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

parse_recipe_args "$@"   # --dry-run; --out DIR; any further OpenRLHF or --safesteer.* flag is passed through
OUT=./runs/safesteer-cpu
set -- "${EXTRA[@]}"
EXTRA=()
while [[ $# -gt 0 ]]; do
  if [[ $1 == --out ]]; then OUT=$2; shift 2; else EXTRA+=("$1"); shift; fi
done
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-$OUT/model}
VECTOR=${VECTOR:-$OUT/vector}
TOKENS=${TOKENS:-$OUT/safety_tokens.json}
PROMPTS=${PROMPTS:-$OUT/harmful.jsonl}
HARMLESS=$OUT/harmless.jsonl

# ---- stage 1: toy model, steering vector, safety tokens ---------------------------------------
TOY_MODEL=("$PYTHON" -c '
import json, sys
from openrlhf_safesteer.testing import tiny_tokenizer
from openrlhf_safesteer.toy import toy_prompts, train_refusal_model
model_dir, harmful, harmless = sys.argv[1:4]
tokenizer = tiny_tokenizer()
model = train_refusal_model("llama", tokenizer)
model.save_pretrained(model_dir)
tokenizer.save_pretrained(model_dir)
for kind, path in (("harmful", harmful), ("harmless", harmless)):
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"prompt": p}) + "\n" for p in toy_prompts(kind))
' "$MODEL" "$PROMPTS" "$HARMLESS")
DIRECTION=("$PYTHON" -m openrlhf_safesteer.cli.main direction --model "$MODEL" --harmful "$PROMPTS"
           --harmless "$HARMLESS" --out "$VECTOR" --n-train 32 --n-val 16)
SAFETY_TOKENS=("$PYTHON" -m openrlhf_safesteer.cli.main tokens --model "$MODEL" --vector "$VECTOR"
               --prompts "$HARMLESS" --out "$TOKENS" --horizon 3 --n-samples 2 --k 20)

# ---- stage 2: SafeSteer through OpenRLHF (2 steps: 4 prompts, 2 per step, 2 samples each) -----
RAY_FLAGS=(
  --actor.num_nodes 1 --actor.num_gpus_per_node 1
  --ref.num_nodes 1 --ref.num_gpus_per_node 1
  --vllm.num_engines 1 --safesteer.rollout hf
)
MODEL_FLAGS=(
  --actor.model_name_or_path "$MODEL"
  --ds.zero_stage 0 --ds.param_dtype bf16 --ds.attn_implementation sdpa
)
DATA_FLAGS=(
  --data.prompt_dataset "$PROMPTS" --data.input_key prompt --data.apply_chat_template
  --data.max_samples 4 --data.max_len 64
)
ROLLOUT_FLAGS=(
  --rollout.batch_size 2 --rollout.n_samples_per_prompt 2 --rollout.max_new_tokens 8
  --rollout.micro_batch_size 4
)
TRAIN_FLAGS=(
  --train.batch_size 4 --train.micro_batch_size 4 --train.max_epochs 1
  --actor.adam.lr 1e-3 --actor.lr_warmup_ratio 0.0
  --ckpt.output_dir "$OUT/final" --ckpt.path "$OUT/ckpt"
  --logger.tensorboard_dir "$OUT/tensorboard"
)
SAFESTEER_FLAGS=(
  --safesteer.vector "$VECTOR" --safesteer.tokens "$TOKENS" --safesteer.objective exact
  --safesteer.dump_dir "$OUT/dump"
)
LAUNCH=("$PYTHON" -m openrlhf_safesteer.cli.train_safesteer_ray "${RAY_FLAGS[@]}" "${MODEL_FLAGS[@]}"
        "${DATA_FLAGS[@]}" "${ROLLOUT_FLAGS[@]}" "${TRAIN_FLAGS[@]}" "${SAFESTEER_FLAGS[@]}" "${EXTRA[@]}")

if [[ $DRY_RUN == 1 ]]; then
  echo "# stage 1 (each step skipped when its output exists):"
  show_command "${TOY_MODEL[0]}" -c '...' "$MODEL" "$PROMPTS" "$HARMLESS"
  show_command "${DIRECTION[@]}"
  show_command "${SAFETY_TOKENS[@]}"
  echo "# stage 2 (starts a local Ray cluster without the dashboard):"
  show_command "${LAUNCH[@]}"
  exec "${LAUNCH[@]}" --safesteer.dry_run
fi

# One CPU thread per process: Ray's actors (policy, teacher, rollout engine) share the cores, and
# torch's default thread pool on a small machine mostly fights itself.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
[[ -f "$MODEL/config.json" ]] || "${TOY_MODEL[@]}"
[[ -f "$VECTOR/steering_vector.json" ]] || "${DIRECTION[@]}"
[[ -f "$TOKENS" ]] || "${SAFETY_TOKENS[@]}"

exec "${LAUNCH[@]}"
