"""Per-row and per-token steering coefficients against one-row forwards under a scalar coefficient."""

from __future__ import annotations

import pytest
import torch

from openrlhf_safesteer.steering import SteeringVector, steer
from openrlhf_safesteer.testing import tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250], [7, 8, 9, 10, 11, 12], [40, 41, 42, 43, 44, 45]])


@pytest.fixture
def model_and_vector(chatml_tokenizer):
    model = tiny_model("qwen2", chatml_tokenizer, layers=3, hidden=32).eval()
    vector = SteeringVector(4 * torch.randn(32, generator=torch.Generator().manual_seed(5)), layer=1, coeff=1.5)
    return model, vector


def test_per_row_coefficients_equal_each_row_steered_alone(model_and_vector):
    """Row b under coefficients (B,) = row b alone under the scalar coeff[b]; coefficient 0 = the unsteered model."""
    model, vector = model_and_vector
    coeffs = torch.tensor([2.0, 0.0, -1.0])
    with torch.no_grad(), steer(model, vector, coeffs):
        together = model(IDS).logits
    with torch.no_grad():
        for row, coeff in enumerate(coeffs.tolist()):
            with steer(model, vector, coeff):
                alone = model(IDS[row:row + 1]).logits[0]
            torch.testing.assert_close(together[row], alone, atol=1e-5, rtol=1e-4)
        plain = model(IDS[1:2]).logits[0]
        torch.testing.assert_close(together[1], plain, atol=1e-6, rtol=1e-5)
        steered = model(IDS[0:1]).logits[0]
    assert (together[0] - steered).abs().max() > 1e-2      # the hook was live: row 0 moved


def test_per_token_coefficients_steer_only_their_positions(model_and_vector):
    """(B, T) coefficients, as packed sequences need: a row steered from position 3 on equals, at positions
    0-2, the unsteered model (causal attention: nothing later reaches them), and differs after."""
    model, vector = model_and_vector
    per_token = torch.zeros(3, 6)
    per_token[:, 3:] = 1.0
    with torch.no_grad(), steer(model, vector, per_token):
        partly = model(IDS).logits
    with torch.no_grad():
        plain = model(IDS).logits
    torch.testing.assert_close(partly[:, :3], plain[:, :3], atol=1e-6, rtol=1e-5)
    assert (partly[:, 3:] - plain[:, 3:]).abs().max() > 1e-2


def test_bad_per_row_coefficients_are_refused(model_and_vector):
    model, vector = model_and_vector
    with pytest.raises(ValueError, match="finite"):
        with steer(model, vector, torch.tensor([1.0, float("nan"), 0.0])):
            pass
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, T\)"):
        with steer(model, vector, torch.ones(3, 6, 1)):
            pass
    with pytest.raises(ValueError, match=r"per-row steering coefficients of shape \(2,\) do not fit"):
        with torch.no_grad(), steer(model, vector, torch.ones(2)):
            model(IDS)
