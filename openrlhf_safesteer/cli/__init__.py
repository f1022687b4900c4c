"""Command-line front ends: `safesteer` (local) and `train_safesteer_ray` (OpenRLHF)."""
