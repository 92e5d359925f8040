"""The mission's priority score, the one formula both schedulers rank by.

::

    0.5 * urgency + 0.3 / (1 + resource_ratio) + 0.2 / (1 + unmet_deps)

``urgency`` in 0..1; ``resource_ratio``: the task's largest share of one resource (0..1);
``unmet_deps``: dependencies not yet succeeded. Higher runs first. Callers add their own terms
(priority class, aging) on top.
"""

from __future__ import annotations

__all__ = ["mission_score"]


def mission_score(urgency: float, resource_ratio: float, unmet_dependencies: int = 0) -> float:
    """The score above; inputs are trusted (the callers' dataclasses check them)."""
    return 0.5 * urgency + 0.3 / (1.0 + resource_ratio) + 0.2 / (1.0 + unmet_dependencies)
