"""Image decoding and the train / eval augmentation (torchvision transforms v2), driven by `TransformConfig`.

Every image becomes 3-channel RGB first, whatever its mode (1-bit, grey, palette, RGBA, 16-bit). Then:
train: RandomResizedCrop(image_size, scale, ratio) + horizontal flip; eval: Resize(resize_size) + CenterCrop.
Both end in float (3,H,W): values in [0, pixel_scale], channels in `channel_order`, then (x - mean) / std
with mean and std given in that channel order (BN-Inception: bgr, 255, mean [104, 117, 128], std [1, 1, 1]).

The train stream runs the same augmentation split in two (`TrainAugment`: bytes to uint8 crops, per sample;
`batch_to_float`: the float conversion, one pass per channel over the batch), which gives `train_transform`'s
values (to float rounding) for the same torch RNG state, with less work per sample. TrainAugment can decode
JPEGs at reduced size (PIL's draft mode) where the crop allows it.
"""

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


@dataclass
class TransformConfig:
    image_size: int = 224
    resize_size: int = 256
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    hflip: float = 0.5
    interpolation: str = "bilinear"
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    channel_order: str = "rgb"
    pixel_scale: float = 1.0

    def __post_init__(self):
        checks = {
            "image_size": self.image_size > 0,
            "resize_size": self.resize_size >= self.image_size,
            "scale": len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1,
            "ratio": len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1],
            "hflip": 0.0 <= self.hflip <= 1.0,
            "interpolation": self.interpolation in INTERPOLATIONS,
            "mean": len(self.mean) == 3,
            "std": len(self.std) == 3 and all(s > 0 for s in self.std),
            "channel_order": self.channel_order in ("rgb", "bgr"),
            "pixel_scale": self.pixel_scale > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TransformConfig: invalid {', '.join(bad)}: "
                             + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))


def as_transform_config(cfg) -> TransformConfig:
    """None (defaults), a TransformConfig, a mapping or an omegaconf node (the trainer's `data.transform`)."""
    if cfg is None:
        return TransformConfig()
    if isinstance(cfg, TransformConfig):
        return cfg
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"transform must be a TransformConfig, a mapping or None, got {type(cfg).__name__}")
    unknown = set(cfg) - set(TransformConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"transform: unknown keys {sorted(unknown)}")
    fields: dict[str, Any] = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items()}
    return TransformConfig(**fields)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels become white, 16/32-bit and float images are rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes (any format PIL reads) to an RGB image; raises on undecodable or truncated data."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(img)


def _to_float(cfg: TransformConfig) -> list:
    """uint8 (..., 3, H, W) to the normalised float32 (..., 3, H, W): one image or a batch alike."""
    steps = [v2.ToDtype(torch.float32, scale=True)]
    if cfg.pixel_scale != 1.0:
        steps.append(v2.Lambda(partial(torch.mul, other=float(cfg.pixel_scale))))
    if cfg.channel_order == "bgr":
        steps.append(v2.Lambda(partial(torch.flip, dims=(-3,))))
    steps.append(v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)))
    return steps


def _to_tensor(cfg: TransformConfig) -> list:
    return [v2.PILToTensor()] + _to_float(cfg)


def _random_resized_crop(cfg: TransformConfig) -> v2.RandomResizedCrop:
    return v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                interpolation=INTERPOLATIONS[cfg.interpolation], antialias=True)


def train_transform(cfg: TransformConfig) -> v2.Compose:
    """RGB PIL image to float (3, image_size, image_size); draws from the torch RNG."""
    steps = [_random_resized_crop(cfg)]
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    return v2.Compose(steps + _to_tensor(cfg))


