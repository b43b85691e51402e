"""CLIP towers: token shapes, freezing, the text tower and class embeddings (random weights)."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ltdist.config import load_config
from ltdist.models.clip import (
    ClipTowerConfig,
    ImageTower,
    SequenceFirstAttention,
    TextTower,
    build_clip,
    build_towers,
    class_embeddings,
    clip_preprocess,
    get_tokenizer,
    resolved_clip_config,
    without_weights,
)

# Measured once (open_clip 3.3, random init) and asserted exactly.
VIT_B16_IMAGE_TOWER_PARAMS = 86_192_640  # incl. ln_post and proj (768 x 512)
VIT_B16_TEXT_TOWER_PARAMS = 63_428_096  # text transformer + projection 512 x 512
RN50_TEXT_TOWER_PARAMS = 63_690_240  # same transformer, projection 512 x 1024

TINY = ClipTowerConfig(pretrained="", tiny=True, image_size=64)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return build_clip(TINY)


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return build_clip(ClipTowerConfig(pretrained=""))


class Parent(nn.Module):
    """A downstream model: frozen tower + a trainable layer."""

    def __init__(self, tower: ImageTower):
        super().__init__()
        self.tower = tower
        self.fc = nn.Linear(tower.width, 3)

    def forward(self, images):
        return self.fc(self.tower(images).mean(1))


def test_tiny_image_tower_shapes(tiny_clip):
    tower = ImageTower(tiny_clip.visual)
    tokens = tower(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 1 + 16, 64)
    assert (tower.width, tower.token_dim, tower.num_tokens) == (64, 64, 17)
    zeros = torch.zeros(1, 3, 64, 64)
    assert torch.equal(tower.tokens(zeros), tower(zeros))  # the token-source interface


def test_class_token_is_what_clip_projects(tiny_clip):
    tower = ImageTower(tiny_clip.visual)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(tower.project(tower(x)), tiny_clip.encode_image(x))
    # every token carries ln_post: zero mean, unit variance before the affine (ones/zeros at init)
    tokens = tower(x)
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 17), atol=1e-5, rtol=0)


def test_frozen_tower_survives_train_and_gets_no_grad(tiny_clip):
    tower = ImageTower(build_clip(TINY).visual)
    parent = Parent(tower)
    parent.train()
    assert parent.training and parent.fc.training
    assert not tower.training and not any(m.training for m in tower.modules())
    assert all(not p.requires_grad for p in tower.parameters())

    out = parent(torch.randn(2, 3, 64, 64))
    out.square().sum().backward()
    assert parent.fc.weight.grad is not None and parent.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tower.parameters())

    opt = torch.optim.AdamW([p for p in parent.parameters() if p.requires_grad])
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(parent.fc.weight), id(parent.fc.bias)}
    assert not any(id(p) in held for p in tower.parameters())


def test_frozen_tower_output_has_no_graph_even_under_grad(tiny_clip):
    tower = ImageTower(tiny_clip.visual)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    assert not tower(x).requires_grad


def test_image_tower_rejects_resnet_clip():
    import open_clip

    vision = open_clip.model.CLIPVisionCfg(layers=[1, 1, 1, 1], width=8, image_size=64)
    text = open_clip.model.CLIPTextCfg(width=32, heads=2, layers=1)
    model = open_clip.model.CLIP(16, vision, text)
    with pytest.raises(TypeError, match="VisionTransformer"):
        ImageTower(model.visual)


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "clip.yaml"
    path.write_text("model_name: RN50\npretrained: ''\nquick_gelu: null\n")
    cfg = load_config(ClipTowerConfig, path, ["tiny=false", "image_size=448"])
    assert (cfg.model_name, cfg.pretrained, cfg.quick_gelu) == ("RN50", "", None)
    assert cfg.image_size == 448 and cfg.tiny is False
    assert load_config(ClipTowerConfig, None, ["quick_gelu=true"]).quick_gelu is True
    with pytest.raises(ValueError, match="divisible"):
        load_config(ClipTowerConfig, None, ["tiny=true", "tiny_width=30", "tiny_heads=4"])


def test_pretrained_tags_reach_open_clip(monkeypatch, tiny_clip):
    """No weights can be downloaded here: check what would be asked of open_clip."""
    import open_clip

    calls = []

    def fake_create_model(name, **kwargs):
        calls.append((name, kwargs))
        return tiny_clip

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    build_clip(ClipTowerConfig())
    build_clip(ClipTowerConfig(model_name="RN50", image_size=448, cache_dir="/weights"))
    build_clip(ClipTowerConfig(pretrained="laion2b_s34b_b88k"))
    build_clip(ClipTowerConfig(pretrained="/ckpt/vitb16.pt", quick_gelu=True))
    (n0, k0), (n1, k1), (n2, k2), (n3, k3) = calls
    assert (n0, k0["pretrained"], k0["force_quick_gelu"], k0["force_image_size"]) == (
        "ViT-B-16",
        "openai",
        True,
        224,
    )
    assert (n1, k1["pretrained"], k1["force_image_size"], k1["cache_dir"]) == (
        "RN50",
        "openai",
        448,
        "/weights",
    )
    assert k2["pretrained"] == "laion2b_s34b_b88k" and k2["force_quick_gelu"] is False
    assert k3["pretrained"] == "/ckpt/vitb16.pt" and k3["force_quick_gelu"] is True


def test_quick_gelu_is_resolved_from_the_tag_without_downloads():
    """OpenAI's weights were trained with QuickGELU, most others with GELU: the tag's entry in
    open_clip's table decides (nothing is downloaded; no hub here); a random init follows
    'openai', a checkpoint path needs the flag, a set flag stays. ``without_weights`` (an
    export's rebuild) decides it before it drops the tag."""
    cases = [
        (ClipTowerConfig(pretrained="laion2b_s34b_b88k"), False),
        (ClipTowerConfig(pretrained="openai"), True),
        (ClipTowerConfig(pretrained=""), True),
        (ClipTowerConfig(model_name="RN50", pretrained=""), True),
        (ClipTowerConfig(pretrained="/ckpt/vitb16.pt"), False),
        (ClipTowerConfig(pretrained="laion2b_s34b_b88k", quick_gelu=True), True),
        (ClipTowerConfig(pretrained="openai", quick_gelu=False), False),
        (TINY, False),
        (replace(TINY, quick_gelu=True), True),
    ]
    for cfg, quick_gelu in cases:
        assert resolved_clip_config(cfg) == replace(cfg, quick_gelu=quick_gelu), cfg
    gelu = without_weights(ClipTowerConfig(pretrained="laion2b_s34b_b88k"))
    assert (gelu.pretrained, gelu.quick_gelu) == ("", False)
    assert without_weights(ClipTowerConfig()) == ClipTowerConfig(pretrained="", quick_gelu=True)


@pytest.mark.slow
def test_vit_b16_image_tower(vit_b16):
    tower = ImageTower(vit_b16.visual)
    count = n_params(tower)
    print(f"ViT-B/16 image tower parameters: {count:,}")
    assert count == VIT_B16_IMAGE_TOWER_PARAMS
    assert (tower.width, tower.num_tokens, tower.embed_dim) == (768, 197, 512)
    x = torch.randn(2, 3, 224, 224)
    tokens = tower(x)
    assert tokens.shape == (2, 197, 768)
    assert torch.isfinite(tokens).all()
    torch.testing.assert_close(tower.project(tokens), vit_b16.encode_image(x))


@pytest.mark.slow
def test_vit_b16_text_tower(vit_b16):
    text = TextTower(vit_b16, get_tokenizer(ClipTowerConfig()))
    count = n_params(text)
    print(f"ViT-B/16 text tower parameters: {count:,}")
    assert count == VIT_B16_TEXT_TOWER_PARAMS
    assert text.embed_dim == 512
    ids = text.tokenize(["a photo of a dog.", "a photo of a traffic light."])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    emb = text(ids)
    assert emb.shape == (2, 512)
    torch.testing.assert_close(emb, vit_b16.encode_text(ids))
    torch.testing.assert_close(text(ids), emb, rtol=0, atol=0)  # deterministic

    names = ["dog", "traffic_light", "hair drier"]
    classes = class_embeddings(text, names)
    assert classes.shape == (3, 512)
    torch.testing.assert_close(classes[1], emb[1])  # "_" -> " " in the template
    unit = class_embeddings(text, names, normalize=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3))


