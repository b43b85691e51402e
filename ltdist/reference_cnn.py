"""A small CNN trained end to end from shards: the reference the demo table compares with (is
the visual side the bottleneck?) and a learnability check (its shuffled-label control).

It answers "can a model learn this data set at all, and how far above chance?": the same
network trained with the labels shuffled across images (``shuffle_labels``) is the control.
The real trainers (DP-VLPA, CPRFL on Accelerate/DeepSpeed) live in ``ltdist.train``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ltdist import storage
from ltdist.config import to_dict
from ltdist.data.loader import LoaderConfig, ShardLoader, eval_batches
from ltdist.data.shards import load_label_space
from ltdist.eval import format_summary, write_report
from ltdist.eval.metrics import MapResult, map_from_logits

log = logging.getLogger(__name__)


@dataclass
class ReferenceCNNConfig:
    data: str = "shards/demo"
    train_split: str = "train"
    test_split: str = "test"
    out: str = "runs/demo/reference_cnn"
    epochs: int = 6
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 32
    shuffle_labels: bool = False  # the control: each batch's label rows permuted across images
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    loader: LoaderConfig = field(
        default_factory=lambda: LoaderConfig(
            batch_size=32, num_workers=1, shuffle_buffer=256, image_size=64
        )
    )

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")


def small_cnn(num_classes: int, width: int = 32):
    """Four strided conv blocks, then average- and max-pooled features into a linear head."""
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = width
            self.features = nn.Sequential(
                block(3, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 4 * w)
            )
            self.head = nn.Linear(8 * w, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.features(x)  # (B, 4w, H/16, W/16)
            pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)  # (B, 8w)
            return self.head(pooled)

    return SmallCNN()


def evaluate(model, location: str, split: str, image_size: int, batch_size: int = 128) -> MapResult:
    import torch

    model.eval()
    logits, targets = [], []
    with torch.no_grad():
        for x, y, *_ in eval_batches(location, split, batch_size, image_size):
            logits.append(model(x))
            targets.append(y)
    return map_from_logits(torch.cat(logits), torch.cat(targets), load_label_space(location))


def train_reference_cnn(cfg: ReferenceCNNConfig, progress: bool = True) -> dict:
    """Train, evaluate on the test split, write the report; return the metrics summary."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loader = ShardLoader(cfg.data, cfg.train_split, cfg.loader)
    space = loader.label_space
    model = small_cnn(space.num_classes, cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * loader.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    bar = tqdm(
        total=total,
        desc="reference CNN" + (" (shuffled labels)" if cfg.shuffle_labels else ""),
        disable=not progress,
    )
    losses = []
    for _ in range(cfg.epochs):
        model.train()
        for batch in loader:
            labels = batch["labels"]
            if cfg.shuffle_labels:
                labels = labels[torch.randperm(len(labels), generator=gen)]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(batch["image"]), labels
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            bar.update(1)
    bar.close()
    train_seconds = time.perf_counter() - start
    result = evaluate(model, cfg.data, cfg.test_split, cfg.loader.image_size)
    title = "small CNN reference" + (" (shuffled-label control)" if cfg.shuffle_labels else "")
    paths = write_report(result, space, cfg.out, title=title, checkpoint_selection="last")
    summary = {
        "title": title,
        "map": result.summary(),
        "table": format_summary(result, "last"),
        "train_seconds": round(train_seconds, 1),
        "steps": total,
        "final_loss": float(np.mean(losses[-20:])),
        "config": to_dict(cfg),
        "report": paths,
    }
    storage.write_bytes_atomic(
        storage.join(cfg.out, "summary.json"), json.dumps(summary, indent=1).encode()
    )
    return summary
