"""The post-instruction template tokens: what the chat template puts after the user's text.

For ChatML that is `<|im_end|>\\n<|im_start|>assistant\\n`, for Llama-3
`<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`. The refusal direction is read at
these positions (docs/METHOD.md section 1): they are the same tokens for every prompt, so a
difference of means there compares like with like. With LEFT padding they sit at the same
negative offsets -n..-1 in every row of a batch.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from openrlhf_safesteer.chat import render_prompts

# Unusual enough that no template contains it, plain enough that no template rewrites it.
_SENTINEL = "Xq7 sentinel zZ"


def post_instruction_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids the chat template appends after the user message (up to the assistant header).

    Found by rendering a sentinel message and taking the tokens that start after it. Raises when
    the template leaves nothing after the user text or the boundary splits a token.
    """
    text = render_prompts(tokenizer, [_SENTINEL])[0]
    end = text.rfind(_SENTINEL)
    if end < 0:
        raise ValueError("the chat template does not reproduce the user message verbatim; cannot locate it")
    end += len(_SENTINEL)
    suffix = text[end:]
    if not suffix:
        raise ValueError("the chat template adds nothing after the user message; no post-instruction positions")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    if ids[len(ids) - len(suffix_ids):] == suffix_ids:
        return list(suffix_ids)
    # A BPE merge across the boundary: fall back to character offsets of the full encoding.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tail = [tok for tok, (start, _) in zip(encoding["input_ids"], encoding["offset_mapping"]) if start >= end]
    if not tail:
        raise ValueError(f"cannot tokenise the post-instruction template {suffix!r} separately from the user text")
    return tail


def post_instruction_positions(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Negative positions -n..-1 of the post-instruction tokens in a left-padded rendered prompt."""
    n = len(post_instruction_ids(tokenizer))
    return list(range(-n, 0))


def describe_positions(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    """{position: token text} for logs and tables, e.g. {-5: '<|im_end|>', -4: 'Ċ', ...}."""
    ids = post_instruction_ids(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return dict(zip(range(-len(ids), 0), tokens))
