"""benchmarks/gpu_check.py in its CPU mode (--device cpu --small): every check passes on the real code, and the
checks can fail (a read one position late, a hook that adds the wrong vector)."""

import json

import torch

from benchmarks import gpu_check


def test_cpu_small_mode_passes_and_writes_every_check(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--small", "--ratios", "", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    statuses = {c["check"]: c["status"] for c in result["checks"]}
    assert "FAIL" not in statuses.values()
    for name in ("hook: layer l input = plain + (coeff*d).to(dtype)", "hook: removal restores the logits",
                 "alignment: padded batch = per-sequence forwards (sampled tokens)",
                 "alignment: a one-position-late read differs", "packed: (B, T, 1, V) logits give the same read",
                 "fused_loss: gradient = autograd", "policy_step: fused = autograd (loss, lm_head gradient cosine)"):
        assert statuses[name] == "PASS", name
    assert "0 failed" in capsys.readouterr().out


def test_alignment_check_fails_for_a_read_one_position_late():
    real = gpu_check.load_plugin_logits()

    class Late:
        padded_logits = staticmethod(real.padded_logits)

        @staticmethod
        def action_logprobs(logits, sequences, action_mask, safety_ids):
            shifted = torch.cat([logits[:, 1:], logits[:, -1:]], dim=1)
            return real.action_logprobs(shifted, sequences, action_mask, safety_ids)

    report = gpu_check.Report()
    model = gpu_check.build_model(gpu_check.SMALL, "cpu", torch.bfloat16)
    gpu_check.check_alignment(report, model, gpu_check.SMALL, "cpu", Late)
    assert "alignment: padded batch = per-sequence forwards (sampled tokens)" in report.failed


def test_hook_check_fails_when_the_hook_adds_the_wrong_vector(monkeypatch):
    real_attach = gpu_check.attach_steering
    monkeypatch.setattr(gpu_check, "attach_steering", lambda model, vector: real_attach(model, vector, coeff=1.0))
    report = gpu_check.Report()
    model = gpu_check.build_model(gpu_check.SMALL, "cpu", torch.bfloat16)
    gpu_check.check_hook(report, model, gpu_check.SMALL, "cpu")  # the check's vector has coeff 1.5
    assert report.failed == ["hook: layer l input = plain + (coeff*d).to(dtype)"]
