"""The SafeSteer GPU check: what one CUDA GPU with only torch, transformers and peft can confirm.

    python -m benchmarks.gpu_check --out gpu_check.json                 # one GPU (about 2-5 min on an H200)
    python -m benchmarks.gpu_check --device cpu --small                 # the same checks on a tiny model, CPU

On a randomly initialised Llama-3.2-1B-shaped model (vocab 128256, hidden 2048, 16 layers, 32/8 heads,
tied embeddings) in bf16 with sdpa attention, it checks:

  hook        the steering hook on CUDA bf16: the input of layer l is exactly the plain input plus
              (coeff * d).to(bf16); layer l - 1's input is untouched; removing the handle restores the
              logits; steering changes them;
  alignment   the plugin's teacher/student read (`plugin.logits.action_logprobs`, the code the Ray actors
              run) on a right-padded batch with OpenRLHF's position ids equals per-sequence unpadded
              forwards, and a one-position-late read does not (fp32 copy of the model: an indexing check);
  packed      the (B, T, 1, V) logits of OpenRLHF's packed gather give the same read (`padded_logits`);
  fused_loss  the fused exact loss against plain autograd at the full 128k vocabulary (B=4, T=1024,
              |S|=50): loss and gradient agreement, each one's peak extra GPU memory and time; fp64
              exactness at temperature 1.0 and 0.7;
  policy_step one SafeSteer policy step through the 1B model (Actor-style fp32 logits, the plugin's
              slicing, fused loss, seq-mean reduction, backward with gradient checkpointing, AdamW):
              finite gradients, fused vs autograd loss and lm_head-gradient cosine, peak memory;
  benchmarks  the llama-1b rows of benchmark ratios 1, 2 and 4 (`benchmarks.run`; ratio 4 needs trl and
              datasets, and says so when they are missing).

It imports neither vLLM, Ray, flash-attn, DeepSpeed nor OpenRLHF, and downloads nothing. What it cannot
confirm (vLLM weight sync, Ray placement, flash-attn varlen packing, multi-rank ZeRO-3, real checkpoints)
is listed in README.md ("GPU and cluster readiness"). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from openrlhf_safesteer.models import decoder_layers
from openrlhf_safesteer.objectives import localized_reverse_kl, localized_reverse_kl_autograd, sequence_mean
from openrlhf_safesteer.steering import SteeringVector, attach_steering

REPO = Path(__file__).resolve().parents[1]


def load_plugin_logits():
    """openrlhf_safesteer/plugin/logits.py, loaded by path: the package's __init__ registers OpenRLHF import
    stand-ins (einops, ...) that a bare GPU box lacks, while this module needs only torch."""
    spec = importlib.util.spec_from_file_location("safesteer_plugin_logits", REPO / "openrlhf_safesteer" / "plugin"
                                                  / "logits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Shape:
    """Model and batch sizes of one run."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    batch: int
    length: int
    k: int = 50


FULL = Shape(vocab=128_256, hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, batch=4, length=1024)
SMALL = Shape(vocab=512, hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, batch=3, length=48, k=12)


