"""ltdist.train.optim: parameter groups, AdamW, the lr schedules and their checkpointing."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from ltdist.config import ConfigError, dump_yaml, load_config
from ltdist.train.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    lr_factor,
    param_group_names,
    param_groups,
)


class Toy(nn.Module):
    """A backbone, a frozen tower, query tokens, norms, a head and a scalar logit scale."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.backbone_proj = nn.Linear(4, 3)  # shares the prefix string, not the module
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.query_tokens = nn.Parameter(torch.randn(1, 2, 4))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))


EXPECTED_GROUPS = {
    "backbone/decay": ["backbone.0.weight"],
    "backbone/no_decay": ["backbone.0.bias", "backbone.1.weight", "backbone.1.bias"],
    "rest/decay": ["backbone_proj.weight", "head.weight"],
    # named_parameters order: a module's own parameters before its children's
    "rest/no_decay": [
        "query_tokens",
        "logit_scale",
        "backbone_proj.bias",
        "norm.weight",
        "norm.bias",
        "head.bias",
    ],
}


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


def test_groups_membership_lr_and_decay():
    model = toy()
    cfg = OptimConfig(lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1)
    names = param_group_names(model, ["backbone"], ["query_tokens"])
    assert names == EXPECTED_GROUPS
    groups = param_groups(model, cfg, ["backbone"], ["query_tokens"])
    assert [g["name"] for g in groups] == list(EXPECTED_GROUPS)
    params = dict(model.named_parameters())
    for group in groups:
        assert set(group) == {"params", "lr", "weight_decay", "name"}
        expected = [params[n] for n in EXPECTED_GROUPS[group["name"]]]
        assert len(group["params"]) == len(expected)
        assert all(p is q for p, q in zip(group["params"], expected))
        backbone = group["name"].startswith("backbone/")
        assert group["lr"] == pytest.approx(1e-4 if backbone else 1e-3, rel=1e-12)
        assert group["weight_decay"] == (0.05 if group["name"].endswith("/decay") else 0.0)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in grouped for p in model.frozen.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert grouped == trainable


def test_empty_groups_are_left_out():
    model = nn.Linear(3, 2)
    groups = param_groups(model, OptimConfig())
    assert [g["name"] for g in groups] == ["rest/decay", "rest/no_decay"]


def test_no_trainable_parameters_is_an_error():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, OptimConfig())


def test_a_backbone_prefix_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"\['qfromer'\] match no parameter"):
        param_groups(toy(), OptimConfig(), ["qfromer"])
    # a prefix over frozen parameters only matches (the tower is simply not optimized)
    assert "backbone/decay" not in param_group_names(toy(), ["frozen"])


def test_adamw_step_decays_only_the_decay_groups():
    """With zero gradients Adam's update is 0, so one step is the decoupled decay alone:
    p <- p - lr * wd * p in the decay groups, p unchanged in the others."""
    model = toy()
    cfg = OptimConfig(lr=0.1, weight_decay=0.5, backbone_lr_mult=0.2, betas=(0.9, 0.98))
    optimizer = build_optimizer(model, cfg, ["backbone"], ["query_tokens"])
    assert optimizer.defaults["betas"] == (0.9, 0.98)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    params = dict(model.named_parameters())
    for group, names in EXPECTED_GROUPS.items():
        lr = 0.1 * (0.2 if group.startswith("backbone/") else 1.0)
        for name in names:
            p0 = before[name]
            want = p0 - lr * 0.5 * p0 if group.endswith("/decay") else p0
            torch.testing.assert_close(params[name].detach(), want, rtol=1e-6, atol=0)
    assert torch.equal(model.frozen.weight, before["frozen.weight"])


