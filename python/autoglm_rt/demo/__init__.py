"""``autoglm-rt demo``: a small GPT trained data-parallel with autoglm_rt and without, compared.

:func:`run_demo` runs both (each on ``world`` processes over 127.0.0.1), then writes report.json,
report.md and plots. A run that finished is not repeated; one interrupted by SIGTERM resumes from
its checkpoint when the demo is run again with the same ``out``.
"""

from __future__ import annotations

from autoglm_rt.demo.driver import run_demo
from autoglm_rt.demo.train import PRESETS, DemoConfig

__all__ = ["PRESETS", "DemoConfig", "run_demo"]
