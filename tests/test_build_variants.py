"""A CPU-only build (AUTOGLM_RT_CUDA=OFF) builds, imports and says why CUDA is unavailable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cuda_off_wheel_builds_and_imports(tmp_path: Path) -> None:
    if shutil.which("cmake") is None:
        pytest.fail("cmake is required to build autoglm_rt")
    env = {**os.environ, "AUTOGLM_RT_CUDA": "OFF", "CUDACXX": "/nonexistent/nvcc"}
    wheel_dir = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(wheel_dir),
         "-C", f"build-dir={tmp_path / 'build'}", str(ROOT)],
        check=True, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    (wheel,) = wheel_dir.glob("autoglm_rt-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(site)
    assert any(n.startswith("autoglm_rt/_C") for n in names)
    assert "autoglm_rt/_C.pyi" in names and "autoglm_rt/py.typed" in names
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r}); "
        "import autoglm_rt, json; print(json.dumps(autoglm_rt.build_info()))"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], check=True, capture_output=True, text=True)
    info = json.loads(out.stdout)
    assert info["cuda_compiled"] is False and info["cuda_archs"] == [] and info["cuda_device_count"] == 0
    assert "built without CUDA" in info["cuda_unavailable_reason"]
    # The CPU-only module must not depend on any CUDA library.
    so = next(site.glob("autoglm_rt/_C*.so"))
    ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout
    assert "cuda" not in ldd.lower()
