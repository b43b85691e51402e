"""The token cache (``ltdist.train.token_cache``): training from the frozen tower's cached tokens
gives the losses of training from the images, resumes exactly, refuses a cache built for other
settings naming the field, and a cache is byte-identical however many ranks built it and however
often its build was interrupted. In-process tiny runs on the demo shards (no augmentation:
tests/train/configs/tiny_pretrain.yaml leaves loader.augment off)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ltdist.config import load_config
from ltdist.data import loader
from ltdist.data import token_cache as fmt
from ltdist.data.shards import load_index, read_shard
from ltdist.entry import InputError
from ltdist.train import loop
from ltdist.train import token_cache as tc
from ltdist.train.config import TrainConfig
from ltdist.train.resolve import resolve_config

from .conftest import TINY, metrics

STEPS = 6


def _config(demo: Path, out: Path, *extra: str) -> TrainConfig:
    overrides = [f"data.location={demo}", f"output_dir={out}", f"max_steps={STEPS}"]
    overrides += ["data.eval_split=", "loader.num_workers=1", *extra]
    return load_config(TrainConfig, TINY, overrides)


def _resolved(cfg: TrainConfig) -> TrainConfig:
    cfg.validate()
    return resolve_config(cfg, 1).config


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def _losses(result: dict) -> list[float]:
    steps = [h for h in result["history"] if "loss" in h]  # (the final evaluation has none)
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1))
    return [h["loss"] for h in steps]


@pytest.fixture(scope="module")
def one_rank(demo, tmp_path_factory) -> Path:
    """The demo's training split cached in one straight build."""
    out = tmp_path_factory.mktemp("cache") / "one"
    cfg = _resolved(_config(demo, out.parent / "run", f"data.token_cache={out}"))
    built = tc.build_token_cache(cfg, tc.training_source(cfg))
    assert built.shards_written == list(range(12)) and built.shards_kept == 0
    return out


def test_training_from_the_cache_gives_the_losses_from_images_and_resumes_exactly(
    demo, one_rank, tmp_path, monkeypatch
):
    images = loop.train(_config(demo, tmp_path / "images"))
    # the run builds its cache (data.token_cache=auto: <location>/tokens would be shared with
    # other tests, so a folder of its own) with the tower it trains with
    cache = tmp_path / "tokens"
    cached = loop.train(_config(demo, tmp_path / "cached", f"data.token_cache={cache}"))
    assert _files(cache) == _files(one_rank)  # the loop's own build = the command's
    # K = 1 and no augmentation: the same losses step for step, to bf16 rounding of the tokens
    a, b = _losses(images), _losses(cached)
    assert b == pytest.approx(a, rel=2e-3, abs=2e-3)
    assert a != b  # the tokens really came from the bf16 cache
    # the cached run does the image run's FLOPs less the tower's forward, which it never runs
    fi, fc = images["flops"], cached["flops"]
    assert fi["frozen_forward"] > 0 and fc["frozen_forward"] == 0 and fc["frozen_modules"] == []
    assert fc["per_sample"] == fi["per_sample"] - fi["frozen_forward"]

    # stopped after step 3 (a checkpoint), then resumed: the uninterrupted run's losses exactly
    stop = tmp_path / "stop"
    resumed = _config(
        demo, tmp_path / "resumed", f"data.token_cache={cache}", f"preempt_file={stop}"
    )
    real = loop._log_step

    def stop_at_3(*args, **kwargs):
        record = real(*args, **kwargs)
        if record["step"] == 3:
            stop.touch()
        return record

    monkeypatch.setattr(loop, "_log_step", stop_at_3)
    assert loop.train(resumed) == {"status": "preempted", "step": 3}
    monkeypatch.undo()
    stop.unlink()
    assert _losses(loop.train(resumed)) == b


