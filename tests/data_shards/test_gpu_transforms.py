"""The device decode + augment path (data_shards.gpu_transforms) run with device="cpu", against the CPU path
(data_shards.transforms, torchvision on PIL images) on the same real JPEG/PNG files made here."""

import io
import os
import threading

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import InterpolationMode

from data_shards import check_decode, eval_loader, train_loader
from data_shards.gpu_transforms import (
    DecodeStats,
    DeviceTransform,
    decode_images,
    device_batches,
    sample_crop_boxes,
)
from data_shards.stream import fill_from_nearest
from data_shards.transforms import INTERPOLATIONS, TransformConfig, decode_image, eval_transform, train_transform

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

BN_INCEPTION = dict(channel_order="bgr", pixel_scale=255.0, mean=[104.0, 117.0, 128.0], std=[1.0, 1.0, 1.0])


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth, asymmetric colour image (a low-frequency random field plus a left-to-right ramp)."""
    g = torch.Generator().manual_seed(seed)
    field = torch.rand(1, 3, 6, 6, generator=g) * 200
    img = torch.nn.functional.interpolate(field, size=(h, w), mode="bicubic", align_corners=False)[0]
    img = img + torch.linspace(0, 55, w).view(1, 1, w)
    return img.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def encode(img: np.ndarray | Image.Image, fmt: str = "JPEG", **kw) -> torch.Tensor:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, fmt, **kw)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


SIZES = [(75, 100), (100, 75), (64, 64), (90, 160), (48, 200)]


@pytest.fixture(scope="module")
def blobs() -> list[torch.Tensor]:
    return [encode(photo(h, w, seed=i), quality=90) for i, (h, w) in enumerate(SIZES * 3)]


def cpu_batch(blobs, transform) -> torch.Tensor:
    return torch.stack([transform(decode_image(b.numpy().tobytes())) for b in blobs])


def device_batch(blobs, cfg, train, seed) -> torch.Tensor:
    (images, _), = device_batches([(blobs, torch.zeros(len(blobs)))], cfg, "cpu", train=train, seed=seed)
    return images


def test_crop_boxes_follow_torchvision_distribution():
    """Crop area share, log aspect and placement: KS distance to torchvision's own sampler (the CPU path's
    RandomResizedCrop.make_params) below 0.03 with 6,000 draws per size (the 0.1% critical value is 0.036);
    the extreme 12x300 image takes the centre-crop fallback, identical on both sides."""
    cfg = TransformConfig()
    rrc = train_transform(cfg).transforms[0]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n = 6000
    for h, w in [(375, 500), (500, 375), (100, 100), (40, 160)]:
        ours = sample_crop_boxes(torch.tensor([[h, w]] * n), cfg.scale, cfg.ratio, g).double()
        image = torch.zeros(3, h, w, dtype=torch.uint8)
        ref = torch.tensor([[p["top"], p["left"], p["height"], p["width"]]
                            for p in (rrc.make_params([image]) for _ in range(n))]).double()
        for box in (ours, ref):
            assert (box[:, 2:] > 0).all() and (box[:, 0] + box[:, 2] <= h).all()
            assert (box[:, 1] + box[:, 3] <= w).all() and (box[:, :2] >= 0).all()

        def stats(b, h=h, w=w):
            return {"area": b[:, 2] * b[:, 3] / (h * w), "log_aspect": torch.log(b[:, 3] / b[:, 2]),
                    "top": (b[:, 0] + 0.5) / (h - b[:, 2] + 1), "left": (b[:, 1] + 0.5) / (w - b[:, 3] + 1)}

        s_ours, s_ref = stats(ours), stats(ref)
        for key in s_ours:
            d = ks_2samp(s_ours[key].numpy(), s_ref[key].numpy()).statistic
            assert d < 0.03, f"{(h, w)} {key}: KS distance {d:.3f}"
    skinny = sample_crop_boxes(torch.tensor([[12, 300]] * 50), cfg.scale, cfg.ratio, g)
    expected = rrc.make_params([torch.zeros(3, 12, 300)])
    assert (skinny == torch.tensor([expected[k] for k in ("top", "left", "height", "width")])).all()


def test_crop_boxes_fallback_branches_match_torchvision():
    """With a scale range nothing fits, every box is torchvision's centre crop, for wide, tall and square."""
    g = torch.Generator().manual_seed(1)
    scale, ratio = [3.0, 4.0], [0.75, 1.3333]
    rrc = train_transform(TransformConfig()).transforms[0]
    rrc.scale = tuple(scale)
    for h, w in [(50, 200), (200, 50), (60, 70)]:
        ours = sample_crop_boxes(torch.tensor([[h, w]]), scale, ratio, g)[0].tolist()
        p = rrc.make_params([torch.zeros(3, h, w)])
        assert ours == [p["top"], p["left"], p["height"], p["width"]], (h, w)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_same_boxes_give_the_pixels_of_torchvision(blobs, interpolation):
    """Given the crop boxes, the device crop + resize is torchvision's resized_crop on the float tensor (to
    1e-3 grey levels) and on the PIL image (the CPU path) within 1.5 grey levels, mean < 0.35 (PIL's nearest
    is torch's nearest-exact, which may round a position on a pixel border the other way: < 2% of pixels)."""
    raw = dict(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], pixel_scale=255.0)  # outputs are grey levels
    cfg = TransformConfig(image_size=40, resize_size=40, hflip=0.0, interpolation=interpolation, **raw)
    images = decode_images(blobs, torch.device("cpu"), DecodeStats())
    out = DeviceTransform(cfg, "cpu", True, torch.Generator().manual_seed(4))(images)
    sizes = torch.tensor([img.shape[-2:] for img in images])
    boxes = sample_crop_boxes(sizes, cfg.scale, cfg.ratio, torch.Generator().manual_seed(4)).tolist()
    mode = INTERPOLATIONS[interpolation]
    tensor_mode = InterpolationMode.NEAREST_EXACT if interpolation == "nearest" else mode
    tensor_ref = torch.stack([TF.resized_crop(img.float(), *box, [40, 40], tensor_mode, antialias=True)
                              for img, box in zip(images, boxes)]).clamp(0, 255)
    assert (out - tensor_ref).abs().max() < 1e-3
    pil_ref = torch.stack([TF.pil_to_tensor(TF.resized_crop(decode_image(b.numpy().tobytes()), *box, [40, 40],
                                                            mode, antialias=True)) for b, box in zip(blobs, boxes)])
    levels = (out - pil_ref).abs()
    if interpolation == "nearest":  # a sample position on a pixel border may round either way: 0.5% here
        assert (levels > 1.5).float().mean() < 0.02
    else:
        assert levels.max() <= 1.5 and levels.mean() < 0.35, (levels.max(), levels.mean())


