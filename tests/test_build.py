"""build_info(), cuda_available() and the loud-failure contract of the extension import."""

from __future__ import annotations

import json
import subprocess
import sys

import autoglm_rt
from autoglm_rt.cli import main as cli_main

REQUIRED_KEYS = {
    "version": str,
    "cuda_compiled": bool,
    "cuda_archs": list,
    "cuda_device_count": int,
    "cpu_threads": int,
}


def test_build_info_has_the_documented_fields() -> None:
    info = autoglm_rt.build_info()
    for key, typ in REQUIRED_KEYS.items():
        assert isinstance(info[key], typ), key
    assert info["version"] == autoglm_rt.__version__
    assert info["cpu_threads"] >= 1
    assert info["cuda_runtime_version"] is None or info["cuda_runtime_version"].count(".") == 1
    if info["cuda_device_count"] == 0:
        assert isinstance(info["cuda_unavailable_reason"], str) and len(info["cuda_unavailable_reason"]) > 10
    else:
        assert info["cuda_unavailable_reason"] is None
    if info["cuda_compiled"]:
        assert info["cuda_archs"], "a CUDA build lists its architectures"
        assert info["cuda_runtime_version"] is not None
    else:
        assert info["cuda_archs"] == [] and info["cuda_device_count"] == 0


def test_build_info_returns_a_fresh_dict() -> None:
    a = autoglm_rt.build_info()
    a["version"] = "changed"
    assert autoglm_rt.build_info()["version"] != "changed"


def test_cuda_available_agrees_with_build_info() -> None:
    info = autoglm_rt.build_info()
    ok, reason = autoglm_rt.cuda_available(return_reason=True)
    assert ok == autoglm_rt.cuda_available()
    assert ok == (info["cuda_compiled"] and info["cuda_device_count"] > 0)
    assert (reason is None) == ok


def test_thread_count_round_trips() -> None:
    before = autoglm_rt.num_threads()
    try:
        autoglm_rt.set_num_threads(3)
        assert autoglm_rt.num_threads() == 3
        assert autoglm_rt.build_info()["cpu_threads"] == 3
    finally:
        autoglm_rt.set_num_threads(before)
    import pytest

    with pytest.raises(ValueError, match=r"1\.\.4096"):
        autoglm_rt.set_num_threads(0)


def test_cli_info_json(capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli_main(["info", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == autoglm_rt.build_info()


def test_cli_entry_point_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "autoglm_rt.cli", "info"], capture_output=True, text=True, check=True)
    assert "cuda_compiled" in out.stdout and "cpu_threads" in out.stdout


def test_broken_extension_raises_import_error_with_cause(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A copy of the package whose _C is garbage must fail to import, loudly, naming the cause.
    import shutil
    from pathlib import Path

    src = Path(autoglm_rt.__file__).parent
    dst = tmp_path / "autoglm_rt"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    suffix = next(p.name for p in src.glob("_C*.so")) if list(src.glob("_C*.so")) else "_C.so"
    (dst / suffix).write_bytes(b"not an ELF file")
    if suffix == "_C.so":  # editable installs keep _C elsewhere; name it as the interpreter wants
        import sysconfig

        (dst / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_bytes(b"not an ELF file")
    code = "import autoglm_rt"
    res = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); {code}"],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
    assert "ImportError" in res.stderr and "native extension autoglm_rt._C failed to load" in res.stderr
