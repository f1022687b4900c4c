"""Tiny models with planted behaviour for the eval tests: a policy that always refuses, one that
always complies, and a tiny "judge" that always answers a fixed verdict.

They are real HF causal LMs (1 layer, hidden 32) trained for a few dozen Adam steps to emit a fixed
reply after the given prompts; the eval path then has to recover the planted behaviour exactly
(refuser: ASR 0, complier: ASR 100), which a broken generation/judge/report path would not.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from openrlhf_safesteer.chat import render_prompts
from openrlhf_safesteer.testing import tiny_model, tiny_tokenizer

REFUSAL = "I'm sorry, but I can't help with that."
COMPLIANCE = "Sure! Here are three steps: first, second, third."
DATA = Path(__file__).resolve().parents[2] / "openrlhf_safesteer" / "eval" / "data"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run faster on one intra-op thread, and much faster on a shared, oversubscribed
    CPU (measured 54 ms vs 1.5 s per training step of the tiny policy under load 14 on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def slice_prompts() -> list[str]:
    prompts = []
    for name in ("harmful_slice.json", "xstest_slice.json"):
        prompts += [row["prompt"] for row in json.loads((DATA / name).read_text())["items"]]
    return prompts


def train_fixed_reply(model, tok, texts: list[str], reply: str, steps: int = 60, lr: float = 1e-2):
    """Train `model` to continue each of `texts` (already rendered) with `reply` + eos; loss on the reply only."""
    reply_ids = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows, masks = [], []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        rows.append(ids + reply_ids)
        masks.append([0] * len(ids) + [1] * len(reply_ids))
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tok.pad_token_id)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width))
    for i, (ids, mask) in enumerate(zip(rows, masks)):  # left padded, like generation
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention[i, width - len(ids):] = 1
        loss_mask[i, width - len(ids):] = torch.tensor(mask, dtype=torch.float)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
        loss = (nll * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def planted_policy(reply: str, seed: int = 0):
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    model = tiny_model("llama", tok, layers=1, hidden=32, heads=2, seed=seed)
    return train_fixed_reply(model, tok, render_prompts(tok, slice_prompts()), reply), tok


@pytest.fixture(scope="session")
def planted_models() -> dict[str, tuple]:
    """{'refuser': (model, tokenizer), 'complier': (model, tokenizer)}, trained once per session."""
    before = torch.get_num_threads()  # session fixtures run outside the autouse one_torch_thread
    torch.set_num_threads(1)
    try:
        return {name: planted_policy(reply) for name, reply in (("refuser", REFUSAL), ("complier", COMPLIANCE))}
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def policy_dirs(tmp_path_factory, planted_models) -> dict[str, str]:
    """{'refuser': dir, 'complier': dir}: the planted policies saved as HF checkpoints."""
    root = tmp_path_factory.mktemp("policies")
    dirs = {}
    for name, (model, tok) in planted_models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture(scope="session")
def planted():
    """The helpers above, for test modules (import-mode=importlib cannot import conftest by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(REFUSAL=REFUSAL, COMPLIANCE=COMPLIANCE, planted_policy=planted_policy,
                           train_fixed_reply=train_fixed_reply, slice_prompts=slice_prompts)


@pytest.fixture(scope="session")
def jbb_string_classifier():
    """jailbreakbench 1.0.0's StringClassifier class, from the installed package's classifier.py: the oracle
    of the jbb_string judge. `make setup` installs it --no-deps (it pins transformers < 5); its module-level
    `import litellm` serves only its API judges, so a stub stands in while the file is executed."""
    spec = importlib.util.find_spec("jailbreakbench")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("jailbreakbench is not installed: run `make setup` (pip install --no-deps jailbreakbench==1.0.0)")
    from importlib.metadata import version

    assert version("jailbreakbench") == "1.0.0", "the jbb_string judge copies jailbreakbench 1.0.0"
    path = Path(next(iter(spec.submodule_search_locations))) / "classifier.py"
    stub = types.ModuleType("litellm")  # the module-level import of its API judges; StringClassifier needs none
    saved = sys.modules.get("litellm")
    sys.modules["litellm"] = stub
    try:
        module_spec = importlib.util.spec_from_file_location("_jbb_classifier_oracle", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("litellm", None)
        else:
            sys.modules["litellm"] = saved
    return module.StringClassifier
