"""The device path on a real CUDA device (marked gpu: excluded by default, run with `-m gpu` on a GPU host).

First run on an H200 on 2026-11-29 (bench/gpu_check.sh); the nvJPEG tolerance follows that measurement.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from data_shards import check_decode
from data_shards.gpu_transforms import DecodeStats, decode_images, device_batches
from data_shards.transforms import TransformConfig, decode_image
from tests.data_shards.test_gpu_transforms import encode, photo

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning"),
]


def variants() -> dict[str, torch.Tensor]:
    rgb = Image.fromarray(photo(120, 160, seed=1))
    return {"baseline_420": encode(rgb), "444": encode(rgb, subsampling=0), "422": encode(rgb, subsampling=1),
            "progressive": encode(rgb, progressive=True), "restart": encode(rgb, restart_marker_rows=1),
            "optimized": encode(rgb, optimize=True), "grey": encode(rgb.convert("L")),
            "cmyk": encode(rgb.convert("CMYK")), "odd_size": encode(Image.fromarray(photo(77, 131, seed=2)))}


def test_nvjpeg_decode_matches_pil_within_decoder_differences():
    """Every JPEG variant is decoded (by nvJPEG, or by PIL after nvJPEG refused it: counted); nvJPEG's pixels
    are PIL's within IDCT / chroma-upsampling differences: mean < 2.5 grey levels, 99th percentile <= 10.
    Measured on an H200 (torch 2.11, nvJPEG of CUDA 13 against Pillow 12.3), mean / 99th percentile: 4:4:4,
    grey, CMYK 0 / 0; 4:2:2 0.89 / 5; 4:2:0 (baseline, progressive, restart, optimized) 1.64 / 7; 4:2:0 of
    odd size (77x131) 2.21 / 9: libjpeg-turbo's "fancy" chroma upsampling against nvJPEG's, largest on the
    edge rows. A swapped channel or a shifted row is tens of levels. Every variant is printed and checked."""
    blobs = variants()
    stats = DecodeStats()
    images = decode_images(list(blobs.values()), torch.device("cuda"), stats)
    assert stats.device + stats.cpu_device_failed == len(blobs) and stats.unreadable == 0
    figures = {}
    for name, blob, img in zip(blobs, blobs.values(), images):
        ref = torch.from_numpy(np.array(decode_image(blob.numpy().tobytes()))).permute(2, 0, 1)
        assert img.is_cuda and img.shape == ref.shape, name
        diff = (img.cpu().int() - ref.int()).abs().float()
        figures[name] = (round(diff.mean().item(), 3), diff.quantile(0.99).item())
    print("nvJPEG - PIL, mean and 99th percentile per variant:", figures)
    bad = {k: v for k, v in figures.items() if not (v[0] < 2.5 and v[1] <= 10)}
    assert not bad, (bad, figures)


def test_cuda_batches_follow_the_cpu_run_and_survive_main_stream_pressure():
    """Same seed: the CUDA run (side stream + producer thread) draws the same boxes and flips as the CPU run,
    so its images differ only by the decoder; meanwhile the main stream allocates, frees and computes, which
    must not corrupt batches prepared on the side stream (record_stream / wait_event)."""
    cfg = TransformConfig(image_size=64, resize_size=72)
    blobs = [encode(photo(90 + 5 * i, 120, seed=i)) for i in range(24)]
    png = encode(photo(80, 100, seed=99), "PNG")
    batches = [(blobs[i:i + 8] + [png], torch.arange(9)) for i in range(0, 24, 8)] * 4
    cpu = list(device_batches(batches, cfg, "cpu", seed=11))
    it = device_batches(batches, cfg, "cuda", seed=11)
    got = []
    for images, labels in it:
        assert images.is_cuda and labels.is_cuda
        for _ in range(3):  # main-stream churn: big allocations freed while the side stream works
            churn = torch.randn(2048, 2048, device="cuda")
            churn = churn @ churn
        del churn
        got.append((images.cpu(), labels.cpu()))
    assert it.stats.device == 12 * 8 and it.stats.cpu_not_jpeg == 12
    for (a, la), (b, lb) in zip(cpu, got, strict=True):
        assert torch.equal(la, lb)
        levels = (a - b).abs() * torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
        assert levels.mean() < 1.5, levels.mean()


def test_check_decode_device_accepts_cuda():
    check_decode("gpu", "cuda")
