"""The one conftest: device parametrization and skips, with reasons from the library itself.

A test that takes a ``device`` argument runs once per device ("cpu", "cuda"); the CUDA run is
marked ``cuda`` and skipped with ``autoglm_rt.cuda_available(return_reason=True)``'s reason where
no device is usable, so a CPU-only machine runs everything that can run. Tests marked ``cgroup``
are skipped with ``autoglm_rt.resources.availability()``'s reason where no cgroup is writable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import autoglm_rt
import autoglm_rt.resources


def _cuda_status() -> tuple[bool, str | None]:
    ok, reason = autoglm_rt.cuda_available(return_reason=True)
    if ok:
        import torch

        if not torch.cuda.is_available():
            return False, f"autoglm_rt sees a GPU but this torch ({torch.__version__}) has no CUDA"
    return ok, reason


CUDA_OK, CUDA_REASON = _cuda_status()
CGROUP_KIND, CGROUP_REASON = autoglm_rt.resources.availability()


def available_devices() -> list[str]:
    """Devices this machine can run tests on, CPU first."""
    return ["cpu", "cuda"] if CUDA_OK else ["cpu"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames:
        metafunc.parametrize(
            "device",
            [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)],
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason=f"CUDA unavailable: {CUDA_REASON}")
    skip_cgroup = pytest.mark.skip(reason=CGROUP_REASON)
    for item in items:
        if "cuda" in item.keywords and not CUDA_OK:
            item.add_marker(skip_cuda)
        if "cgroup" in item.keywords and CGROUP_KIND == "none":
            item.add_marker(skip_cgroup)


CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


def _cgroup_memory_status() -> str | None:
    """None when a cgroup v1 memory controller is writable here, else why not."""
    if not (CGROUP_V1_MEMORY / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {CGROUP_V1_MEMORY}"
    if not os.access(CGROUP_V1_MEMORY, os.W_OK):
        return f"{CGROUP_V1_MEMORY} is not writable (needs root)"
    return None


@pytest.fixture
def cgroup_memory_root() -> Path:
    """The writable cgroup v1 memory hierarchy; skips with the reason where there is none."""
    reason = _cgroup_memory_status()
    if reason is not None:
        pytest.skip(f"cgroup memory limits unavailable: {reason}")
    return CGROUP_V1_MEMORY


@pytest.fixture
def single_rank_group() -> Iterator[None]:
    """A one-rank gloo process group whose store listens on 127.0.0.1 only
    (``autoglm_rt.distributed``), destroyed afterwards."""
    import datetime
    import socket

    import torch.distributed as dist

    from autoglm_rt.distributed import init_process_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    init_process_group("gloo", rank=0, world_size=1, port=port, timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()
