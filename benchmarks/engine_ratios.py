"""Ratios 4-6: the local engine against TRL's GKDTrainer, the demo's stage shares, LoRA memory."""

from __future__ import annotations

RATIOS: dict = {}
