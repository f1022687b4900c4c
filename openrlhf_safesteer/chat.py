"""Chat-template rendering, left-padded batching and plain HF generation.

Every stage of SafeSteer (directions, safety tokens, rollouts, evaluation) renders single-turn
user prompts with the model's own chat template and no system prompt; this module is the one
place that does it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


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


def _generate(model, tokenizer, prompts, max_new_tokens, batch_size, do_sample, temperature, top_p,
              system_prompt, progress, first_logprobs: bool) -> tuple[list[str], list[torch.Tensor]]:
    from tqdm.auto import tqdm

    texts = render_prompts(tokenizer, prompts, system_prompt)
    device = model_device(model)
    replies: list[str] = []
    first: list[torch.Tensor] = []
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    for chunk in tqdm(list(batches(texts, batch_size)), desc="generate", disable=not progress):
        input_ids, attention_mask = encode_left_padded(tokenizer, chunk, device)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=end_of_turn_ids(tokenizer),
            output_logits=first_logprobs, return_dict_in_generate=True, **sampling,
        )
        replies.extend(tokenizer.batch_decode(out.sequences[:, input_ids.shape[1]:], skip_special_tokens=True))
        if first_logprobs:
            # raw (unprocessed) logits of the first step = the next-token distribution at the prompt's end
            first.append(torch.log_softmax(out.logits[0].float(), dim=-1).cpu())
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
