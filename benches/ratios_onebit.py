"""Fused 1-bit (sign) compression with error feedback against the vectorized torch code a user
would otherwise write (pad to whole chunks, abs().mean, compare, pack eight bools per byte by a
weighted sum, where(+-scale), error update; unpack with shifts and bitwise_and), side by side,
at 2^20 and 2^24 float32 elements, chunk 2048, on one thread and on the default threads (both
libraries set alike: autoglm_rt.set_num_threads and torch.set_num_threads).

"adam step" times one 1-bit Adam step of the DDP hook on one rank, the exchange left out (the
other rank's message is already in the gathered buffer): onebit_adam_compress +
onebit_adam_decompress against the sequence the hook ran before them (torch.dot for the norm,
div_/mul_/add_ for the momentum, sign_compress, sign_decompress, the finite check, u.copy_,
out.div_), at 2^24 elements, chunk 2048, W = 2."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import autoglm_rt
from autoglm_rt import benchmarking, ops

SIZES = (1 << 20, 1 << 24)
CHUNK = 2048
WORLD = 4  # rows decoded in the decompress case (ranks of a gathered message)
ADAM_N = 1 << 24
ADAM_WORLD = 2
BETA1 = 0.9
ADAM_T = 10  # the step whose bias correction is applied


def torch_compress(x: torch.Tensor, error: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch pipeline (the fastest of the variants tried on this machine): returns
    (bits, scales) and updates error in place to the same bits as the kernel; scales differ in
    the last float32 bit at most (float32 sums here, float64 in the kernel)."""
    n = x.numel()
    nc = -(-n // chunk)
    c = x.reshape(-1) + error.reshape(-1)
    if n % chunk:
        c = torch.nn.functional.pad(c, (0, nc * chunk - n))
    c = c.view(nc, chunk)
    lengths = torch.full((nc,), float(chunk), device=x.device)
    lengths[-1] = n - (nc - 1) * chunk
    scales = torch.linalg.vector_norm(c, 1, dim=1) / lengths  # faster than c.abs().mean(1)
    pos = c >= 0
    sign = pos.to(torch.float32).mul_(2).sub_(1)
    if n % chunk:
        error.copy_(torch.addcmul(c, sign, scales[:, None], value=-1).view(-1)[:n])
    else:
        torch.addcmul(c, sign, scales[:, None], value=-1, out=error.view(nc, chunk))  # c - (+-scale)
    flat = pos.view(-1)[:n]
    if n % 8:
        flat = torch.nn.functional.pad(flat, (0, -n % 8))
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=x.device)
    bits = (flat.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)
    return bits, scales


def torch_decompress(bits: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, chunk: int, scale: float) -> None:
    """bits [W, nbytes], scales [W, nc] -> out = scale * sum over rows of +-scales, rows in order
    (unpack by shift and and, sign as +-1.0, addcmul against the broadcast scales: the fastest of
    four variants tried; bit-identical to the kernel)."""
    n = out.numel()
    nc = scales.shape[1]
    shifts = torch.arange(8, dtype=torch.uint8, device=out.device)
    acc = torch.zeros(nc, chunk, device=out.device)
    for r in range(bits.shape[0]):
        set_ = bits[r, :, None].bitwise_right_shift(shifts).bitwise_and_(1).view(-1)
        sign = torch.nn.functional.pad(set_, (0, nc * chunk - set_.numel())).view(nc, chunk)
        acc.addcmul_(sign.to(torch.float32).mul_(2).sub_(1), scales[r, :, None])
    torch.mul(acc.view(-1)[:n], scale, out=out.view(-1))


@dataclass
class AdamState:
    """One rank's view of a 1-bit Adam step: the bucket's gradient (overwritten by the step's
    output, as the hook does), the hook's tables and the gathered [W, ...] message rows, row 0
    this rank's, row 1 another rank's."""

    g: torch.Tensor
    denom: torch.Tensor
    u: torch.Tensor
    e: torch.Tensor
    bits: torch.Tensor
    scales: torch.Tensor
    sq: torch.Tensor

    def clone(self) -> AdamState:
        return AdamState(*(t.clone() for t in (self.g, self.denom, self.u, self.e, self.bits, self.scales, self.sq)))


