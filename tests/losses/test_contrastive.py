"""GCL (Eq. 1), DQR-weighted GCL (Eq. 4), the DQR weights and QCL (Eq. 2-3): against direct
float64 loops, a hand-worked case, and 2 real gloo processes against 1 process on the same
global batch."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ltdist.distributed import gather_with_grad, rank_and_world
from ltdist.losses.coa import CooccurrenceLoss
from ltdist.losses.contrastive import (
    DQR_ALPHA,
    GlobalContrastiveLoss,
    QueryContrastiveLoss,
    class_dqr_weights,
    dqr_weights,
)

# -- direct implementations (float64, loops over pairs) ---------------------------------------


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / max(math.sqrt(float((v * v).sum())), 1e-12)  # F.normalize's eps


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum()) / math.sqrt(float((a * a).sum()) * float((b * b).sum()))


def _infonce_rows(sim: list[list[float]], scale: float) -> float:
    """Mean over rows a of -log softmax(scale * sim[a])[a]."""
    total = 0.0
    for a, row in enumerate(sim):
        total += -scale * row[a] + math.log(sum(math.exp(scale * s) for s in row))
    return total / len(sim)


def ref_gcl(q, t, scale, w=None, mode="weighted_mean") -> float:
    """Eq. 1 (w None: max over queries) or Eq. 4: sum_k W s_k / sum_k W (or max_k W s_k)."""
    n, k = q.shape[:2]

    def sim(i, j):
        cos = [_cos(q[i, kk], t[j]) for kk in range(k)]
        if w is None:
            return max(cos)
        weights = [float(w[i, kk]) for kk in range(k)]
        if mode == "max":
            return max(wk * c for wk, c in zip(weights, cos))
        return sum(wk * c for wk, c in zip(weights, cos)) / sum(weights)

    s = [[sim(i, j) for j in range(n)] for i in range(n)]
    s_t = [[s[i][j] for i in range(n)] for j in range(n)]
    return (_infonce_rows(s, scale) + _infonce_rows(s_t, scale)) / 2


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def ref_sparc_weights(cos: list[float]) -> list[float]:
    """SPARC: min-max normalise over the queries, drop values below 1/K, renormalise."""
    lo, hi = min(cos), max(cos)
    if hi == lo:
        return [1 / len(cos)] * len(cos)
    scaled = [(c - lo) / (hi - lo) for c in cos]
    kept = [s if s >= 1 / len(cos) else 0.0 for s in scaled]
    return [s / sum(kept) for s in kept]


def ref_softmax_weights(weight_scale: float):
    def weights(cos: list[float]) -> list[float]:
        e = [math.exp(weight_scale * c) for c in cos]
        return [x / sum(e) for x in e]

    return weights


def ref_linear_weights(cos: list[float]) -> list[float]:
    pos = [max(c, 0.0) for c in cos]
    return [p / max(sum(pos), 1e-12) for p in pos]  # all cosines < 0: no guided query


def _ref_captions(q, words, mask, weights) -> list[list[tuple]]:
    """Per caption, its valid words as (unit word t_j^i, unit text-guided query q_j^i)."""
    captions = []
    for i in range(q.shape[0]):
        queries = [_unit(q[i, kk]) for kk in range(q.shape[1])]
        items = []
        for j in range(words.shape[1]):
            if mask[i, j]:
                t = _unit(words[i, j])
                w = weights([_dot(t, qk) for qk in queries])  # Eq. 2
                items.append((t, _unit(sum(wk * qk for wk, qk in zip(w, queries)))))
        captions.append(items)
    return captions


def _ref_infonce_pair(t, g, cols, scale) -> float:
    """(word -> guided query + guided query -> word) / 2 for one word against ``cols``."""
    w2q = -scale * _dot(t, g) + math.log(sum(math.exp(scale * _dot(t, gb)) for _, gb in cols))
    q2w = -scale * _dot(g, t) + math.log(sum(math.exp(scale * _dot(g, tb)) for tb, _ in cols))
    return (w2q + q2w) / 2


def ref_qcl(q, words, mask, scale, weights, same_image_only=False) -> float:
    """Eq. 3 with batch negatives: mean over every valid word of the batch."""
    captions = _ref_captions(q, words, mask, weights)
    everything = [item for items in captions for item in items]
    terms = [
        _ref_infonce_pair(t, g, items if same_image_only else everything, scale)
        for items in captions
        for t, g in items
    ]
    return sum(terms) / len(terms)


def ref_qcl_caption(q, words, mask, scale, weights) -> float:
    """SPARC's fine-grained loss: negatives are the caption's other words; mean over the
    caption's words, then over the captions that have a word."""
    means = []
    for items in _ref_captions(q, words, mask, weights):
        if items:
            means.append(sum(_ref_infonce_pair(t, g, items, scale) for t, g in items) / len(items))
    return sum(means) / len(means)


