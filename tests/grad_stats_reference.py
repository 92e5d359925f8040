"""Obviously-correct float64 references for grad_stats and the gradient noise scale (numpy)."""

from __future__ import annotations

from typing import Any

import numpy as np

FIELDS = ("numel", "nonfinite", "sum", "sumsq", "maxabs", "mean", "var")


def to_float64(t: Any) -> np.ndarray:
    """A flat float64 copy of a torch tensor or numpy array (float16/bfloat16 widen exactly)."""
    if hasattr(t, "detach"):
        return t.detach().to("cpu").double().numpy().ravel()
    return np.asarray(t, dtype=np.float64).ravel()


def stats_of(x: np.ndarray) -> dict[str, float]:
    """The statistics of one flat float64 array; sums and moments over finite elements only."""
    finite = np.isfinite(x)
    xf = x[finite]
    n = xf.size
    mean = xf.sum() / n if n else float("nan")
    return {
        "numel": x.size,
        "nonfinite": int(x.size - n),
        "sum": float(xf.sum()),
        "sumsq": float(np.square(xf).sum()),
        "maxabs": float(np.abs(xf).max()) if n else 0.0,
        "mean": float(mean),
        "var": float(np.square(xf - mean).sum() / n) if n else float("nan"),
        "sum_abs": float(np.abs(xf).sum()),
    }


def reference(tensors: list[Any]) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Per-tensor statistics and the statistics of all elements together."""
    flats = [to_float64(t) for t in tensors]
    per = [stats_of(x) for x in flats]
    total = stats_of(np.concatenate(flats) if flats else np.zeros(0))
    return per, total


def chunked_stats(x32: np.ndarray, chunk: int = 1 << 23) -> dict[str, float]:
    """stats_of for one huge float32 array without a float64 copy of all of it (two passes)."""
    n = x32.size
    acc = {"sum": 0.0, "sumsq": 0.0, "maxabs": 0.0, "sum_abs": 0.0, "nonfinite": 0}
    for i in range(0, n, chunk):
        x = x32[i : i + chunk].astype(np.float64)
        finite = np.isfinite(x)
        xf = x[finite]
        acc["nonfinite"] += int(x.size - xf.size)
        acc["sum"] += float(xf.sum())
        acc["sumsq"] += float(np.square(xf).sum())
        acc["sum_abs"] += float(np.abs(xf).sum())
        if xf.size:
            acc["maxabs"] = max(acc["maxabs"], float(np.abs(xf).max()))
    count = n - acc["nonfinite"]
    mean = acc["sum"] / count
    m2 = 0.0
    for i in range(0, n, chunk):
        x = x32[i : i + chunk].astype(np.float64)
        xf = x[np.isfinite(x)]
        m2 += float(np.square(xf - mean).sum())
    return {**acc, "numel": n, "mean": mean, "var": m2 / count}


def noise_scale_truth(g: np.ndarray, sigma_diag: np.ndarray) -> float:
    """B_simple = tr(Sigma) / |G|^2 for per-example gradients ~ N(G, diag(sigma_diag))."""
    return float(sigma_diag.sum() / np.dot(g, g))
