"""SafeSteer as a plugin of OpenRLHF 0.10.2 to 0.11.2 (Ray + vLLM + DeepSpeed); `versions` says what differs.

OpenRLHF has no plugin registry, so the engine is a set of subclasses that the launcher
(`python -m openrlhf_safesteer.cli.train_safesteer_ray`) hands to OpenRLHF's own `train()`:

- `teacher.SteeredReferenceActor`: OpenRLHF's reference actor plus the steering hook on the model
  DeepSpeed wraps; returns the teacher's log-probs on S (B, T-1, |S|) and of the sampled tokens.
- `experience.SafeSteerExperienceMaker`: carries the teacher data with each experience, sets the
  sampled-form advantage (objective `sampled`), logs KL over S, mass on S; no reward, no critic.
- `policy.SafeSteerPolicyActor` / `SafeSteerActorTrainer`: the exact localized reverse KL from the
  actor's own logits (objective `exact`, the paper's loss), or OpenRLHF's stock PPO loss (`sampled`).
- `rollout.HFRolloutActor`: an HF-generate rollout engine that answers like OpenRLHF's vLLM engine.

Importing this package, or any module of it, changes nothing: the import stand-ins for flash_attn/vllm on
machines that lack them (see `compat`) are installed by the processes that import OpenRLHF: the launcher, the
flag checker and the CPU runner of OpenRLHF's own trainers (`compat.prepare_process()` before OpenRLHF's entry
point runs), and every Ray worker of the job the launcher starts (`compat.worker_setup`, run by Ray before the
worker unpickles an actor class). `teacher`, `experience`, `policy` and `stock_actors` subclass OpenRLHF's
classes, so they import only in such a process.
"""

from openrlhf_safesteer.plugin.compat import SUPPORTED_OPENRLHF

__all__ = ["SUPPORTED_OPENRLHF"]