def _features(seed=0, n=6, k=3, d=8, t=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, k, d, generator=g, dtype=torch.float64)
    txt = torch.randn(n, d, generator=g, dtype=torch.float64)
    words = torch.randn(n, t, d, generator=g, dtype=torch.float64)
    mask = torch.rand(n, t, generator=g) < 0.7
    mask[:, 0] = True
    return q, txt, words, mask


# -- single-process checks ------------------------------------------------------------------


def test_gcl_matches_direct_loops():
    q, txt, _, _ = _features()
    gcl = GlobalContrastiveLoss(init_temperature=0.1).double()
    scale = 1 / gcl.logit_scale.temperature
    loss, (i2t, t2i) = gcl(q, txt, return_logits=True)
    assert i2t.shape == t2i.shape == (6, 6)
    assert loss.item() == pytest.approx(ref_gcl(q, txt, scale), abs=1e-10)


@pytest.mark.parametrize("mode", ["weighted_mean", "max"])
def test_dqr_gcl_matches_direct_loops(mode):
    q, txt, _, _ = _features(seed=1)
    w = 1 + torch.rand(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gcl = GlobalContrastiveLoss(init_temperature=0.2, dqr_mode=mode).double()
    scale = 1 / gcl.logit_scale.temperature
    assert gcl(q, txt, query_weights=w).item() == pytest.approx(
        ref_gcl(q, txt, scale, w, mode), abs=1e-10
    )
    ones = torch.ones(6, 3, dtype=torch.float64)
    if mode == "max":  # W = 1 is Eq. 1 itself
        assert gcl(q, txt, query_weights=ones).item() == pytest.approx(
            gcl(q, txt).item(), abs=1e-12
        )
    else:  # Eq. 4 is a weighted average: W = 1 is the mean over queries, c W is W
        assert gcl(q, txt, query_weights=ones).item() == pytest.approx(
            ref_gcl(q, txt, scale, ones), abs=1e-10
        )
        assert gcl(q, txt, query_weights=3 * w).item() == pytest.approx(
            gcl(q, txt, query_weights=w).item(), abs=1e-12
        )


def test_dqr_gcl_default_is_eq4_weighted_mean():
    q, txt, _, _ = _features(seed=7)
    w = 1 + torch.rand(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    gcl = GlobalContrastiveLoss(init_temperature=0.2).double()
    assert gcl.dqr_mode == "weighted_mean"
    scale = 1 / gcl.logit_scale.temperature
    loss = gcl(q, txt, query_weights=w).item()
    assert loss == pytest.approx(ref_gcl(q, txt, scale, w, "weighted_mean"), abs=1e-10)
    assert loss != pytest.approx(ref_gcl(q, txt, scale, w, "max"), abs=1e-4)
    with pytest.raises(ValueError, match="'mean'"):
        GlobalContrastiveLoss(dqr_mode="mean")


def test_gcl_hand_worked_2x2():
    # image 1 queries (1,0),(0.6,0.8); image 2 queries (0,1),(0,-1); texts (1,0),(0,1); tau = 1
    q = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.0, -1.0]]], dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # s = [[max(1, .6), max(0, .8)], [max(0, 0), max(1, -1)]] = [[1, .8], [0, 1]]
    # i2t rows: log(1 + e^-0.2), log(1 + e^-1); t2i rows (columns of s): log(1 + e^-1),
    # log(1 + e^-0.2): the loss is the mean of the two distinct terms.
    expected = (math.log(1 + math.exp(-0.2)) + math.log(1 + math.exp(-1.0))) / 2
    gcl = GlobalContrastiveLoss(init_temperature=1.0, learn_temperature=False).double()
    loss, (i2t, _) = gcl(q, txt, return_logits=True)
    assert i2t.flatten().tolist() == pytest.approx([1.0, 0.8, 0.0, 1.0])
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.45570, abs=1e-5)


