"""grad_stats against what a user would otherwise run, side by side in one process:

- the per-tensor torch loop (var_mean, vector_norm, abs().amax(), isfinite, sum): same statistics;
- torch._foreach_norm (what clip_grad_norm_ uses): one statistic, the fastest torch has;
- the read-bandwidth probe (``_C.read_checksum``) over the same tensors, alternating with
  grad_stats: its ratio is the fraction of read bandwidth grad_stats reaches.

Workloads: the gradient shapes of GPT-2 small (124M parameters, 148 tensors) and 10,000 tiny
tensors (1..256 elements). --quick shrinks both.
"""

from __future__ import annotations

import torch

from autoglm_rt import benchmarking, ops
from autoglm_rt._native import _C
from grad_stats_workloads import foreach_norm, gpt_shapes, gradient_list, tiny_tensors, torch_loop


def run(ctx) -> list[benchmarking.Comparison]:  # type: ignore[no-untyped-def]
    device = ctx.device
    sync = torch.cuda.synchronize if device == "cuda" else None
    rounds = 3 if ctx.quick else 7
    read_gbps = ctx.bandwidth["read_gbps"]
    shapes = gpt_shapes(d_model=256, layers=4, vocab=8000) if ctx.quick else gpt_shapes()
    gpt = gradient_list(shapes, device=device)
    gpt_bytes = sum(t.numel() * t.element_size() for t in gpt)
    tiny = tiny_tensors(2000 if ctx.quick else 10_000, device=device)
    tiny_bytes = sum(t.numel() * t.element_size() for t in tiny)
    large = [torch.randn(2**24 if ctx.quick else 2**26, device=device) for _ in range(2)]
    large_bytes = sum(t.numel() * t.element_size() for t in large)
    gpt_bf16 = gradient_list(shapes, dtype=torch.bfloat16, device=device)
    gpt_bf16_bytes = sum(t.numel() * t.element_size() for t in gpt_bf16)

    def stats(tensors: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        return lambda: ops.grad_stats(tensors)

    common = {"rounds": rounds, "sync": sync, "read_gbps": read_gbps}
    single_thread: list[benchmarking.Comparison] = []
    probe: list[benchmarking.Comparison] = []
    if device == "cpu":
        # The read probe on the same tensors, alternating with grad_stats: the ratio is the
        # fraction of the machine's read bandwidth, measured side by side (robust to load changes
        # between the bandwidth probe at the start of the run and this case).
        probe = [
            benchmarking.compare(
                f"{name} vs read probe",
                stats(ts),
                lambda ts=ts: [_C.read_checksum(t) for t in ts],
                baseline_label="read_checksum (read bandwidth)",
                bytes_read=nbytes,
                **common,
            )
            for name, ts, nbytes in (
                (f"2 large fp32 tensors ({large_bytes / 2**20:.0f} MiB)", large, large_bytes),
                ("GPT grads fp32", gpt, gpt_bytes),
            )
        ]
        single_thread = _single_thread_comparisons(gpt, gpt_bf16, gpt_bytes, gpt_bf16_bytes, rounds)
    label = f"{len(gpt)} tensors, {sum(t.numel() for t in gpt) / 1e6:.0f}M fp32"
    return [
        benchmarking.compare(
            f"GPT grads ({label}) vs torch loop",
            stats(gpt),
            lambda: torch_loop(gpt),
            baseline_label="per-tensor torch loop",
            bytes_read=gpt_bytes,
            min_time=0.0,
            **common,
        ),
        benchmarking.compare(
            f"GPT grads ({label}) vs _foreach_norm",
            stats(gpt),
            lambda: foreach_norm(gpt),
            baseline_label="torch._foreach_norm",
            bytes_read=gpt_bytes,
            **common,
        ),
        benchmarking.compare(
            f"GPT grads bf16 ({len(gpt_bf16)} tensors) vs _foreach_norm",
            stats(gpt_bf16),
            lambda: foreach_norm(gpt_bf16),
            baseline_label="torch._foreach_norm",
            bytes_read=gpt_bf16_bytes,
            **common,
        ),
        benchmarking.compare(
            f"{len(tiny)} tiny tensors vs torch loop",
            stats(tiny),
            lambda: torch_loop(tiny),
            baseline_label="per-tensor torch loop",
            bytes_read=tiny_bytes,
            min_time=0.0,
            **common,
        ),
        benchmarking.compare(
            f"{len(tiny)} tiny tensors vs _foreach_norm",
            stats(tiny),
            lambda: foreach_norm(tiny),
            baseline_label="torch._foreach_norm",
            bytes_read=tiny_bytes,
            **common,
        ),
        benchmarking.compare(
            f"2 large fp32 tensors ({large_bytes / 2**20:.0f} MiB) vs _foreach_norm",
            stats(large),
            lambda: foreach_norm(large),
            baseline_label="torch._foreach_norm",
            bytes_read=large_bytes,
            **common,
        ),
        *probe,
        *single_thread,
    ]


def _single_thread_comparisons(gpt, gpt_bf16, gpt_bytes, gpt_bf16_bytes, rounds):  # type: ignore[no-untyped-def]
    """The same GPT cases with one thread on each side: per-core efficiency, free of how quickly
    either thread pool gets its threads scheduled on a loaded machine."""
    import autoglm_rt

    before = (torch.get_num_threads(), autoglm_rt.num_threads())
    torch.set_num_threads(1)
    autoglm_rt.set_num_threads(1)
    try:
        return [
            benchmarking.compare(
                f"GPT grads {name}, 1 thread each, vs _foreach_norm",
                lambda ts=ts: ops.grad_stats(ts),
                lambda ts=ts: foreach_norm(ts),
                baseline_label="torch._foreach_norm (1 thread)",
                bytes_read=nbytes,
                rounds=rounds,
            )
            for name, ts, nbytes in (("fp32", gpt, gpt_bytes), ("bf16", gpt_bf16, gpt_bf16_bytes))
        ]
    finally:
        torch.set_num_threads(before[0])
        autoglm_rt.set_num_threads(before[1])
