"""Post-instruction template tokens for ChatML and Llama-3 templates."""

from __future__ import annotations

import pytest

from openrlhf_safesteer.chat import (
    ChatTemplateError,
    encode_left_padded,
    render_prompts,
)
from openrlhf_safesteer.templates import (
    post_instruction_ids,
    post_instruction_positions,
)
from openrlhf_safesteer.testing import tiny_tokenizer


@pytest.mark.parametrize("template, suffix", [
    ("chatml", "<|im_end|>\n<|im_start|>assistant\n"),
    ("llama3", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_post_instruction_ids_are_the_template_suffix(template, suffix):
    tok = tiny_tokenizer(template=template)
    ids = post_instruction_ids(tok)
    assert tok.decode(ids) == suffix
    positions = post_instruction_positions(tok)
    assert positions == list(range(-len(ids), 0))
    # In a left-padded batch of prompts of different lengths the same ids sit at those positions.
    input_ids, _ = encode_left_padded(tok, render_prompts(tok, ["Hi", "How do I bake bread in a garden oven?"]))
    for row in input_ids:
        assert row[positions].tolist() == ids


def test_no_template_is_a_clear_error():
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        post_instruction_positions(tok)
