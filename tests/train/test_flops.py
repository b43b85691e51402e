"""FLOP accounting (``ltdist.train.flops``): the counts against hand counts (2 m n k per matrix
product, exact integers), frozen parts costing their forward alone, the per-sample / per-step
split, and MFU against the peak table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ltdist.config import load_config
from ltdist.labels import LabelSpace
from ltdist.models.clip import ClipTowerConfig, ImageTower
from ltdist.models.qformer import QFormerConfig, QFormerLayer
from ltdist.train.config import TrainConfig
from ltdist.train.flops import (
    Peak,
    count_flops,
    count_run_flops,
    count_step_flops,
    device_peak,
    matmul_precision,
    synthetic_batch,
    throughput,
)
from ltdist.train.tasks import build_task

from .conftest import TINY


def mm(m: int, n: int, k: int) -> int:
    """FLOPs of an (m, k) x (k, n) product."""
    return 2 * m * n * k


class _QueryLayer(nn.Module):
    """One Q-Former layer on its learnable query tokens."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.hidden_size))
        self.layer = QFormerLayer(cfg, has_cross_attention=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(image.shape[0], -1, -1)
        return self.layer(queries, self.queries.shape[1], image, None).sum()


@pytest.mark.parametrize("mode", ["train", "eval"])  # math attention vs CPU flash attention
def test_one_qformer_layer_matches_a_hand_count(mode):
    b, K, N, H, C, inner = 2, 32, 50, 64, 48, 128  # batch, queries, visual tokens, widths
    cfg = QFormerConfig(
        hidden_size=H, num_heads=4, intermediate_size=inner, num_queries=K, vision_width=C
    )
    layer = _QueryLayer(cfg).train(mode == "train")
    image = torch.randn(b, N, C)  # the frozen tower's tokens: no gradient

    split, frozen = count_flops(layer, lambda: layer(image))

    self_attn = 4 * mm(b * K, H, H) + 2 * b * mm(K, K, H)  # q k v out; QK^T and A V
    cross_kv = 2 * mm(b * N, H, C)  # keys and values from the visual tokens
    cross = 2 * mm(b * K, H, H) + cross_kv + 2 * b * mm(K, N, H)
    ffn = mm(b * K, inner, H) + mm(b * K, H, inner)
    forward = self_attn + cross + ffn
    # backward: input and weight gradients (2x) everywhere, but the visual tokens need none:
    # their key / value projections get their weight gradient alone (1x)
    backward = 2 * forward - cross_kv
    assert (split.frozen_forward, split.trainable_forward) == (0, forward)
    assert split.trainable_backward == backward
    assert frozen == {}
    assert all(p.grad is None for p in layer.parameters())  # the count stores no gradient


def _tiny_tower(frozen: bool) -> ImageTower:
    cfg = ClipTowerConfig(
        pretrained="",
        tiny=True,
        image_size=32,
        tiny_width=32,
        tiny_layers=2,
        tiny_heads=2,
        tiny_patch_size=8,
        freeze_image=frozen,
    )
    return ImageTower.from_config(cfg)


class _TowerAndHead(nn.Module):
    def __init__(self, tower: nn.Module, classes: int) -> None:
        super().__init__()
        self.tower, self.head = tower, nn.Linear(tower.width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(images)).sum()


def test_a_frozen_tower_costs_its_forward_alone():
    torch.manual_seed(0)
    b, W, L, patch, classes = 3, 32, 1 + 16, 8, 5  # 32 px / 8 px patches: 16 + class token
    images = torch.randn(b, 3, 32, 32)
    patches = mm(b * (L - 1), W, 3 * patch * patch)  # the patch embedding (a convolution)
    block = 3 * mm(b * L, W, W) + 2 * b * mm(L, L, W) + mm(b * L, W, W) + 2 * mm(b * L, 4 * W, W)
    tower = patches + 2 * block
    head = mm(b * L, classes, W)

    counts = {}
    for frozen in (True, False):  # frozen: open_clip's MultiheadAttention takes its fast path
        model = _TowerAndHead(_tiny_tower(frozen), classes).train()
        counts[frozen] = count_flops(model, lambda model=model: model(images))

    split, by_module = counts[True]
    assert by_module == {"tower": tower}
    assert (split.frozen_forward, split.trainable_forward) == (tower, head)
    assert split.trainable_backward == head  # the head's weight gradient; its input needs none
    trained, by_module = counts[False]
    assert by_module == {}
    assert (trained.frozen_forward, trained.trainable_forward) == (0, tower + head)
    # freezing removes exactly the tower's backward (2x its forward, less the patch
    # embedding's input gradient: the images need none) and the head's input gradient
    assert trained.trainable_backward - split.trainable_backward == 2 * tower - patches + head


class _PromptTask(nn.Module):
    """A loss with per-step work (class prompts encoded every step, as DP-VLPA adaptation
    does), per-sample work and a frozen encoder."""

    def __init__(self, classes: int = 7, width: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Linear(12, width).requires_grad_(False)
        self.prompt = nn.Linear(width, width)
        self.register_buffer("prompts", torch.randn(classes, width))

    def forward(self, batch):
        x = self.encoder(batch["image"])  # (b, width), frozen
        e = self.prompt(self.prompts)  # (C, width) every step
        return {"loss": (x @ e.T).sum()}


def test_a_step_splits_into_per_sample_and_fixed_work():
    task = _PromptTask()
    flops = count_step_flops(task, lambda b: {"image": torch.randn(b, 12)})
    C, W = 7, 16
    assert flops.sample.frozen_forward == mm(1, W, 12)
    assert flops.sample.trainable_forward == mm(1, C, W)
    assert flops.sample.trainable_backward == mm(1, C, W)  # d e only: x needs no gradient
    assert flops.fixed.frozen_forward == 0
    assert flops.fixed.trainable_forward == mm(C, W, W)
    assert flops.fixed.trainable_backward == mm(C, W, W)  # the weight gradient alone
    assert flops.frozen_modules == ("encoder",)
    at8 = flops.per_sample(8)
    assert at8.total == pytest.approx(flops.sample.total + flops.fixed.total / 8)
    cached = flops.without_frozen_forward()
    assert cached.per_sample(8).total == pytest.approx(at8.total - mm(1, W, 12))
    assert task.training and all(p.grad is None for p in task.parameters())


@pytest.mark.parametrize("task", ["pretrain", "dpvlpa", "cprfl"])
def test_counting_from_shapes_equals_counting_while_computing(task):
    """The count answers matrix products with zeros of their shape: the same FLOPs as
    computing them, on each task's real code path (tiny sizes)."""
    extra = ["model.backbone.tiny=true", "model.backbone.pretrained=false"]
    cfg = load_config(TrainConfig, TINY, [f"task={task}", *extra])
    names = [f"class{i}" for i in range(5)]
    space = LabelSpace.from_label_sets(names, [[0, 1], [2], [3, 4], [0, 4], [1]])
    module = build_task(task, cfg.model, space).eval()
    text = cfg.model.max_text_tokens if module.needs_text else 0
    batch = synthetic_batch(3, cfg.loader.image_size, len(names), text)
    rng = torch.random.get_rng_state()
    counts = [
        count_flops(module, lambda: module(batch)["loss"], compute=compute)
        for compute in (True, False)
    ]
    assert counts[0] == counts[1]
    assert torch.equal(torch.random.get_rng_state(), rng)  # a run's random stream is untouched
    assert all(p.grad is None for p in module.parameters())
    split, frozen = counts[0]
    assert split.trainable_backward > 0
    if task != "cprfl":  # the CPRFL head here trains its ResNet
        assert list(frozen) == ["model.image_tower"] and split.frozen_forward > 0


def test_mfu_against_the_peak_table():
    h100 = device_peak("NVIDIA H100 80GB HBM3", "bf16")
    assert h100 == Peak(989.4, "H100 SXM bf16 dense")
    assert device_peak("NVIDIA H100 PCIe", "bf16").tflops == 756.0
    assert device_peak("NVIDIA H100 NVL", "bf16").tflops == 835.5  # not the SXM row
    assert device_peak("NVIDIA H200", "bf16") == Peak(989.4, "H200 SXM bf16 dense")
    assert device_peak("NVIDIA A100-SXM4-40GB", "tf32").tflops == 156.0
    assert device_peak("NVIDIA A10", "bf16").tflops == 125.0
    assert device_peak("NVIDIA A10G", "bf16").tflops is None  # not an A10
    assert device_peak("Tesla V100-SXM2-32GB", "bf16").tflops is None  # no bf16 units
    assert device_peak("Tesla V100-SXM2-32GB", "fp16").tflops == 125.0
    assert device_peak("cpu", "fp32").tflops is None
    assert device_peak("cpu", "fp32", override=2.5) == Peak(2.5, "config peak_tflops")
    # 8 devices, 500 samples/s at 100 GFLOP per sample: 50 TFLOP/s, 6.25 per device
    out = throughput(100e9, 500.0, 8, h100)
    assert out["tflops"] == pytest.approx(50.0)
    assert out["tflops_per_device"] == pytest.approx(6.25)
    assert out["mfu"] == pytest.approx(6.25 / 989.4)
    assert "mfu" not in throughput(100e9, 500.0, 1, device_peak("cpu", "fp32"))


def test_fp32_runs_are_measured_against_tf32_when_pytorch_allows_it():
    assert matmul_precision("bf16") == "bf16"
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert matmul_precision("no") == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert matmul_precision("no") == "fp32"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("source", ["clip", "qformer"])
def test_a_head_reading_cached_tokens_is_counted_as_the_step_it_runs(source):
    """task=cprfl with a token cache: the run's count (the step less the frozen forward) is
    the count of the step it really runs, the head (and projection) on cached tokens; the
    frozen forward removed is the token source's, all of it."""
    extra = ["task=cprfl", "model.backbone.kind=clip", "model.backbone.proj_dim=16"]
    cfg = load_config(TrainConfig, TINY, [*extra, "data.location=x", "data.token_cache=auto"])
    if source == "qformer":  # (a run takes it from an export: model.init_from)
        cfg.model.backbone.kind, cfg.model.backbone.freeze = "qformer", True
    names = [f"class{i}" for i in range(5)]
    space = LabelSpace.from_label_sets(names, [[0, 1], [2], [3, 4], [0, 4], [1]])
    task = build_task("cprfl", cfg.model, space)
    frozen = task.frozen_token_source()
    assert frozen is task.backbone.source

    def cached_batch(b: int) -> dict:
        batch = synthetic_batch(b, cfg.loader.image_size, len(names))
        with torch.no_grad():
            tokens = frozen.tokens(batch.pop("image")).to(torch.bfloat16)  # as the cache holds
        return {**batch, "image_tokens": tokens}

    counted = count_run_flops(cfg, task, len(names), "cpu")
    ran = count_step_flops(task, cached_batch)
    assert (counted.sample, counted.fixed, counted.frozen_modules) == (ran.sample, ran.fixed, ())
    assert ran.sample.trainable_forward > 0 and ran.sample.trainable_backward > 0
    cfg.data.token_cache = ""
    images = count_run_flops(cfg, task, len(names), "cpu")
    assert images.frozen_modules == ("backbone.source",) and images.sample.frozen_forward > 0
    assert images.sample.total - images.sample.frozen_forward == ran.sample.total
