"""OptimizerOffload: bit-identical trajectories with and without offload, checkpoints in either
state, moves that fail part-way, and the escalation policy."""

from __future__ import annotations

import os

import pytest
import torch

from autoglm_rt.offload import (
    EscalationConfig,
    MemoryEscalation,
    MemoryStep,
    OptimizerOffload,
    fused_adam_step,
)
from autoglm_rt.offload import optimizer_offload as oo


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48), torch.nn.Tanh(), torch.nn.Linear(48, 3)
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 12, generator=g), torch.randint(0, 3, (64,), generator=g)


def _optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    # Two groups with different hyper-parameters, Adam's L2 decay.
    params = list(model.parameters())
    return torch.optim.Adam(
        [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "betas": (0.8, 0.95)}], lr=1e-2, weight_decay=1e-3
    )


def _train(kind, tmp_path, moves: dict[int, str], steps: int = 20, block_bytes: int = 4096):
    model = _model()
    opt = _optimizer(kind, model)
    off = OptimizerOffload(opt, tier="disk", directory=tmp_path, block_bytes=block_bytes)
    x, y = _data()
    losses = []
    for s in range(steps):
        if moves.get(s) == "offload":
            assert off.offload()
        elif moves.get(s) == "restore":
            assert off.restore()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        off.step()
        losses.append(loss.item())
    return model, opt, off, losses


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("kind", ["AdamW", "Adam"])
def test_trajectory_bit_identical_with_and_without_offload(kind, tmp_path):
    base, base_opt, _, base_losses = _train(kind, tmp_path / "a", {})
    moved, moved_opt, off, losses = _train(kind, tmp_path / "b", {0: "offload", 7: "restore", 11: "offload"})
    assert losses == base_losses
    assert _same(base, moved)
    assert off.offloaded and off.resident_bytes() == 0
    for p, q in zip(base.parameters(), moved.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(base_opt.state[p][key], moved_opt.state[q][key])
    # "Without offload" is also the plain fused step, with no OptimizerOffload at all.
    model = _model()
    opt = _optimizer(kind, model)
    x, y = _data()
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        fused_adam_step(opt)
    assert _same(model, base)
    off.close()


def test_disk_tier_file_holds_the_state_and_resident_bytes_drop(tmp_path):
    model, _, off, _ = _train("AdamW", tmp_path, {}, steps=2)
    state_bytes = sum(2 * p.numel() * 4 for p in model.parameters())
    assert off.resident_bytes() == state_bytes
    assert off.offload() and not off.offload()
    assert off.resident_bytes() == 0
    path = tmp_path / oo.STATE_FILE
    assert path.stat().st_size >= state_bytes
    assert not (tmp_path / (oo.STATE_FILE + ".tmp")).exists()
    assert off.restore() and not off.restore()
    assert off.resident_bytes() == state_bytes and not path.exists()


def test_checkpoint_in_either_state_resumes_bit_identically(tmp_path):
    base, _, _, _ = _train("AdamW", tmp_path / "base", {}, steps=12)
    x, y = _data()
    for offloaded_at_save in (False, True):
        model, _, off, _ = _train(
            "AdamW", tmp_path / f"s{offloaded_at_save}", {0: "offload"} if offloaded_at_save else {}, steps=6
        )
        ckpt = tmp_path / f"ckpt{offloaded_at_save}.pt"
        torch.save({"model": model.state_dict(), "offload": off.state_dict()}, ckpt)
        saved = torch.load(ckpt, weights_only=True)
        assert saved["offload"]["offload"] == {"tier": "disk", "offloaded": offloaded_at_save}
        # Resume in the other state.
        model2 = _model()
        model2.load_state_dict(saved["model"])
        opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.05)
        off2 = OptimizerOffload(opt2, tier="disk", directory=tmp_path / f"r{offloaded_at_save}")
        if not offloaded_at_save:
            off2.offload()
        off2.load_state_dict(saved["offload"])
        assert off2.offloaded == (not offloaded_at_save)
        for _ in range(6):
            opt2.zero_grad()
            torch.nn.functional.cross_entropy(model2(x), y).backward()
            off2.step()
        assert _same(model2, base)
        off2.close()
        off.close()


