"""Decode and augment on the device: the `decode="none"` loader's encoded bytes become image batches.

    loader = train_loader(split_dir, ..., decode="none")        # yields (list[uint8 bytes tensor], labels)
    for images, labels in device_batches(loader, transform_cfg, "cuda"): ...

JPEGs are decoded as one batch by nvJPEG (`torchvision.io.decode_jpeg(list, device="cuda")`); anything else
(PNG, GIF, BMP, ...) and every JPEG the device decoder refuses is decoded on the CPU with PIL, exactly like
the CPU path, and copied over; a sample no decoder can read is, as on the CPU path, replaced by the nearest
good sample before it in a train batch (batch size kept: no DDP hang) and left out of an eval batch with its
label and key; all four are counted in `.stats`. The augmentation is the CPU path's (data_shards.transforms)
run on the device: train = RandomResizedCrop with torchvision's crop-box sampling (per sample, the same 10
tries and centre-crop fallback) and antialiased resize, horizontal flip, normalisation (channel order, pixel
scale, mean/std); eval = resize of the shorter side + centre crop + normalisation. The random draws of
batch p are seeded by (seed, epoch, p), with epoch and the first p read from the loader (`train_loader`'s
`.epoch` and `.start_batch`), so a run resumed mid-epoch gets the same augmentation as an uninterrupted one.

On CUDA a producer thread decodes + augments batch b+1 on a side stream while step b runs; the consumer's
stream waits on an event recorded after the batch, and the tensors are `record_stream`ed onto it. With
`device="cpu"` the same code runs synchronously in the caller (what the CPU tests exercise).
"""

from __future__ import annotations

import logging
import queue
import threading
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from omegaconf import OmegaConf
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from data_shards.decode import check_decode
from data_shards.stream import fill_from_nearest, hash_seed
from data_shards.transforms import INTERPOLATIONS, TransformConfig, decode_image

log = logging.getLogger(__name__)
# torchvision 0.29 deprecates its decoders in favour of TorchCodec (not in our stack yet): say it once, here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

JPEG_MAGIC = b"\xff\xd8\xff"
_CROP_TRIES = 10  # torchvision's RandomResizedCrop.make_params