def _ref_weights(weighting: str, weight_scale: float):
    return {
        "sparc": ref_sparc_weights,
        "softmax": ref_softmax_weights(weight_scale),
        "linear": ref_linear_weights,
    }[weighting]


@pytest.mark.parametrize("weighting", ["sparc", "softmax", "linear"])
@pytest.mark.parametrize("negatives", ["caption", "global", "image"])
def test_qcl_matches_direct_loops(weighting, negatives):
    q, _, words, mask = _features(seed=3)
    qcl = QueryContrastiveLoss(
        init_temperature=0.1, weight_temperature=0.5, weighting=weighting, negatives=negatives
    ).double()
    scale, wscale = 1 / qcl.logit_scale.temperature, 1 / qcl.weight_scale.temperature
    leaves = q.clone().requires_grad_(), words.clone().requires_grad_()
    loss, (w2q, q2w) = qcl(*leaves, mask, return_logits=True)
    columns = words.shape[1] if negatives == "caption" else mask.numel()
    assert w2q.shape == q2w.shape == (int(mask.sum()), columns)
    weights = _ref_weights(weighting, wscale)
    if negatives == "caption":
        expected = ref_qcl_caption(q, words, mask, scale, weights)
    else:
        expected = ref_qcl(q, words, mask, scale, weights, same_image_only=negatives == "image")
    assert loss.item() == pytest.approx(expected, abs=1e-10)
    loss.backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all() and float(leaf.grad.abs().sum()) > 0


def test_qcl_default_is_sparc():
    qcl = QueryContrastiveLoss(init_temperature=0.1).double()
    assert (qcl.weighting, qcl.negatives) == ("sparc", "caption")
    q, _, words, mask = _features(seed=7)
    scale = 1 / qcl.logit_scale.temperature
    expected = ref_qcl_caption(q, words, mask, scale, ref_sparc_weights)
    assert qcl(q, words, mask).item() == pytest.approx(expected, abs=1e-10)


def test_sparc_weights_hand_worked():
    qcl = QueryContrastiveLoss()
    # s' = (1, 0.5, 0, 0.375); 1/K = 0.25 drops the third; renormalised by 1.875
    cos = torch.tensor([[0.9, 0.5, 0.1, 0.4]], dtype=torch.float64)
    assert qcl.query_weights(cos)[0].tolist() == pytest.approx([8 / 15, 4 / 15, 0.0, 3 / 15])
    # max == min (all queries equally similar, or K = 1): uniform weights
    assert qcl.query_weights(torch.full((1, 4), 0.3))[0].tolist() == [0.25] * 4
    assert qcl.query_weights(torch.tensor([[-0.2]]))[0].tolist() == [1.0]


