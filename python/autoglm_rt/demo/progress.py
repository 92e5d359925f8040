"""Progress of one run on rank 0: a ``tqdm`` bar on a terminal; on a file or a pipe (where a bar's
carriage returns would pile up into one endless line) a short plain line every tenth of the run."""

from __future__ import annotations

import shutil
import sys
from typing import Any, TextIO


class Progress:
    def __init__(self, run: str, total: int, initial: int, *, enabled: bool = True, stream: TextIO | None = None):
        self.run, self.total = run, total
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled
        self.bar: Any = None
        self._every = max(1, total // 10)
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            # The size from shutil, which falls back to 80x24 where a pseudo-terminal reports 0x0
            # (tqdm's own probe then takes -1 rows and draws nothing at all).
            size = shutil.get_terminal_size()
            self.bar = tqdm(
                total=total, initial=initial, desc=run, unit="step", file=self.stream, ncols=size.columns,
                nrows=size.lines,
            )  # fmt: skip

    def update(self, step: int, record: dict[str, Any]) -> None:
        """``step``: the step just finished (0-based); ``record``: its step record."""
        if not self.enabled:
            return
        phase = record.get("phase") or "-"
        batch = f"{record['micro_batch']}x{record['accumulation']}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.3f} {phase} {batch}", refresh=False)
            self.bar.update(1)
        elif (step + 1) % self._every == 0 or step + 1 == self.total:
            print(
                f"[{self.run}] step {step + 1}/{self.total} loss {record['loss']:.3f} phase {phase} batch {batch}",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
