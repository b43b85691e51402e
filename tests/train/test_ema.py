"""ltdist.train.ema: the float32 moving average of the trained weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ltdist.train.ema import EMA

safetensors_torch = pytest.importorskip("safetensors.torch")


class Net(nn.Module):
    """Trainable layers with BatchNorm statistics, a frozen tower and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = nn.Linear(3, 3).requires_grad_(False)
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.register_buffer("class_frequency", torch.ones(4), persistent=False)


TRACKED = {
    "scale",
    "fc.weight",
    "fc.bias",
    "bn.weight",
    "bn.bias",
    "bn.running_mean",
    "bn.running_var",
    "bn.num_batches_tracked",
}


def net(seed: int = 0, dtype=torch.float32) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def train_step(model: Net, gen: torch.Generator) -> None:
    """Stands in for an optimizer step: new trainable weights and BN statistics."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))
        model.bn.running_mean.add_(torch.randn(4, generator=gen).to(model.bn.running_mean.dtype))
        model.bn.num_batches_tracked.add_(1)


def tracked_values(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: tensors[name].detach().clone() for name in TRACKED}


def reference_average(model: Net, decays: list[float], seed: int) -> dict[str, torch.Tensor]:
    """The average written out in float64, over the same sequence of weights."""
    gen = torch.Generator().manual_seed(seed)
    ref = {n: t.double() for n, t in tracked_values(model).items()}
    for d in decays:
        train_step(model, gen)
        for name, value in tracked_values(model).items():
            if name == "bn.num_batches_tracked":
                ref[name] = value.double()
            else:
                ref[name] = d * ref[name] + (1 - d) * value.double()
    return ref


def test_tracks_trainable_parameters_and_persistent_buffers_only():
    model = net()
    ema = EMA(model, decay=0.9)
    assert set(ema.shadow) == TRACKED
    assert set(ema.state_dict()) == TRACKED | {"__num_updates__"}
    assert ema.num_updates == 0
    assert ema.shadow["bn.num_batches_tracked"].dtype == torch.int64
    # a snapshot, not a view of the model
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    assert not torch.equal(ema.shadow["fc.weight"], model.fc.weight)


def test_average_after_k_updates_matches_a_float64_loop():
    model, reference_model = net(), net()
    ema = EMA(model, decay=0.8)
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        train_step(model, gen)
        ema.update(model)
    ref = reference_average(reference_model, [0.8] * 7, seed=1)
    assert ema.num_updates == 7
    for name, shadow in ema.shadow.items():
        torch.testing.assert_close(shadow.double(), ref[name], rtol=0, atol=1e-5, msg=name)
    assert int(ema.shadow["bn.num_batches_tracked"]) == 7  # copied, not averaged


def test_warmup_decay_formula():
    model, reference_model = net(), net()
    ema = EMA(model, decay=0.3, warmup_steps=5)
    # n = 0, 1, 2, ...: min(0.3, (1 + n) / (10 + n)) for the first 5 updates, then 0.3
    expected = [0.1, 2 / 11, 0.25, 0.3, 0.3, 0.3, 0.3]
    decays, gen = [], torch.Generator().manual_seed(2)
    for _ in expected:
        decays.append(ema.current_decay())
        train_step(model, gen)
        ema.update(model)
    assert decays == pytest.approx(expected, rel=1e-15)
    ref = reference_average(reference_model, expected, seed=2)
    for name, shadow in ema.shadow.items():
        torch.testing.assert_close(shadow.double(), ref[name], rtol=0, atol=1e-5, msg=name)

    long = EMA(net(), decay=0.999, warmup_steps=10_000)
    for done, decay in [(100, 101 / 110), (10_000, 0.999)]:  # then the warmup is over
        long.load_state_dict({**long.state_dict(), "__num_updates__": torch.tensor(done)})
        assert long.current_decay() == pytest.approx(decay, rel=1e-15)


def test_bf16_model_is_averaged_in_float32():
    model, reference_model = net(dtype=torch.bfloat16), net(dtype=torch.bfloat16)
    ema = EMA(model, decay=0.999)
    assert all(
        s.dtype == torch.float32 for n, s in ema.shadow.items() if n != "bn.num_batches_tracked"
    )
    bf16_average = model.fc.weight.detach().clone()  # what a bf16 shadow would compute
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        train_step(model, gen)
        ema.update(model)
        bf16_average.lerp_(model.fc.weight.detach(), 0.001)
    ref = reference_average(reference_model, [0.999] * 5, seed=3)
    for name, shadow in ema.shadow.items():
        torch.testing.assert_close(shadow.double(), ref[name], rtol=0, atol=1e-5, msg=name)
    # (1 - d) * (param - average) is below bf16's resolution of the average
    assert (bf16_average.double() - ref["fc.weight"]).abs().max() > 1e-4

    ema.copy_to(model)
    assert model.fc.weight.dtype == torch.bfloat16
    assert torch.equal(model.fc.weight, ema.shadow["fc.weight"].to(torch.bfloat16))


def test_frozen_parameters_are_neither_tracked_nor_written():
    model = net()
    ema = EMA(model, decay=0.5)
    tower = model.tower.weight.detach().clone()
    ema.shadow["fc.weight"].fill_(3.0)
    ema.copy_to(model)
    assert torch.equal(model.tower.weight, tower)
    assert torch.equal(model.fc.weight, torch.full_like(model.fc.weight, 3.0))
    assert torch.equal(model.class_frequency, torch.ones(4))


def test_state_dict_round_trips_through_safetensors(tmp_path):
    model = net()
    ema = EMA(model, decay=0.9, warmup_steps=100)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        train_step(model, gen)
        ema.update(model)
    path = tmp_path / "ema.safetensors"
    safetensors_torch.save_file(ema.state_dict(), str(path))

    resumed = EMA(net(seed=9), decay=0.9, warmup_steps=100)
    resumed.load_state_dict(safetensors_torch.load_file(str(path)))
    assert resumed.num_updates == 3
    for _ in range(4):  # the warmup decay depends on num_updates: it must have come back
        train_step(model, gen)
        ema.update(model)
        resumed.update(model)
    for name, shadow in ema.shadow.items():
        assert torch.equal(resumed.shadow[name], shadow), name
    assert resumed.num_updates == ema.num_updates == 7


def test_load_state_dict_mismatches_are_errors():
    ema = EMA(net(), decay=0.9)
    state = ema.state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['fc.bias'\], unexpected keys \[\]"):
        ema.load_state_dict({k: v for k, v in state.items() if k != "fc.bias"})
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['extra'\]"):
        ema.load_state_dict({**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"fc.weight: \(4, 2\) vs \(4, 3\)"):
        ema.load_state_dict({**state, "fc.weight": torch.zeros(4, 2)})


def test_swapped_restores_the_weights_even_when_the_body_raises():
    model = net()
    ema = EMA(model, decay=0.5)
    for shadow in ema.shadow.values():
        shadow.add_(1)
    original = {n: t.clone() for n, t in model.state_dict().items()}
    with ema.swapped(model) as swapped:
        assert swapped is model
        assert torch.equal(model.fc.weight, ema.shadow["fc.weight"])
        assert torch.equal(model.bn.running_mean, ema.shadow["bn.running_mean"])
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with ema.swapped(model):
            assert torch.equal(model.scale, ema.shadow["scale"])
            raise RuntimeError("evaluation failed")
    for name, value in model.state_dict().items():
        assert torch.equal(value, original[name]), name


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_decay_outside_open_unit_interval_is_an_error(decay):
    with pytest.raises(ValueError, match=r"EMA decay must be in \(0, 1\)"):
        EMA(net(), decay=decay)


def test_a_model_without_the_tracked_names_is_an_error():
    ema = EMA(net(), decay=0.9)
    with pytest.raises(ValueError, match="model has none of the EMA's tensors"):
        ema.update(nn.Sequential(net()))  # e.g. a wrapper that prefixes the names
