"""The train stream's split augmentation (TrainAugment per sample + batch_to_float per batch) against
train_transform, and its JPEG draft-mode decode against the full decode, on real JPEG/PNG files made here."""

import pytest
import torch

from data_shards.transforms import TrainAugment, TransformConfig, batch_to_float, decode_image, train_transform
from tests.data_shards.test_gpu_transforms import BN_INCEPTION, encode, photo

SIZES = [(375, 500), (500, 375), (300, 300), (240, 420), (120, 160)]


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [bytes(encode(photo(h, w, seed=i), quality=90).numpy()) for i, (h, w) in enumerate(SIZES * 2)]


def split_path(blobs, cfg, seed, draft=False):
    torch.manual_seed(seed)
    aug = TrainAugment(cfg, draft)
    crops = [aug(b) for b in blobs]
    assert all(c.dtype == torch.uint8 and c.shape == (3, cfg.image_size, cfg.image_size) for c in crops)
    return batch_to_float(cfg)(crops), aug.drafted


def whole_path(blobs, cfg, seed):
    torch.manual_seed(seed)
    tf = train_transform(cfg)
    return torch.stack([tf(decode_image(b)) for b in blobs])


@pytest.mark.parametrize("preset", ["imagenet", "bn_inception"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_split_augmentation_gives_train_transform_values(jpegs, preset, interpolation):
    png = [bytes(encode(photo(50, 70, seed=9), "PNG").numpy())]
    cfg = TransformConfig(image_size=40, resize_size=48, interpolation=interpolation,
                          **(BN_INCEPTION if preset == "bn_inception" else {}))
    got, drafted = split_path(jpegs + png, cfg, seed=3)
    assert drafted == 0 and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, whole_path(jpegs + png, cfg, seed=3), rtol=1e-5, atol=1e-5 * cfg.pixel_scale)
    assert not torch.allclose(got, whole_path(jpegs + png, cfg, seed=4))
    torch.manual_seed(3)
    aug = TrainAugment(cfg)
    shared = batch_to_float(cfg)([aug(b) for b in jpegs + png], shared=True)  # as made in a loader worker
    assert shared.is_shared() and not got.is_shared() and torch.equal(shared, got)
    torch.manual_seed(3)
    aug = TrainAugment(cfg)
    as_bytes = batch_to_float(cfg)([aug.crop_bytes(b) for b in jpegs + png], shared=True)  # the stream's form
    assert as_bytes.is_shared() and torch.equal(as_bytes, got)


def test_draft_decode_keeps_each_crop(jpegs):
    """Same RNG state: the same boxes and flips, so each drafted output is the full decode's up to the
    decoder's downscaling (mean < 2 grey levels of 255); a box scaled wrongly would move the content."""
    raw = dict(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], pixel_scale=255.0)  # outputs in grey levels
    cfg = TransformConfig(image_size=32, resize_size=36, **raw)
    blobs = jpegs * 8
    full, _ = split_path(blobs, cfg, seed=5)
    draft, drafted = split_path(blobs, cfg, seed=5, draft=True)
    assert drafted > len(blobs) // 2  # most crops of these sizes are >= 64 px: decoded at 1/2 or less
    per_sample = (full - draft).abs().mean((1, 2, 3))
    assert per_sample.mean() < 2.0 and per_sample.max() < 6.0, (per_sample.mean(), per_sample.max())
    png = [bytes(encode(photo(375, 500, seed=1), "PNG").numpy())]
    assert split_path(png * 4, cfg, seed=5, draft=True)[1] == 0  # only JPEGs have a draft mode


@pytest.mark.parametrize("preset", ["imagenet", "bn_inception"])
def test_draft_decode_keeps_the_pixel_distribution(jpegs, preset):
    """Independent draws (different seeds) on each path: per-channel mean and std of the normalised pixels
    over 10 images x 40 draws agree within 4 standard errors of the difference (as the GPU path's test)."""
    cfg = TransformConfig(image_size=32, resize_size=36, **(BN_INCEPTION if preset == "bn_inception" else {}))
    blobs = jpegs * 40
    full, _ = split_path(blobs, cfg, seed=0)
    draft, drafted = split_path(blobs, cfg, seed=1, draft=True)
    assert drafted > len(blobs) // 2
    for name, fn in [("mean", lambda x: x.mean((2, 3))), ("std", lambda x: x.std((2, 3)))]:
        a, b = fn(full), fn(draft)
        se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
        diff = (a.mean(0) - b.mean(0)).abs()
        assert (diff < 4 * se).all(), f"{preset} {name}: diff {diff.tolist()} vs 4 se {(4 * se).tolist()}"


def test_draft_scale_leaves_the_crop_at_least_image_size():
    aug = TrainAugment(TransformConfig(image_size=32, resize_size=36), draft=True)
    assert [aug.draft_scale(w, h) for w, h in [(31, 300), (63, 64), (64, 64), (200, 130), (300, 256)]] == \
        [1, 1, 2, 4, 8]
