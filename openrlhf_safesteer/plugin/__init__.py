"""SafeSteer as a plugin of OpenRLHF 0.11.2 (Ray + vLLM + DeepSpeed).

OpenRLHF has no plugin registry, so the engine is a set of subclasses that the launcher
(`python -m openrlhf_safesteer.cli.train_safesteer_ray`) hands to OpenRLHF's own `train()`:

- `teacher.SteeredReferenceActor`: OpenRLHF's reference actor plus the steering hook on the model
  DeepSpeed wraps; returns the teacher's log-probs on S (B, T-1, |S|) and of the sampled tokens.
- `experience.SafeSteerExperienceMaker`: carries the teacher data with each experience, sets the
  sampled-form advantage (objective `sampled`), logs KL over S, mass on S; no reward, no critic.
- `policy.SafeSteerPolicyActor` / `SafeSteerActorTrainer`: the exact localized reverse KL from the
  actor's own logits (objective `exact`, the paper's loss), or OpenRLHF's stock PPO loss (`sampled`).
- `rollout.HFRolloutActor`: an HF-generate rollout engine that answers like OpenRLHF's vLLM engine.

Importing this package registers import stand-ins for flash_attn/vllm on machines that lack them
(see `compat`), so that OpenRLHF's modules import on a CPU machine and on every Ray worker.
"""

from openrlhf_safesteer.plugin import compat

compat.configure_cpu_environment()
compat.install_import_stand_ins()

SUPPORTED_OPENRLHF = compat.SUPPORTED_OPENRLHF
