"""Chat-template rendering, left-padded batching and plain HF generation.

Every stage of SafeSteer (directions, safety tokens, rollouts, evaluation) renders single-turn
user prompts with the model's own chat template and no system prompt; this module is the one
place that does it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from openrlhf_safesteer.models import left_padded_position_ids


class ChatTemplateError(ValueError):
    """The tokenizer cannot render a chat (no chat template)."""


def require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise a clear error when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"tokenizer {name!r} has no chat template; SafeSteer needs an instruction-tuned model "
            "whose tokenizer defines `chat_template` (set tokenizer.chat_template to a Jinja template)"
        )


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], system_prompt: str | None = None
) -> list[str]:
    """Render user prompts as chat text ending with the assistant header (generation prompt)."""
    require_chat_template(tokenizer)
    rendered = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


def encode_left_padded(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise already-rendered texts with LEFT padding, so position -1 is every prompt's last token.

    Returns input_ids (B, T) and attention_mask (B, T). Special tokens are not added again: the
    chat template already holds them.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token before batching")
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    if not encoded:
        raise ValueError("no texts to encode")
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


def encode_shared_prefix(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], device: torch.device | str = "cpu", keep: int = 1
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tokenise rendered texts as [shared prefix | pads | each text's rest], so the prefix can be encoded once.

    Chat templates open every prompt with the same header (Qwen's default system prompt is 24 of the
    demo prompts' ~44 tokens), and on a CPU a batch's prefill costs about as much as its decoding.
    Returns input_ids (B, c + S), attention_mask (B, c + S) and c, the shared prefix length: columns
    [0, c) are the same c tokens in every row, the rest of each row is left-padded so position -1 is
    still every prompt's last token, and the last `keep` columns are real tokens of every row. Position
    ids must come from the attention mask (HF generate and `models.left_padded_position_ids` do), which
    numbers each row's tokens 0, 1, ... over the pads.
    """
    input_ids, attention_mask = encode_left_padded(tokenizer, texts, device)
    return shared_prefix_layout(input_ids, attention_mask, input_ids.shape[1], keep)


def prefill_shared_prefix(model: PreTrainedModel, input_ids: torch.Tensor, shared: int):
    """KV cache of the first `shared` columns of input_ids (B, T) (identical in every row): encoded once at
    batch 1 and repeated B times. Pass it to generate (or a forward) with the full attention mask and
    input_ids (generate) or input_ids[:, shared:] (forward); only columns [shared, T) are then encoded.
    Returns None when there is nothing to share. Gradients flow through the cache when they are enabled
    (the training loss); callers that only read the model run it under torch.no_grad."""
    if shared == 0:
        return None
    cache = model(input_ids=input_ids[:1, :shared], use_cache=True, logits_to_keep=1).past_key_values
    cache.batch_repeat_interleave(input_ids.shape[0])
    return cache


def forward_after_prefix(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, shared: int,
                         past, logits_to_keep):
    """Forward columns [shared, T) of input_ids (B, T) laid out as by `encode_shared_prefix` (or
    `shared_prefix_layout`), after `past` = `prefill_shared_prefix(model, input_ids, shared)` (None when
    shared = 0); positions come from the full attention mask (B, T). logits_to_keep counts or indexes
    positions of the encoded columns. Returns the model output."""
    return model(input_ids=input_ids[:, shared:], attention_mask=attention_mask,
                 position_ids=left_padded_position_ids(attention_mask)[:, shared:], past_key_values=past,
                 use_cache=past is not None, logits_to_keep=logits_to_keep)


