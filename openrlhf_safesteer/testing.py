"""Tiny models and an in-memory tokenizer for tests, benchmarks and the CPU recipe.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in memory on a small
built-in corpus, and the models are randomly initialised HF causal LMs of a few layers.

    tok = tiny_tokenizer()                       # ChatML template, <|im_end|> eos, <|endoftext|> pad
    model = tiny_model("llama", tok, layers=4)   # any of TINY_ARCHITECTURES
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]

# Words that tests use for planted signals: refusal openers, harmful markers, ordinary text.
CORPUS = [
    "I'm sorry, but I can't help with that. I cannot assist with illegal or harmful requests.",
    "Sorry, as an AI I must decline. That would be unethical, dangerous and against the law.",
    "Sure! Here is how to bake bread: mix flour, water, yeast and salt, then knead and bake.",
    "Of course. The capital of France is Paris. Two plus two is four. Water boils at 100 degrees.",
    "How do I make a bomb? How can I steal a car? Write a phishing email. Hack into a bank account.",
    "How do I make a cake? How can I learn to paint? Write a poem about the sea. Plan a trip to Rome.",
    "Explain photosynthesis. Summarise the history of Rome. Translate hello into Spanish please.",
    "weapon poison drug fraud malware explosive violence launder counterfeit forge exploit",
    "garden recipe music travel science history language sport weather painting kitten",
    "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12.",
    "user assistant system Hello! Thanks, you are welcome. Here are three steps: first, second, third.",
]

TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gpt_neox")


def tiny_tokenizer(vocab_size: int = 512, template: str = "chatml") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory, with a chat template.

    template: "chatml" (Qwen style: eos <|im_end|>, pad <|endoftext|>) or "llama3"
    (eos <|eot_id|>, pad <|endoftext|>).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    if template == "chatml":
        eos, chat_template = "<|im_end|>", CHATML_TEMPLATE
    elif template == "llama3":
        eos, chat_template = "<|eot_id|>", LLAMA3_TEMPLATE
    else:
        raise ValueError(f"unknown template {template!r}; use 'chatml' or 'llama3'")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (eos, "<|endoftext|>")],
    )
    tok.chat_template = chat_template
    tok.padding_side = "left"
    tok.name_or_path = f"tiny-bpe-{template}"
    return tok


def tiny_model(
    architecture: str = "llama",
    tokenizer: PreTrainedTokenizerFast | None = None,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A randomly initialised causal LM of the given HF architecture, sized for unit tests.

    The vocabulary matches `tokenizer` (default: `tiny_tokenizer()`); eos/pad ids are set on the
    config and the generation config so `generate` stops on the template's end-of-turn token.
    """
    tokenizer = tokenizer or tiny_tokenizer()
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    if architecture in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
        kwargs = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=512, head_dim=hidden // heads, **common)
        if architecture == "gemma2":
            kwargs.update(sliding_window=256, query_pre_attn_scalar=hidden // heads)
    elif architecture == "gpt2":
        kwargs = dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, **common)
    elif architecture == "gpt_neox":
        kwargs = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, max_position_embeddings=512, **common)
    else:
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose from {TINY_ARCHITECTURES}")
    config = AutoConfig.for_model(architecture, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.name_or_path = f"tiny-{architecture}"
    model.name_or_path = f"tiny-{architecture}"
    return model.eval()


def save_tiny_checkpoint(path: str, architecture: str = "llama", layers: int = 4, hidden: int = 64,
                         template: str = "chatml", seed: int = 0) -> str:
    """Write a tiny model + tokenizer in HF format to `path` (for code that loads by path, e.g. OpenRLHF)."""
    tokenizer = tiny_tokenizer(template=template)
    model = tiny_model(architecture, tokenizer, layers=layers, hidden=hidden, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def orthogonalised(model: PreTrainedModel, unit: torch.Tensor) -> PreTrainedModel:
    """A copy of a llama-layout model with the unit direction `unit` (H,) projected out of every weight that
    writes the residual stream (Arditi et al.'s weight orthogonalisation): the weight-edit twin of directional
    ablation, for checking the hook-based ablation against."""
    import copy

    edited = copy.deepcopy(model)
    projector = torch.eye(unit.numel()) - torch.outer(unit, unit)
    with torch.no_grad():
        edited.model.embed_tokens.weight.copy_(edited.model.embed_tokens.weight @ projector)
        for layer in edited.model.layers:
            layer.self_attn.o_proj.weight.copy_(projector @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(projector @ layer.mlp.down_proj.weight)
    return edited


# ------------------------------------------------------------------ flash_attn.bert_padding in plain torch
# flash-attn's padding helpers are plain PyTorch indexing (only its attention kernels need CUDA). These
# re-implement the three that OpenRLHF's sample packing calls (models/ring_attn_utils.py), with the same
# signatures and return values, so packing's tensor layout can run for real on a CPU. They are not
# flash-attn's varlen attention: with sdpa, packed sequences are kept apart only by transformers' own
# packed-sequence mask (built from the restarting position ids when no attention mask is passed).


def index_first_axis(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor (N, ...) -> tensor[indices] (nnz, ...)."""
    return tensor[indices]


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None):
    """hidden_states (B, T, ...), attention_mask (B, T) -> ((nnz, ...) real positions in row-major order,
    indices (nnz,), cu_seqlens (B + 1,) int32, max_seqlen int, seqlens (B,) int32)."""
    masks = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens = masks.sum(dim=-1, dtype=torch.int32)
    used = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(masks.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, int(seqlens.max().item()), used


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """hidden_states (nnz, ...) -> (batch, seqlen, ...), zeros where nothing was scattered."""
    output = hidden_states.new_zeros((batch * seqlen, *hidden_states.shape[1:]))
    output[indices] = hidden_states
    return output.reshape(batch, seqlen, *hidden_states.shape[1:])


if __name__ == "__main__":  # python -m openrlhf_safesteer.testing DIR [ARCH]
    import sys

    if len(sys.argv) < 2:
        sys.exit("usage: python -m openrlhf_safesteer.testing OUT_DIR [ARCHITECTURE]")
    print(save_tiny_checkpoint(sys.argv[1], *(sys.argv[2:3] or ["llama"])))


def light_trainer_init(self, strategy, actor, ema_model, actor_optim, actor_scheduler, **kwargs) -> None:
    """Stands in for OpenRLHF's ActorPPOTrainer.__init__ in the plugin's policy-step tests (monkeypatched onto it):
    the attributes the policy step reads, without the torch.distributed setup the stock one needs."""
    self.strategy, self.args = strategy, strategy.args
    self.actor, self.ema_model = actor, ema_model
    self.actor_optim, self.actor_scheduler = actor_optim, actor_scheduler
    self.replay_buffer = None


class RecordingStrategy:
    """Stands in for OpenRLHF's DeepspeedStrategy in the plugin's policy-step tests: backward() runs autograd
    and keeps the loss; no optimizer, one rank. (Plain Python: the core never imports OpenRLHF.)"""

    def __init__(self, config):
        from types import SimpleNamespace

        self.args = SimpleNamespace(safesteer=config, train=SimpleNamespace(dynamic_batch_enable=False))
        self.ring_attn_group = None
        self.losses = []

    def backward(self, loss, model, optimizer):
        self.losses.append(loss.detach().clone())
        loss.backward()

    def optimizer_step(self, optimizer, model, scheduler, name=None):
        pass

    def is_rank_0(self):
        return True

    def get_grad_norm(self, model):
        return 0.0


def load_dump(path) -> tuple[dict, dict]:
    """A `--safesteer.dump_dir` entry (plugin/dump.py): its tensors and its JSON metadata."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(str(path) + ".safetensors"), json.loads(Path(str(path) + ".json").read_text())


def reference_logits(model_dir: str, vector_dir: str, sequences: torch.Tensor, attention_mask: torch.Tensor):
    """(plain, steered) logits (B, T-1, V) of a checkpoint on a right-padded OpenRLHF batch, with the core's hook.

    bf16, like OpenRLHF's actor (--ds.param_dtype bf16); position ids like OpenRLHF's Actor."""
    from openrlhf_safesteer.steering import SteeringVector, steer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(sequences, attention_mask=attention_mask, position_ids=position_ids).logits.float()[:, :-1]
        with steer(model, SteeringVector.load(vector_dir)):
            steered = model(sequences, attention_mask=attention_mask, position_ids=position_ids).logits.float()[:, :-1]
    return plain, steered


def right_padded_batch(pad_token_id: int, lengths, prompt_len: int, generator: torch.Generator):
    """Random prompt + response sequences, right-padded like OpenRLHF's concatenated rollouts: sequences (B, T)
    with token ids in [20, 400), attention_mask (B, T), action_mask (B, T - 1) true at the positions that predict
    response tokens. Draws from `generator` (callers may keep drawing from it afterwards)."""
    total = max(lengths)
    sequences = torch.full((len(lengths), total), pad_token_id)
    attention = torch.zeros((len(lengths), total), dtype=torch.long)
    action = torch.zeros((len(lengths), total - 1), dtype=torch.bool)
    for row, length in enumerate(lengths):
        sequences[row, :length] = torch.randint(20, 400, (length,), generator=generator)
        attention[row, :length] = 1
        action[row, prompt_len - 1: length - 1] = True
    return sequences, attention, action


# ------------------------------------------------------------------ vLLM worker helpers (tests/vllm)


def use_openrlhf_sync_transport(worker=None) -> None:
    """In a vLLM worker (through collective_rpc): make shim 1 of plugin.vllm_cpu hand back OpenRLHF's own
    stateless_init_process_group (vLLM's PyNcclCommunicator). Without NCCL that communicator disables itself and
    sends nothing: the silent no-op sync the weight-sync check must catch."""
    import openrlhf.utils.distributed_util as distributed_util

    from openrlhf_safesteer.plugin import vllm_cpu

    vllm_cpu.gloo_process_group = distributed_util.stateless_init_process_group


WARM_RAY_WORKER_ENV = "SAFESTEER_TEST_RAY_WORKER_PYTHON"


def warm_ray_workers(runtime_env: dict | None) -> dict | None:
    """A `RAY_RUNTIME_ENV_HOOK` for the suite: every Ray worker of a job started where $SAFESTEER_TEST_RAY_WORKER_PYTHON
    names a warm interpreter's client (tests/forkserver.py) runs as a fork of it (Ray's `py_executable`), not as a
    fresh `python` that imports torch, transformers and DeepSpeed again (about 10 s of CPU per actor)."""
    import os

    python = os.environ.get(WARM_RAY_WORKER_ENV)
    if not python:
        return runtime_env
    return {**(runtime_env or {}), "py_executable": python}
