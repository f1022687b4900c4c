"""The teacher under DeepSpeed: the steering hook on the HF model inside a DeepSpeed engine (what
SteeredReferenceActor does) gives the core steer() result under ZeRO-0 and under ZeRO-3 with the
reference offloaded to CPU (`--ref.offload`). DeepSpeed's CPU accelerator, gloo, world size 1, in a
subprocess so torch.distributed does not leak into other tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import json, os, socket, sys
    with socket.socket() as s:
        s.bind(("", 0)); port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      DS_ACCELERATOR="cpu")
    from openrlhf_safesteer.plugin import compat
    compat.prepare_process()
    import deepspeed, torch
    from openrlhf.models import Actor
    from openrlhf.utils.deepspeed.deepspeed_utils import get_eval_ds_config
    from transformers import AutoModelForCausalLM
    from openrlhf_safesteer.plugin.teacher import teacher_outputs
    from openrlhf_safesteer.steering import SteeringVector, attach_steering, steer

    model_dir, vector_dir, ids = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
    deepspeed.init_distributed(dist_backend="gloo")
    vector = SteeringVector.load(vector_dir)
    seq = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 0, 0]])
    att = (seq != 0).long()
    act = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), steer(plain, vector):
        expected = teacher_outputs(plain(seq, attention_mask=att, position_ids=pos).logits.float(), seq, act, ids)
    with torch.no_grad():
        base = teacher_outputs(plain(seq, attention_mask=att, position_ids=pos).logits.float(), seq, act, ids)
    report = {"steering_effect": float((expected["logprobs_on_s"] - base["logprobs_on_s"]).abs().max())}
    for stage, offload in ((0, False), (3, True)):
        cfg = get_eval_ds_config(offload=offload, stage=stage, param_dtype="bf16")
        cfg.update(train_micro_batch_size_per_gpu=1, train_batch_size=1)
        actor = Actor(model_dir, attn_implementation="sdpa", param_dtype="bf16", ds_config=cfg)
        engine, *_ = deepspeed.initialize(model=actor.model, config=cfg, dist_init_required=True)
        actor.model = engine
        handle = attach_steering(actor.model, vector)  # as SteeredReferenceActor: on the DeepSpeed engine
        with torch.no_grad():
            got = teacher_outputs(actor(seq, None, att, return_output=True)["logits"], seq, act, ids)
        handle.remove()
        report[f"zero{stage}"] = {k: float((got[k] - expected[k]).abs().max()) for k in got}
    print("REPORT " + json.dumps(report))
''')


@pytest.mark.slow
def test_teacher_hook_under_zero0_and_zero3_with_offload(tiny_run):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tiny_run["model"], tiny_run["vector"],
                           json.dumps(tiny_run["safety_ids"])], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1].splitlines()[0])
    assert report["steering_effect"] > 1e-2  # the hook changes the teacher, so agreement below means something
    for stage in ("zero0", "zero3"):
        # bf16 everywhere; ZeRO-3 gathers parameters per module, which can reorder bf16 sums slightly.
        assert report[stage]["logprobs_on_s"] < 2e-3, report
        assert report[stage]["logprobs"] < 2e-3, report