def test_the_fused_adamw_is_the_default_and_updates_as_the_loop_does():
    """optim.fused (default true): torch's fused kernel; ten steps of random gradients give
    the parameters of the per-parameter loop (optim.fused=false) to float32 rounding."""
    fused, loop = toy(), toy()
    opt_fused = build_optimizer(fused, OptimConfig(lr=0.01), ["backbone"], ["query_tokens"])
    opt_loop = build_optimizer(
        loop, OptimConfig(lr=0.01, fused=False), ["backbone"], ["query_tokens"]
    )
    assert opt_fused.defaults["fused"] is True and not opt_loop.defaults["fused"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        for a, b in zip(fused.parameters(), loop.parameters()):
            if a.requires_grad:
                a.grad = torch.randn(a.shape, generator=gen)
                b.grad = a.grad.clone()
        opt_fused.step()
        opt_loop.step()
    moved = 0.0
    for (name, a), b, p0 in zip(fused.named_parameters(), loop.parameters(), toy().parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, (a - p0).abs().max().item())
    assert moved > 0.05  # ten steps at lr 0.01 moved the parameters


def reference_factor(schedule, step, total, warmup, floor=0.0):
    """The schedules written out directly, in float64."""
    if schedule != "onecycle" and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize(
    ("schedule", "total", "warmup", "floor"),
    [
        ("cosine", 100, 10, 0.0),
        ("cosine", 100, 10, 0.1),
        ("cosine", 37, 0, 0.05),
        ("constant", 20, 5, 0.0),
        ("constant", 20, 0, 0.0),
    ],
)
def test_lr_factor_matches_the_formula(schedule, total, warmup, floor):
    cfg = OptimConfig(schedule=schedule, warmup_steps=warmup, min_lr_ratio=floor)
    for step in range(total + 3):
        want = reference_factor(schedule, step, total, warmup, floor)
        assert lr_factor(step, total, cfg) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_cosine_endpoints():
    cfg = OptimConfig(warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, 20, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 20, cfg) == 1.0  # the first step after warmup is the peak
    assert lr_factor(20, 20, cfg) == pytest.approx(0.1)
    assert lr_factor(50, 20, cfg) == pytest.approx(0.1)  # held at the floor


def torch_onecycle_lrs(total: int, warmup: int) -> list[float]:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=1.0,
        total_steps=total,
        pct_start=warmup / total,
        anneal_strategy="cos",
        div_factor=25.0,
        final_div_factor=1e4,
    )
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize(("total", "warmup"), [(100, 30), (50, 0), (37, 5), (10, 2), (1000, 200)])
def test_onecycle_matches_torch(total, warmup):
    cfg = OptimConfig(schedule="onecycle", warmup_steps=warmup)
    ours = [lr_factor(step, total, cfg) for step in range(total)]
    assert ours == pytest.approx(torch_onecycle_lrs(total, warmup), rel=1e-9, abs=1e-15)
    if warmup > 1:
        assert ours[0] == pytest.approx(1 / 25) and ours[warmup - 1] == pytest.approx(1.0)
    assert ours[-1] == pytest.approx(1 / 25 / 1e4)


def test_onecycle_one_step_rise_is_the_peak():
    """torch divides by zero here (pct_start * total = 1); we start at the peak."""
    cfg = OptimConfig(schedule="onecycle", warmup_steps=1)
    assert lr_factor(0, 10, cfg) == 1.0
    assert lr_factor(9, 10, cfg) == pytest.approx(1 / 25 / 1e4)


def test_warmup_ratio_resolves_to_steps():
    assert OptimConfig(warmup_ratio=0.1).warmup_for(30) == 3
    assert OptimConfig(warmup_ratio=0.2).warmup_for(1001) == 200
    assert OptimConfig(warmup_ratio=0.001).warmup_for(100) == 1  # set, so at least one step
    assert OptimConfig(warmup_steps=7).warmup_for(30) == 7
    assert OptimConfig().warmup_for(30) == 0
    cfg = OptimConfig(warmup_ratio=0.25)
    assert lr_factor(0, 8, cfg) == 0.5 and lr_factor(1, 8, cfg) == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "constant", "onecycle"])