def test_interrupted_offload_loses_nothing(tmp_path, monkeypatch):
    model, opt, off, _ = _train("AdamW", tmp_path, {}, steps=3)
    snapshot = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}

    def fail(*_a, **_k):
        raise OSError("injected: disk full during rename")

    monkeypatch.setattr(oo.os, "replace", fail)
    with pytest.raises(OSError, match="injected"):
        off.offload()
    monkeypatch.undo()
    assert not off.offloaded
    assert os.listdir(tmp_path) == []  # the partial file is gone
    for p in model.parameters():
        for k, v in snapshot[id(p)].items():
            assert torch.equal(opt.state[p][k], v)

    # Interrupted while copying back: the file-backed state stays in place and intact.
    assert off.offload()
    calls = {"n": 0}
    real = oo._copy_out

    def flaky(t, device):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(t, device)

    monkeypatch.setattr(oo, "_copy_out", flaky)
    with pytest.raises(KeyboardInterrupt):
        off.restore()
    monkeypatch.undo()
    assert off.offloaded and (tmp_path / oo.STATE_FILE).exists()
    for p in model.parameters():
        for k, v in snapshot[id(p)].items():
            assert torch.equal(opt.state[p][k], v)
    assert off.restore()


def test_bad_arguments(tmp_path):
    model = _model()
    with pytest.raises(TypeError, match=r"expected a torch\.optim\.Adam or torch\.optim\.AdamW, got SGD"):
        OptimizerOffload(torch.optim.SGD(model.parameters(), lr=0.1))
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="tier: expected one of host, disk, got 'nvme'"):
        OptimizerOffload(opt, tier="nvme")
    with pytest.raises(ValueError, match="block_bytes"):
        OptimizerOffload(opt, tier="disk", block_bytes=0)
    with pytest.raises(ValueError, match=r"tier='host' moves optimizer state off a CUDA device.*use tier='disk'"):
        OptimizerOffload(opt, tier="host").offload()
    (tmp_path / "f").write_text("not a directory")
    with pytest.raises(OSError):
        OptimizerOffload(opt, tier="disk", directory=tmp_path / "f").offload()
    assert not opt.state  # the failed move created no state
    # A parameter added after offload() is refused, not stepped from RAM silently.
    off = OptimizerOffload(opt, tier="disk", directory=tmp_path / "d")
    off.offload()
    extra = torch.zeros(3, requires_grad=True)
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="added after offload"):
        off.step()
    off.close()


def test_default_directory_is_removed_by_close():
    model, opt = _model(), None
    opt = torch.optim.AdamW(model.parameters())
    off = OptimizerOffload(opt, tier="disk")
    off.offload()
    directory = off._directory
    assert directory is not None and os.path.exists(os.path.join(directory, oo.STATE_FILE))
    off.close()
    assert not os.path.exists(directory) and not off.offloaded


# ----------------------------------------------------------------------------- escalation policy
def _decide(esc, ratio, micro_batch=4, offloaded=False, state=0, oom=False):
    return esc.decide(
        usage_bytes=int(ratio * 1000),
        limit_bytes=1000,
        micro_batch=micro_batch,
        offloaded=offloaded,
        state_bytes=state,
        oom=oom,
    ).step


def test_escalation_order_shrink_then_offload_then_fail():
    esc = MemoryEscalation(EscalationConfig(high_ratio=0.9, low_ratio=0.6, calm_steps=3))
    assert _decide(esc, 0.95, micro_batch=4) is MemoryStep.SHRINK_MICRO_BATCH
    assert _decide(esc, 0.95, micro_batch=1) is MemoryStep.OFFLOAD
    assert _decide(esc, 0.95, micro_batch=1, offloaded=True) is MemoryStep.FAIL
    assert _decide(esc, 0.1, micro_batch=1, oom=True) is MemoryStep.OFFLOAD
    assert (
        MemoryEscalation(can_offload=False)
        .decide(usage_bytes=999, limit_bytes=1000, micro_batch=1, offloaded=False)
        .step
        is MemoryStep.FAIL
    )
    assert _decide(esc, 0.5, micro_batch=4, offloaded=False) is MemoryStep.NONE
    assert esc.decide(usage_bytes=10**12, limit_bytes=None, micro_batch=1, offloaded=False).step is MemoryStep.NONE