@pytest.mark.slow
def test_rn50_text_tower_is_1024_wide():
    cfg = ClipTowerConfig(model_name="RN50", pretrained="")
    text = TextTower.from_config(cfg)
    count = n_params(text)
    print(f"RN50 text tower parameters: {count:,}")
    assert count == RN50_TEXT_TOWER_PARAMS
    assert text.embed_dim == 1024
    classes = class_embeddings(text, ["person", "dining_table"])
    assert classes.shape == (2, 1024) and torch.isfinite(classes).all()


def test_tokenizer_offline():
    tok = get_tokenizer(ClipTowerConfig())
    ids = tok(["a photo of a dog.", "a photo of a dog."])
    assert ids.shape == (2, 77)
    assert torch.equal(ids[0], ids[1])
    assert ids[0, 0].item() == 49406  # <start_of_text>
    assert 49407 in ids[0].tolist()  # <end_of_text>


def test_text_tower_frozen_and_trainable(tiny_clip):
    frozen = TextTower(tiny_clip, get_tokenizer(TINY), frozen=True)
    ids = frozen.tokenize(["a photo of a cat.", "a photo of a bus."])
    emb = frozen(ids)
    assert emb.shape == (2, 32) and not emb.requires_grad
    frozen.train()
    assert not frozen.training
    torch.testing.assert_close(emb, tiny_clip.encode_text(ids))

    model = build_clip(TINY)
    trainable = TextTower(model, get_tokenizer(TINY), frozen=False)
    trainable.train()
    assert trainable.training
    trainable(ids).sum().backward()
    assert all(p.requires_grad for p in trainable.parameters())
    assert trainable.token_embedding.weight.grad is not None
    # only the text parts: no logit scale, no image tower
    names = {n.split(".")[0] for n, _ in trainable.named_parameters()}
    assert names == {
        "token_embedding",
        "positional_embedding",
        "transformer",
        "ln_final",
        "text_projection",
    }