def test_warmup_not_shorter_than_the_run_is_an_error(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=100)
    with pytest.raises(ValueError, match=r"warmup \(100 steps\) >= total steps \(100\)"):
        cfg.warmup_for(100)
    with pytest.raises(ValueError, match=r"warmup \(100 steps\) >= total steps \(50\)"):
        lr_factor(0, 50, cfg)
    optimizer = build_optimizer(toy(), cfg)
    with pytest.raises(ValueError, match=r"warmup \(100 steps\) >= total steps \(80\)"):
        build_scheduler(optimizer, cfg, 80)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", 0.0, "lr must be finite and > 0"),
        ("lr", float("inf"), "lr must be finite and > 0"),
        ("weight_decay", float("nan"), "must be finite"),
        ("betas", (0.9, 1.0), "betas must be two values in"),
        ("betas", (0.9,), "betas must be two values in"),
        ("warmup_ratio", 1.0, "warmup_ratio must be in"),
        ("min_lr_ratio", -0.1, "min_lr_ratio must be in"),
        ("grad_accum", 0, "grad_accum must be >= 1"),
        ("grad_clip", -1.0, "grad_clip must be >= 0"),
        ("warmup_steps", -1, "warmup_steps must be >= 0"),
        ("schedule", "linear", "schedule 'linear' is not one of"),
    ],
)
def test_validate_rejects(field, value, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**{field: value}).validate()


def test_warmup_steps_and_ratio_together_is_an_error():
    with pytest.raises(ValueError, match="warmup_steps or warmup_ratio, not both"):
        OptimConfig(warmup_steps=10, warmup_ratio=0.1).validate()


def test_scheduler_sets_each_groups_lr():
    model = toy()
    cfg = OptimConfig(lr=1e-3, backbone_lr_mult=0.5, warmup_steps=3, min_lr_ratio=0.1)
    optimizer = build_optimizer(model, cfg, ["backbone"])
    scheduler = build_scheduler(optimizer, cfg, total_steps=12)
    for step in range(12):
        factor = lr_factor(step, 12, cfg)
        for group in optimizer.param_groups:
            peak = 5e-4 if group["name"].startswith("backbone/") else 1e-3
            assert group["lr"] == pytest.approx(peak * factor, rel=1e-12)
        optimizer.step()
        scheduler.step()


def run_steps(model, optimizer, scheduler, steps: int) -> list[list[float]]:
    lrs = []
    for _ in range(steps):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        model.zero_grad()
        model.head(torch.ones(2, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_scheduler_state_round_trips_through_weights_only_load(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=4, min_lr_ratio=0.05)
    model = toy()
    optimizer = build_optimizer(model, cfg, ["backbone"])
    scheduler = build_scheduler(optimizer, cfg, total_steps=20)
    run_steps(model, optimizer, scheduler, 7)

    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed_model = toy()
    resumed_model.load_state_dict(model.state_dict())
    resumed_opt = build_optimizer(resumed_model, cfg, ["backbone"])
    resumed_sched = build_scheduler(resumed_opt, cfg, total_steps=20)
    resumed_opt.load_state_dict(state["optimizer"])
    resumed_sched.load_state_dict(state["scheduler"])

    expected = run_steps(model, optimizer, scheduler, 13)
    assert run_steps(resumed_model, resumed_opt, resumed_sched, 13) == expected
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_config_from_overrides_and_yaml(tmp_path):
    cfg = load_config(OptimConfig, overrides=["betas=0.9,0.98", "lr=1e-4"])
    assert cfg.betas == (0.9, 0.98) and cfg.lr == 1e-4
    path = tmp_path / "optim.yaml"
    path.write_text("lr: 3e-4\nbetas: [0.9, 0.95]\nschedule: onecycle\nwarmup_ratio: 0.2\n")
    cfg = load_config(OptimConfig, path, overrides=["grad_accum=4"])
    assert cfg == OptimConfig(
        lr=3e-4, betas=(0.9, 0.95), schedule="onecycle", warmup_ratio=0.2, grad_accum=4
    )
    path.write_text(dump_yaml(cfg))  # what a checkpoint records loads back equal
    assert load_config(OptimConfig, path) == cfg
    with pytest.raises(ConfigError, match="'cosin' is not one of"):
        load_config(OptimConfig, overrides=["schedule=cosin"])
    with pytest.raises(ValueError, match="betas must be two values"):
        load_config(OptimConfig, overrides=["betas=[0.9]"])  # config.py does not check arity
