"""The fused CPU Adam/AdamW step against a numpy reference (bit for bit) and torch.optim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoglm_rt._native import _C
from autoglm_rt.offload import fused_adam_step
from tests.adam_reference import adam_step as ref_step

HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
SIZES = [0, 1, 7, 8, 9, 31, 65537, 131075]


def _case(n: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 10.0 ** rng.integers(-4, 3, n)).astype(np.float32)
    m = (rng.standard_normal(n) * 0.1).astype(np.float32)
    v = (rng.random(n) * 0.01).astype(np.float32)
    return p, g, m, v


def _native(p, g, m, v, step, *, weight_decay, decoupled, maximize=False, scalar=False, beta1=0.9):
    t = [torch.from_numpy(x.copy()) for x in (p, g, m, v)]
    h = dict(HYPER, beta1=beta1)
    _C.adam_step(
        [t[0]],
        [t[1]],
        [t[2]],
        [t[3]],
        [step],
        h["lr"],
        h["beta1"],
        h["beta2"],
        h["eps"],
        weight_decay,
        decoupled,
        maximize,
        scalar,
    )
    return t[0].numpy(), t[2].numpy(), t[3].numpy()


@pytest.mark.parametrize("scalar", [False, True], ids=["vector", "scalar"])
@pytest.mark.parametrize(
    ("weight_decay", "decoupled", "maximize", "beta1"),
    [
        (0.01, True, False, 0.9),
        (0.0, True, False, 0.9),
        (0.05, False, False, 0.9),
        (0.01, True, True, 0.9),
        (0.01, True, False, 0.2),
    ],
    ids=["adamw", "no-decay", "adam-l2", "maximize", "large-lerp-weight"],
)
def test_kernel_matches_reference_bit_for_bit(scalar, weight_decay, decoupled, maximize, beta1):
    for i, n in enumerate(SIZES):
        p, g, m, v = _case(n, i)
        for step in (1.0, 2.0, 1000.0):
            got = _native(
                p,
                g,
                m,
                v,
                step,
                weight_decay=weight_decay,
                decoupled=decoupled,
                maximize=maximize,
                scalar=scalar,
                beta1=beta1,
            )
            want = ref_step(
                p,
                g,
                m,
                v,
                step,
                **dict(HYPER, beta1=beta1),
                weight_decay=weight_decay,
                decoupled=decoupled,
                maximize=maximize,
            )
            for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, want, strict=True):
                np.testing.assert_array_equal(a.view(np.int32), b.view(np.int32), err_msg=f"{name} n={n} step={step}")


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even, NaN kept quiet (independent of the kernel)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    quiet = ((u >> 16) | 0x40).astype(np.uint16)
    return np.where((u & 0x7FFFFFFF) > 0x7F800000, quiet, rounded)


def _from_bf16(h: np.ndarray) -> np.ndarray:
    return (h.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("scalar", [False, True], ids=["vector", "scalar"])
def test_bfloat16_params_match_reference_bit_for_bit(scalar):
    for i, n in enumerate([1, 9, 65537]):
        p, g, m, v = _case(n, 20 + i)
        p[: min(n, 3)] = [np.nan, np.inf, -0.0][: min(n, 3)]
        p16, g16 = _to_bf16(p), _to_bf16(g)
        tp, tg = (torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16) for x in (p16, g16))
        tm, tv = torch.from_numpy(m.copy()), torch.from_numpy(v.copy())
        _C.adam_step([tp], [tg], [tm], [tv], [5.0], 1e-3, 0.9, 0.999, 1e-8, 0.01, True, False, scalar)
        want_p, want_m, want_v = ref_step(
            _from_bf16(p16), _from_bf16(g16), m, v, 5.0, **HYPER, weight_decay=0.01, decoupled=True
        )
        np.testing.assert_array_equal(tp.view(torch.int16).numpy().view(np.uint16), _to_bf16(want_p))
        np.testing.assert_array_equal(tm.numpy().view(np.int32), want_m.view(np.int32))
        np.testing.assert_array_equal(tv.numpy().view(np.int32), want_v.view(np.int32))


def test_fused_adam_step_keeps_float32_moments_for_bfloat16_params():
    w = torch.randn(100).to(torch.bfloat16).requires_grad_(True)
    w.grad = torch.randn(100).to(torch.bfloat16)
    before = w.detach().clone()
    opt = torch.optim.AdamW([w], lr=0.1)
    fused_adam_step(opt)
    assert opt.state[w]["exp_avg"].dtype == torch.float32 and w.dtype == torch.bfloat16
    assert not torch.equal(w.detach(), before)


def test_nonfinite_values_propagate_like_reference():
    p, g, m, v = _case(64, 3)
    g[[1, 9, 17]] = [np.nan, np.inf, -np.inf]
    p[40] = np.inf
    got = _native(p, g, m, v, 3.0, weight_decay=0.01, decoupled=True)
    want = ref_step(p, g, m, v, 3.0, **HYPER, weight_decay=0.01, decoupled=True)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)  # NaN == NaN for assert_array_equal
    assert np.isnan(got[0][1]) and np.isnan(got[0][9])


def test_results_do_not_depend_on_thread_count():
    p, g, m, v = _case(300001, 5)
    before = _C.num_threads()
    try:
        _C.set_num_threads(1)
        one = _native(p, g, m, v, 4.0, weight_decay=0.01, decoupled=True)
        _C.set_num_threads(max(2, before))
        many = _native(p, g, m, v, 4.0, weight_decay=0.01, decoupled=True)
    finally:
        _C.set_num_threads(before)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(a.view(np.int32), b.view(np.int32))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kind", ["AdamW", "Adam"])
def test_matches_torch_optim(foreach, kind):
    """Moments bit-identical with torch. Params: torch's CPU float32 sqrt is not correctly rounded
    (module doc of autoglm_rt.offload.fused_adam), so the denominator may differ by 1 ulp, the
    update by 2 ulp of itself, and the param by that plus its own last-place rounding."""
    torch.manual_seed(0)
    shapes = [(3, 5), (7,), (128, 33), (70001,)]
    cls = getattr(torch.optim, kind)
    kwargs = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}
    ref = [torch.randn(s, requires_grad=True) for s in shapes]
    mine = [t.detach().clone().requires_grad_(True) for t in ref]
    opt_ref = cls(ref, foreach=foreach, **kwargs)
    opt_mine = cls(mine, foreach=foreach, **kwargs)
    for _ in range(5):
        before = [a.detach().clone() for a in ref]
        for a, b in zip(ref, mine, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_ref.step()
        fused_adam_step(opt_mine)
        for a, b in zip(ref, mine, strict=True):
            sa, sb = opt_ref.state[a], opt_mine.state[b]
            assert torch.equal(sa["exp_avg"], sb["exp_avg"])
            assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
            assert torch.equal(sa["step"], sb["step"]) and sb["step"].dtype == torch.float32
        for a, b, old in zip(ref, mine, before, strict=True):
            got, want = b.detach().double(), a.detach().double()
            update = (want - old.double()).abs()
            bound = torch.from_numpy(np.spacing(np.abs(a.detach().numpy()))).double() + 2.0**-21 * update
            assert bool(((got - want).abs() <= bound).all())
            b.data.copy_(a.data)  # start the next step from torch's params: the bound is per step
    # The state dicts are interchangeable.
    opt_ref.load_state_dict(opt_mine.state_dict())


def test_fused_step_skips_params_without_grad_and_matches_scalar_path():
    torch.manual_seed(1)
    params = [torch.randn(100, requires_grad=True) for _ in range(3)]
    twin = [p.detach().clone().requires_grad_(True) for p in params]
    opt, opt2 = torch.optim.AdamW(params, lr=0.1), torch.optim.AdamW(twin, lr=0.1)
    params[0].grad = torch.randn(100)
    params[2].grad = torch.randn(100)
    twin[0].grad, twin[2].grad = params[0].grad.clone(), params[2].grad.clone()
    before = params[1].detach().clone()
    fused_adam_step(opt)
    fused_adam_step(opt2, scalar=True)
    assert params[1] not in opt.state and torch.equal(params[1].detach(), before)
    for a, b in zip(params, twin, strict=True):
        assert torch.equal(a.detach(), b.detach())


# ------------------------------------------------------------------------------------ bad input
def _lists(n=4, dtype=torch.float32):
    return [[torch.zeros(n, dtype=dtype)] for _ in range(4)]


def _call(p, g, m, v, steps=(1.0,)):
    _C.adam_step(p, g, m, v, list(steps), 1e-3, 0.9, 0.999, 1e-8, 0.0, True)


def test_rejects_wrong_dtype():
    p, g, m, v = _lists()
    with pytest.raises(TypeError, match=r"grads\[0\].*float32.*float64"):
        _call(p, [torch.zeros(4, dtype=torch.float64)], m, v)
    with pytest.raises(TypeError, match=r"grads\[0\]: expected dtype bfloat16 like params\[0\], got float32"):
        _call([torch.zeros(4, dtype=torch.bfloat16)], g, m, v)
    with pytest.raises(TypeError, match=r"exp_avgs\[0\].*float32.*bfloat16"):
        _call(p, g, [torch.zeros(4, dtype=torch.bfloat16)], v)


def test_rejects_non_contiguous_and_read_only():
    p, g, m, v = _lists()
    with pytest.raises(TypeError, match=r"exp_avgs\[0\].*contiguous"):
        _call(p, g, [torch.zeros(8)[::2]], v)
    ro = np.zeros(4, dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\].*(read-only|writable)"):
        _call(p, g, m, [ro])


def test_rejects_mismatched_lengths_sizes_and_steps():
    p, g, m, v = _lists()
    with pytest.raises(ValueError, match=r"grads has 2 tensors, expected one per parameter \(1\)"):
        _call(p, g * 2, m, v)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] has 5 elements, expected 4"):
        _call(p, g, [torch.zeros(5)], v)
    with pytest.raises(ValueError, match=r"steps has 2 values"):
        _call(p, g, m, v, steps=(1.0, 2.0))
    with pytest.raises(ValueError, match=r"steps\[0\] is 0.*>= 1"):
        _call(p, g, m, v, steps=(0.0,))
    with pytest.raises(ValueError, match=r"steps\[0\] is nan"):
        _call(p, g, m, v, steps=(float("nan"),))
    with pytest.raises(TypeError, match=r"params: expected a list or tuple of tensors"):
        _call(torch.zeros(4), g, m, v)


def test_bad_input_writes_nothing():
    p, g, m, v = [torch.ones(4)], [torch.ones(4)], [torch.ones(4)], [torch.ones(4)]
    p2, g2 = [*p, torch.ones(3)], [*g, torch.ones(3, dtype=torch.float64)]
    with pytest.raises(TypeError):
        _call(p2, g2, [*m, torch.ones(3)], [*v, torch.ones(3)], steps=(1.0, 1.0))
    assert all(torch.equal(t[0], torch.ones(4)) for t in (p, m, v))


def test_empty_list_is_a_no_op():
    _call([], [], [], [], steps=())


def test_fused_adam_step_rejects_other_optimizers_and_options():
    w = torch.zeros(3, requires_grad=True)
    w.grad = torch.ones(3)
    with pytest.raises(TypeError, match=r"expected a torch\.optim\.Adam or torch\.optim\.AdamW, got SGD"):
        fused_adam_step(torch.optim.SGD([w], lr=0.1))
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        fused_adam_step(torch.optim.AdamW([w], amsgrad=True))
    s = torch.zeros(3, requires_grad=True)
    s.grad = torch.sparse_coo_tensor([[0]], [1.0], (3,), check_invariants=True)
    with pytest.raises(TypeError, match="sparse gradients"):
        fused_adam_step(torch.optim.Adam([s]))
    h = torch.zeros(3, dtype=torch.float16, requires_grad=True)
    h.grad = torch.ones(3, dtype=torch.float16)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        fused_adam_step(torch.optim.Adam([h]))
