"""The Runtime (``runtime.facade``) and its configuration objects; see ``facade``'s docstring."""

from autoglm_rt.runtime.config import BatchConfig, Hooks, MemoryConfig, ThreadConfig
from autoglm_rt.runtime.facade import Runtime
from autoglm_rt.runtime.report import StepReport

__all__ = ["BatchConfig", "Hooks", "MemoryConfig", "Runtime", "StepReport", "ThreadConfig"]
