"""The streaming loader on real WebDataset tars: coverage, equal steps, exact resume."""

from __future__ import annotations

import collections
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ltdist import storage
from ltdist.data.loader import CLIP_MEAN, CLIP_STD, LoaderConfig, ShardLoader

from .conftest import label_ids

# Shared modules: these tests run in both environments (see tests/test_environments.py).
pytestmark = pytest.mark.both_envs


def epoch_batches(loader: ShardLoader) -> list[list[str]]:
    return [b["key"] for b in loader]


def run_epochs(location, cfg, world_size, epochs, **kw) -> dict[int, list[list[list[str]]]]:
    """keys[rank][epoch] = list of batches (lists of keys)."""
    out = {}
    for rank in range(world_size):
        loader = ShardLoader(location, "train", cfg, rank=rank, world_size=world_size, **kw)
        out[rank] = [epoch_batches(loader) for _ in range(epochs)]
    return out


def test_two_ranks_two_workers_cover_every_sample_once_per_epoch(dataset):
    location, keys = dataset(100, 13)  # 8 shards of 13, 13, ..., 9 samples
    cfg = LoaderConfig(batch_size=5, num_workers=2, shuffle_buffer=7, image_size=8)
    keys_by_rank = run_epochs(location, cfg, world_size=2, epochs=2, decode_images=False)
    orders = []
    for epoch in range(2):
        per_rank = [keys_by_rank[r][epoch] for r in range(2)]
        assert [len(b) for b in per_rank[0]] == [5] * 10  # 100 / (5 x 2) steps, full batches
        assert [len(b) for b in per_rank[1]] == [5] * 10
        seen = [k for batches in per_rank for b in batches for k in b]
        assert sorted(seen) == keys  # every sample exactly once
        orders.append(seen)
    assert orders[0] != orders[1]  # shards and windows reshuffled per epoch


def deinterleave(batches: list[list[str]], num_workers: int) -> list[str]:
    """A rank's epoch in stream order: worker w made batches w, w+W, ...; workers read in turn."""
    return [k for w in range(num_workers) for b in batches[w::num_workers] for k in b]


def test_remainder_rolls_into_next_epoch_and_every_pass_is_exact(dataset):
    location, keys = dataset(103, 10)
    cfg = LoaderConfig(batch_size=5, num_workers=2, shuffle_buffer=1, image_size=8)
    keys_by_rank = run_epochs(location, cfg, world_size=2, epochs=3, decode_images=False)
    stream = []
    for epoch in range(3):
        assert len(keys_by_rank[0][epoch]) == len(keys_by_rank[1][epoch]) == 103 // 10
        for rank in range(2):
            stream += deinterleave(keys_by_rank[rank][epoch], 2)
    assert len(stream) == 3 * 100
    assert sorted(stream[:103]) == keys  # pass 0
    assert sorted(stream[103:206]) == keys  # pass 1: the 3 left over opened epoch 1
    assert len(set(stream[206:])) == 94  # pass 2 so far, no repeats
    assert stream[:103] != stream[103:206]  # a new shard order per pass


def consume(loader: ShardLoader, n: int) -> tuple[list[list[str]], dict]:
    """Take n batches from a live iterator (workers prefetching ahead), then the position."""
    got = []
    for batch in loader:
        got.append(batch["key"])
        if len(got) == n:
            break
    return got, loader.state_dict()


@pytest.mark.parametrize("resume_step", [0, 3, 7, 10])
def test_resume_continues_with_the_same_samples(dataset, resume_step):
    check_resume(dataset, resume_step)