@pytest.mark.parametrize(
    ("override", "field", "found", "wanted"),
    [
        ("loader.resize_mode=squash", "resize_mode", "'shortest'", "'squash'"),
        ("data.token_cache_dtype=fp16", "dtype", "'bf16'", "'fp16'"),
        ("model.clip.tiny_layers=2", "tower", "'tiny_layers': 1", "'tiny_layers': 2"),
        ("seed=1", "source_weights_sha256", "", "another random init seed"),
    ],
)
def test_a_cache_built_for_other_settings_is_refused_naming_the_field(
    demo, one_rank, tmp_path, override, field, found, wanted
):
    before = _files(one_rank)
    cfg = _config(demo, tmp_path / "run", f"data.token_cache={one_rank}", override)
    with pytest.raises(InputError, match=f"built with {field}=") as err:
        loop.train(cfg)
    assert found in str(err.value) and wanted in str(err.value)
    assert _files(one_rank) == before  # refused before anything was written
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_cache_needs_the_frozen_tower_and_no_augmentation(demo, tmp_path):
    for extra, words in [
        ("loader.augment=true", "loader.augment=true draws a new crop"),
        ("model.clip.freeze_image=false", "needs a frozen image tower"),
    ]:
        with pytest.raises(ValueError, match=words):  # a ConfigError when the config loads
            _config(demo, tmp_path, "data.token_cache=auto", extra)


def _no_images(sample):
    raise AssertionError(f"image {sample.key} decoded: the run should read cached tokens")


def _head_on_a_frozen_source(head: str, source: str, pretrained: Path | None) -> list[str]:
    """A head of task=cprfl on a frozen CLIP tower, or on frozen pretrained Q-Former tokens
    (the 2-rank pretraining run's export) with a trainable projection."""
    extra = ["task=cprfl", f"model.head={head}", f"model.backbone.kind={source}"]
    if source == "qformer":
        extra += [f"model.init_from={pretrained / 'export'}", "model.backbone.freeze=true"]
        extra += ["model.backbone.proj_dim=16"]
    return extra


@pytest.mark.parametrize(
    ("head", "source"),
    [("linear", "clip"), ("cprfl", "clip"), ("linear", "qformer"), ("cprfl", "qformer")],
)
def test_a_head_on_a_frozen_source_trains_the_same_from_its_cache(
    demo, pretrained, tmp_path, monkeypatch, head, source
):
    """task=cprfl reads the frozen source's tokens from a cache: the losses of training from
    the images, step by step to the bf16 rounding of the tokens, without the source's FLOPs;
    its periodic and final evaluations read a cache of the test split (built by the run, no
    image decoded once the caches exist) and give the mAP of the run from images."""
    extra = _head_on_a_frozen_source(head, source, pretrained)
    extra += ["data.eval_split=test", "data.eval_limit=64", "eval_every_steps=3"]
    images = loop.train(_config(demo, tmp_path / "images", *extra))
    cache = tmp_path / "tokens"
    real = tc.build_token_cache

    def no_image_after_the_build(*args, **kwargs):
        built = real(*args, **kwargs)
        monkeypatch.setattr(loader, "decode_image", _no_images)
        return built

    monkeypatch.setattr(tc, "build_token_cache", no_image_after_the_build)
    cached = loop.train(_config(demo, tmp_path / "cached", f"data.token_cache={cache}", *extra))
    monkeypatch.undo()
    manifest = fmt.read_manifest(str(cache), "train")
    assert manifest.source == source
    assert manifest.shape == ((1, 17, 32) if source == "clip" else (1, 4, 32))
    test = fmt.read_manifest(str(cache), "test")
    assert (test.shape, test.num_samples) == (manifest.shape, 600)
    a, b = _losses(images), _losses(cached)
    assert b == pytest.approx(a, rel=2e-3, abs=2e-3)
    assert a != b  # the tokens really came from the bf16 cache
    for run in (images, cached):  # periodic at step 3, final at the last
        assert [h["step"] for h in run["history"] if "eval_map" in h] == [3, STEPS]
    maps = [
        [h["eval_map"]["all"] for h in r["history"] if "eval_map" in h] for r in (images, cached)
    ]
    # weights trained from bf16 tokens differ a little, and 64 images' mAP (step 3) moves with
    # small score changes: the same weights' mAP from images and cache is compared below
    # (test_evaluation_from_a_cache_scores_the_map_of_the_images)
    assert maps[1] == pytest.approx(maps[0], abs=3e-2)
    assert maps[1][-1] == pytest.approx(maps[0][-1], abs=1e-2)  # the final: all 600
    # the frozen forward of these runs is the source's alone, and the cached run skips it
    fi, fc = images["flops"], cached["flops"]
    root = "backbone.source" if source == "qformer" else "backbone"  # clip: no projection
    assert fi["frozen_modules"] == [root] and fi["frozen_forward"] > 0
    assert fc["frozen_forward"] == 0 and fc["frozen_modules"] == []
    assert fc["per_sample"] == fi["per_sample"] - fi["frozen_forward"]
    if source == "qformer":  # the Q-Former's weights are the export's, and they stayed so
        from ltdist.train.export import read_export_weights

        exported = read_export_weights(str(pretrained / "export"))
        trained = read_export_weights(str(tmp_path / "cached" / "export"))
        for key in [k for k in exported if k.startswith("model.qformer.")][:5]:
            mine = "backbone.source.qformer." + key.removeprefix("model.qformer.")
            assert torch.equal(trained[mine], exported[key]), key


