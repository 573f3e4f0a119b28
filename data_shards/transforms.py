"""Image decoding and the train / eval augmentation (torchvision transforms v2), driven by `TransformConfig`.

Every image becomes 3-channel RGB first, whatever its mode (1-bit, grey, palette, RGBA, 16-bit). Then:
train: RandomResizedCrop(image_size, scale, ratio) + horizontal flip; eval: Resize(resize_size) + CenterCrop.
Both end in float (3,H,W): values in [0, pixel_scale], channels in `channel_order`, then (x - mean) / std
with mean and std given in that channel order (BN-Inception: bgr, 255, mean [104, 117, 128], std [1, 1, 1]).
"""

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial

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
    return TransformConfig(**{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items()})


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


def _to_tensor(cfg: TransformConfig) -> list:
    steps = [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]
    if cfg.pixel_scale != 1.0:
        steps.append(v2.Lambda(partial(torch.mul, other=float(cfg.pixel_scale))))
    if cfg.channel_order == "bgr":
        steps.append(v2.Lambda(partial(torch.flip, dims=(0,))))
    steps.append(v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)))
    return steps


def train_transform(cfg: TransformConfig) -> v2.Compose:
    interp = INTERPOLATIONS[cfg.interpolation]
    steps = [v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                  interpolation=interp, antialias=True)]
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    return v2.Compose(steps + _to_tensor(cfg))


def eval_transform(cfg: TransformConfig) -> v2.Compose:
    interp = INTERPOLATIONS[cfg.interpolation]
    return v2.Compose([v2.Resize(cfg.resize_size, interpolation=interp, antialias=True),
                       v2.CenterCrop(cfg.image_size)] + _to_tensor(cfg))