@dataclass
class DecodeStats:
    """Samples by where they were decoded, and those nothing could decode."""

    device: int = 0  # JPEGs decoded as a batch by decode_jpeg on the target device
    cpu_not_jpeg: int = 0  # PNG, GIF, BMP, ... : PIL on the CPU
    cpu_device_failed: int = 0  # JPEGs the device decoder refused: PIL on the CPU
    unreadable: int = 0  # by no decoder: replaced by a neighbour (train) or left out (eval)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _pil_decode(blob: torch.Tensor) -> torch.Tensor:
    """The CPU path's decode (PIL, any mode -> RGB) as a uint8 (3, H, W) tensor."""
    rgb = np.array(decode_image(blob.numpy().tobytes()), dtype=np.uint8)
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _device_decode(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """decode_jpeg on a batch; if that fails (no partial results then), one by one to find the culprits."""
    try:
        return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out: list[torch.Tensor | None] = []
        for blob in blobs:
            try:
                out.append(decode_jpeg(blob, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_images(blobs: list[torch.Tensor], device: torch.device,
                  stats: DecodeStats) -> list[torch.Tensor | None]:
    """uint8 (3, H, W) images on `device`, one per blob; None for what nothing could decode."""
    images: list[torch.Tensor | None] = [None] * len(blobs)
    jpegs = [i for i, b in enumerate(blobs) if b.numel() >= 3 and bytes(b[:3].tolist()) == JPEG_MAGIC]
    decoded = _device_decode([blobs[i] for i in jpegs], device) if jpegs else []
    for i, img in zip(jpegs, decoded):
        if img is not None and img.shape[0] == 3:
            images[i] = img
            stats.device += 1
    failed = set(jpegs)
    for i, blob in enumerate(blobs):
        if images[i] is not None:
            continue
        try:
            img = _pil_decode(blob)
        except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
            stats.unreadable += 1
            log.warning("dropping a sample no decoder can read (%d bytes): %s", blob.numel(), e)
            continue
        if device.type == "cuda":
            img = img.pin_memory().to(device, non_blocking=True)
        images[i] = img
        if i in failed:
            stats.cpu_device_failed += 1
        else:
            stats.cpu_not_jpeg += 1
    return images


def sample_crop_boxes(sizes: torch.Tensor, scale, ratio, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop boxes for a batch: sizes (B, 2) = (H, W) -> (B, 4) top, left, h, w.

    Per sample: up to 10 tries of area ~ U(scale) * H * W and log aspect ~ U(log ratio); the first try that
    fits is placed uniformly; none fits -> the centre crop clamped to the ratio range.
    """
    n = sizes.shape[0]
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    log_r = torch.log(torch.tensor(ratio, dtype=torch.float64))
    u_area = torch.rand(n, _CROP_TRIES, generator=generator, dtype=torch.float64)
    u_ratio = torch.rand(n, _CROP_TRIES, generator=generator, dtype=torch.float64)
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))  # torch.round == Python round (half to even)
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first try that fits
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    height, width = height.squeeze(1), width.squeeze(1)
    u_pos = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.floor(u_pos[:, 0] * (height - h + 1))
    left = torch.floor(u_pos[:, 1] * (width - w + 1))

    # fallback, as torchvision: the whole image clamped to the ratio range, centred
    in_ratio = width / height
    r_min, r_max = min(ratio), max(ratio)
    fw = torch.where(in_ratio > r_max, torch.round(height * r_max), width)
    fh = torch.where(in_ratio < r_min, torch.round(width / r_min), height)
    none_fit = ~fits.any(dim=1)
    h, w = torch.where(none_fit, fh, h), torch.where(none_fit, fw, w)
    top = torch.where(none_fit, torch.div(height - h, 2, rounding_mode="floor"), top)
    left = torch.where(none_fit, torch.div(width - w, 2, rounding_mode="floor"), left)
    return torch.stack([top, left, h, w], dim=1).long()


class DeviceTransform:
    """The CPU transform of data_shards.transforms, batched on a device, for uint8 (3, H, W) images."""

    def __init__(self, cfg: Any, device: torch.device | str, train: bool, generator: torch.Generator):
        self.cfg, self.device, self.train, self.generator = cfg, torch.device(device), train, generator
        self.interpolation = INTERPOLATIONS[cfg.interpolation]  # cfg is a validated TransformConfig
        # torchvision's resize of a float image calls interpolate with these; calling it directly per sample
        # saves half the per-sample CPU time (the hot loop: one crop + resize per image)
        smooth = self.interpolation != InterpolationMode.NEAREST
        if not smooth:  # PIL's nearest (the CPU path's) is torch's nearest-exact
            self.interpolation = InterpolationMode.NEAREST_EXACT
        mode = self.interpolation.value
        self.resize_kw = dict(mode=mode, antialias=smooth, align_corners=False if smooth else None)
        order = [2, 1, 0] if cfg.channel_order == "bgr" else [0, 1, 2]
        self.order = torch.tensor(order, device=self.device)
        # x in [0, 255] -> (x / 255 * pixel_scale - mean) / std, in one multiply-add
        std = torch.tensor(cfg.std, dtype=torch.float32)
        self.mul = (cfg.pixel_scale / 255.0 / std).view(1, 3, 1, 1).to(self.device)
        self.add = (-torch.tensor(cfg.mean, dtype=torch.float32) / std).view(1, 3, 1, 1).to(self.device)

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        size = self.cfg.image_size
        out = torch.empty(len(images), 3, size, size, device=self.device)
        if self.train:
            sizes = torch.tensor([img.shape[-2:] for img in images]).view(-1, 2)
            boxes = sample_crop_boxes(sizes, self.cfg.scale, self.cfg.ratio, self.generator).tolist()
            for k, (img, (top, left, h, w)) in enumerate(zip(images, boxes)):
                crop = img[None, :, top:top + h, left:left + w].float()
                out[k] = F.interpolate(crop, size=(size, size), **self.resize_kw)[0]
            flip = torch.rand(len(images), generator=self.generator) < self.cfg.hflip
            if flip.any():
                idx = flip.nonzero().squeeze(1).to(self.device)
                out[idx] = out[idx].flip(-1)
        else:
            for k, img in enumerate(images):
                resized = TF.resize(img.float(), [self.cfg.resize_size], self.interpolation, antialias=True)
                out[k] = TF.center_crop(resized, [size, size])
        if self.resize_kw["antialias"]:
            out.clamp_(0, 255)  # bicubic overshoots; the CPU path's uint8 images cannot
        out = out.index_select(1, self.order)
        return out.mul_(self.mul).add_(self.add)


class DeviceBatches:
    """(images, labels[, keys]) on the device, from a loader of (list[encoded bytes], labels[, keys])."""

    def __init__(self, loader, transform_cfg, device, train: bool = True, *, seed: int | None = None,
                 overlap: bool | None = None, prefetch: int = 1):
        self.device = torch.device(device)
        if not isinstance(transform_cfg, TransformConfig):  # the trainer's omegaconf section, or a dict
            plain = OmegaConf.to_container(transform_cfg) if OmegaConf.is_config(transform_cfg) else transform_cfg
            transform_cfg = TransformConfig(**cast(dict, plain))
        if self.device.type == "cuda":
            check_decode("gpu", self.device)
            if self.device.index is None:  # the producer thread must use the caller's device, not device 0
                self.device = torch.device("cuda", torch.cuda.current_device())
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.loader, self.prefetch = loader, prefetch
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        if seed is None:  # follows torch.manual_seed of the caller, distinct per rank
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            seed = hash_seed(f"{torch.initial_seed()}/{rank}")
        self.seed, self.train = seed, train
        self.generator = torch.Generator()
        self.transform = DeviceTransform(transform_cfg, self.device, train, self.generator)
        if self.device.type == "cuda":  # its constants were copied on the caller's stream: done before ours
            torch.cuda.current_stream(self.device).synchronize()
        self.epoch = getattr(loader, "epoch", 0)
        self.start_batch = getattr(loader, "start_batch", 0)
        self.stats = DecodeStats()

    def __len__(self) -> int:
        return len(self.loader)

    def _prepare(self, raw, position: int) -> tuple:
        blobs, labels, *keys = raw
        if not isinstance(blobs, (list, tuple)):
            raise TypeError(f"device_batches needs a loader made with decode='none' (a list of encoded bytes "
                            f"tensors per batch), got {type(blobs).__name__}")
        decoded = decode_images(list(blobs), self.device, self.stats)
        keep = [i for i, img in enumerate(decoded) if img is not None]
        if not keep:
            raise RuntimeError(f"no image of a batch of {len(blobs)} could be decoded (stats: {self.stats})")
        if len(keep) < len(decoded) and self.train:  # the stream's rule: the nearest good sample before, else after
            keep = fill_from_nearest([img is not None for img in decoded])
        labels = torch.as_tensor(labels)[keep]
        keys = [[k[i] for i in keep] for k in keys]
        if self.device.type == "cuda":
            labels = labels.pin_memory().to(self.device, non_blocking=True)
        self.generator.manual_seed(hash_seed(f"device_batches/{self.seed}/{self.epoch}/{position}"))
        return (self.transform([img for i in keep if (img := decoded[i]) is not None]), labels, *keys)

    def __iter__(self):
        if not self.overlap:
            for position, raw in enumerate(self.loader, self.start_batch):
                yield self._prepare(raw, position)
            return
        yield from self._overlapped()

    def _produce(self, batches, q: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            stream = None
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # the current device is per thread
                stream = torch.cuda.Stream(self.device)
            for position, raw in enumerate(batches, self.start_batch):
                event = None
                if stream is None:
                    batch = self._prepare(raw, position)
                else:
                    with torch.cuda.stream(stream):
                        # nvJPEG writes from its own stream into memory allocated on ours without waiting for
                        # it (pytorch/vision#9606): nothing of ours may still be queued when it is handed out.
                        stream.synchronize()
                        batch = self._prepare(raw, position)
                        event = torch.cuda.Event()
                        event.record(stream)
                if not put((batch, event)):
                    return
            put(None)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    def _overlapped(self) -> Iterator:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        batches = iter(self.loader)  # DataLoader workers start (fork) here, in the caller's thread
        producer = threading.Thread(target=self._produce, args=(batches, q, stop), name="device_batches",
                                    daemon=True)
        producer.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in batch[:2]:
                        t.record_stream(current)  # freed on our side stream only after the step used it
                yield batch
        finally:
            stop.set()
            producer.join()


def device_batches(loader, transform_cfg, device, train: bool = True, **kwargs) -> DeviceBatches:
    """The trainer's entry point: see the module docstring; kwargs: seed, overlap, prefetch."""
    return DeviceBatches(loader, transform_cfg, device, train, **kwargs)


__all__ = ["DecodeStats", "DeviceBatches", "DeviceTransform", "decode_images",
           "device_batches", "sample_crop_boxes"]