@pytest.mark.parametrize("task", ["pretrain", "cprfl"])
def test_evaluation_from_a_cache_scores_the_map_of_the_images(demo, tmp_path, task):
    """The same weights score a split from its images and from its cached tokens (one
    deterministic view): logits and mAP agree to the bf16 rounding of the tokens."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ltdist.data.shards import load_label_space
    from ltdist.eval.metrics import map_from_logits
    from ltdist.train.evaluation import evaluate_split
    from ltdist.train.tasks import build_task

    extra = [] if task == "pretrain" else _head_on_a_frozen_source("cprfl", "clip", None)
    cfg = _config(demo, tmp_path, f"data.token_cache={tmp_path / 'tokens'}", *extra)
    cfg = _resolved(cfg)
    set_seed(cfg.seed)
    space = load_label_space(str(demo))
    module = build_task(cfg.task, cfg.model, space)
    cache = tc.open_token_cache(cfg, tc.frozen_source(module), split="test", views=1)
    assert cache[1].views == 1 and cache[1].augment_seed is None
    acc = Accelerator(cpu=True)
    prep = {"transform": cfg.loader.transform, "preprocess": cfg.loader.clip_preprocess()}
    scored = {
        name: evaluate_split(acc, module, str(demo), "test", 64, 32, **prep, caches=caches)
        for name, caches in [("images", None), ("cache", {"test": cache})]
    }
    (li, ti), (lc, tc_) = scored["images"], scored["cache"]
    assert np.array_equal(ti, tc_) and li.shape == lc.shape == (600, space.num_classes)
    np.testing.assert_allclose(lc, li, rtol=2e-2, atol=2e-2)
    assert not np.array_equal(lc, li)  # the tokens really came from the bf16 cache
    maps = {k: map_from_logits(v[0], v[1], space, "sigmoid").summary() for k, v in scored.items()}
    assert maps["cache"]["all"] == pytest.approx(maps["images"]["all"], abs=2e-3)


def test_a_cache_of_another_source_or_weights_is_refused_naming_the_field(
    demo, one_rank, pretrained, tmp_path
):
    """The DP-VLPA tower's cache (one_rank) is a CLIP source: Q-Former tokens refuse it by
    kind; a CLIP tower of another seed by its weights' checksum."""
    before = _files(one_rank)
    for extra, field, wanted in [
        (_head_on_a_frozen_source("linear", "qformer", pretrained), "source", "'qformer'"),
        (
            ["task=cprfl", "model.head=linear", "model.backbone.kind=clip", "seed=1"],
            "source_weights_sha256",
            "the token source's weights differ",
        ),
    ]:
        cfg = _config(demo, tmp_path / field, f"data.token_cache={one_rank}", *extra)
        with pytest.raises(InputError, match=f"built with {field}=") as err:
            loop.train(cfg)
        assert wanted in str(err.value)
        assert not (tmp_path / field / "checkpoints").exists()
    assert _files(one_rank) == before


