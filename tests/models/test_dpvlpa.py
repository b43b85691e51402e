"""DP-VLPA wiring with tiny stand-in towers: phase 1 and 2 losses, the frozen tower, class
logits (max over queries), DQR weights (Eq. 4) and COA (Eq. 5) against direct formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from ltdist.labels import LabelSpace
from ltdist.losses.coa import CooccurrenceLoss, normalized_cooccurrence
from ltdist.models.dpvlpa import DPVLPA, DPVLPAConfig

N_TOKENS, PATCH, VIS, HID, K, VOCAB, T = 5, 12, 16, 32, 4, 200, 7


class TinyTower(nn.Module):
    """Stand-in image tower: (B, N, P) 'patches' -> (B, N, Wv) tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(PATCH, VIS)
        self.drop = nn.Dropout(0.5)  # must stay off: the tower is frozen in eval mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(images))


class TinyQFormer(nn.Module):
    """Stand-in Q-Former with the real one's interface (learned queries, cross-attention)."""

    hidden_size = HID

    def __init__(self) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, K, HID))
        self.vis = nn.Linear(VIS, HID)
        self.cross = nn.MultiheadAttention(HID, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(HID, 2 * HID), nn.GELU(), nn.Linear(2 * HID, HID))
        self.embed = nn.Embedding(VOCAB, HID)
        self.text = nn.TransformerEncoderLayer(HID, 4, 2 * HID, dropout=0.0, batch_first=True)

    def encode_image(self, image_tokens: torch.Tensor) -> torch.Tensor:
        ctx = self.vis(image_tokens)
        q = self.queries.expand(image_tokens.shape[0], -1, -1)
        x = q + self.cross(q, ctx, ctx)[0]
        return x + self.ff(x)  # (B, K, H)

    def encode_text(self, input_ids, attention_mask):
        x = self.text(self.embed(input_ids), src_key_padding_mask=~attention_mask.bool())
        return x[:, 0], x