@dataclass
class Report:
    checks: list[dict] = field(default_factory=list)

    def add(self, name: str, passed: bool | None, **details: Any) -> None:
        status = "INFO" if passed is None else ("PASS" if passed else "FAIL")
        self.checks.append({"check": name, "status": status, **details})
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in details.items())
        print(f"[{status}] {name}: {shown}", flush=True)

    @property
    def failed(self) -> list[str]:
        return [c["check"] for c in self.checks if c["status"] == "FAIL"]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def build_model(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised Llama-3.2-1B-shaped causal LM (or the SMALL one), built on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         intermediate_size=shape.intermediate, max_position_embeddings=4096, rope_theta=500_000.0,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_during(device: str, fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(fn(), peak extra memory in GiB above what was allocated before (CUDA only; nan on CPU), seconds)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    result = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if device.startswith("cuda") else float("nan")
    return result, peak, seconds


def right_padded(shape: Shape, lengths: list[int], prompt: int, device: str, seed: int = 0):
    """Right-padded sequences (B, T), attention mask (B, T), action mask (B, T - 1) (OpenRLHF's layout)."""
    generator = torch.Generator().manual_seed(seed)
    total = max(lengths)
    sequences = torch.zeros(len(lengths), total, dtype=torch.long)
    attention = torch.zeros(len(lengths), total, dtype=torch.long)
    action = torch.zeros(len(lengths), total - 1, dtype=torch.bool)
    for row, length in enumerate(lengths):
        sequences[row, :length] = torch.randint(10, shape.vocab, (length,), generator=generator)
        attention[row, :length] = 1
        action[row, prompt - 1: length - 1] = True
    return sequences.to(device), attention.to(device), action.to(device)


def openrlhf_position_ids(attention: torch.Tensor) -> torch.Tensor:
    """Actor.forward's position ids (openrlhf/models/actor.py, unpacked branch)."""
    position_ids = attention.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention == 0, 1)


# ----------------------------------------------------------------------------------------------- checks


def check_hook(report: Report, model, shape: Shape, device: str) -> None:
    layers = decoder_layers(model)
    layer = len(layers) // 2
    generator = torch.Generator().manual_seed(1)
    vector = SteeringVector(vector=4 * torch.randn(shape.hidden, generator=generator), layer=layer,
                            model_name="gpu-check", coeff=1.5)
    input_ids = torch.randint(10, shape.vocab, (2, min(64, shape.length)), generator=generator).to(device)
    seen: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(module, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    @torch.no_grad()
    def forward(tag: str) -> torch.Tensor:
        handles = [layers[layer - 1].register_forward_pre_hook(capture(f"{tag}/prev"), with_kwargs=True)]
        if tag == "steered":
            handles.append(attach_steering(model, vector))
        # Registered after the steering hook: sees layer l's input as the layer itself receives it.
        handles.append(layers[layer].register_forward_pre_hook(capture(f"{tag}/layer"), with_kwargs=True))
        try:
            return model(input_ids=input_ids, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()

    plain = forward("plain")
    steered = forward("steered")
    after = forward("after")
    addition = (vector.vector * vector.coeff).to(device=device, dtype=seen["plain/layer"].dtype)
    exact = torch.equal(seen["steered/layer"], seen["plain/layer"] + addition)
    report.add("hook: layer l input = plain + (coeff*d).to(dtype)", exact, layer=layer,
               dtype=str(seen["steered/layer"].dtype).replace("torch.", ""), device=str(seen["steered/layer"].device),
               max_abs_diff=float((seen["steered/layer"] - (seen["plain/layer"] + addition)).abs().max()))
    report.add("hook: layer l-1 input untouched", torch.equal(seen["steered/prev"], seen["plain/prev"]),
               max_abs_diff=float((seen["steered/prev"] - seen["plain/prev"]).abs().max()))
    restored = float((after - plain).abs().max())
    report.add("hook: removal restores the logits", restored <= 1e-6, max_abs_diff=restored,
               bitwise=torch.equal(after, plain))
    moved = float((steered.float() - plain.float()).abs().max())
    report.add("hook: steering changes the logits", moved > 1e-2, max_abs_diff=moved)


def check_alignment(report: Report, model, shape: Shape, device: str, logits_module) -> None:
    """The plugin's read on a right-padded batch vs each sequence alone, in an fp32 copy of the model."""
    model32 = model.float()  # in place; main() casts back to bf16 (bf16 -> fp32 -> bf16 is lossless)
    full = shape.length
    lengths = [full, full - full // 4, full // 2, full // 3][: max(2, shape.batch)]
    prompt = max(2, full // 8)
    sequences, attention, action = right_padded(shape, lengths, prompt, device)
    safety_ids = torch.arange(shape.k, device=device) * (shape.vocab // shape.k)
    with torch.no_grad():
        logits = model32(input_ids=sequences, attention_mask=attention, position_ids=openrlhf_position_ids(attention),
                         use_cache=False).logits.float()
        got = logits_module.action_logprobs(logits, sequences, action, safety_ids)
        worst_sampled = worst_on_s = worst_late = 0.0
        for row, length in enumerate(lengths):
            alone = model32(input_ids=sequences[row:row + 1, :length], use_cache=False).logits.float()
            log_p = F.log_softmax(alone[0, :-1], dim=-1)                                   # (length - 1, V)
            columns = action[row, : length - 1]
            expected = log_p.gather(-1, sequences[row, 1:length, None]).squeeze(-1)[columns]
            worst_sampled = max(worst_sampled, float((got["logprobs"][row, : length - 1][columns] - expected)
                                                     .abs().max()))
            worst_on_s = max(worst_on_s, float((got["logprobs_on_s"][row, : length - 1][columns]
                                                - log_p[:, safety_ids][columns]).abs().max()))
            late = log_p[1:].gather(-1, sequences[row, 1:length - 1, None]).squeeze(-1)[columns[:-1]]
            worst_late = max(worst_late, float((got["logprobs"][row, : length - 2][columns[:-1]] - late).abs().max()))
        packed = logits_module.action_logprobs(logits.unsqueeze(2), sequences, action, safety_ids)
    tolerance = 2e-3
    report.add("alignment: padded batch = per-sequence forwards (sampled tokens)", worst_sampled < tolerance,
               max_abs_diff=worst_sampled, lengths=lengths)
    report.add("alignment: padded batch = per-sequence forwards (S)", worst_on_s < tolerance, max_abs_diff=worst_on_s)
    report.add("alignment: a one-position-late read differs", worst_late > 100 * max(tolerance, worst_sampled),
               max_abs_diff=worst_late)
    same = all(torch.equal(packed[key], got[key]) for key in got)
    report.add("packed: (B, T, 1, V) logits give the same read", same)


def check_fused_loss(report: Report, shape: Shape, device: str) -> None:
    generator = torch.Generator().manual_seed(2)
    batch, length, vocab, k = shape.batch, shape.length, shape.vocab, shape.k
    logits = (3 * torch.randn(batch, length, vocab, generator=generator)).to(device)
    safety_ids = torch.randperm(vocab, generator=generator)[:k].sort().values.to(device)
    teacher = torch.log_softmax(torch.randn(batch, length, k, generator=generator), -1).to(device) - 2.0
    mask = (torch.rand(batch, length, generator=generator) > 0.2).float().to(device)

    def run(loss_fn):
        leaf = logits.clone().requires_grad_(True)
        loss, _ = loss_fn(leaf, teacher, safety_ids, mask)
        loss.backward()
        return loss.detach(), leaf.grad

    base = logits.numel() * 4 / 2**30
    (loss_fused, grad_fused), peak_fused, t_fused = peak_during(device, lambda: run(localized_reverse_kl))
    (loss_auto, grad_auto), peak_auto, t_auto = peak_during(device, lambda: run(localized_reverse_kl_autograd))
    loss_diff = abs(float(loss_fused) - float(loss_auto)) / max(abs(float(loss_auto)), 1e-12)
    grad_diff = float((grad_fused - grad_auto).abs().max() / grad_auto.abs().max())
    report.add("fused_loss: loss = autograd (fp32, full vocab)", loss_diff < 1e-5, relative_diff=loss_diff,
               shape=[batch, length, vocab])
    report.add("fused_loss: gradient = autograd", grad_diff < 1e-4, max_diff_over_max_grad=grad_diff)
    report.add("fused_loss: memory and time", None, logits_gib=base, fused_peak_extra_gib=peak_fused,
               autograd_peak_extra_gib=peak_auto, fused_s=t_fused, autograd_s=t_auto)
    del grad_fused, grad_auto
    small = logits[:1, :64].double()
    for temperature in (1.0, 0.7):
        a = small.clone().requires_grad_(True)
        b = small.clone().requires_grad_(True)
        la, _ = localized_reverse_kl(a, teacher[:1, :64].double(), safety_ids, mask[:1, :64], temperature)
        lb, _ = localized_reverse_kl_autograd(b, teacher[:1, :64].double(), safety_ids, mask[:1, :64], temperature)
        la.backward()
        lb.backward()
        diff = max(abs(float(la.detach() - lb.detach())), float((a.grad - b.grad).abs().max()))
        report.add(f"fused_loss: fp64 exact at temperature {temperature}", diff < 1e-12, max_abs_diff=diff)


def check_policy_step(report: Report, model, shape: Shape, device: str, logits_module) -> None:
    """One policy step the way the plugin's exact step runs it, with gradient checkpointing."""
    length = shape.length
    lengths = [length - (i * length) // 8 for i in range(shape.batch)]
    sequences, attention, action = right_padded(shape, lengths, max(2, length // 4), device, seed=3)
    generator = torch.Generator().manual_seed(4)
    safety_ids = torch.randperm(shape.vocab, generator=generator)[: shape.k].sort().values.to(device)
    teacher = torch.log_softmax(torch.randn(*action.shape, shape.k, generator=generator), -1).to(device) - 2.0
    # OpenRLHF's default (--actor.gradient_checkpointing_use_reentrant off).
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    mask = action.float()

    def step(loss_fn):
        model.zero_grad(set_to_none=True)
        output = model(input_ids=sequences, attention_mask=attention, position_ids=openrlhf_position_ids(attention))
        logits = logits_module.padded_logits(output.logits.float(), sequences)  # Actor: fp32 logits
        logits = logits[:, :-1][:, -action.shape[1]:]
        _, per_token = loss_fn(logits, teacher, safety_ids, mask)
        loss = sequence_mean(per_token, mask)
        loss.backward()
        return float(loss.detach())

    try:
        loss_fused, peak, seconds = peak_during(device, lambda: step(localized_reverse_kl))
        head = model.get_output_embeddings().weight
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        grad_norm = float(torch.sqrt(sum(g.float().pow(2).sum() for g in grads)))
        head_fused = head.grad.float().clone()
        report.add("policy_step: finite gradients (fused loss, gradient checkpointing)",
                   finite and grad_norm > 0 and len(grads) == len(list(model.parameters())),
                   loss=loss_fused, grad_norm=grad_norm, peak_extra_gib=peak, seconds=seconds,
                   batch=[shape.batch, length])
        loss_auto = step(localized_reverse_kl_autograd)
        cosine = float(F.cosine_similarity(head_fused.flatten(), head.grad.float().flatten(), dim=0))
        report.add("policy_step: fused = autograd (loss, lm_head gradient cosine)",
                   math.isclose(loss_fused, loss_auto, rel_tol=1e-4) and cosine > 0.999,
                   loss_fused=loss_fused, loss_autograd=loss_auto, cosine=cosine)
        before = head.detach().float().clone()
        step(localized_reverse_kl)
        optimizer.step()
        moved = float((head.detach().float() - before).abs().max())
        report.add("policy_step: AdamW step moves the weights", moved > 0, max_abs_change=moved)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing_disable()
        model.eval()


def check_benchmarks(report: Report, device: str, small: bool, ratios: set[int], repeats: int) -> list[dict]:
    from benchmarks.common import format_table
    from benchmarks.run import run

    name = "tiny" if small else "llama-1b"
    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if 4 in ratios and missing:
        print(f"ratio 4 needs {' and '.join(missing)} (TRL's GKDTrainer and its datasets); it is reported as "
              "FAILED below", flush=True)
    rows = run([name], ratios, repeats, device, demo_report="")
    print(format_table(rows), flush=True)
    out = []
    for r in rows:
        out.append({"number": r.number, "name": r.name, "model": r.model, "candidate": r.candidate,
                    "baseline": r.baseline, "unit": r.unit, "value": r.value, "goal": r.goal, "note": r.note})
        # A ratio whose packages are not installed here (trl for ratio 4) is reported, not failed.
        skipped = "ModuleNotFoundError" in r.note
        report.add(f"benchmark ratio {r.number} ({r.model})", None if math.isfinite(r.value) or skipped else False,
                   value=r.value, goal=r.goal, **({"skipped": r.note} if skipped else {}))
    return out


def environment(device: str) -> dict:
    import transformers

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "device": device,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name in ("peft", "accelerate", "trl", "datasets"):
        spec = importlib.util.find_spec(name)
        info[name] = importlib.import_module(name).__version__ if spec else None
    if device.startswith("cuda"):
        info.update(gpu=torch.cuda.get_device_name(), bf16=torch.cuda.is_bf16_supported(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --small: the script itself)")
    parser.add_argument("--small", action="store_true", help="a tiny model and batch instead of the 1B shape")
    parser.add_argument("--ratios", default=None, help="benchmark ratios, comma list (default: 1,2,4; --small: 1,2; "
                        "'' for none)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of benchmark ratios 1-2")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --small to check the script)")
    if not args.small and not args.device.startswith("cuda"):
        parser.error("the 1B shape is for a GPU; on a CPU pass --small")
    ratio_text = args.ratios if args.ratios is not None else ("1,2" if args.small else "1,2,4")
    ratios = {int(x) for x in ratio_text.split(",") if x.strip()}
    shape = SMALL if args.small else FULL
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))

    started = time.time()
    report = Report()
    env = environment(args.device)
    report.add("environment", None, **env)
    logits_module = load_plugin_logits()
    model, _, build_s = peak_during(args.device, lambda: build_model(shape, args.device, torch.bfloat16))
    report.add("model", None, parameters_m=sum(p.numel() for p in model.parameters()) / 1e6, build_s=build_s,
               dtype="bfloat16", attention=model.config._attn_implementation)
    check_hook(report, model, shape, args.device)
    check_alignment(report, model, shape, args.device, logits_module)
    model.to(torch.bfloat16)
    check_fused_loss(report, shape, args.device)
    check_policy_step(report, model, shape, args.device, logits_module)
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    bench = check_benchmarks(report, args.device, args.small, ratios, args.repeats) if ratios else []
    seconds = time.time() - started
    print(f"{len(report.checks)} checks, {len(report.failed)} failed, {seconds:.0f} s", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"environment": env, "shape": shape.__dict__, "checks": report.checks, "benchmarks": bench,
                       "seconds": round(seconds, 1)}, handle, indent=1, default=str)
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