def test_a_cache_of_a_trainable_source_is_refused_naming_the_key_that_freezes_it(demo, tmp_path):
    cprfl = ["task=cprfl", "data.token_cache=auto"]
    for extra, key in [
        (["model.backbone.kind=qformer", "model.init_from=x"], "model.backbone.freeze=true"),
        (["model.backbone.kind=clip", "model.clip.freeze_image=false"], "model.clip.freeze_image"),
        (["model.backbone.kind=resnet101"], "model.backbone.freeze=true"),
    ]:
        with pytest.raises(ValueError, match="needs a frozen") as err:
            _config(demo, tmp_path, *cprfl, *extra)
        assert key in str(err.value)
    with pytest.raises(ValueError, match="model.backbone.freeze freezes the Q-Former"):
        _config(
            demo, tmp_path, "task=cprfl", "model.backbone.kind=clip", "model.backbone.freeze=true"
        )


def test_a_cache_built_on_two_ranks_is_byte_identical_to_one_built_on_one(pretrained, one_rank):
    """The shared 2-process pretraining run (tests/train/conftest.py) built its cache on both
    ranks at once, each its own shards, before training from it."""
    two = pretrained.parent / "tokens"
    index = load_index(str(two), "train")
    assert index.complete and len(index.shards) == 12
    files = _files(two)  # shards, index, manifest, classes.json
    assert {n: b for n, b in files.items() if not n.startswith("test")} == _files(one_rank)
    # the run evaluated from a cache of its evaluation split, which its 2 ranks built too
    assert fmt.complete_index(str(two), "test") and fmt.read_manifest(str(two), "test").views == 1
    run = metrics(pretrained)
    assert run["world_size"] == 2 and run["status"] == "completed"
    assert run["provenance"]["config"]["data"]["token_cache"] == str(two)


def test_an_interrupted_build_resumes_without_rewriting_finished_shards(
    demo, one_rank, tmp_path, monkeypatch
):
    out = tmp_path / "tokens"
    cfg = _resolved(_config(demo, tmp_path / "run", f"data.token_cache={out}"))
    tower = tc.training_source(cfg)
    real, reads = tc.read_shard, []

    def killed_at_the_fourth_shard(*args, **kwargs):
        reads.append(1)
        if len(reads) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tc, "read_shard", killed_at_the_fourth_shard)
    with pytest.raises(KeyboardInterrupt):
        tc.build_token_cache(cfg, tower)
    monkeypatch.undo()
    assert not fmt.complete_index(str(out), "train")
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")}
    assert sorted(done) == [f"train-{k:06d}.tar" for k in range(3)]

    built = tc.build_token_cache(cfg, tower)
    assert built.shards_kept == 3 and built.shards_written == list(range(3, 12))
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done  # not written again
    assert _files(out) == _files(one_rank)


def test_the_cache_holds_the_towers_tokens_in_bf16(demo, one_rank, tmp_path):
    cfg = _resolved(_config(demo, tmp_path, f"data.token_cache={one_rank}"))
    tower = tc.training_source(cfg)
    manifest = fmt.read_manifest(str(one_rank), "train")
    assert (manifest.shape, manifest.dtype, manifest.num_samples) == ((1, 17, 32), "bf16", 1200)
    info = load_index(str(one_rank), "train").shards[0]
    cached = next(read_shard(str(one_rank / info.name), expected=info))
    image = next(read_shard(str(demo / info.name)))
    assert cached.key == image.key and cached.meta == image.meta and cached.text == image.text
    assert cached.image is None and len(cached.image_tokens) == 17 * 32 * 2
    from ltdist.data.loader import decode_image, image_transform

    prep = image_transform("clip", 32, preprocess=cfg.loader.clip_preprocess())
    with torch.no_grad():
        want = tower(prep.normalize(prep(decode_image(image))[None]))[0]
    got = fmt.decode_tokens(cached.image_tokens, manifest.shape, "bf16", cached.key)[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))


