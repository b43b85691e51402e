"""DP-VLPA wiring with tiny stand-in towers: phase 1 and 2 losses, the frozen tower, class
logits (Eq. 4's DQR-weighted mean over queries by default, the max as a switch), DQR weights
(Eq. 4) and their logged range, and COA (Eq. 5) against direct formulas."""

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


@pytest.mark.parametrize(
    "qcl_form",
    [("sparc", "caption"), ("softmax", "global"), ("linear", "image")],
)
def test_pretrain_loss_forward_backward(qcl_form):
    weighting, negatives = qcl_form
    assert (DPVLPAConfig.qcl_weighting, DPVLPAConfig.qcl_negatives) == ("sparc", "caption")
    cfg = DPVLPAConfig(embed_dim=8, qcl_weighting=weighting, qcl_negatives=negatives)
    model = _model(cfg).train()
    assert (model.qcl.weighting, model.qcl.negatives) == qcl_form
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
    [
        {},
        {"coa_source": "prototypes", "dqr_assign": "hard", "cls_bias_init": -2.0},
        {"coa_source": "predictions", "coa_target": "cosine", "coa_reduction": "mean"},
    ],
)
def test_adapt_loss_forward_backward(overrides):
    cfg = DPVLPAConfig(embed_dim=8, lambda1=0.5, lambda2=2.0, **overrides)
    model = _model(cfg, _label_space()).train()
    g = torch.Generator().manual_seed(1)
    class_ids, class_mask = _tokens(4, g)
    class_embeddings = model.encode_classes(class_ids, class_mask)  # (C, D), with gradient
    assert class_embeddings.shape == (4, 8)
    out = model.adapt_loss(_batch(), class_embeddings)
    assert set(out) == {"loss", "cls", "gcl_dqr", "coa"} | STATS
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


STATS = {f"dqr_w_{g}_{s}" for g in ("head", "medium", "tail") for s in ("min", "mean", "max")}
FREQ, TAIL = [150, 40, 9, 4], [False, False, True, True]  # _label_space()'s classes


def ref_class_weights(q, e, freq, boosted, alpha, tau) -> list:
    """W[b][k][c] = 1 + alpha [c boosted] softmax_k(cos(q_k, E_c) / tau) / sqrt(max(n_c, 1))."""
    out = []
    for b in range(q.shape[0]):
        cos = [[_cos(q[b, k], e[c]) for c in range(e.shape[0])] for k in range(q.shape[1])]
        w = [[1.0] * e.shape[0] for _ in range(q.shape[1])]
        for c in range(e.shape[0]):
            if boosted[c]:
                z = sum(math.exp(cos[k][c] / tau) for k in range(q.shape[1]))
                for k in range(q.shape[1]):
                    w[k][c] += alpha * math.exp(cos[k][c] / tau) / z / math.sqrt(max(freq[c], 1))
        out.append(w)
    return out


def ref_class_scores(q, e, freq, boosted, alpha, tau, mode="weighted_mean") -> np.ndarray:
    """Eq. 4 in float64 loops: sum_k W_kc cos_kc / sum_k W_kc (``mode="max"``: max_k W cos)."""
    weights = ref_class_weights(q, e, freq, boosted, alpha, tau)
    out = np.zeros((q.shape[0], e.shape[0]))
    for b in range(q.shape[0]):
        for c in range(e.shape[0]):
            cos = [_cos(q[b, k], e[c]) for k in range(q.shape[1])]
            w = [weights[b][k][c] for k in range(q.shape[1])]
            if mode == "max":
                out[b, c] = max(wk * ck for wk, ck in zip(w, cos))
            else:
                out[b, c] = sum(wk * ck for wk, ck in zip(w, cos)) / sum(w)
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))


def _q_and_e(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, K, 8, generator=g), torch.randn(4, 8, generator=g)


def test_default_class_logits_are_eq4_weighted_mean_with_label_free_dqr_weights():
    cfg = DPVLPAConfig(embed_dim=8)
    assert (cfg.dqr_mode, cfg.dqr_class_scores, cfg.dqr_alpha) == ("weighted_mean", True, 4.5)
    model = _model(cfg, _label_space())
    q, e = _q_and_e()
    logits = model.class_logits(q, e)
    scale = 1 / model.cls_scale.temperature
    assert scale == pytest.approx(1 / 0.07, rel=1e-5)
    direct = scale * ref_class_scores(q, e, FREQ, TAIL, 4.5, 0.07)
    assert np.allclose(logits.detach().numpy(), direct, atol=1e-4)
    # head and medium classes keep W = 1: their score is the plain mean over queries
    mean = scale * np.array(
        [[np.mean([_cos(q[b, k], e[c]) for k in range(K)]) for c in range(4)] for b in range(3)]
    )
    assert np.allclose(logits[:, :2].detach().numpy(), mean[:, :2], atol=1e-4)
    # a tail class's boosted (most similar) queries count more: above the plain mean
    assert np.all(logits[:, 2:].detach().numpy() > mean[:, 2:] + 1e-3)