def test_build_towers_share_one_model():
    image, text = build_towers(TINY)
    assert image.width == 64 and text.embed_dim == 32
    assert image.tokens(torch.randn(1, 3, 64, 64)).shape == (1, 17, 64)


def test_trainable_tower_trains_and_matches_the_frozen_tokens(tiny_clip):
    """freeze_image=false (a tower without pretrained weights): an ordinary module with the
    same tokens as the frozen one."""
    frozen = ImageTower(tiny_clip.visual)
    torch.manual_seed(0)
    trainable = ImageTower(build_clip(TINY).visual, frozen=False)
    trainable.load_state_dict(frozen.state_dict())
    parent = Parent(trainable)
    parent.train()
    trained = [n for n, p in trainable.named_parameters() if p.requires_grad]
    # everything but CLIP's projection, which the tokens never use (DDP needs every trainable
    # parameter to get a gradient)
    assert trainable.training and trained == [
        n for n, _ in trainable.named_parameters() if n != "visual.proj"
    ]
    x = torch.randn(2, 3, 64, 64)
    parent(x).square().sum().backward()
    assert all(p.grad is not None for p in trainable.parameters() if p.requires_grad)
    trainable.eval()
    torch.testing.assert_close(trainable(x), frozen(x))


class _Gemms(TorchDispatchMode):
    """The shapes of every batched GEMM (aten.bmm) a forward runs."""

    def __init__(self):
        super().__init__()
        self.bmm: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.bmm.default:
            self.bmm.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