def _which_flip(out: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """1 where a sample is the mirrored image, 0 where it is the plain one."""
    d_plain = (out - plain).abs().flatten(1).mean(1)
    d_flip = (out - plain.flip(-1)).abs().flatten(1).mean(1)
    assert (torch.minimum(d_plain, d_flip) < 0.05).all()
    return (d_flip < d_plain).float()


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_flip_rate_matches_cpu_path(p):
    """Whole-image crops (scale and ratio pinned to the image), so each output is the image or its mirror:
    the flip share of 1,200 samples is within 4 binomial sigma (0.058 at p=0.5) of p on both paths."""
    h, w = 48, 64
    blob = encode(photo(h, w, seed=7), "PNG")
    cfg = TransformConfig(image_size=32, resize_size=32, scale=[1.0, 1.0], ratio=[w / h, w / h], hflip=p)
    n = 1200
    torch.manual_seed(0)
    cpu = cpu_batch([blob] * n, train_transform(cfg))
    dev = device_batch([blob] * n, cfg, train=True, seed=0)
    plain = cpu_batch([blob], train_transform(TransformConfig(**{**cfg.__dict__, "hflip": 0.0})))
    tol = 4 * (p * (1 - p) / n) ** 0.5
    for out in (cpu, dev):
        assert abs(_which_flip(out, plain).mean().item() - p) < tol


@pytest.mark.parametrize("preset", ["imagenet", "bn_inception"])
def test_train_pixel_statistics_match_cpu_path(blobs, preset):
    """Per-channel mean and std of the normalised pixels over 15 images x 40 draws on each path agree within
    4 standard errors of the difference (the standard errors measured from the per-sample values)."""
    cfg = TransformConfig(image_size=32, resize_size=36, **(BN_INCEPTION if preset == "bn_inception" else {}))
    reps = 40
    torch.manual_seed(0)
    cpu = cpu_batch(blobs * reps, train_transform(cfg))
    dev = device_batch(blobs * reps, cfg, train=True, seed=0)
    assert cpu.shape == dev.shape == (len(blobs) * reps, 3, 32, 32)
    for name, fn in [("mean", lambda x: x.mean((2, 3))), ("std", lambda x: x.std((2, 3)))]:
        a, b = fn(cpu), fn(dev)  # (N, 3) per-sample values
        se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
        diff = (a.mean(0) - b.mean(0)).abs()
        assert (diff < 4 * se).all(), f"{preset} {name}: diff {diff.tolist()} vs 4 se {(4 * se).tolist()}"


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("preset", ["imagenet", "bn_inception"])
def test_eval_matches_cpu_eval_transform(blobs, interpolation, preset):
    """Resize + centre crop on the device vs torchvision on PIL: at most 1.5 grey levels apart (of 255; PIL
    rounds to uint8 after its resize, we stay in float; measured max 1.05, mean 0.25), mean < 0.35."""
    extra = BN_INCEPTION if preset == "bn_inception" else {}
    cfg = TransformConfig(image_size=56, resize_size=64, interpolation=interpolation, **extra)
    cpu = cpu_batch(blobs, eval_transform(cfg))
    dev = device_batch(blobs, cfg, train=False, seed=0)
    levels = (cpu - dev).abs() * torch.tensor(cfg.std).view(1, 3, 1, 1) * 255 / cfg.pixel_scale
    if interpolation == "nearest":
        assert (levels > 1.5).float().mean() < 0.02
    else:
        assert levels.max() <= 1.5 and levels.mean() < 0.35, (levels.max(), levels.mean())


def test_decode_matches_pil(blobs):
    """The batched decoder (libjpeg-turbo on the CPU) gives PIL's pixels, within 1 grey level."""
    stats = DecodeStats()
    ours = decode_images(blobs, torch.device("cpu"), stats)
    assert stats.device == len(blobs) and stats.unreadable == 0
    for blob, img in zip(blobs, ours):
        ref = torch.from_numpy(np.array(decode_image(blob.numpy().tobytes()))).permute(2, 0, 1)
        assert img.shape == ref.shape and img.dtype == torch.uint8
        assert (img.int() - ref.int()).abs().max() <= 1


def test_fallbacks_counted_and_bad_samples_dropped():
    """Non-JPEGs go to the CPU decoder (PNG with transparency composited on white like the CPU path), grey
    and CMYK JPEGs stay on the batched decoder, unreadable bytes are dropped with their label and key."""
    rgb = photo(40, 50, seed=3)
    rgba = Image.fromarray(rgb).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 50, dtype=np.uint8), (40, 1))))
    good = {
        "jpeg": encode(rgb), "grey_jpeg": encode(Image.fromarray(rgb).convert("L")),
        "cmyk_jpeg": encode(Image.fromarray(rgb).convert("CMYK")), "png_rgba": encode(rgba, "PNG"),
        "gif": encode(Image.fromarray(rgb).convert("P"), "GIF"), "bmp": encode(rgb, "BMP"),
        "webp": encode(rgb, "WEBP"),
    }
    jpeg = good["jpeg"].numpy().tobytes()
    bad = {"truncated_jpeg": torch.frombuffer(bytearray(jpeg[: len(jpeg) // 2]), dtype=torch.uint8),
           "garbage": torch.arange(64, dtype=torch.uint8), "empty": torch.zeros(0, dtype=torch.uint8),
           "jpeg_magic_only": torch.tensor([0xFF, 0xD8, 0xFF, 0xE0], dtype=torch.uint8)}
    keys = list(good) + list(bad)
    blobs = list(good.values()) + list(bad.values())
    batches = [(blobs, torch.arange(len(blobs)), keys)] * 2
    cfg = TransformConfig(image_size=24, resize_size=28)
    it = device_batches(batches, cfg, "cpu", train=False)
    out = list(it)
    assert it.stats.as_dict() == {"device": 2 * 3, "cpu_not_jpeg": 2 * 4, "cpu_device_failed": 0,
                                  "unreadable": 2 * 4}
    images, labels, out_keys = out[0]
    assert out_keys == list(good) and labels.tolist() == list(range(len(good)))
    ref = cpu_batch(list(good.values()), eval_transform(cfg))
    levels = (ref - images).abs() * torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
    assert levels.max() <= 1.5, levels.amax((1, 2, 3))


def test_takes_the_trainers_omegaconf_section(blobs):
    from omegaconf import OmegaConf

    cfg = TransformConfig(image_size=24, resize_size=28, interpolation="bicubic")
    section = OmegaConf.structured(cfg)
    assert torch.equal(device_batch(blobs, section, train=True, seed=2), device_batch(blobs, cfg, train=True, seed=2))
    with pytest.raises(ValueError, match="TransformConfig: invalid hflip"):
        device_batches([], {**OmegaConf.to_container(section), "hflip": 2.0}, "cpu")


def test_all_bad_batch_raises_clearly():
    with pytest.raises(RuntimeError, match="no image of a batch of 2"):
        list(device_batches([([torch.arange(9, dtype=torch.uint8)] * 2, torch.zeros(2))],
                            TransformConfig(), "cpu"))


def test_loader_with_decoded_images_is_refused():
    with pytest.raises(TypeError, match="decode='none'"):
        list(device_batches([(torch.zeros(2, 3, 8, 8), torch.zeros(2))], TransformConfig(), "cpu"))


def test_overlapped_thread_gives_the_synchronous_result(blobs):
    """The prefetch thread (what CUDA uses) yields the same batches as the synchronous path for one seed,
    stops its thread when the consumer leaves early, and re-raises a loader error in the consumer."""
    cfg = TransformConfig(image_size=24, resize_size=28)
    batches = [(blobs[i:i + 5], torch.arange(i, i + 5)) for i in range(0, 15, 5)]
    sync = list(device_batches(batches, cfg, "cpu", seed=3, overlap=False))
    threaded = device_batches(batches, cfg, "cpu", seed=3, overlap=True, prefetch=2)
    assert len(threaded) == 3
    for (a, la), (b, lb) in zip(sync, threaded, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)

    before = threading.active_count()
    for _ in device_batches(batches * 10, cfg, "cpu", overlap=True):
        break
    assert threading.active_count() == before

    def failing():
        yield batches[0]
        raise OSError("shard vanished")

    with pytest.raises(OSError, match="shard vanished"):
        list(device_batches(failing(), cfg, "cpu", overlap=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_decode_without_cuda_says_so():
    check_decode("cpu")
    with pytest.raises(ValueError, match="data.decode=gpu needs a CUDA GPU"):
        check_decode("gpu")
    with pytest.raises(ValueError, match="device is 'cpu'"):
        check_decode("gpu", "cpu")
    with pytest.raises(ValueError, match="data.decode must be"):
        check_decode("nvjpeg")
    with pytest.raises(ValueError, match="data.decode=gpu needs a CUDA GPU"):
        device_batches([], TransformConfig(), "cuda")


def test_unreadable_train_sample_is_replaced_like_the_cpu_stream():
    """In a train batch an undecodable sample takes the nearest good one before it (else after): the batch
    keeps its size, as data_shards.stream does on the CPU path."""
    good = [encode(photo(30, 40, seed=s)) for s in range(3)]
    bad = torch.arange(16, dtype=torch.uint8)
    blobs, labels = [bad, good[0], bad, good[1], good[2], bad], torch.arange(6)
    it = device_batches([(blobs, labels)], TransformConfig(image_size=16, resize_size=16), "cpu")
    (images, out_labels), = list(it)
    assert images.shape[0] == 6 and out_labels.tolist() == [1, 1, 1, 3, 4, 4]
    assert it.stats.unreadable == 3 and it.stats.device == 3


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A class folder of 6 classes x 6 images (two of them PNG per class, sizes varied) as shards."""
    from data_shards import write_dataset

    root = tmp_path_factory.mktemp("gpu_shards")
    for c in range(6):
        os.makedirs(root / "src" / f"c{c}")
        for k in range(6):
            img = photo(40 + 7 * k, 64 - 5 * k, seed=10 * c + k)
            fmt, ext = ("PNG", "png") if k % 3 == 0 else ("JPEG", "jpg")
            Image.fromarray(img).save(root / "src" / f"c{c}" / f"i{k}.{ext}", fmt)
    write_dataset("folder", root / "src", root / "out", train_fraction=1.0, shard_size="6kB", progress=False)
    return root / "out" / "train"


def test_train_loader_decode_none_end_to_end(split):
    """train_loader(decode="none") through device_batches: the CPU stream's batch count and labels, every
    PNG on the CPU decoder, every JPEG on the batched one; start_batch=3 gives batches 3.. exactly; the
    overlapped (threaded) form gives the same batches."""
    from data_shards import train_loader

    cfg = TransformConfig(image_size=24, resize_size=28)
    kw = dict(batch_size=8, num_workers=2, seed=1, epoch=2, transform=cfg)
    cpu = [y for _, y in train_loader(split, **kw)]
    it = device_batches(train_loader(split, decode="none", **kw), cfg, "cpu", seed=5)
    dev = [(x.clone(), y.clone()) for x, y in it]
    assert len(dev) == len(it) == len(cpu) == 36 // 8
    assert all(x.shape == (8, 3, 24, 24) and torch.equal(y, c) for (x, y), c in zip(dev, cpu))
    assert it.stats.cpu_not_jpeg + it.stats.device == 32 and it.stats.unreadable == 0
    assert 0 < it.stats.cpu_not_jpeg < 16
    resumed = list(device_batches(train_loader(split, decode="none", start_batch=3, **kw), cfg, "cpu", seed=5))
    assert len(resumed) == 1 and torch.equal(resumed[0][0], dev[3][0])
    # the producer thread (the CUDA arrangement) iterating the worker processes gives the same batches
    threaded = list(device_batches(train_loader(split, decode="none", **kw), cfg, "cpu", seed=5, overlap=True))
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(dev, threaded, strict=True))


def test_eval_loader_decode_none_matches_cpu_eval(split):
    from data_shards import eval_loader

    cfg = TransformConfig(image_size=24, resize_size=28)
    cpu = list(eval_loader(split, batch_size=10, num_workers=2, transform=cfg))
    dev = list(device_batches(eval_loader(split, batch_size=10, num_workers=2, transform=cfg, decode="none"),
                              cfg, "cpu", train=False))
    assert [k for *_, k in cpu] == [k for *_, k in dev] and len(cpu) == 4
    for (a, la, _), (b, lb, _) in zip(cpu, dev):
        assert torch.equal(la, lb)
        assert ((a - b).abs() * torch.tensor(cfg.std).view(1, 3, 1, 1) * 255).max() <= 1.5


def test_fill_from_nearest_is_the_one_bad_sample_rule():
    """Each bad position takes the nearest good sample before it, else the first good one after it."""
    assert fill_from_nearest([True, False, True, False]) == [0, 0, 2, 2]
    assert fill_from_nearest([False, False, True, True]) == [2, 2, 2, 3]
    with pytest.raises(ValueError):
        fill_from_nearest([False, False])


def test_loaders_with_a_device_yield_device_batches_equal_to_the_plain_loaders(split):
    """The decode switch end to end: train_loader / eval_loader given a device yield the same batches as the
    plain loaders, already on the device (decode=cpu); the gpu form is device_batches over the byte loader,
    seeded by seed + rank; decode=gpu on a CPU device, or without a device, is refused before any work."""
    from data_shards import DeviceLoader

    cfg = TransformConfig(image_size=16, resize_size=16)
    kw = dict(batch_size=4, num_workers=0, transform=cfg, seed=2, rank=1, world_size=2)
    plain = list(train_loader(split, **kw))
    on_device = train_loader(split, device=torch.device("cpu"), **kw)
    got = list(on_device)
    assert len(on_device) == len(got) == len(plain) > 0
    for (x, y), (x2, y2) in zip(plain, got):
        assert torch.equal(x, x2) and torch.equal(y, y2) and x2.device.type == "cpu"
    again = list(on_device.set_epoch(1, 1))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(again, train_loader(split, epoch=1, start_batch=1, **kw)))
    evals = list(eval_loader(split, batch_size=5, num_workers=0, transform=cfg, device="cpu"))
    assert sorted(k for _, _, keys in evals for k in keys) == sorted(
        k for _, _, keys in eval_loader(split, batch_size=5, num_workers=0, transform=cfg) for k in keys)
    gpu_form = DeviceLoader(train_loader(split, decode="none", **kw), "gpu", "cpu", cfg, train=True, seed=3)
    reference = device_batches(train_loader(split, decode="none", **kw), cfg, "cpu", seed=3)
    for (x, y), (x2, y2) in zip(gpu_form, reference):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="device is 'cpu'"):
        train_loader(split, decode="gpu", device="cpu", **kw)
    with pytest.raises(ValueError, match="needs the device"):
        train_loader(split, decode="gpu", **kw)


def test_persistent_workers_outlive_the_thread_that_decodes_on_the_device(split):
    """The device decoder's producer thread iterates the loader; the workers must not be its children: a worker
    asks for SIGKILL when the thread that forked it ends (PR_SET_PDEATHSIG follows the thread), so workers forked
    there died with each epoch's thread and the next epoch met 'DataLoader worker exited unexpectedly' (seen on an
    H200 with data.decode=gpu). Two epochs and two evaluations through the threaded path, persistent workers."""
    from data_shards import DeviceLoader

    cfg = TransformConfig(image_size=16, resize_size=16)
    kw = dict(batch_size=4, num_workers=2, seed=1, transform=cfg, persistent_workers=True, decode="none")
    train = train_loader(split, **kw)
    evals = eval_loader(split, batch_size=5, num_workers=2, transform=cfg, persistent_workers=True, decode="none")
    try:
        for epoch in range(2):
            train.set_epoch(epoch)
            got = list(device_batches(train, cfg, "cpu", seed=1, overlap=True))
            assert len(got) == len(train) > 0
            keys = [k for _, _, ks in DeviceLoader(evals, "gpu", "cpu", cfg, train=False) for k in ks]
            assert len(keys) == 36
    finally:
        train.close()
        evals.close()
