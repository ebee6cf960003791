"""Per-step metrics to TensorBoard (CLU writers, `tb/`), `metrics.jsonl` and a tqdm bar.

Only process 0 writes files. On resume, lines logged after the restored step are dropped so that
`metrics.jsonl` holds one object per logged step even across a kill and restart.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


class MetricsLog:
    def __init__(
        self,
        out: Path,
        *,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        progress: bool | None = None,
    ):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        from clu import (
            metric_writers,
        )  # here: it imports TensorFlow, which configs need not pay for

        self.writer = metric_writers.create_default_writer(
            str(Path(out) / "tb"), just_logging=not enabled
        )
        if enabled:
            self._truncate_after(start_step)
        show = sys.stderr.isatty() if progress is None else progress
        self.bar = None
        if enabled and show:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        self.writer.write_scalars(step, scalars)
        with open(self.path, "a") as f:
            f.write(
                json.dumps(
                    {
                        "step": step,
                        **{k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()},
                    }
                )
                + "\n"
            )
        if self.bar is not None:
            self.bar.set_postfix(
                {k: f"{v:.4g}" for k, v in scalars.items() if k in ("loss", "mfu", "val_top1")}
            )

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        if self.bar is not None:
            self.bar.close()