class BatchToFloat:
    """A list of B uint8 crops (3, H, W) (TrainAugment's) to float32 (B, 3, H, W): `train_transform`'s values
    up to float rounding (a few ulp): per output channel c, x[source channel] * pixel_scale / (255 std_c) -
    mean_c / std_c (bgr: source channel 2 - c), as one copy per channel and one multiply-add over the batch."""

    def __init__(self, cfg: TransformConfig):
        self.source = (2, 1, 0) if cfg.channel_order == "bgr" else (0, 1, 2)
        self.scale = torch.tensor([cfg.pixel_scale / (255.0 * sd) for sd in cfg.std]).view(1, 3, 1, 1)
        self.shift = torch.tensor([-m / sd for m, sd in zip(cfg.mean, cfg.std)]).view(1, 3, 1, 1)

    def __call__(self, crops: list, shared: bool = False) -> torch.Tensor:
        """crops: B uint8 tensors (3, H, W), or B square crops' (H, H, 3) pixel bytes (TrainAugment.crop_bytes).
        shared: the result in shared memory (as torch's default_collate makes a batch in a loader worker), so
        that handing it to the main process copies nothing."""
        if isinstance(crops[0], bytes):
            side = math.isqrt(len(crops[0]) // 3)
            x = torch.frombuffer(bytearray().join(crops), dtype=torch.uint8).view(len(crops), side, side, 3)
        else:  # pil_to_tensor's (3, H, W) is a view of (H, W, 3) memory: stacked that way it is a plain copy
            x = torch.stack([c.permute(1, 2, 0) for c in crops])
        shape = (x.shape[0], 3, x.shape[1], x.shape[2])
        if shared:
            empty = torch.empty(0, dtype=torch.float32)
            out = empty.new(empty._typed_storage()._new_shared(math.prod(shape))).view(shape)
        else:
            out = torch.empty(shape, dtype=torch.float32)
        for c, k in enumerate(self.source):  # the uint8 -> float copy per channel, then one multiply-add over all:
            out[:, c].copy_(x[..., k])  # the same float32 values as a multiply per channel, in 2/3 of the time
        return out.mul_(self.scale).add_(self.shift)


def batch_to_float(cfg: TransformConfig) -> BatchToFloat:
    return BatchToFloat(cfg)


DRAFT_SCALES = (8, 4, 2)  # the JPEG decoder's reductions (PIL Image.draft), largest first


class TrainAugment:
    """Encoded image bytes to a uint8 (3, image_size, image_size) crop: `train_transform` without its float
    conversion (`batch_to_float` does it per batch); the same torch RNG draws in the same order (crop box on
    the full image size, then the flip), so the same RNG state gives exactly train_transform's uint8 pixels.

    draft=True: a JPEG whose crop box spans at least s * image_size pixels in both directions is decoded at
    1/s of its size (s = 8, 4 or 2, the largest that fits; PIL's draft mode, the DCT scaling of libjpeg) and
    the box, scaled by 1/s, is resized from there. The box is drawn from the full size before, so crop
    positions, scales, aspects and flips keep their distribution exactly; the pixels differ by the decoder's
    downscaling instead of PIL's (a slight blur difference). Other formats and smaller crops decode in full.
    Raises what PIL raises on undecodable data."""

    def __init__(self, cfg: TransformConfig, draft: bool = False):
        self.cfg, self.draft, self.drafted = cfg, draft, 0
        self.random_resized_crop = _random_resized_crop(cfg)
        self.resample = Image.Resampling[cfg.interpolation.upper()]  # nearest | bilinear | bicubic

    def draft_scale(self, width: int, height: int) -> int:
        """The largest JPEG reduction s that leaves a (width, height) crop >= image_size px; 1 if none."""
        return next((s for s in DRAFT_SCALES if min(width, height) >= s * self.cfg.image_size), 1)

    def __call__(self, data: bytes) -> torch.Tensor:
        return v2.functional.pil_to_tensor(self.crop(data))

    def crop_bytes(self, data: bytes) -> bytes:
        """The crop as its (image_size, image_size, 3) uint8 pixel bytes, what the train stream batches
        (`BatchToFloat` takes a list of them): one copy, against three through a tensor and a stack."""
        return self.crop(data).tobytes()

    def crop(self, data: bytes) -> Image.Image:
        """The augmented crop as an RGB PIL image (image_size x image_size). Crop and resize call PIL as
        torchvision's v2 kernels do for PIL images (the same pixels), without their dispatch."""
        size = self.cfg.image_size
        with Image.open(io.BytesIO(data)) as img:
            p, full = self.random_resized_crop.make_params([img]), img.size
            top, left, h, w = p["top"], p["left"], p["height"], p["width"]
            s = self.draft_scale(w, h) if self.draft and img.format == "JPEG" else 1
            drafted = s > 1 and img.draft(img.mode, (img.width // s, img.height // s))
            img.load()
            rgb = to_rgb(img)
        if drafted:  # decoded at 1/k of the full size (k = s, what PIL's draft returns: its box is W/k x H/k)
            k = full[0] / drafted[1][2]
            self.drafted += 1
            out = rgb.resize((size, size), self.resample, box=(left / k, top / k, (left + w) / k, (top + h) / k))
        else:  # v2.functional.resized_crop on a PIL image: crop, then resize unless the size is already right
            out = rgb.crop((left, top, left + w, top + h))
            if out.size != (size, size):
                out = out.resize((size, size), self.resample)
        if self.cfg.hflip > 0 and torch.rand(1) < self.cfg.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out


def eval_transform(cfg: TransformConfig) -> v2.Compose:
    interp = INTERPOLATIONS[cfg.interpolation]
    return v2.Compose([v2.Resize(cfg.resize_size, interpolation=interp, antialias=True),
                       v2.CenterCrop(cfg.image_size)] + _to_tensor(cfg))
