"""SafeSteer beside OpenRLHF's own DPO and PPO, on one machine, in one command.

    bash recipes/compare_cpu.sh --out DIR [--from DEMO_DIR]
    python -m openrlhf_safesteer.compare.run --out DIR [--from DEMO_DIR] [--arms ...]

Arms (same training prompts, seed, optimizer steps, LoRA adapter, learning-rate schedule):
- safesteer: the OpenRLHF plugin (`openrlhf_safesteer.cli.train_safesteer_ray`), exact loss on S;
- safesteer_sampled: the same launcher with the per-token advantage in OpenRLHF's stock policy loss;
- dpo: OpenRLHF's `openrlhf.cli.train_dpo` on pairs chosen = steered teacher's reply, rejected = the
  base model's own reply, for the same prompt draws (no human labels);
- ppo: OpenRLHF's `openrlhf.cli.train_ppo_ray` with REINFORCE++-baseline and a reward function file
  that scores each reply with the refusal judge;
- safesteer_local: the local engine (`safesteer train`) on the demo's settings.
Then every arm's final checkpoint and the base model are evaluated like the demo (greedy, held-out
prompts), and DIR/report.json, report.md and a plot are written.
"""
