"""The CPRFL head (PI, VSI, dual-path logits), the token backbones and the linear head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ltdist.config import from_dict
from ltdist.models.cprfl import (
    CPRFLConfig,
    CPRFLHead,
    random_class_embeddings,
    word_vector_embeddings,
)
from ltdist.models.heads import LinearHead

# 80 classes, token_dim 2048, T = 1024 (CLIP RN50 text), the official sizes:
# PI 1024*1024+1024 + 1024*2048+2048 = 3,148,800; VSI 2 LayerNorms 8,192 + q/k/v 2048*12288
# + out 4096*2048+2048 + MLP 2*(2048*2048)+2048+2048 = 41,957,376.
CPRFL_COCO_HEAD_PARAMS = 45_106_176

TINY = CPRFLConfig(heads=2, head_dim=8, mlp_dim=24, dropout=0.0)


def tiny_head(residual: bool = False, dtype=torch.float64, seed: int = 0) -> CPRFLHead:
    torch.manual_seed(seed)
    cfg = CPRFLConfig(**{**TINY.__dict__, "residual": residual})
    return CPRFLHead(torch.randn(5, 12), token_dim=16, config=cfg).to(dtype).eval()


def test_base_head_param_count_and_step():
    torch.manual_seed(0)
    head = CPRFLHead(torch.randn(80, 1024), token_dim=2048)
    count = sum(p.numel() for p in head.parameters())
    print(f"CPRFL head parameters (C=80, D=2048, T=1024): {count:,}")
    assert count == CPRFL_COCO_HEAD_PARAMS
    assert head.prompt_init.fc1.out_features == 1024  # hidden = 0.5 x 2048
    assert head.vsi.to_q.out_features == 8 * 512
    head.train()
    logits = head(torch.randn(2, 196, 2048))
    assert logits.shape == (2, 80)
    logits.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    assert "class_embeddings" in dict(head.named_buffers())


def test_prompts_get_gradient_by_both_paths():
    head = tiny_head()
    visual = torch.randn(3, 7, 16, dtype=torch.float64)
    weights = torch.randn(3, 5, dtype=torch.float64)  # a generic linear function of the logits

    def grad(detach_vsi: bool, detach_direct: bool) -> torch.Tensor:
        prompts = head.prompts().detach().requires_grad_()
        refined = head.refine(visual, prompts)
        refined = refined.detach() if detach_vsi else refined
        direct = prompts.detach() if detach_direct else prompts
        (head.score(refined, direct) * weights).sum().backward()
        return prompts.grad

    full = grad(False, False)
    via_direct = grad(detach_vsi=True, detach_direct=False)
    via_vsi = grad(detach_vsi=False, detach_direct=True)
    assert via_direct.abs().sum() > 0 and via_vsi.abs().sum() > 0
    assert not torch.allclose(via_direct, via_vsi)
    torch.testing.assert_close(via_direct + via_vsi, full, atol=1e-5, rtol=0)
    # and the prompt network itself is reached from the logits
    head(visual).sum().backward()
    assert head.prompt_init.fc1.weight.grad.abs().sum() > 0


def test_detach_prompts_blocks_one_path_of_eq6():
    # prompt_net none: the prompts are the class embeddings, so their gradient is readable
    torch.manual_seed(0)
    visual = torch.randn(3, 7, 16, dtype=torch.float64)
    weights = torch.randn(3, 5, dtype=torch.float64)  # a generic linear function of the logits
    emb = torch.randn(5, 16, dtype=torch.float64)

    def grad(block: str) -> torch.Tensor:
        cfg = CPRFLConfig(**{**TINY.__dict__, "prompt_net": "none", "detach_prompts": block})
        torch.manual_seed(1)  # the same VSI weights for every setting
        head = CPRFLHead(emb, token_dim=16, config=cfg).double().eval()
        prompts = emb.clone().requires_grad_()
        (head(visual, class_embeddings=prompts) * weights).sum().backward()
        return prompts.grad, head.refine(visual, emb)

    full, refined = grad("none")
    direct_only, _ = grad("vsi")
    vsi_only, _ = grad("direct")
    # d/dp_c sum_b w_bc (p'_bc . p_c) with p' held fixed = sum_b w_bc p'_bc (Eq. 6, direct path)
    direct = torch.einsum("bc,bcd->cd", weights, refined)
    torch.testing.assert_close(direct_only, direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vsi_only, full - direct, rtol=1e-10, atol=1e-12)
    assert vsi_only.abs().sum() > 0 and direct.abs().sum() > 0
    # with the PI network in front, the two blocked gradients still add up to the full one
    grads = {}
    for block in ("none", "vsi", "direct"):
        cfg = CPRFLConfig(**{**TINY.__dict__, "detach_prompts": block})
        torch.manual_seed(2)
        head = CPRFLHead(torch.randn(5, 12), token_dim=16, config=cfg).double().eval()
        (head(visual) * weights).sum().backward()
        grads[block] = head.prompt_init.fc2.weight.grad
    torch.testing.assert_close(grads["vsi"] + grads["direct"], grads["none"], rtol=0, atol=1e-10)


def test_prompt_network_ablations():
    torch.manual_seed(0)
    emb = torch.randn(5, 12, dtype=torch.float64)
    linear = CPRFLHead(emb, 16, CPRFLConfig(**{**TINY.__dict__, "prompt_net": "linear"})).double()
    assert sum(p.numel() for p in linear.prompt_init.parameters()) == 12 * 16 + 16
    fc = linear.prompt_init.fc
    torch.testing.assert_close(linear.prompts(), emb @ fc.weight.T + fc.bias)  # one Linear
    square = torch.randn(5, 16, dtype=torch.float64)
    none = CPRFLHead(square, 16, CPRFLConfig(**{**TINY.__dict__, "prompt_net": "none"})).double()
    assert list(none.prompt_init.parameters()) == []
    torch.testing.assert_close(none.prompts(), square)  # the embeddings themselves
    assert none(torch.randn(2, 7, 16, dtype=torch.float64)).shape == (2, 5)
    with pytest.raises(ValueError, match=r"prompt_net=none.*model.backbone.proj_dim=12"):
        CPRFLHead(emb, 16, CPRFLConfig(**{**TINY.__dict__, "prompt_net": "none"}))


def full_attention_reference(head: CPRFLHead, visual, prompts, residual: bool):
    """The encoder layer written the long way: full self-attention over [visual; prompts],
    every position updated, then the visual outputs discarded."""
    vsi = head.vsi
    B, N, _ = visual.shape
    seq = torch.cat([visual, prompts.expand(B, -1, -1)], dim=1)  # (B, N + C, D)
    x = vsi.norm1(seq)
    q = vsi.to_q(x)
    k, v = vsi.to_kv(x).chunk(2, dim=-1)
    q, k, v = (t.unflatten(-1, (vsi.heads, -1)).transpose(1, 2) for t in (q, k, v))
    attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
    a = vsi.to_out(attn.transpose(1, 2).flatten(2))
    if residual:
        a = a + seq
    out = vsi.mlp(vsi.norm2(a))
    if residual:
        out = out + a
    return out[:, N:]


def test_only_prompt_positions_and_equivalence_to_full_attention():
    head = tiny_head()
    visual = torch.randn(2, 7, 16, dtype=torch.float64)
    prompts = head.prompts()
    refined = head.refine(visual, prompts)
    assert refined.shape == (2, 5, 16)  # (B, C, D): no visual outputs

    changed = visual.clone()
    changed[:, 3] += torch.randn(16, dtype=torch.float64)  # not a constant: LayerNorm
    assert not torch.allclose(head(changed), head(visual))
    torch.testing.assert_close(full_attention_reference(head, visual, prompts, False), refined)


def test_logits_are_dot_products_with_own_prompt():
    head = tiny_head()
    visual = torch.randn(2, 7, 16, dtype=torch.float64)
    prompts = head.prompts()
    refined = head.refine(visual, prompts)
    expected = torch.einsum("bcd,cd->bc", refined, prompts)
    torch.testing.assert_close(head(visual), expected)


def test_residual_switch_changes_outputs():
    plain, residual = tiny_head(residual=False), tiny_head(residual=True)
    residual.load_state_dict(plain.state_dict())  # same weights, only the wiring differs
    visual = torch.randn(2, 7, 16, dtype=torch.float64)
    assert not torch.allclose(plain(visual), residual(visual))
    prompts = residual.prompts()
    torch.testing.assert_close(
        residual.refine(visual, prompts), full_attention_reference(residual, visual, prompts, True)
    )


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    head = CPRFLHead(
        torch.randn(5, 12), 16, CPRFLConfig(heads=2, head_dim=8, mlp_dim=24, dropout=0.5)
    )
    visual = torch.randn(2, 7, 16)
    head.eval()
    torch.testing.assert_close(head(visual), head(visual))
    head.train()
    assert not torch.allclose(head(visual), head(visual))


def test_prompt_sources():
    # random: fixed, seeded, needs the class count
    head = CPRFLHead(
        None,
        16,
        CPRFLConfig(prompt_init="random", random_dim=10, heads=2, head_dim=8, mlp_dim=24),
        num_classes=4,
    )
    assert head.class_embeddings.shape == (4, 10)
    torch.testing.assert_close(head.class_embeddings, random_class_embeddings(4, 10, seed=0))
    assert head(torch.randn(1, 3, 16)).shape == (1, 4)
    with pytest.raises(ValueError, match="num_classes"):
        CPRFLHead(None, 16, CPRFLConfig(prompt_init="random"))
    with pytest.raises(ValueError, match=r"\(C, T\)"):
        CPRFLHead(None, 16, CPRFLConfig(prompt_init="clip"))

    # glove: mean word vectors per class name
    vectors = {"traffic": [1.0, 0.0], "light": [0.0, 1.0], "dog": [2.0, 2.0]}
    emb = word_vector_embeddings(["traffic_light", "Dog"], vectors)
    torch.testing.assert_close(emb, torch.tensor([[0.5, 0.5], [2.0, 2.0]]))
    with pytest.raises(KeyError, match="hair drier"):
        word_vector_embeddings(["hair drier"], vectors)
    head = CPRFLHead(emb, 16, CPRFLConfig(prompt_init="glove", heads=2, head_dim=8, mlp_dim=24))
    assert head(torch.randn(1, 3, 16)).shape == (1, 2)


def test_fresh_class_embeddings_per_call_reach_the_text_side():
    head = tiny_head(dtype=torch.float32)
    text = torch.randn(5, 12, requires_grad=True)  # e.g. a trainable text encoder's output
    head(torch.randn(2, 7, 16), class_embeddings=text).sum().backward()
    assert text.grad is not None and text.grad.abs().sum() > 0


def test_configs_load_from_mapping():
    cfg = from_dict(CPRFLConfig, {"prompt_init": "glove", "residual": "true", "dropout": "0.2"})
    assert cfg.prompt_init == "glove" and cfg.residual is True and cfg.dropout == 0.2
    with pytest.raises(ValueError):
        from_dict(CPRFLConfig, {"prompt_init": "word2vec"})


def test_linear_head_pooling():
    torch.manual_seed(0)
    tokens = torch.randn(3, 6, 8)
    mean_head = LinearHead(8, 4, pool="mean")
    torch.testing.assert_close(
        mean_head(tokens), F.linear(tokens.mean(1), mean_head.fc.weight, mean_head.fc.bias)
    )
    cls_head = LinearHead(8, 4, pool="cls")
    torch.testing.assert_close(
        cls_head(tokens), tokens[:, 0] @ cls_head.fc.weight.T + cls_head.fc.bias
    )
    with pytest.raises(ValueError):
        LinearHead(8, 4, pool="max")


def test_logits_are_float32_under_bf16_autocast():
    """Eq. 6 is computed in float32 on the bf16 features autocast makes: the logits equal the
    float64 dot product of those features to float32 precision, not to bf16's 2^-8."""
    head = tiny_head(dtype=torch.float32)
    visual = torch.randn(4, 7, 16)
    seen = {}
    head.vsi.register_forward_hook(lambda m, i, out: seen.update(refined=out))
    head.prompt_init.register_forward_hook(lambda m, i, out: seen.update(prompts=out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(visual)
    assert seen["refined"].dtype == seen["prompts"].dtype == torch.bfloat16  # autocast was on
    assert logits.dtype == torch.float32
    direct = (seen["refined"].double() * seen["prompts"].double()).sum(-1)
    torch.testing.assert_close(logits.double(), direct, rtol=1e-6, atol=1e-6)

    linear = LinearHead(16, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(visual.bfloat16())
    assert out.dtype == torch.float32
    w, b = linear.fc.weight.double(), linear.fc.bias.double()
    direct = visual.bfloat16().double().mean(1) @ w.T + b
    torch.testing.assert_close(out.double(), direct, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_resnet101_tokens_at_448():
    from ltdist.models.backbones import BackboneConfig, build_backbone

    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(kind="resnet101", pretrained=False, proj_dim=2048))
    assert backbone.token_dim == 2048
    backbone.eval()
    with torch.no_grad():
        tokens = backbone.tokens(torch.randn(1, 3, 448, 448))
    assert tokens.shape == (1, 196, 2048)
    assert torch.isfinite(tokens).all()
    with pytest.raises(ValueError, match="IMAGENET1K"):
        build_backbone(BackboneConfig(pretrained=True, weights="IMAGENET22K"))


def test_resnet101_pretrained_asks_for_the_weights_enum(monkeypatch):
    import torchvision
    from torchvision.models import ResNet101_Weights

    from ltdist.models.backbones import ResNetTokens

    asked = []

    def fake_resnet101(weights=None):
        asked.append(weights)
        return torchvision.models.resnet18(weights=None)  # no download here; small and fast

    monkeypatch.setattr(torchvision.models, "resnet101", fake_resnet101)
    ResNetTokens(pretrained=True)
    ResNetTokens(pretrained=True, weights="IMAGENET1K_V1")
    ResNetTokens(pretrained=False)
    assert asked == [ResNet101_Weights.IMAGENET1K_V2, ResNet101_Weights.IMAGENET1K_V1, None]


def test_tiny_resnet_tokens_take_the_resnet101_code_path(monkeypatch):
    """``tiny``: the same ResNetTokens on a 1-block-per-stage ResNet (random init, no weights
    asked for even with ``pretrained=True``), for tests and reduced-size runs."""
    import torchvision
    from torchvision.models.resnet import Bottleneck

    from ltdist.models.backbones import BackboneConfig, ResNetTokens, build_backbone

    def no_resnet101(weights=None):
        raise AssertionError("a tiny ResNet is not ResNet-101")

    monkeypatch.setattr(torchvision.models, "resnet101", no_resnet101)
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(kind="resnet101", tiny=True, proj_dim=0))
    assert isinstance(backbone.source, ResNetTokens)
    stages = list(backbone.source.body)[4:]  # layer1..layer4
    assert [len(stage) for stage in stages] == [1, 1, 1, 1]  # ResNet-101: [3, 4, 23, 3]
    assert all(isinstance(block, Bottleneck) for stage in stages for block in stage)
    assert backbone.token_dim == backbone.source.token_dim == 2048
    tokens = backbone(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 4, 2048)  # a 2 x 2 map at 64 px
    tokens.sum().backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_clip_backbone_with_projection():
    from ltdist.models.backbones import BackboneConfig, build_backbone
    from ltdist.models.clip import ClipTowerConfig

    tiny = ClipTowerConfig(pretrained="", tiny=True, image_size=32)
    backbone = build_backbone(BackboneConfig(kind="clip", proj_dim=24, clip=tiny))
    backbone.train()
    assert backbone.token_dim == 24 and not backbone.source.training
    tokens = backbone(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 5, 24)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"proj.weight", "proj.bias"}
    head = CPRFLHead(torch.randn(3, 12), backbone.token_dim, TINY)
    head(tokens).sum().backward()
    assert backbone.proj.weight.grad is not None

    plain = build_backbone(BackboneConfig(kind="clip", proj_dim=0, clip=tiny))
    assert plain.token_dim == 64 and plain.tokens(torch.randn(1, 3, 32, 32)).shape == (1, 5, 64)