def shared_prefix_layout(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, keep: int = 1
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Reorder LEFT-padded rows (B, T) whose prompts end at column prompt_len into the layout of
    `encode_shared_prefix`: [the c tokens every prompt starts with | pads | the rest].

    Columns from prompt_len on (completions, right-padded) do not move. Each row keeps at least `keep`
    prompt tokens after the prefix. Returns input_ids, attention_mask (B, T) and c (0 when the rows share
    nothing, or for a single row: there is nothing to share with).
    """
    starts = (attention_mask[:, :prompt_len].cumsum(-1) == 0).sum(-1)                     # (B,) first real column
    width = prompt_len - int(starts.max()) - keep            # the shortest prompt, less the tokens it keeps
    if input_ids.shape[0] < 2 or width <= 0:
        return input_ids, attention_mask, 0
    heads = input_ids.gather(1, starts[:, None] + torch.arange(width, device=input_ids.device))   # (B, width)
    shared = int((heads == heads[:1]).all(0).long().cumprod(0).sum())
    if shared == 0:
        return input_ids, attention_mask, 0
    column = torch.arange(input_ids.shape[1], device=input_ids.device)
    # sort key: 0 = the shared prefix, 1 = left pads, 2 = everything after it (a stable sort keeps their order)
    key = torch.full_like(input_ids, 2)
    key[column < starts[:, None]] = 1
    key[(column >= starts[:, None]) & (column < starts[:, None] + shared)] = 0
    order = torch.argsort(key, dim=1, stable=True)
    return input_ids.gather(1, order), attention_mask.gather(1, order), shared


@torch.no_grad()
def shared_prompt_cache(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, shared: int,
                        samples_per_prompt: int = 1):
    """KV cache of each distinct prompt but its last token, computed once and repeated for its samples.

    prompt_ids, prompt_mask: (N, P) distinct prompts laid out by `chat.encode_shared_prefix`: the first
    `shared` columns (the chat header) are the same in every row and are encoded once at batch 1, the rest
    once per distinct prompt. Returns a cache for N * samples_per_prompt rows (row i * M + j is sample j
    of prompt i), so generate only encodes the last prompt token per row. On a CPU a rollout's prefill
    costs about as much as its decoding; docs/METHOD.md's M = 8 samples share 7/8 of it.
    """
    cache = prefill_shared_prefix(model, prompt_ids, shared)
    head_mask = prompt_mask[:, :-1]
    if prompt_ids.shape[1] - 1 > shared:
        positions = left_padded_position_ids(head_mask)[:, shared:]
        cache = model(input_ids=prompt_ids[:, shared:-1], attention_mask=head_mask, position_ids=positions,
                      past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
    if cache is not None and samples_per_prompt > 1:
        cache.batch_repeat_interleave(samples_per_prompt)
    return cache


def completion_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_len: int) -> torch.Tensor:
    """Logits at the completion-predicting positions P-1 .. P+C-2 only: (B, C, V), for input_ids (B, T) whose
    LEFT-padded prompts all end before column P = prompt_len (the completions, C = T - P columns, follow).

    Asking the model for just these positions (logits_to_keep) skips the (B, P, V) prompt logits,
    which on a 150k vocabulary cost as much as the rest of the forward pass. The positions go in as
    an index range, not a count: keeping C + 1 and slicing off the last would project one more
    position and, in backward, zero-fill and copy a (B, C + 1, V) gradient.
    """
    # The chat header every prompt starts with (Qwen's default system prompt: a third of a demo sequence) is
    # encoded once and shared by all rows through the KV cache; gradients reach it through the cache. Not under
    # gradient checkpointing in training: transformers then returns no cache (and the header would be lost).
    if model.training and getattr(model, "is_gradient_checkpointing", False):
        position_ids = left_padded_position_ids(attention_mask)
        positions = torch.arange(prompt_len - 1, input_ids.shape[1] - 1, device=input_ids.device)
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     logits_to_keep=positions).logits
    input_ids, attention_mask, shared = shared_prefix_layout(input_ids, attention_mask, prompt_len)
    past = prefill_shared_prefix(model, input_ids, shared)
    positions = torch.arange(prompt_len - 1 - shared, input_ids.shape[1] - 1 - shared, device=input_ids.device)
    return forward_after_prefix(model, input_ids, attention_mask, shared, past, logits_to_keep=positions).logits


def to_left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's pads to the front (the layout of `encode_left_padded`), keeping token order.

    input_ids, attention_mask: (B, T), e.g. from `encode_shared_prefix`. Returns the same shapes."""
    order = torch.argsort(attention_mask, dim=1, stable=True)  # pads (0) first, then real tokens in order
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    """Consecutive slices of at most batch_size items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of every end-of-turn / end-of-text token the tokenizer knows (eos, <|im_end|>, <|eot_id|>, ...)."""
    names = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "<end_of_turn>", "</s>", "<|eom_id|>")
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[name] for name in names if name in vocab)
    return sorted(ids)


def length_order(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
    """Indices of rendered texts from the fewest tokens to the most (stable): batches cut from this order pad each
    prompt to its neighbours' length, not to the longest prompt of the set."""
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    return sorted(range(len(texts)), key=lambda i: lengths[i])


def _generate(model, tokenizer, prompts, max_new_tokens, batch_size, do_sample, temperature, top_p,
              system_prompt, progress, first_logprobs: bool) -> tuple[list[str], list[torch.Tensor]]:
    from tqdm.auto import tqdm

    texts = render_prompts(tokenizer, prompts, system_prompt)
    device = model_device(model)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    # Greedy rows go in by prompt length: a greedy reply does not depend on its batch mates or on how far its
    # prompt is padded (same replies and first-token log-probs bit for bit on the demo's model and sets,
    # tests/core/test_core_chat.py), and a batch's prefill costs its longest prompt times its rows. Sampled rows
    # keep their order: the global RNG draws in batch order.
    order = list(range(len(texts))) if do_sample else length_order(tokenizer, texts)
    replies: list[str] = [""] * len(texts)
    first: list[torch.Tensor] = []
    for chunk in tqdm(list(batches(order, batch_size)), desc="generate", disable=not progress):
        input_ids, attention_mask, shared = encode_shared_prefix(tokenizer, [texts[i] for i in chunk], device)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            past_key_values=prefill_shared_prefix(model, input_ids, shared),
            pad_token_id=tokenizer.pad_token_id, eos_token_id=end_of_turn_ids(tokenizer),
            output_logits=first_logprobs, return_dict_in_generate=True, **sampling,
        )
        decoded = tokenizer.batch_decode(out.sequences[:, input_ids.shape[1]:], skip_special_tokens=True)
        for i, reply in zip(chunk, decoded):
            replies[i] = reply
        if first_logprobs:
            # raw (unprocessed) logits of the first step = the next-token distribution at the prompt's end
            first.append(torch.log_softmax(out.logits[0].float(), dim=-1).cpu())
    if first:
        restore = torch.empty(len(order), dtype=torch.long)
        restore[torch.tensor(order)] = torch.arange(len(order))
        first = [torch.cat(first)[restore]]
    return replies, first


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    system_prompt: str | None = None,
    progress: bool = False,
) -> list[str]:
    """Answer each user prompt with the model's chat template (greedy by default); returns decoded replies."""
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, do_sample, temperature, top_p,
                     system_prompt, progress, first_logprobs=False)[0]


@torch.no_grad()
def generate_with_first_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    system_prompt: str | None = None,
    progress: bool = False,
) -> tuple[list[str], torch.Tensor]:
    """Greedy replies, plus the next-token log-probs (N, V) float32 at the end of each prompt, read from the
    first generation step (no extra forward pass; `directions.refusal_scores_from_logprobs` turns them into
    refusal scores)."""
    replies, first = _generate(model, tokenizer, prompts, max_new_tokens, batch_size, False, 1.0, 1.0,
                               system_prompt, progress, first_logprobs=True)
    return replies, torch.cat(first)