def test_a_frozen_towers_attention_projects_in_one_gemm_with_the_same_tokens():
    """Under autocast, PyTorch's batch-first attention folds its transposed input into one
    in-projection GEMM only for a weight that requires grad: frozen, it copies the weight once
    per token into a batched GEMM (a ViT-B/16 forward 6x slower on a CPU). A frozen tower's
    attention is SequenceFirstAttention: the same state dict and tokens (float64), no copy."""
    torch.manual_seed(0)
    plain = build_clip(TINY).visual.eval()
    frozen = ImageTower(copy.deepcopy(plain))
    trainable = ImageTower(copy.deepcopy(plain), frozen=False).eval()
    attention = [m for m in frozen.modules() if isinstance(m, nn.MultiheadAttention)]
    assert attention and all(type(m) is SequenceFirstAttention for m in attention)
    assert all(
        type(m) is nn.MultiheadAttention
        for m in trainable.modules()
        if isinstance(m, nn.MultiheadAttention)
    )
    assert list(frozen.state_dict()) == list(trainable.state_dict())
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            frozen.double()(x.double()), trainable.double()(x.double()), rtol=0, atol=1e-12
        )
    frozen.float()
    weight_copies = (frozen.num_tokens, frozen.width, 3 * frozen.width)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _Gemms() as gemms:
        frozen(x)
    assert weight_copies not in gemms.bmm
    plain.requires_grad_(False)  # frozen weights in PyTorch's attention: what the class avoids
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _Gemms() as gemms:
        plain(x)
    assert weight_copies in gemms.bmm, "PyTorch folds frozen weights now: drop the workaround"


def test_freeze_image_flag_reaches_the_tower():
    tower = ImageTower.from_config(replace(TINY, freeze_image=False))
    assert not tower.frozen and tower.visual.conv1.weight.requires_grad
    image, _ = build_towers(replace(TINY, freeze_image=False))
    assert not image.frozen
    assert ImageTower.from_config(TINY).frozen


# (model, tag) -> open_clip's preprocess table entry: mean, std, interpolation, resize mode
PREPROCESS = {
    ("ViT-B-16", "openai"): ((0.48145466, 0.4578275, 0.40821073), "bicubic", "shortest"),
    ("ViT-L-14", "laion2b_s32b_b82k"): ((0.5, 0.5, 0.5), "bicubic", "shortest"),
    ("ViT-L-14-CLIPA", "datacomp1b"): ((0.485, 0.456, 0.406), "bilinear", "squash"),
    ("ViT-B-16-SigLIP", "webli"): ((0.5, 0.5, 0.5), "bicubic", "squash"),
}


def _photo(w: int = 96, h: int = 64):
    """A generated RGB image with detail (noise on a gradient), 3:2 so that the short side
    resizes to whole pixels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
    pixels = np.clip(ramp + rng.integers(0, 56, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(("model", "tag"), list(PREPROCESS))
def test_the_loader_preprocesses_as_open_clip_does_for_the_model_and_tag(model, tag):
    """The tower's preprocessing comes from open_clip's table (no download) and the loader's
    "clip" preset then makes the tensor open_clip's own preprocess makes (the transform
    ``create_model_and_transforms`` returns for that model and tag)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from ltdist.data.loader import LoaderConfig, image_transform

    prep = clip_preprocess(ClipTowerConfig(model_name=model, pretrained=tag))
    mean, interpolation, resize_mode = PREPROCESS[(model, tag)]
    assert prep.mean == pytest.approx(mean) and prep.interpolation == interpolation
    assert prep.resize_mode == resize_mode
    for size, mode in ((32, prep.resize_mode), (32, "longest")):
        cfg = replace(prep, resize_mode=mode)
        loader = LoaderConfig(image_size=size, mean=cfg.mean, std=cfg.std)
        loader = replace(loader, interpolation=cfg.interpolation, resize_mode=mode)
        ours = image_transform("clip", size, preprocess=loader.clip_preprocess())
        x = ours.normalize(ours(_photo())[None])[0]
        theirs = image_transform_v2(
            PreprocessCfg(size=size, **{k: getattr(cfg, k) for k in vars(cfg)}), is_train=False
        )
        torch.testing.assert_close(x, theirs(_photo()), atol=2e-5, rtol=0)


