"""Where per-step training metrics go: one interface, a local JSONL log that works alone.

The orchestration layer adds MLflow behind the same `log` call. Values arrive as tensors and stay on the
device until `flush` (every `log_every` steps), so the training loop has no per-step host sync.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch


class MetricsLog:
    def __init__(self, path: str | Path, resume_from_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pending: list[tuple[int, dict[str, torch.Tensor | float]]] = []
        if resume_from_step is None:
            self.path.write_text("")
        elif self.path.is_file():  # rows past the checkpoint will be recomputed (identically): drop them
            rows = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in rows if json.loads(ln)["step"] <= resume_from_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, metrics: dict[str, torch.Tensor | float]) -> None:
        self._pending.append((step, metrics))

    def flush(self) -> list[dict]:
        """Move pending values to the host (one sync), append them to the log and return the rows."""
        if not self._pending:
            return []
        keys = sorted({k for _, m in self._pending for k in m})
        values = torch.stack([torch.stack([torch.as_tensor(m.get(k, float("nan")), dtype=torch.float64).cpu()
                                           for k in keys]) for _, m in self._pending]).tolist()
        rows = [{"step": step, **dict(zip(keys, vals))} for (step, _), vals in zip(self._pending, values)]
        with self.path.open("a") as f:
            for row in rows:
                f.write(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                                    for k, v in row.items()}) + "\n")
        self._pending.clear()
        return rows
