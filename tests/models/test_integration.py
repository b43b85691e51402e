"""The real parts wired together at tiny size: open_clip tower -> Q-Former -> DP-VLPA / CPRFL."""

from __future__ import annotations

import numpy as np
import torch

from ltdist.labels import LabelSpace
from ltdist.models.backbones import QFormerTokens
from ltdist.models.clip import ClipTowerConfig, ImageTower
from ltdist.models.cprfl import CPRFLConfig, CPRFLHead
from ltdist.models.dpvlpa import DPVLPA, DPVLPAConfig
from ltdist.models.heads import LinearHead
from ltdist.models.qformer import QFormer, QFormerConfig

C = 6


def parts(seed: int = 0):
    torch.manual_seed(seed)
    tower = ImageTower.from_config(
        ClipTowerConfig(pretrained="", tiny=True, image_size=32, tiny_patch_size=8)
    )
    qformer = QFormer(
        QFormerConfig(
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            vocab_size=200,
            max_positions=40,
            num_queries=4,
            vision_width=tower.width,
            dropout=0.0,
        )
    )
    rng = np.random.default_rng(seed)
    labels = [sorted(set(rng.integers(0, C, 2).tolist())) for _ in range(300)]
    labels += [[5]] * 3  # class 5 stays a tail class
    space = LabelSpace.from_label_sets([f"c{i}" for i in range(C)], labels)
    return tower, qformer, space


def batch(b: int = 4, t: int = 10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(103, 200, (b, t), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 6:] = 0
    targets = torch.zeros(b, C)
    targets[torch.arange(b), torch.arange(b) % C] = 1
    targets[0, 5] = 1
    return {
        "image": torch.randn(b, 3, 32, 32, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": targets,
    }


def test_dpvlpa_on_the_real_tower_and_qformer_trains_both_phases():
    tower, qformer, space = parts()
    model = DPVLPA(tower, qformer, DPVLPAConfig(embed_dim=16), label_space=space)
    data = batch()

    model.set_phase("pretrain")
    out = model.pretrain_loss(data)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["gcl"] > 0 and out["qcl"] > 0
    assert all(p.grad is None for p in tower.parameters())
    assert qformer.query_tokens.grad is not None and qformer.query_tokens.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    model.set_phase("adapt")
    class_ids = torch.randint(103, 200, (C, 5))
    class_emb = model.encode_classes(class_ids, torch.ones_like(class_ids))
    out = model.adapt_loss(data, class_emb)
    out["loss"].backward()
    stats = {f"dqr_w_{g}_{s}" for g in set(space.groups) for s in ("min", "mean", "max")}
    assert set(out) == {"loss", "cls", "gcl_dqr", "coa"} | stats
    assert all(torch.isfinite(v) for v in out.values())
    assert all(p.grad is None for p in tower.parameters())
    logits = model(data["image"], class_emb.detach())
    assert logits.shape == (4, C)


def test_cprfl_and_linear_heads_on_qformer_tokens():
    tower, qformer, _ = parts()
    source = QFormerTokens(tower, qformer)
    images = batch()["image"]
    tokens = source.tokens(images)
    assert tokens.shape == (4, 4, 32)  # K = 4 queries of width 32

    head = CPRFLHead(
        torch.randn(C, 12), source.token_dim, CPRFLConfig(heads=2, head_dim=8, mlp_dim=16)
    )
    logits = head(tokens)
    logits.sum().backward()
    assert logits.shape == (4, C)
    assert qformer.query_tokens.grad.abs().sum() > 0  # fine-tuning reaches the Q-Former
    assert all(p.grad is None for p in tower.parameters())

    linear = LinearHead(source.token_dim, C)
    assert linear(source.tokens(images)).shape == (4, C)


def test_a_frozen_qformer_source_trains_nothing_and_keeps_its_eval_tokens():
    """model.backbone.freeze: Q-Former tokens with no trainable parameter, no graph, and no
    dropout whatever train() a parent calls, so a token cache can hold them."""
    tower, qformer, _ = parts()
    source = QFormerTokens(tower, qformer, freeze_qformer=True)
    assert source.frozen and not any(p.requires_grad for p in source.parameters())
    images = batch()["image"]
    want = source.eval().tokens(images)
    source.train()
    assert not source.qformer.training and not source.image_tower.training
    got = source.tokens(images)
    assert not got.requires_grad and torch.equal(got, want)
    trainable = QFormerTokens(*parts()[:2])
    assert not trainable.frozen and trainable.train().qformer.training