def test_random_and_tiny_towers_keep_openai_preprocessing():
    from ltdist.data.loader import CLIP_MEAN, CLIP_STD, ClipPreprocess, LoaderConfig

    openai = ClipPreprocess(CLIP_MEAN, CLIP_STD, "bicubic", "shortest")
    assert clip_preprocess(TINY) == openai
    assert clip_preprocess(ClipTowerConfig(model_name="ViT-B-16-SigLIP", pretrained="")) == openai
    assert LoaderConfig().clip_preprocess() == openai  # an export written before records none
    # bit for bit the normalisation of before (one multiply-add with these constants)
    from ltdist.data.loader import image_transform

    std, mean = torch.tensor(CLIP_STD).view(1, 3, 1, 1), torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    before = x.float().mul_(1.0 / (255.0 * std)).add_(-mean / std)
    assert torch.equal(image_transform("clip", 8, preprocess=openai).normalize(x), before)


def test_a_run_records_its_image_towers_preprocessing(tmp_path):
    """The resolved config (what checkpoints and the export record) holds the image tower's
    values: model.clip's, the CPRFL CLIP backbone's, an init_from export's; ResNet-101 and
    the cprfl_official preset are left as they were."""
    import json

    from ltdist.config import to_dict
    from ltdist.data.loader import CLIP_STD, LoaderConfig
    from ltdist.train.config import TrainConfig
    from ltdist.train.resolve import image_preprocess

    def resolved(*overrides):
        return image_preprocess(load_config(TrainConfig, None, ["data.location=x", *overrides]))

    loader, why = resolved()  # ViT-B-16 / openai
    assert loader.mean == pytest.approx(PREPROCESS[("ViT-B-16", "openai")][0])
    assert loader.resize_mode == "shortest" and "ViT-B-16 / 'openai'" in why
    siglip = [
        "model.backbone.clip.model_name=ViT-B-16-SigLIP",
        "model.backbone.clip.pretrained=webli",
    ]
    loader, why = resolved("task=cprfl", "model.backbone.kind=clip", *siglip)
    assert (loader.mean, loader.std, loader.resize_mode) == ((0.5,) * 3, (0.5,) * 3, "squash")
    assert "model.backbone.clip" in why
    loader, _ = resolved("task=cprfl", "model.backbone.kind=clip", *siglip, "loader.mean=[0,0,0]")
    assert loader.mean == (0.0, 0.0, 0.0) and loader.std == (0.5,) * 3  # what is set stays
    loader, _ = resolved("task=cprfl", "loader.transform=cprfl_official")
    assert loader == LoaderConfig(transform="cprfl_official")
    loader, _ = resolved("task=cprfl")  # ResNet-101: the preset's defaults
    assert (loader.mean, loader.resize_mode) == ((), "")

    export = tmp_path / "export"
    export.mkdir()
    pre = load_config(TrainConfig, None, ["data.location=x", "loader.mean=[0.5,0.5,0.5]"])
    (export / "config.json").write_text(json.dumps(to_dict(pre)))
    loader, why = resolved("task=dpvlpa", f"model.init_from={export}")
    assert loader.mean == (0.5,) * 3 and loader.std == CLIP_STD and "export" in why