def test_qcl_caption_edge_cases():
    """A caption whose queries are all the same (max == min for every word): uniform weights,
    finite gradients. A one-word caption: term log 1 = 0, still counted. A caption without
    words: not counted. No word at all: loss 0."""
    q, _, words, mask = _features(seed=8)
    q[1] = q[1, :1]  # image 1: K identical queries
    mask[2] = False
    mask[2, 3] = True  # caption 2: one word
    mask[4] = False  # caption 4: no word
    qcl = QueryContrastiveLoss(init_temperature=0.1).double()
    leaves = q.clone().requires_grad_(), words.clone().requires_grad_()
    loss = qcl(*leaves, mask)
    scale = 1 / qcl.logit_scale.temperature
    expected = ref_qcl_caption(q, words, mask, scale, ref_sparc_weights)
    assert loss.item() == pytest.approx(expected, abs=1e-10)
    # the one-word caption adds 0 to the sum over the 5 captions with words
    alone = mask.clone()
    alone[2] = False
    assert loss.item() == pytest.approx(qcl(q, words, alone).item() * 4 / 5, abs=1e-12)
    loss.backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    assert float(leaves[1].grad[2].abs().sum()) == 0.0  # no negative, no gradient
    empty = qcl(*leaves, torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad


def test_qcl_refuses_learnable_weight_temperature_without_softmax():
    with pytest.raises(ValueError, match="learn_weight_temperature needs weighting='softmax'"):
        QueryContrastiveLoss(learn_weight_temperature=True)
    assert QueryContrastiveLoss(learn_weight_temperature=True, weighting="softmax")


def test_qcl_ignores_padding_content():
    q, _, words, mask = _features(seed=4)
    qcl = QueryContrastiveLoss().double()
    other = words.clone()
    other[~mask] = 1e3 * torch.randn(int((~mask).sum()), words.shape[-1], dtype=torch.float64)
    assert qcl(q, words, mask).item() == pytest.approx(qcl(q, other, mask).item(), abs=1e-12)


def test_temperatures_are_learnable():
    q, txt, words, mask = _features(seed=5)
    gcl, qcl = GlobalContrastiveLoss(), QueryContrastiveLoss()
    assert gcl.logit_scale.temperature == pytest.approx(0.07)
    (gcl(q.float(), txt.float()) + qcl(q.float(), words.float(), mask)).backward()
    for module in (gcl, qcl):
        grad = module.logit_scale.log_scale.grad
        assert grad is not None and torch.isfinite(grad) and float(grad.abs()) > 0
    frozen = GlobalContrastiveLoss(learn_temperature=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_losses_run_in_float32_under_autocast():
    q, txt, words, mask = (x.float() if x.is_floating_point() else x for x in _features(seed=6))
    gcl, qcl = GlobalContrastiveLoss(), QueryContrastiveLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g_loss, (i2t, _) = gcl(q, txt, return_logits=True)
        q_loss, (w2q, _) = qcl(q, words, mask, return_logits=True)
    assert i2t.dtype == w2q.dtype == torch.float32
    assert g_loss.item() == pytest.approx(gcl(q, txt).item(), abs=1e-6)
    assert q_loss.item() == pytest.approx(qcl(q, words, mask).item(), abs=1e-6)


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 2)
    out, rank, world = gather_with_grad(x)
    assert out is x and (rank, world) == (0, 1) == rank_and_world()


def test_dqr_weights_scale_with_inverse_sqrt_frequency():
    # one image, two queries; class 0 (n=4) correlates with query 1
    sim = torch.tensor([[[0.1], [0.9]]], dtype=torch.float64)  # (1, K=2, C=1)
    w = dqr_weights(sim, torch.ones(1, 1), torch.tensor([4.0]), alpha=1.0, assign="hard")
    assert w.flatten().tolist() == pytest.approx([1.0, 1.5])
    # the default strength: 1 + 4.5 / sqrt(4)
    w = dqr_weights(sim, torch.ones(1, 1), torch.tensor([4.0]), assign="hard")
    assert w.flatten().tolist() == pytest.approx([1.0, 3.25])


def ref_dqr_weights(sim, targets, freq, boosted, alpha, tau) -> torch.Tensor:
    """Eq. 4's W_ik (targets given) or the label-free W_ikc (targets None), float64 loops."""
    b, k, c = sim.shape
    out = torch.ones(b, k, c, dtype=torch.float64)
    for i in range(b):
        for cc in range(c):
            if not boosted[cc]:
                continue
            e = [math.exp(float(sim[i, kk, cc]) / tau) for kk in range(k)]
            for kk in range(k):
                out[i, kk, cc] += alpha * (e[kk] / sum(e)) / math.sqrt(max(float(freq[cc]), 1))
    if targets is None:
        return out
    return 1 + ((out - 1) * targets[:, None, :].double()).sum(-1)


def test_dqr_weights_match_direct_formula():
    g = torch.Generator().manual_seed(11)
    sim = 2 * torch.rand(5, 3, 4, generator=g, dtype=torch.float64) - 1  # (B, K, C) cosines
    targets = (torch.rand(5, 4, generator=g) < 0.5).float()
    freq, boosted = torch.tensor([150.0, 40, 9, 0]), torch.tensor([False, False, True, True])
    w = dqr_weights(sim, targets, freq, boosted, alpha=2.5, temperature=0.2)
    assert torch.allclose(w, ref_dqr_weights(sim, targets, freq, boosted, 2.5, 0.2), atol=1e-12)
    wc = class_dqr_weights(sim, freq, boosted, alpha=2.5, temperature=0.2)
    assert torch.allclose(wc, ref_dqr_weights(sim, None, freq, boosted, 2.5, 0.2), atol=1e-12)
    # an image whose only tail positive is class c: its training W_ik is W_ikc
    one = torch.zeros(5, 4)
    one[:, 2] = 1
    assert torch.allclose(
        dqr_weights(sim, one, freq, boosted), class_dqr_weights(sim, freq, boosted)[..., 2]
    )


def test_default_strength_makes_every_tail_query_weigh_at_least_twice_a_head_query():
    """'significantly higher': a fully assigned query of a class with n_c < 20 gets W >= 2."""
    assert 1 + DQR_ALPHA / math.sqrt(19) >= 2 > 1 + (DQR_ALPHA - 0.5) / math.sqrt(19)


# -- 2 real processes (gloo on 127.0.0.1) vs 1 process --------------------------------------

WORLD = 2
B, K, D, T, C = 8, 3, 6, 5, 4
# qcl_sparc*: QCL's default (SPARC weights, per-caption negatives); qcl*: softmax weights
# with batch negatives
CASES = (
    "gcl",
    "gcl_dqr",
    "qcl",
    "qcl_image",
    "qcl_empty_rank",
    "qcl_sparc",
    "qcl_sparc_empty_rank",
    "coa",
    "coa_queries",
)


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[B // 2 :, 2:] = False  # rank 1 has fewer valid words than rank 0
    mask[:, 0] = True
    empty = mask.clone()
    empty[B // 2 :] = False  # rank 1 has no valid word at all
    return {
        "q": torch.randn(B, K, D, generator=g, dtype=torch.float64),
        "t": torch.randn(B, D, generator=g, dtype=torch.float64),
        "w": 1 + torch.rand(B, K, generator=g, dtype=torch.float64),
        "words": torch.randn(B, T, D, generator=g, dtype=torch.float64),
        "mask": mask,
        "empty": empty,
        "logits": torch.randn(B, C, generator=g, dtype=torch.float64),
        "co": torch.tensor([[5, 2, 0, 1], [2, 4, 1, 0], [0, 1, 3, 1], [1, 0, 1, 2]]),
        "e": torch.randn(C, D, generator=g, dtype=torch.float64),  # class embeddings
    }


def _run_case(name: str, data: dict, rank: int, world: int) -> dict:
    """This rank's share of the global batch through one loss: loss, gradients, logit shapes.

    The global inputs are leaves replicated on every rank (like parameters under DDP); each
    rank feeds its rows. After backward, averaging the leaves' gradients over ranks is what
    DDP does, and must give the 1-process gradient.
    """
    b = B // world
    rows = slice(rank * b, (rank + 1) * b)
    leaves = {k: data[k].clone().requires_grad_() for k in ("q", "t", "words", "logits")}
    q, t, words = leaves["q"], leaves["t"], leaves["words"]
    logits = ()
    if name.startswith("gcl"):
        module = GlobalContrastiveLoss(init_temperature=0.1).double()
        weights = data["w"][rows] if name == "gcl_dqr" else None
        loss, logits = module(q[rows], t[rows], query_weights=weights, return_logits=True)
    elif name.startswith("qcl"):
        form = {"weighting": "softmax", "negatives": "image" if name == "qcl_image" else "global"}
        form = {} if "sparc" in name else form
        module = QueryContrastiveLoss(init_temperature=0.1, **form).double()
        mask = data["empty" if "empty" in name else "mask"][rows]
        loss, logits = module(q[rows], words[rows], mask, return_logits=True)
    elif name == "coa":  # batch columns of the predictions, gathered
        module = CooccurrenceLoss(
            data["co"], beta=0.5, source="predictions", target="cosine", reduction="sum"
        )
        loss = module(leaves["logits"][rows])
    else:  # the paper's per-image form: no gather, normalised by the global image count
        module = CooccurrenceLoss(data["co"], beta=0.5)
        loss = module(q[rows], data["e"])
    loss.backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}
    for n, p in module.named_parameters():
        grads[n] = p.grad.clone()
    return {"loss": loss.detach(), "grads": grads, "shapes": [tuple(x.shape) for x in logits]}


def _expected_shapes(name: str, data: dict, rank: int, world: int) -> list[tuple]:
    b = B // world
    if name.startswith("gcl"):
        return [(b, B), (b, B)]
    if name.startswith("qcl"):
        mask = data["empty" if "empty" in name else "mask"][rank * b : (rank + 1) * b]
        return [(int(mask.sum()), T if "sparc" in name else B * T)] * 2
    return []


def _worker(rank: int, world: int, port: int, out_dir: str, reference: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        assert dist.get_world_size() == 2 and rank_and_world() == (rank, 2)
        data = _global_batch()
        results = {}
        for name in CASES:
            out = _run_case(name, data, rank, world)
            assert out["shapes"] == _expected_shapes(name, data, rank, world), name
            # what DDP reports and applies: the mean over ranks
            loss = out["loss"].clone()
            dist.all_reduce(loss)
            grads = {}
            for key, g in out["grads"].items():
                g = g.clone()
                dist.all_reduce(g)
                grads[key] = g / world
            results[name] = {"loss": loss / world, "grads": grads, "shapes": out["shapes"]}
            ref = reference[name]
            assert torch.allclose(results[name]["loss"], ref["loss"], rtol=0, atol=1e-6), name
            for key, g in grads.items():
                assert torch.allclose(g, ref["grads"][key], rtol=0, atol=1e-6), (name, key)
        # unequal local batches are refused on every rank, with a message saying what to do
        try:
            gather_with_grad(torch.zeros(3 + rank, 2))
        except ValueError as e:
            assert "same per-process batch size" in str(e)
            results["unequal_refused"] = True
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    data = _global_batch()
    reference = {name: _run_case(name, data, rank=0, world=1) for name in CASES}
    # the reference runs see the whole batch: B rows, every valid word
    assert reference["gcl"]["shapes"] == [(B, B), (B, B)]
    assert reference["qcl"]["shapes"] == [(int(data["mask"].sum()), B * T)] * 2
    for name in CASES:
        ref = reference[name]
        assert torch.isfinite(ref["loss"]) and float(ref["loss"]) > 0, name
        assert float(ref["grads"]["logits" if name == "coa" else "q"].abs().sum()) > 0, name
    ref_only = {n: {"loss": r["loss"], "grads": r["grads"]} for n, r in reference.items()}
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path), ref_only), nprocs=WORLD)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(results) == {*CASES, "unequal_refused"}
        for name in CASES:
            got, ref = results[name], reference[name]
            assert got["shapes"] == _expected_shapes(name, data, rank, WORLD)
            assert torch.allclose(got["loss"], ref["loss"], rtol=0, atol=1e-6), name
            for key, g in ref["grads"].items():
                assert torch.allclose(got["grads"][key], g, rtol=0, atol=1e-6), (name, key)