def _tokens(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-like ids: [CLS]=101, words, [SEP]=102, padding 0."""
    ids = torch.zeros(n, T, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(2, T - 1, (1,), generator=g))
        ids[i, 0] = 101
        ids[i, 1 : 1 + length] = torch.randint(103, VOCAB, (length,), generator=g)
        ids[i, 1 + length] = 102
    return ids, (ids != 0).long()


# Training label sets. Class 0: head (150), 1: medium (40), 2: tail (9), 3: tail (4).
TRAIN_SETS = [[0]] * 110 + [[0, 1]] * 36 + [[0, 2]] * 4 + [[1, 2]] * 3 + [[2, 3]] * 2
TRAIN_SETS += [[1, 3], [3]]


def _label_space() -> LabelSpace:
    return LabelSpace.from_label_sets(["person", "dog", "kite", "toaster"], TRAIN_SETS)


def _model(config: DPVLPAConfig | None = None, label_space=None) -> DPVLPA:
    torch.manual_seed(0)
    cfg = config or DPVLPAConfig(embed_dim=8)
    return DPVLPA(TinyTower(), TinyQFormer(), cfg, label_space=label_space)


def _batch(n: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids, mask = _tokens(n, g)
    labels = torch.zeros(n, 4)
    for i, c in enumerate([[0], [0, 2], [1, 3], [0, 1], [2], [3]][:n]):
        labels[i, c] = 1
    return {
        "image": torch.randn(n, N_TOKENS, PATCH, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
    }


def _assert_tower_frozen(model: DPVLPA) -> None:
    assert not model.image_tower.training
    for p in model.image_tower.parameters():
        assert not p.requires_grad and p.grad is None


def test_pretrain_loss_forward_backward():
    model = _model().train()
    batch = _batch()
    out = model.pretrain_loss(batch)
    assert set(out) == {"loss", "gcl", "qcl"}
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.allclose(out["loss"], out["gcl"] + out["qcl"])
    out["loss"].backward()
    _assert_tower_frozen(model)
    for name in (
        "vision_proj.weight",
        "text_proj.weight",
        "qformer.queries",
        "qformer.embed.weight",
        "gcl.logit_scale.log_scale",
        "qcl.logit_scale.log_scale",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    # QCL's words exclude [CLS], [SEP] and padding
    mask = model.word_mask(batch["input_ids"], batch["attention_mask"])
    assert not mask[:, 0].any() and int(mask.sum()) == int((batch["input_ids"] > 102).sum())


@pytest.mark.parametrize(
    "overrides",
    [{}, {"coa_source": "prototypes", "dqr_assign": "hard", "cls_bias_init": -2.0}],
)
def test_adapt_loss_forward_backward(overrides):
    cfg = DPVLPAConfig(embed_dim=8, lambda1=0.5, lambda2=2.0, **overrides)
    model = _model(cfg, _label_space()).train()
    g = torch.Generator().manual_seed(1)
    class_ids, class_mask = _tokens(4, g)
    class_embeddings = model.encode_classes(class_ids, class_mask)  # (C, D), with gradient
    assert class_embeddings.shape == (4, 8)
    out = model.adapt_loss(_batch(), class_embeddings)
    assert set(out) == {"loss", "cls", "gcl_dqr", "coa"}
    assert all(torch.isfinite(v) for v in out.values())
    assert out["gcl_dqr"].item() > 0 and out["coa"].item() > 0
    expected = out["cls"] + 0.5 * out["gcl_dqr"] + 2.0 * out["coa"]
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    _assert_tower_frozen(model)
    params = dict(model.named_parameters())
    for name in (
        "vision_proj.weight",
        "text_proj.weight",
        "cls_scale.log_scale",
        "gcl.logit_scale.log_scale",
        "qformer.queries",
    ):
        assert params[name].grad is not None and float(params[name].grad.abs().sum()) > 0, name


@pytest.mark.parametrize("lambda1", [1.0, 0.0])
def test_set_phase_leaves_no_unused_trainable_parameter(lambda1):
    """What DDP without find_unused_parameters needs: every trainable parameter gets a grad."""
    model = _model(DPVLPAConfig(embed_dim=8, lambda1=lambda1, cls_bias_init=0.0), _label_space())
    g = torch.Generator().manual_seed(1)
    class_ids, class_mask = _tokens(4, g)
    for phase in ("pretrain", "adapt", "pretrain"):
        model.zero_grad(set_to_none=True)
        model.set_phase(phase)
        if phase == "pretrain":
            out = model.pretrain_loss(_batch())
        else:
            out = model.adapt_loss(_batch(), model.encode_classes(class_ids, class_mask))
        out["loss"].backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert unused == [], (phase, unused)
    _assert_tower_frozen(model)


def test_adapt_loss_needs_label_space():
    model = _model()
    with pytest.raises(RuntimeError, match="label space"):
        model.adapt_loss(_batch(), torch.randn(4, 8))


def test_class_logits_are_max_over_queries():
    model = _model()
    g = torch.Generator().manual_seed(2)
    q, e = torch.randn(3, K, 8, generator=g), torch.randn(5, 8, generator=g)
    logits = model.class_logits(q, e)
    scale = 1 / model.cls_scale.temperature
    assert scale == pytest.approx(1 / 0.07, rel=1e-5)
    for b in range(3):
        for c in range(5):
            cos = [float(q[b, k] @ e[c]) / float(q[b, k].norm() * e[c].norm()) for k in range(K)]
            assert logits[b, c].item() == pytest.approx(scale * max(cos), abs=1e-4)


def test_class_logits_are_float32_under_bf16_autocast():
    """The evaluation forward under bf16 autocast: bf16 query features, float32 logits equal
    to the float64 formula on those features to float32 precision."""
    model = _model().eval()
    g = torch.Generator().manual_seed(3)
    images, e = torch.randn(3, N_TOKENS, PATCH, generator=g), torch.randn(5, 8, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q = model.encode_image(images)
        logits = model(images, e.bfloat16())
    assert q.dtype == torch.bfloat16 and logits.dtype == torch.float32
    qn = torch.nn.functional.normalize(q.double(), dim=-1)
    en = torch.nn.functional.normalize(e.bfloat16().double(), dim=-1)
    scale = float(model.cls_scale().detach())
    direct = scale * torch.einsum("bkd,cd->bkc", qn, en).amax(dim=1)
    torch.testing.assert_close(logits.double(), direct, rtol=1e-6, atol=1e-5)


def test_dqr_boosts_the_query_of_the_tail_class_by_inverse_sqrt_frequency():
    ls = _label_space()
    assert ls.groups == ["head", "medium", "tail", "tail"]
    n_kite, n_toaster = int(ls.frequency[2]), int(ls.frequency[3])
    assert (n_kite, n_toaster) == (9, 4)
    cfg = DPVLPAConfig(embed_dim=4, dqr_alpha=2.0, dqr_temperature=0.1)
    model = _model(cfg, ls)
    eye = torch.eye(4)
    # queries: q0 ~ person, q1 ~ dog, q2 closest to the kite/toaster direction, q3 elsewhere
    queries = torch.stack([eye[0], eye[1], eye[2] + 0.3 * eye[3], eye[3] - 0.5 * eye[2]])
    class_embeddings = torch.stack([eye[0], eye[1], eye[2], eye[2]])  # kite == toaster
    q = queries.expand(4, -1, -1)
    targets = torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]])
    boost = model.dqr_weights(q, class_embeddings, targets) - 1  # (4, K)

    # an image whose only tail class is 'kite': the query most like 'kite' gets the most
    assert int(boost[0].argmax()) == 2 and float(boost[0, 2]) > 0
    assert torch.all(boost[0] >= 0)
    # head / medium classes do not boost: image 0 (person + kite) == image 1 (kite only)
    assert torch.allclose(boost[0], boost[1])
    assert torch.equal(boost[2], torch.zeros(K))  # no tail class: W = 1 (plain GCL)
    # direct formula: alpha * softmax_k(cos(q_k, E_kite) / tau) / sqrt(n_kite)
    cos = torch.nn.functional.normalize(queries, dim=-1) @ eye[2]
    direct = 2.0 * torch.softmax(cos / 0.1, dim=0) / math.sqrt(n_kite)
    assert torch.allclose(boost[1], direct, atol=1e-6)
    # the rarer class (toaster, n=4) boosts more than kite (n=9), by sqrt(9 / 4) = 1.5
    assert float(boost[3, 2]) > float(boost[1, 2])
    assert torch.allclose(boost[3], 1.5 * boost[1], atol=1e-6)


def _direct_q_co(co: np.ndarray, kind: str) -> np.ndarray:
    c = len(co)
    n = np.diag(co).astype(float)
    out = np.zeros((c, c))
    for i in range(c):
        for j in range(c):
            if i == j:
                out[i, j] = 1.0
            elif kind == "cosine":
                out[i, j] = co[i, j] / math.sqrt(n[i] * n[j])
            elif kind == "conditional":
                out[i, j] = (co[i, j] / n[i] + co[i, j] / n[j]) / 2
            else:
                out[i, j] = co[i, j] / (n[i] + n[j] - co[i, j])
    return out


@pytest.mark.parametrize("kind", ["cosine", "conditional", "jaccard"])
def test_q_co_direct_formula(kind):
    ls = _label_space()
    q_co = normalized_cooccurrence(ls.cooccurrence, ls.frequency, kind)
    assert np.allclose(q_co.numpy(), _direct_q_co(ls.cooccurrence, kind), atol=1e-12)
    assert torch.equal(q_co, q_co.T)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_coa_matches_direct_formula(reduction):
    ls = _label_space()
    coa = CooccurrenceLoss.from_label_space(ls, beta=0.3, reduction=reduction)
    logits = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    probs = 1 / (1 + np.exp(-logits.numpy()))
    q = probs.T / np.linalg.norm(probs.T, axis=1, keepdims=True)  # (C, B) unit rows
    q_co = _direct_q_co(ls.cooccurrence, "cosine")
    total = sum((q_co[i, j] - q[i] @ q[j]) ** 2 for i in range(4) for j in range(4))
    expected = 0.3 * (total if reduction == "sum" else total / 16)
    assert coa(logits).item() == pytest.approx(expected, abs=1e-12)


def test_coa_is_zero_when_q_qt_equals_q_co():
    ls = _label_space()
    labels = torch.zeros(len(TRAIN_SETS), 4, dtype=torch.float64)
    for i, s in enumerate(TRAIN_SETS):
        labels[i, s] = 1
    # predictions equal to the training labels: Q Q^T is their column cosine == Q_co
    coa = CooccurrenceLoss.from_label_space(ls, activation="none", reduction="sum")
    assert coa(labels).item() == pytest.approx(0.0, abs=1e-12)
    assert coa(labels.flip(1)).item() > 0.01
    # prototypes whose Gram matrix is Q_co (a square root of the PSD Q_co)
    q_co = normalized_cooccurrence(ls.cooccurrence)
    vals, vecs = torch.linalg.eigh(q_co)
    protos = vecs * vals.clamp_min(0).sqrt()  # (C, C), protos @ protos.T == Q_co
    proto_coa = CooccurrenceLoss.from_label_space(ls, source="prototypes", reduction="sum")
    assert proto_coa(protos).item() == pytest.approx(0.0, abs=1e-12)
    assert proto_coa(torch.eye(4, dtype=torch.float64)).item() > 0.1


def test_mean_text_pool_is_the_masked_mean_of_the_word_outputs():
    """text_pool='mean': the text feature is normalize(text_proj(mean of the attended token
    outputs)), checked against a direct float64 computation; 'cls' takes token 0."""
    batch = _batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for pool in ("mean", "cls"):
        model = _model(DPVLPAConfig(embed_dim=8, text_pool=pool)).eval()
        with torch.no_grad():
            feat, _ = model.encode_text(ids, mask)
            _, words = model.qformer.encode_text(ids, mask)
        w = words.double()
        m = mask.double()[..., None]
        pooled = (w * m).sum(1) / m.sum(1) if pool == "mean" else w[:, 0]
        proj = model.text_proj.double()
        expected = torch.nn.functional.normalize(proj(pooled), dim=-1)
        torch.testing.assert_close(feat.double(), expected, rtol=1e-5, atol=1e-6)


def test_a_trainable_tower_is_trained_by_the_losses():
    """A tower that says frozen=False (ImageTower(frozen=False)) gets gradients from phase 1
    and stays in train mode; the default tower stays frozen."""
    tower = TinyTower()
    tower.frozen = False
    torch.manual_seed(0)
    model = DPVLPA(tower, TinyQFormer(), DPVLPAConfig(embed_dim=8))
    model.set_phase("pretrain")
    model.train()
    assert model.image_tower.training
    model.pretrain_loss(_batch())["loss"].backward()
    assert model.image_tower.proj.weight.grad is not None
    assert model.image_tower.proj.weight.grad.abs().sum() > 0
    _assert_tower_frozen(_model().train())