def test_the_command_prints_the_size_first_and_resumes_a_finished_cache(demo, one_rank, capsys):
    from accelerate.state import AcceleratorState

    from ltdist import cli

    before = _files(one_rank)
    argv = ["features", "cache", "--config", str(TINY), f"data.location={demo}"]
    try:
        assert cli.main([*argv, "--out", str(one_rank), "loader.num_workers=1"]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    out = capsys.readouterr().out.splitlines()
    size = f"token cache {one_rank} (train): 1200 samples x 1 view(s) x 17 tokens x 32 x 2 bytes"
    assert out[0].startswith(size) and out[0].endswith("0.001 MB per sample, 1.3 MB in all")
    assert out[1] == "rank 0: wrote 0 shards, 12 already done"
    assert _files(one_rank) == before


def test_the_command_caches_an_evaluation_split_in_one_view(demo, tmp_path, capsys):
    """A run with K augmented training views evaluates from the test form: the command gives
    another split than the training one a single view unless --views says otherwise."""
    from accelerate.state import AcceleratorState

    from ltdist import cli

    argv = ["features", "cache", "--config", str(TINY), f"data.location={demo}"]
    argv += ["--split", "test", "--out", str(tmp_path), "loader.num_workers=1"]
    try:
        assert cli.main([*argv, "loader.augment=true", "data.token_cache_views=2"]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    manifest = fmt.read_manifest(str(tmp_path), "test")
    assert (manifest.views, manifest.augment_seed, manifest.num_samples) == (1, None, 600)
    assert "600 samples x 1 view(s)" in capsys.readouterr().out


def test_k_views_are_the_augmentations_of_epochs_0_to_k_minus_1(demo, tmp_path):
    """With loader.augment=true a cache of K views holds, per image, the augmented views that
    training from images draws in epochs 0..K-1; epoch e reads view e % K."""
    from ltdist.data.loader import ShardLoader

    extra = ["loader.augment=true", "data.token_cache_views=2", "loader.num_workers=0"]
    extra += ["loader.shuffle_shards=false", "loader.shuffle_buffer=0"]  # same images each epoch
    cfg = _resolved(_config(demo, tmp_path, f"data.token_cache={tmp_path / 'k2'}", *extra))
    tower = tc.training_source(cfg)
    built = tc.build_token_cache(cfg, tower, split="test")
    assert built.manifest.shape == (2, 17, 32) and built.manifest.augment_seed == 0
    assert "600 samples x 2 view(s)" in built.estimate

    def first_batch(location: str, epoch: int, **kwargs) -> dict:
        loader = ShardLoader(location, "test", cfg.loader, **kwargs)
        loader.load_state_dict({**loader.state_dict(), "epoch": epoch})
        return next(iter(loader))

    seen = {}
    for epoch in (0, 1, 2):
        cached = first_batch(built.location, epoch, token_cache=built.manifest)
        assert cached["image_tokens"].shape == (8, 17, 32)
        seen[epoch] = dict(zip(cached["key"], cached["image_tokens"], strict=True))
        if epoch < 2:  # the tower on the images training from images draws in this epoch
            images = first_batch(str(demo), epoch)
            assert cached["key"] == images["key"]
            with torch.no_grad():
                want = tower(images["image"]).to(torch.bfloat16)
            torch.testing.assert_close(cached["image_tokens"], want, atol=2e-2, rtol=2e-2)
    assert list(seen[0]) == list(seen[1]) == list(seen[2])
    for key in seen[0]:  # epoch 1: another crop; epoch 2 reads view 0 again
        assert not torch.equal(seen[0][key], seen[1][key])
        assert torch.equal(seen[0][key], seen[2][key])