def adam_state(n: int, device: str, seed: int = 0) -> AdamState:
    gen = torch.Generator().manual_seed(seed)
    g = 1e-3 * torch.randn(n, generator=gen)
    # sqrt(v) + eps. The step writes its output over g, and rounds repeat it: with these sizes the
    # values stay near 1 over hundreds of steps (no overflow, no denormals to slow a round down).
    denom = 0.5 * torch.rand(n, generator=gen) + 0.5
    u = 0.5 * torch.randn(n, generator=gen)
    e = 0.05 * torch.randn(n, generator=gen)
    nbytes, nc = ops.sign_message_sizes(n, CHUNK)
    bits = torch.empty(ADAM_WORLD, nbytes, dtype=torch.uint8)
    scales = torch.empty(ADAM_WORLD, nc)
    for r in range(1, ADAM_WORLD):
        ops.sign_compress(torch.randn(n, generator=gen), None, CHUNK, bits_out=bits[r], scales_out=scales[r])
    sq = torch.zeros(1, dtype=torch.float64)
    return AdamState(*(t.to(device) for t in (g, denom, u, e, bits, scales, sq)))


def fused_adam_step(s: AdamState) -> None:
    """The two fused ops: g, denom, u, e read once; bits and scales into row 0; out into g."""
    ops.onebit_adam_compress(
        s.g, s.denom, s.u, s.e, BETA1, CHUNK, bits_out=s.bits[0], scales_out=s.scales[0], sq_norm_out=s.sq
    )
    ops.onebit_adam_decompress(s.bits, s.scales, s.g, s.u, CHUNK, scale=1 / ADAM_WORLD, bias=1 / (1 - BETA1**ADAM_T))


def unfused_adam_step(s: AdamState) -> None:
    """The hook's sequence before the fused ops (autoglm_rt.onebit._sign_step, one parameter)."""
    s.sq.copy_(torch.dot(s.g, s.g).double().reshape(1))
    c = s.g.div_(s.denom).mul_(1 - BETA1).add_(s.u, alpha=BETA1)
    ops.sign_compress(c, s.e, CHUNK, bits_out=s.bits[0], scales_out=s.scales[0])
    ops.sign_decompress(s.bits, s.scales, s.g, CHUNK, scale=1 / ADAM_WORLD)
    ok = torch.isfinite(s.scales).all()
    if ok.device.type == "cpu":
        if bool(ok):
            s.u.copy_(s.g)
    else:
        s.u.copy_(torch.where(ok, s.g, s.u))
    s.g.div_(1 - BETA1**ADAM_T)


def unfused_adam_step_without_fma(s: AdamState) -> None:
    """unfused_adam_step with the momentum built one rounding at a time (no alpha=, which fuses a
    multiply-add on the CPU): the definition the fused ops follow bit for bit, up to out, which
    they scale by a multiply instead of a division."""
    s.sq.copy_(torch.dot(s.g, s.g).double().reshape(1))
    c = torch.mul(s.u, BETA1).add_(torch.div(s.g, s.denom).mul_(1 - BETA1))
    ops.sign_compress(c, s.e, CHUNK, bits_out=s.bits[0], scales_out=s.scales[0])
    avg = ops.sign_decompress(s.bits, s.scales, torch.empty_like(s.g), CHUNK, scale=1 / ADAM_WORLD)
    s.u.copy_(torch.where(torch.isfinite(avg), avg, s.u))
    s.g.copy_(avg * (1 / (1 - BETA1**ADAM_T)))


def _with_threads(threads: int | None) -> tuple[int, int]:
    old = (autoglm_rt.num_threads(), torch.get_num_threads())
    if threads is not None:
        autoglm_rt.set_num_threads(threads)
        torch.set_num_threads(threads)
    return old


