"""The public-trace converter (benches/cluster_traces/convert_openb.py): its mapping on hand-made rows,
and the committed converted trace is exactly what the converter makes of the committed excerpt
of Alibaba's openb pod list, and loads in the simulator."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from autoglm_rt.jobqueue import trace_sim

TRACES = Path(__file__).resolve().parents[1] / "benches" / "cluster_traces"
HEADER = (
    "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time\n"
)


def converter() -> ModuleType:
    spec = importlib.util.spec_from_file_location("convert_openb", TRACES / "convert_openb.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mapping_of_each_column(tmp_path: Path) -> None:
    src = tmp_path / "pods.csv"
    src.write_text(
        HEADER
        + "p0,12000,16384,1,460,,LS,Running,100,700,150\n"  # a shared GPU: 0.46
        + "p1,88000,327680,8,1000,,Burstable,Failed,200,260,200\n"  # 8 whole GPUs, ran 60 s
        + "p2,3152,5600,1,1000,,BE,Pending,300,310,\n"  # never ran: dropped
        + "p3,4000,15258,0,0,,Guaranteed,Running,5000,5001,5001\n"  # outside the window: dropped
    )
    dest = tmp_path / "trace.csv"
    assert converter().main([str(src), str(dest), "--start", "100", "--end", "1000"]) == 0
    lines = dest.read_text().splitlines()
    assert lines == [
        "arrival_s,duration_s,cpus,memory_mib,gpus,qos,peak_memory_mib,peak_at",
        "0,550,12,16384,0.46,latency,,",
        "100,60,88,327680,8,best_effort,,",
    ]
    jobs = trace_sim.load_trace(dest)
    assert [(j.arrival, j.duration, j.gpus, j.qos) for j in jobs] == [
        (0.0, 550.0, 0.46, "latency"),
        (100.0, 60.0, 8.0, "best_effort"),
    ]


def test_unknown_qos_is_named(tmp_path: Path) -> None:
    src = tmp_path / "pods.csv"
    src.write_text(HEADER + "p0,1000,1024,0,0,,Gold,Running,0,10,0\n")
    with pytest.raises(ValueError, match="p0: unknown qos 'Gold'"):
        converter().main([str(src), str(tmp_path / "t.csv"), "--start", "0"])


def test_committed_trace_is_the_conversion_of_the_committed_excerpt(tmp_path: Path) -> None:
    dest = tmp_path / "trace.csv"
    converter().main([str(TRACES / "openb_pod_list_default_head.csv"), str(dest)])
    assert dest.read_text() == (TRACES / "openb_trace_sim.csv").read_text()
    jobs = trace_sim.load_trace(dest)
    assert len(jobs) == 392 and {j.qos for j in jobs} == {"latency", "guaranteed", "best_effort"}
