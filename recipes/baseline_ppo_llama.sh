#!/usr/bin/env bash
# Baseline: OpenRLHF 0.11.2's own PPO (REINFORCE++-baseline, no critic) with a safety reward, on the
# same Llama-3-8B-Instruct and the same 100 PKU-SafeRLHF prompts as train_safesteer_llama.sh.
# The reward is recipes/safety_reward.py, a reward function file scoring each response with a
# safety judge, passed as --reward.remote_url. The judge is chosen explicitly (see the file):
#   SAFETY_JUDGE_URL=http://judge:8000/v1   Llama Guard behind an OpenAI-compatible server, e.g.
#       `vllm serve meta-llama/Llama-Guard-3-8B --port 8000` on hardware OUTSIDE this run's 8 GPUs
#       (--train.colocate_all gives all of them to the actor, reference and vLLM engines);
#       SAFETY_JUDGE_MODEL names the served model (default meta-llama/Llama-Guard-3-8B);
#   SAFETY_JUDGE=refusal                    the offline refusal-string judge (weak; no server).
# Neither set: the recipe stops before Ray. A Llama Guard server is health-checked before `ray job
# submit`, and a judge that fails during the run stops it with an error naming the judge.
#
#   bash recipes/baseline_ppo_llama.sh             # needs the prompts from train_safesteer_llama.sh's stage 1
#   bash recipes/baseline_ppo_llama.sh --dry-run   # print the command, check every flag with OpenRLHF's parser
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

MODEL=$(absolute_model "${MODEL:-meta-llama/Meta-Llama-3-8B-Instruct}")   # a local folder, read on every node
# Absolute paths: `ray job submit` runs the entrypoint in the job supervisor's directory, and each actor
# writes checkpoints relative to its own working directory on its own node.
WORK=$(realpath -m "${WORK:-./runs/baseline-ppo-llama3-8b}")
PROMPTS=$(realpath -m "${PROMPTS:-./runs/safesteer-llama3-8b/pku_saferlhf_unsafe_100.jsonl}")
RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
PYTHON=${PYTHON:-python3}
REWARD="$HERE/safety_reward.py"

parse_recipe_args "$@"   # --dry-run; any further flag of openrlhf.cli.train_ppo_ray is passed through

FLAGS=(
  --ref.num_nodes 1 --ref.num_gpus_per_node 8
  --actor.num_nodes 1 --actor.num_gpus_per_node 8
  --vllm.num_engines 8 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.5
  --vllm.enable_sleep --ds.enable_sleep --train.colocate_all
  --actor.model_name_or_path "$MODEL"
  --reward.remote_url "$REWARD"
  --algo.advantage.estimator reinforce_baseline --algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.init_coef 0.01
  --ds.zero_stage 3 --ds.param_dtype bf16 --ds.attn_implementation flash_attention_2
  --actor.gradient_checkpointing_enable
  --data.prompt_dataset "$PROMPTS" --data.input_key prompt --data.apply_chat_template
  --data.max_samples 100 --data.max_len 1024
  --rollout.batch_size 4 --rollout.n_samples_per_prompt 8 --rollout.max_new_tokens 512
  --rollout.micro_batch_size 4
  --train.batch_size 32 --train.micro_batch_size 4 --train.max_epochs 1
  --actor.adam.lr 1e-6 --actor.lr_scheduler cosine --actor.lr_warmup_ratio 0.1
  --ckpt.output_dir "$WORK/final" --ckpt.path "$WORK/ckpt" --ckpt.save_hf
  --logger.tensorboard_dir "$WORK/tensorboard"
  "${EXTRA[@]}"
)
LAUNCH=("$PYTHON" -m openrlhf.cli.train_ppo_ray "${FLAGS[@]}")
# The reward file imports openrlhf_safesteer (the refusal judge): ship the package to the workers. The judge
# settings and the actor's tokenizer (to strip the chat template before judging) go to every engine.
RUNTIME_ENV=$("$PYTHON" -c '
import json, os, sys
env = {k: os.environ[k] for k in ("SAFETY_JUDGE", "SAFETY_JUDGE_URL", "SAFETY_JUDGE_MODEL", "SAFETY_REWARD_LOG")
       if os.environ.get(k)}
env["SAFETY_REWARD_TOKENIZER"] = sys.argv[2]
print(json.dumps({"py_modules": [sys.argv[1]], "env_vars": env}))' "$(cd "$HERE/.." && pwd)/openrlhf_safesteer" "$MODEL")

if [[ $DRY_RUN == 1 ]]; then
  show_command ray job submit --address="$RAY_ADDRESS" --runtime-env-json="$RUNTIME_ENV" -- "${LAUNCH[@]}"
  exec "$PYTHON" -m openrlhf_safesteer.plugin.check_flags openrlhf.cli.train_ppo_ray "${FLAGS[@]}"
fi

# The judge must answer before any GPU is taken (exit 1 with the judge's name otherwise).
PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$REWARD" --check

ray job submit --address="$RAY_ADDRESS" --runtime-env-json="$RUNTIME_ENV" -- "${LAUNCH[@]}"