@pytest.mark.parametrize("switch", ["no_class_dqr", "pretrain_phase", "max_mode", "dqr_off"])
def test_class_logits_switches_to_the_max(switch):
    cfg = DPVLPAConfig(
        embed_dim=8,
        dqr_class_scores=switch != "no_class_dqr",
        dqr_mode="max" if switch in ("max_mode", "dqr_off") else "weighted_mean",
        dqr_alpha=0.0 if switch == "dqr_off" else 4.5,  # DQR off: W = 1 inside the max
    )
    model = _model(cfg, _label_space())
    if switch == "pretrain_phase":  # zero-shot scores as GCL trained them (Eq. 1)
        model.set_phase("pretrain")
    q, e = _q_and_e()
    logits = model.class_logits(q, e).detach().numpy()
    scale = 1 / model.cls_scale.temperature
    if switch == "max_mode":  # max_k W_kc cos_kc
        direct = scale * ref_class_scores(q, e, FREQ, TAIL, 4.5, 0.07, mode="max")
    else:
        direct = scale * np.array(
            [[max(_cos(q[b, k], e[c]) for k in range(K)) for c in range(4)] for b in range(3)]
        )
    assert np.allclose(logits, direct, atol=1e-4)


def test_inference_scores_are_the_training_scores_and_reweighted():
    """forward (evaluation, export, predict) gives L_CLS's logits: Eq. 4 with the label-free
    weights, no labels involved."""
    cfg = DPVLPAConfig(embed_dim=8, lambda1=0.0, lambda2=0.0, dqr_alpha=3.0)
    model = _model(cfg, _label_space()).eval()
    model.set_phase("adapt")
    batch, e = _batch(), _q_and_e()[1]
    with torch.no_grad():
        logits = model(batch["image"], e)
        queries = model.encode_image(batch["image"])
        out = model.adapt_loss(batch, e)
    scale = 1 / model.cls_scale.temperature
    direct = scale * ref_class_scores(queries, e, FREQ, TAIL, 3.0, 0.07)
    assert np.allclose(logits.numpy(), direct, atol=1e-4)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])
    assert out["cls"].item() == pytest.approx(bce.item(), abs=1e-6)
    # a class outside the label space has n_c = 0: a tail class, boosted as the rarest
    freq, boosted = model.class_prior(["kite", "a zebra", "person", "Toaster"])
    assert freq.tolist() == [9, 0, 150, 4] and boosted.tolist() == [True, True, False, True]
    with torch.no_grad():
        open_vocab = model(batch["image"], e, freq, boosted)
    direct = scale * ref_class_scores(queries, e, [9, 0, 150, 4], boosted.tolist(), 3.0, 0.07)
    assert np.allclose(open_vocab.numpy(), direct, atol=1e-4)


def test_logged_dqr_weight_range_is_the_weights():
    cfg = DPVLPAConfig(embed_dim=8, dqr_classes="all", dqr_temperature=0.5)
    model = _model(cfg, _label_space())
    batch, e = _batch(), _q_and_e()[1]
    with torch.no_grad():
        queries = model.encode_image(batch["image"])
        out = model.adapt_loss(batch, e)
    w = np.array(ref_class_weights(queries, e, FREQ, [True] * 4, 4.5, 0.5))  # (B, K, C)
    for group, ids in (("head", [0]), ("medium", [1]), ("tail", [2, 3])):
        wg = w[:, :, ids]
        for stat, value in (("min", wg.min()), ("mean", wg.mean()), ("max", wg.max())):
            assert out[f"dqr_w_{group}_{stat}"].item() == pytest.approx(value, abs=1e-5)
    # the tail's boost is larger than the head's (1 / sqrt(n_c))
    assert out["dqr_w_tail_max"] > out["dqr_w_medium_max"] > out["dqr_w_head_max"] > 1