def test_restore_waits_for_calm_and_room():
    esc = MemoryEscalation(EscalationConfig(high_ratio=0.9, low_ratio=0.6, calm_steps=3))
    seq = [_decide(esc, 0.3, 1, True, state=100) for _ in range(3)]
    assert seq == [MemoryStep.NONE, MemoryStep.NONE, MemoryStep.RESTORE]
    # A spike in between resets the count (hysteresis), and no restore while the state won't fit.
    assert _decide(esc, 0.3, 1, True, 100) is MemoryStep.NONE
    assert _decide(esc, 0.7, 1, True, 100) is MemoryStep.NONE
    assert [_decide(esc, 0.3, 1, True, 100) for _ in range(3)][-1] is MemoryStep.RESTORE
    assert [_decide(esc, 0.3, 1, True, state=400) for _ in range(5)] == [MemoryStep.NONE] * 5
    saved = esc.state_dict()
    other = MemoryEscalation(esc.config)
    other.load_state_dict(saved)
    assert other.state_dict() == saved


def test_escalation_rejects_bad_numbers():
    with pytest.raises(ValueError, match="0 < low_ratio < high_ratio <= 1"):
        EscalationConfig(high_ratio=0.5, low_ratio=0.7)
    with pytest.raises(ValueError, match="calm_steps"):
        EscalationConfig(calm_steps=0)
    esc = MemoryEscalation()
    with pytest.raises(ValueError, match="limit_bytes"):
        esc.decide(usage_bytes=1, limit_bytes=0, micro_batch=1, offloaded=False)
    with pytest.raises(ValueError, match="micro_batch"):
        esc.decide(usage_bytes=1, limit_bytes=10, micro_batch=0, offloaded=False)
    with pytest.raises(ValueError, match="usage_bytes"):
        esc.decide(usage_bytes=-1, limit_bytes=10, micro_batch=1, offloaded=False)


# ------------------------------------------------------------------------- strategy and actuator
def test_strategy_action_offloads_through_the_actuator(tmp_path):
    from autoglm_rt.policy.actuators import Actuators
    from autoglm_rt.policy.strategy import Strategy

    rule_yaml = "strategy:\n  name: tight\n  trigger:\n    memory_usage: '>90%'\n  actions:\n"
    strategy = Strategy.from_yaml(rule_yaml + "    - offload_optimizer_state: true\n")
    (rule,) = strategy.rules
    assert [(a.name, a.value, a.target) for a in rule.actions] == [("offload_optimizer_state", True, "offload")]
    (action,) = strategy.evaluate({"memory_usage": 0.95}, now=0.0)
    _, _, off, _ = _train("AdamW", tmp_path, {}, steps=1)
    assert not Actuators().dispatch(action).applied  # nothing attached: says so
    act = Actuators(offload=off.set_offloaded)
    first, second = act.dispatch(action), act.dispatch(action)
    assert first.applied and first.detail == "optimizer state offloaded" and off.offloaded
    assert not second.applied and second.detail == "optimizer state already offloaded"
    with pytest.raises(ValueError, match="offload_optimizer_state"):
        Strategy.from_yaml(rule_yaml + "    - offload_optimizer_state: 3\n")
    off.close()


def test_loading_a_bad_state_dict_keeps_the_offloaded_state(tmp_path):
    model, opt, off, _ = _train("AdamW", tmp_path, {0: "offload"}, steps=3)
    before = {id(p): opt.state[p]["exp_avg"].clone() for p in model.parameters()}
    bad = off.state_dict()
    bad["optimizer"]["param_groups"][0]["params"] = bad["optimizer"]["param_groups"][0]["params"][:1]
    with pytest.raises(ValueError):
        off.load_state_dict(bad)
    assert off.offloaded and (tmp_path / oo.STATE_FILE).exists()
    assert all(torch.equal(opt.state[p]["exp_avg"], before[id(p)]) for p in model.parameters())
    off.close()