def check_resume(dataset, resume_step: int, transform: str = "clip") -> None:
    """A loader resumed at ``resume_step`` gives the straight run's batches, images bitwise."""
    location, _ = dataset(120, 11)
    cfg = LoaderConfig(
        batch_size=5,
        num_workers=2,
        shuffle_buffer=12,
        image_size=8,
        augment=True,
        transform=transform,
    )
    straight = ShardLoader(location, "train", cfg, rank=1, world_size=2)
    assert straight.steps_per_epoch == 12
    ref = [b for _ in range(2) for b in straight]  # two epochs, with decoded, augmented images
    ref_keys = [b["key"] for b in ref]

    first = ShardLoader(location, "train", cfg, rank=1, world_size=2, decode_images=False)
    got, state = consume(first, resume_step) if resume_step else ([], first.state_dict())
    assert got == ref_keys[:resume_step]
    assert (state["epoch"], state["step"]) == (0, resume_step)

    resumed = ShardLoader(location, "train", cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = [b for b in resumed] + [b for b in resumed]  # rest of epoch 0, then epoch 1
    assert [b["key"] for b in rest] == ref_keys[resume_step:]
    for a, b in zip(rest, ref[resume_step:]):
        assert torch.equal(a["image"], b["image"])  # the same augmentation draws


def test_resume_does_not_reopen_consumed_shards(dataset, monkeypatch, tmp_path):
    location, keys = dataset(200, 2)  # 100 small shards: a shuffle window spans many
    cfg = LoaderConfig(batch_size=5, num_workers=2, shuffle_buffer=40, image_size=8)
    ref = epoch_batches(ShardLoader(location, "train", cfg, decode_images=False))
    resume_step = 29
    _, state = consume(ShardLoader(location, "train", cfg, decode_images=False), resume_step)

    log_file = tmp_path / "opened.txt"
    real_open = storage.open_read

    def logging_open(url, **kwargs):
        with open(log_file, "a") as f:  # worker processes append too
            f.write(url + "\n")
        return real_open(url, **kwargs)

    monkeypatch.setattr(storage, "open_read", logging_open)
    resumed = ShardLoader(location, "train", cfg, decode_images=False)
    resumed.load_state_dict(state)
    rest = epoch_batches(resumed)
    assert rest == ref[resume_step:]

    shard_of = {k: i // 2 for i, k in enumerate(keys)}
    needed = {shard_of[k] for b in rest for k in b}
    tars = [line for line in log_file.read_text().split() if line.endswith(".tar")]
    opened = collections.Counter(int(line[-10:-4]) for line in tars)
    assert set(opened) == needed  # no shard opened that gives no sample
    assert len(opened) < 100 // 2  # most of the epoch's shards were consumed before the resume
    assert max(opened.values()) <= 2  # a shard is opened by at most the two workers


def test_fewer_shards_than_workers_does_not_hang_and_says_so(dataset, caplog):
    location, keys = dataset(40, 40)  # one shard, 2 processes x 2 workers
    cfg = LoaderConfig(batch_size=4, num_workers=2, shuffle_buffer=8, image_size=8)
    with caplog.at_level(logging.WARNING):
        keys_by_rank = run_epochs(location, cfg, world_size=2, epochs=1, decode_images=False)
    assert "1 shards for 4 readers" in caplog.text
    seen = [k for r in range(2) for b in keys_by_rank[r][0] for k in b]
    assert sorted(seen) == keys
    assert len(keys_by_rank[0][0]) == len(keys_by_rank[1][0]) == 5


def test_too_few_samples_for_one_global_batch_is_a_clear_error(dataset):
    location, _ = dataset(7, 4)
    with pytest.raises(ValueError, match="less than one global batch"):
        ShardLoader(location, "train", LoaderConfig(batch_size=4), world_size=2)


def test_resume_with_another_world_size_is_refused_unless_resampled(dataset):
    location, _ = dataset(60, 10)
    cfg = LoaderConfig(batch_size=5, num_workers=0)
    _, state = consume(ShardLoader(location, "train", cfg, decode_images=False), 3)
    other = ShardLoader(location, "train", cfg, rank=0, world_size=2, decode_images=False)
    with pytest.raises(ValueError, match="resampled"):
        other.load_state_dict(state)

    rcfg = LoaderConfig(batch_size=5, num_workers=0, resampled=True, samples_per_epoch=40)
    _, rstate = consume(ShardLoader(location, "train", rcfg, decode_images=False), 3)
    other = ShardLoader(location, "train", rcfg, rank=0, world_size=2, decode_images=False)
    other.load_state_dict(rstate)  # accepted: resampled streams restart at the saved epoch
    assert other.state_dict()["epoch"] == 0


def test_resampled_mode_has_a_set_epoch_length_and_distinct_rank_streams(dataset):
    location, keys = dataset(60, 10)
    cfg = LoaderConfig(
        batch_size=5, num_workers=2, resampled=True, samples_per_epoch=70, shuffle_buffer=6
    )
    a = run_epochs(location, cfg, world_size=2, epochs=2, decode_images=False)
    b = run_epochs(location, cfg, world_size=2, epochs=2, decode_images=False)
    assert a == b  # seeded
    for rank in range(2):
        assert [len(e) for e in a[rank]] == [7, 7]  # 70 // (5 x 2)
        assert {k for e in a[rank] for batch in e for k in batch} <= set(keys)
    assert a[0][0] != a[1][0]
    assert a[0][0] != a[0][1]


def test_batches_hold_multi_hot_labels_clip_normalised_images_and_tokens(dataset):
    location, keys = dataset(20, 20)
    cfg = LoaderConfig(
        batch_size=4, num_workers=0, shuffle_buffer=1, shuffle_shards=False, image_size=8
    )
    loader = ShardLoader(
        location, "train", cfg, tokenizer=lambda texts: torch.tensor([len(t) for t in texts])
    )
    batch = next(iter(loader))
    assert batch["key"] == keys[:4]
    for row, i in enumerate(range(4)):
        expected = torch.zeros(5)
        expected[label_ids(i)] = 1.0
        assert torch.equal(batch["labels"][row], expected)
        pixel = (i / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)  # a flat image of value i
        np.testing.assert_allclose(batch["image"][row, :, 0, 0].numpy(), pixel, atol=1e-5)
    assert batch["image"].shape == (4, 3, 8, 8)
    assert batch["text"] == [f"txt {i}" for i in range(4)]
    assert batch["tokens"].tolist() == [len(f"txt {i}") for i in range(4)]


def test_a_towers_own_mean_and_std_change_the_normalised_images(dataset):
    """SigLIP's values (mean = std = 0.5, as a run resolves them from open_clip) instead of
    OpenAI's: training batches and evaluation batches are normalised with them."""
    from ltdist.data.loader import eval_batches

    location, _ = dataset(8, 8)
    siglip = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize_mode": "squash"}
    cfg = LoaderConfig(batch_size=4, num_workers=0, shuffle_buffer=1, image_size=8, **siglip)
    train = next(iter(ShardLoader(location, "train", cfg)))["image"]
    (evaluated, *_) = next(eval_batches(location, "train", 4, 8, preprocess=cfg.clip_preprocess()))
    openai = next(eval_batches(location, "train", 4, 8)).images
    for i in range(4):  # flat images of value i
        np.testing.assert_allclose(train[i].numpy(), (i / 255.0 - 0.5) / 0.5, atol=1e-6)
        np.testing.assert_allclose(evaluated[i].numpy(), (i / 255.0 - 0.5) / 0.5, atol=1e-6)
    assert not torch.allclose(openai, evaluated, atol=0.1)


def test_clip_settings_are_refused_for_the_cprfl_preset():
    with pytest.raises(ValueError, match="loader.mean is a setting of loader.transform=clip"):
        LoaderConfig(transform="cprfl_official", mean=(0.5, 0.5, 0.5)).validate()
    with pytest.raises(ValueError, match="loader.std must be 3 values"):
        LoaderConfig(std=(0.5, 0.0, 0.5)).validate()


def test_incomplete_split_is_refused(tmp_path):
    from ltdist.data.shards import ShardWriter

    from .conftest import write_dataset

    location = str(tmp_path / "ds")
    write_dataset(location, 20, 10)
    ShardWriter(location, "val", 10, 30)  # planned 3 shards, none written
    with pytest.raises(ValueError, match="incomplete"):
        ShardLoader(location, "val", LoaderConfig(batch_size=2))


def test_eval_batches_yield_every_sample_once_in_stored_order(dataset):
    from ltdist.data.loader import eval_batches

    location, keys = dataset(23, 10)
    batches = list(eval_batches(location, "train", batch_size=8, image_size=8))
    assert [len(b.keys) for b in batches] == [8, 8, 7]  # nothing dropped
    assert [k for b in batches for k in b.keys] == keys
    assert [i for b in batches for i in b.index] == list(range(23))
    assert not any(b.padded for b in batches)
    labels = torch.cat([b.targets for b in batches])
    expected = torch.zeros(23, 5)
    for i in range(23):
        expected[i, label_ids(i)] = 1.0
    assert torch.equal(labels, expected)
    images = torch.cat([b.images for b in batches])
    pixel = (22 / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(images[22, :, 3, 3].numpy(), pixel, atol=1e-5)


def test_eval_batches_of_an_empty_split_is_an_error_naming_it(dataset):
    from ltdist.data.loader import eval_batches
    from ltdist.data.shards import ShardWriter
    from ltdist.entry import InputError

    location, _ = dataset(4, 2)
    ShardWriter(location, "val", 10, 0)  # a complete split of nothing
    with pytest.raises(InputError, match="split 'val' has no samples to evaluate"):
        next(eval_batches(location, "val", 4, 8))


@pytest.mark.parametrize("world, limit", [(2, 0), (3, 0), (4, 0), (2, 13)])  # 4: two ranks pad
def test_eval_batches_split_over_ranks_equal_one_rank(dataset, world, limit):
    """Ranks take batches round-robin, each as many (the last padded), and together they hold
    exactly the one-rank batches' rows, bitwise."""
    from ltdist.data.loader import eval_batches

    location, _ = dataset(23, 10)
    one = list(eval_batches(location, "train", 4, 8, limit=limit))
    rows = {i: (x, y) for b in one for i, x, y in zip(b.index, b.images, b.targets)}
    assert sorted(rows) == list(range(limit or 23))
    per_rank = [list(eval_batches(location, "train", 4, 8, r, world, limit)) for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # lockstep
    seen = []
    for r, batches in enumerate(per_rank):
        for b in batches:
            if b.padded:
                assert b.index == [] and b.keys == [] and b.images.shape[0] == 1
                continue
            assert b.index[0] // 4 % world == r  # batch n goes to rank n mod world
            for i, x, y in zip(b.index, b.images, b.targets):
                assert torch.equal(x, rows[i][0]) and torch.equal(y, rows[i][1])
            seen += b.index
    assert sorted(seen) == list(range(limit or 23))
    padded = sum(b.padded for batches in per_rank for b in batches)
    assert padded == (2 if world == 4 else 0)  # 6 batches over 4 ranks: 2 stand-ins


@pytest.mark.parametrize("mode_bits", [("I;16", 16), ("I", 16), ("L", 8), ("F", 1)])
def test_wide_images_convert_by_value_range_not_by_clipping(mode_bits):
    # a 16-bit PNG reached the model almost pure white: convert("RGB") clips at 255
    from ltdist.data.images import to_rgb

    mode, bits = mode_bits
    top = {16: 65535, 8: 255, 1: 1.0}[bits]
    ramp = np.linspace(0, top, 64).reshape(8, 8)
    dtype = {"I;16": np.uint16, "I": np.int32, "L": np.uint8, "F": np.float32}[mode]
    img = Image.fromarray(ramp.astype(dtype), mode=mode if mode != "I;16" else None)
    assert img.mode == mode
    rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    expected = np.rint(ramp.astype(dtype).astype(np.float64) * 255 / top).astype(np.uint8)
    np.testing.assert_allclose(rgb[..., 0], expected, atol=1)
    assert rgb.mean() == pytest.approx(127.5, abs=2)  # a ramp, not white


def test_a_16_bit_png_reaches_the_loader_with_its_values(tmp_path):
    import io

    from ltdist.data.loader import ClipTransform

    grey = np.full((32, 32), 32768, dtype=np.uint16)  # mid grey
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    img = Image.open(io.BytesIO(buf.getvalue()))
    assert img.mode.startswith("I")
    tensor = ClipTransform(16)(img)
    assert tensor.dtype == torch.uint8 and int(tensor.float().mean().round()) == 128


def _corner_image(w: int = 80, h: int = 60) -> Image.Image:
    """A 4:3 image whose four corner blocks have their own colours."""
    arr = np.full((h, w, 3), 128, dtype=np.uint8)
    arr[:6, :6], arr[:6, -6:] = (255, 0, 0), (0, 255, 0)
    arr[-6:, :6], arr[-6:, -6:] = (0, 0, 255), (255, 255, 0)
    return Image.fromarray(arr)


def test_cprfl_official_test_form_keeps_the_whole_image_unnormalised(dataset):
    from ltdist.data.loader import ClipTransform, eval_batches, image_transform

    img = _corner_image()
    squash = image_transform("cprfl_official", 32)
    x = squash(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    corners = [x[:, 0, 0], x[:, 0, -1], x[:, -1, 0], x[:, -1, -1]]
    expected = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    assert [tuple(c.tolist()) for c in corners] == expected  # every corner survives
    clip = ClipTransform(32)(img)  # the centre crop cuts a quarter of the width, corners too
    assert all((c.int() - 128).abs().max() < 16 for c in (clip[:, 0, 0], clip[:, -1, -1]))
    # [0, 1] values: ToTensor's x / 255, no mean / std
    torch.testing.assert_close(squash.normalize(x[None])[0], x.float() / 255, rtol=0, atol=0)
    location, _ = dataset(6, 6)
    batch = next(eval_batches(location, "train", 6, 8, transform="cprfl_official"))
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    flat = torch.tensor([i / 255.0 for i in range(6)]).view(6, 1, 1, 1).expand(6, 3, 8, 8)
    torch.testing.assert_close(batch.images, flat, rtol=0, atol=1e-7)  # png(i) is flat i