def run(ctx) -> list[benchmarking.Comparison]:  # type: ignore[no-untyped-def]
    device = ctx.device
    sync = torch.cuda.synchronize if device == "cuda" else None
    bw = ctx.bandwidth["copy_gbps"]
    out: list[benchmarking.Comparison] = []
    default_threads = autoglm_rt.num_threads()
    for threads in (1, None):
        label = "1 thread" if threads == 1 else f"{default_threads} threads"
        old = _with_threads(threads)
        try:
            for n in SIZES[:1] if ctx.quick else SIZES:
                gen = torch.Generator().manual_seed(n)
                x = torch.randn(n, generator=gen).to(device)
                e_case = (0.1 * torch.randn(n, generator=gen)).to(device)
                e_base = e_case.clone()
                nbytes, nc = ops.sign_message_sizes(n, CHUNK)
                bits = torch.empty(nbytes, dtype=torch.uint8, device=device)
                scales = torch.empty(nc, device=device)
                rounds = 2 if ctx.quick else 5
                cmp = benchmarking.compare(
                    f"sign_compress n=2^{n.bit_length() - 1} ({label})",
                    lambda x=x, e=e_case, b=bits, s=scales: ops.sign_compress(x, e, CHUNK, bits_out=b, scales_out=s),
                    lambda x=x, e=e_base: torch_compress(x, e, CHUNK),
                    baseline_label="torch pad+abs+mean+pack+where",
                    rounds=rounds,
                    bytes_read=12 * n,  # x and error read, error written: the floor
                    read_gbps=bw,
                    sync=sync,
                )
                cmp.extra = {"n": n, "chunk": CHUNK, "threads": threads or default_threads, "bytes_moved": 12 * n}
                out.append(cmp)

                rows_b = torch.stack([bits.roll(r) for r in range(WORLD)])
                rows_s = torch.stack([scales.roll(r) for r in range(WORLD)])
                dense_case = torch.empty(n, device=device)
                dense_base = torch.empty(n, device=device)
                cmp = benchmarking.compare(
                    f"sign_decompress W={WORLD} n=2^{n.bit_length() - 1} ({label})",
                    lambda b=rows_b, s=rows_s, o=dense_case: ops.sign_decompress(b, s, o, CHUNK, scale=1 / WORLD),
                    lambda b=rows_b, s=rows_s, o=dense_base: torch_decompress(b, s, o, CHUNK, 1 / WORLD),
                    baseline_label="torch shift+and+where+add",
                    rounds=rounds,
                    sync=sync,
                )
                cmp.extra = {"n": n, "chunk": CHUNK, "world": WORLD, "threads": threads or default_threads}
                out.append(cmp)

                def native_round_trip(x=x, e=e_case, b=bits, s=scales, o=dense_case) -> None:  # type: ignore[no-untyped-def]
                    ops.sign_compress(x, e, CHUNK, bits_out=b, scales_out=s)
                    ops.sign_decompress(b, s, o, CHUNK)

                def torch_round_trip(x=x, e=e_base, o=dense_base) -> None:  # type: ignore[no-untyped-def]
                    b, s = torch_compress(x, e, CHUNK)
                    torch_decompress(b[None], s[None], o, CHUNK, 1.0)

                cmp = benchmarking.compare(
                    f"sign compress+decompress n=2^{n.bit_length() - 1} ({label})",
                    native_round_trip,
                    torch_round_trip,
                    baseline_label="torch pipeline, both halves",
                    rounds=rounds,
                    sync=sync,
                )
                cmp.extra = {"n": n, "chunk": CHUNK, "world": 1, "threads": threads or default_threads}
                out.append(cmp)

            n = SIZES[0] if ctx.quick else ADAM_N
            fused_state = adam_state(n, device)
            base_state = fused_state.clone()
            cmp = benchmarking.compare(
                f"adam step W={ADAM_WORLD} n=2^{n.bit_length() - 1} ({label})",
                lambda s=fused_state: fused_adam_step(s),
                lambda s=base_state: unfused_adam_step(s),
                baseline_label="hook: torch momentum + sign ops + copy/div",
                rounds=2 if ctx.quick else 5,
                bytes_read=32 * n,  # the floor: g, denom, u, e read, e written; u read and written, out written
                read_gbps=bw,
                sync=sync,
            )
            cmp.extra = {"n": n, "chunk": CHUNK, "world": ADAM_WORLD, "threads": threads or default_threads}
            out.append(cmp)
        finally:
            autoglm_rt.set_num_threads(old[0])
            torch.set_num_threads(old[1])
    return out
