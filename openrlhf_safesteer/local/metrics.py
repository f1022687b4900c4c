"""Training metrics: a JSONL log always (out/metrics.jsonl), TensorBoard and wandb when asked."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from openrlhf_safesteer.files import atomic_write_text, read_jsonl

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics(out: str | os.PathLike) -> list[dict]:
    return read_jsonl(Path(out) / METRICS_FILE)


class MetricsLogger:
    """Append one JSON object per step; on resume, drop records of steps after the checkpoint first."""

    def __init__(self, out: str | os.PathLike, resume_step: int = 0, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "safesteer", config: dict | None = None):
        self.path = Path(out) / METRICS_FILE
        kept = [r for r in read_metrics(out) if r.get("step", 0) <= resume_step]
        # atomic rewrite: steps past the checkpoint will be redone
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from err
            self._tb = SummaryWriter(str(Path(out) / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError as err:
                raise ImportError("--wandb needs the wandb package: pip install wandb") from err
            self._wandb = wandb_module.init(project=wandb_project, config=config or {}, dir=str(out), resume="allow")

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = int(record["step"])
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