@pytest.mark.cuda
def test_host_tier_steps_cuda_parameters_on_the_host():
    """CUDA parameters, moments in pinned host memory: the step equals the fused CPU step applied
    to host copies of the same parameters and gradients."""
    torch.manual_seed(0)
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in ((64, 33), (129,))]
    twins = [p.detach().cpu().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    twin_opt = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1)
    off = OptimizerOffload(opt, tier="host")
    assert off.offload() and off.resident_bytes() == 0
    for s in (opt.state[p] for p in params):
        assert s["exp_avg"].device.type == "cpu" and s["exp_avg"].is_pinned()
    for _ in range(5):
        for p, t in zip(params, twins, strict=True):
            p.grad = torch.randn_like(p)
            t.grad = p.grad.cpu()
        off.step()
        fused_adam_step(twin_opt)
    for p, t in zip(params, twins, strict=True):
        assert torch.equal(p.detach().cpu(), t.detach())
    assert off.restore() and opt.state[params[0]]["exp_avg"].is_cuda
    assert off.resident_bytes() == sum(2 * p.numel() * 4 for p in params)


@pytest.mark.cuda
def test_host_tier_copies_during_backward_and_sees_later_changes():
    """Gradients from backward (copied by the side-stream hooks, twice with accumulation) and then
    changed in place (clipping: the version moves, so step() copies again): the parameters equal
    the fused CPU step on host copies of the final gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5)).cuda()
    twins = [p.detach().cpu().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    twin_opt = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1)
    off = OptimizerOffload(opt, tier="host")
    assert off.offload()
    g = torch.Generator(device="cuda").manual_seed(1)
    for step in range(6):
        opt.zero_grad(set_to_none=True)
        for _ in range(2):  # accumulation: the hooks fire on each backward
            x = torch.randn(16, 24, device="cuda", generator=g)
            model(x).square().mean().backward()
        if step % 2:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # in place, after the hooks' copies
        for p, t in zip(model.parameters(), twins, strict=True):
            t.grad = p.grad.cpu()
        off.step()
        fused_adam_step(twin_opt)
        for p, t in zip(model.parameters(), twins, strict=True):
            assert torch.equal(p.detach().cpu(), t.detach()), step
    assert off.restore()


@pytest.mark.parametrize("offloaded", [False, True])
def test_a_bad_gradient_changes_nothing(tmp_path, offloaded):
    model, opt, off, _ = _train("Adam", tmp_path, {0: "offload"} if offloaded else {}, steps=2, block_bytes=512)
    params = list(model.parameters())
    snapshot = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    params[-1].grad_dtype = None  # torch refuses a float64 gradient otherwise
    params[-1].grad = torch.ones_like(params[-1], dtype=torch.float64)  # last group, last block
    with pytest.raises(
        TypeError, match=r"params\[\d+\]: expected float32 or bfloat16 parameter and a gradient of the same dtype"
    ):
        off.step()
    for p, (value, state) in zip(params, snapshot, strict=True):
        assert torch.equal(p.detach(), value)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    off.close()


def test_escalation_drives_a_real_offload(tmp_path):
    """The policy's decisions carried out on a real OptimizerOffload, as the Runtime will."""
    _, _, off, _ = _train("AdamW", tmp_path, {}, steps=1)
    esc = MemoryEscalation(EscalationConfig(high_ratio=0.9, low_ratio=0.5, calm_steps=2))
    micro_batch, limit = 2, 1_000_000
    usage = [950_000, 950_000, 950_000, 600_000, 300_000, 300_000, 300_000]
    seen = []
    for used in usage:
        state = off.state_dict()["offload"]
        d = esc.decide(
            usage_bytes=used,
            limit_bytes=limit,
            micro_batch=micro_batch,
            offloaded=state["offloaded"],
            state_bytes=sum(p.numel() * 8 for g in off.optimizer.param_groups for p in g["params"]),
        )
        seen.append(d.step)
        if d.step is MemoryStep.SHRINK_MICRO_BATCH:
            micro_batch //= 2
        elif d.step in (MemoryStep.OFFLOAD, MemoryStep.RESTORE):
            assert off.set_offloaded(d.step is MemoryStep.OFFLOAD)
    assert seen == [
        MemoryStep.SHRINK_MICRO_BATCH,
        MemoryStep.OFFLOAD,
        MemoryStep.FAIL,
        MemoryStep.NONE,
        MemoryStep.NONE,
        MemoryStep.RESTORE,
        MemoryStep.NONE,
    ]
    assert not off.offloaded and off.resident_bytes() > 0
    off.close()