@pytest.mark.parametrize("dqr_class_scores", [True, False], ids=["eq4", "max"])
def test_class_logits_are_float32_under_bf16_autocast(dqr_class_scores):
    """The evaluation forward under bf16 autocast: bf16 query features, float32 logits equal
    to the float64 formula on those features to float32 precision (Eq. 4's weighted mean with
    the label-free DQR weights by default, the max over queries with the switch)."""
    cfg = DPVLPAConfig(embed_dim=8, dqr_class_scores=dqr_class_scores)
    model = _model(cfg, _label_space()).eval()
    g = torch.Generator().manual_seed(3)
    images, e = torch.randn(3, N_TOKENS, PATCH, generator=g), torch.randn(4, 8, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q = model.encode_image(images)
        logits = model(images, e.bfloat16())
    assert q.dtype == torch.bfloat16 and logits.dtype == torch.float32
    scale = float(model.cls_scale().detach())
    q64, e64 = q.double(), e.bfloat16().double()
    if dqr_class_scores:
        args = (q64, e64, FREQ, TAIL, cfg.dqr_alpha, cfg.dqr_temperature)
        direct = torch.from_numpy(scale * ref_class_scores(*args))
    else:
        qn, en = (torch.nn.functional.normalize(x, dim=-1) for x in (q64, e64))
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


def test_default_q_co_is_the_symmetrised_conditional_probability():
    """The paper's Q_co holds co-occurrence probabilities: P(j|i) counted over the training
    label sets, symmetrised, is the default target (of the function and of the loss)."""
    ls = _label_space()
    c = 4
    p = np.zeros((c, c))  # P(j|i) = #{images with i and j} / #{images with i}
    for i in range(c):
        with_i = [s for s in TRAIN_SETS if i in s]
        for j in range(c):
            p[i, j] = sum(j in s for s in with_i) / len(with_i)
    assert not np.allclose(p, p.T)  # asymmetric: only its symmetric part is matched
    expected = (p + p.T) / 2
    assert np.allclose(np.diag(expected), 1.0)
    q_co = normalized_cooccurrence(ls.cooccurrence, ls.frequency)
    assert np.allclose(q_co.numpy(), expected, atol=1e-12)
    assert torch.equal(CooccurrenceLoss.from_label_space(ls).q_co, q_co)


def _direct_queries_coa(queries, class_embeddings, q_co, beta, reduction) -> float:
    """Eq. 5 per image with loops: Q_i[c] = the unit query of argmax_k cos(q_k^i, E_c)."""
    queries, e = queries.detach().double().numpy(), class_embeddings.detach().double().numpy()
    b, k, _ = queries.shape
    c = e.shape[0]
    totals = []
    for i in range(b):
        rows = []
        for cls in range(c):
            cos = [
                queries[i, kk] @ e[cls] / (np.linalg.norm(queries[i, kk]) * np.linalg.norm(e[cls]))
                for kk in range(k)
            ]
            best = queries[i, int(np.argmax(cos))]
            rows.append(best / np.linalg.norm(best))
        total = sum((q_co[a, a2] - rows[a] @ rows[a2]) ** 2 for a in range(c) for a2 in range(c))
        totals.append(total if reduction == "sum" else total / c**2)
    return beta * sum(totals) / b  # the squared Frobenius norm, averaged over images


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_coa_queries_matches_direct_formula(reduction):
    ls = _label_space()
    coa = CooccurrenceLoss.from_label_space(ls, beta=0.3, reduction=reduction)
    g = torch.Generator().manual_seed(4)
    queries = torch.randn(5, K, 6, dtype=torch.float64, generator=g, requires_grad=True)
    class_embeddings = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    q_co = _direct_q_co(ls.cooccurrence, "conditional")
    expected = _direct_queries_coa(queries, class_embeddings, q_co, 0.3, reduction)
    loss = coa(queries, class_embeddings)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # the gradient reaches the assigned queries only; the argmax gives E_class none
    loss.backward()
    assert class_embeddings.grad is None
    assert float(queries.grad.abs().sum()) > 0
    assert torch.autograd.gradcheck(lambda q: coa(q, class_embeddings.detach()), (queries,))
    # queries no class picks get no gradient
    cos = torch.nn.functional.normalize(queries, dim=-1) @ class_embeddings.T
    picked = torch.zeros(5, K, dtype=torch.bool)
    picked.scatter_(1, cos.argmax(1), True)
    assert not picked.all() and torch.all(queries.grad[~picked] == 0)


def test_coa_queries_run_in_float32_under_autocast():
    ls = _label_space()
    coa = CooccurrenceLoss.from_label_space(ls)
    g = torch.Generator().manual_seed(6)
    queries, class_embeddings = torch.randn(3, K, 6, generator=g), torch.randn(4, 6, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = coa(queries.bfloat16(), class_embeddings)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(coa(queries.bfloat16().float(), class_embeddings).item())


def test_coa_defaults_are_the_paper_form():
    """The loss and the config default to Eq. 5 over the visual queries; adapt_loss's COA is
    the direct formula on the model's own query features and class embeddings."""
    ls = _label_space()
    coa = CooccurrenceLoss.from_label_space(ls)
    assert (coa.source, coa.reduction, coa.beta) == ("queries", "sum", 1.0)
    cfg = DPVLPAConfig(embed_dim=8, lambda1=0.0, lambda2=2.0, beta=0.5)
    assert (cfg.coa_source, cfg.coa_target, cfg.coa_reduction) == ("queries", "conditional", "sum")
    model = _model(cfg, ls).train()
    g = torch.Generator().manual_seed(1)
    class_embeddings = model.encode_classes(*_tokens(4, g))
    batch = _batch()
    out = model.adapt_loss(batch, class_embeddings)
    with torch.no_grad():
        queries = model.encode_image(batch["image"])
    q_co = _direct_q_co(ls.cooccurrence, "conditional")
    expected = _direct_queries_coa(queries, class_embeddings, q_co, 0.5, "sum")
    assert out["coa"].item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(out["loss"], out["cls"] + 2.0 * out["coa"])


def test_coa_beta_defaults_to_one_over_c_squared():
    """The paper gives no beta: by default the per-image sum over the C^2 entries is divided by
    C^2 (it starts at the scale of L_CLS); a configured beta is taken as it is."""
    ls = _label_space()
    c = len(ls.names)
    assert DPVLPAConfig().beta is None
    assert _model(DPVLPAConfig(embed_dim=8), ls).coa.beta == pytest.approx(1 / c**2)
    assert _model(DPVLPAConfig(embed_dim=8, beta=0.5), ls).coa.beta == 0.5


def test_coa_queries_per_rank_share_is_the_global_mean(monkeypatch):
    """No process group: the count gather is faked for a 2-rank world with unequal local
    batches (3 and 4 images). The mean over ranks of the loss and of the gradients (what DDP
    reports and applies) equals the 1-process loss and gradient on all 7 images."""
    import ltdist.losses.coa as coa_module

    ls = _label_space()
    g = torch.Generator().manual_seed(5)
    data = torch.randn(7, K, 6, dtype=torch.float64, generator=g)
    class_embeddings = torch.randn(4, 6, dtype=torch.float64, generator=g)
    coa = CooccurrenceLoss.from_label_space(ls, beta=0.7)

    def run(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        queries = data.clone().requires_grad_()  # a replicated leaf, like a parameter
        loss = coa(queries[rows], class_embeddings)
        loss.backward()
        return loss.detach(), queries.grad

    ref_loss, ref_grad = run(slice(None))
    splits = [slice(0, 3), slice(3, 7)]
    losses, grads = [], []
    for rank, rows in enumerate(splits):

        def fake_gather(x, group=None, check_shapes=True, rank=rank, n=rows.stop - rows.start):
            assert x.shape == (1,) and int(x) == n
            return torch.tensor([3.0, 4.0], dtype=x.dtype), rank, 2

        monkeypatch.setattr(coa_module, "gather_with_grad", fake_gather)
        loss, grad = run(rows)
        losses.append(loss)
        grads.append(grad)
    assert (sum(losses) / 2).item() == pytest.approx(ref_loss.item(), abs=1e-12)
    assert torch.allclose((grads[0] + grads[1]) / 2, ref_grad, rtol=0, atol=1e-12)
    # a plain local mean would not be the global mean with unequal batches
    monkeypatch.undo()
    local = [coa(data[r], class_embeddings).item() for r in splits]
    assert (local[0] + local[1]) / 2 != pytest.approx(ref_loss.item(), abs=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_coa_predictions_matches_direct_formula(reduction):
    """Today's batch-column reading, unchanged: source 'predictions' with the cosine target."""
    ls = _label_space()
    coa = CooccurrenceLoss.from_label_space(
        ls, beta=0.3, source="predictions", target="cosine", reduction=reduction
    )
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
    coa = CooccurrenceLoss.from_label_space(
        ls, source="predictions", target="cosine", activation="none", reduction="sum"
    )
    assert coa(labels).item() == pytest.approx(0.0, abs=1e-12)
    assert coa(labels.flip(1)).item() > 0.01
    # prototypes whose Gram matrix is Q_co (a square root of the PSD Q_co)
    q_co = normalized_cooccurrence(ls.cooccurrence, target="cosine")
    vals, vecs = torch.linalg.eigh(q_co)
    protos = vecs * vals.clamp_min(0).sqrt()  # (C, C), protos @ protos.T == Q_co
    proto_coa = CooccurrenceLoss.from_label_space(
        ls, source="prototypes", target="cosine", reduction="sum"
    )
    assert proto_coa(protos).item() == pytest.approx(0.0, abs=1e-12)
    assert proto_coa(torch.eye(4, dtype=torch.float64)).item() > 0.1
    # queries: one per class whose Gram matrix is Q_co, each nearest its own class embedding
    query_coa = CooccurrenceLoss.from_label_space(ls, target="cosine")
    queries = protos / protos.norm(dim=-1, keepdim=True)
    assert query_coa(queries[None], queries).item() == pytest.approx(0.0, abs=1e-12)


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
