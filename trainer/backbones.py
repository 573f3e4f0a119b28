"""The backbones by name: ours (`small_cnn`, `bninception`) and any timm model, each as a `Backbone` (the
feature extractor, its feature size, where its weights load); the config-time checks of the model section
(`check_backbone`, `check_model`) and the input each backbone's published weights expect (`backbone_defaults`).
The embedder around a backbone is trainer/model.py; its weights, trainer/weights.py."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

OWN_BACKBONES = ("small_cnn", "bninception")
POOLINGS = ("avg", "max", "avgmax", "catavgmax", "token", "gem")  # model.pooling; token: timm models with one
OUR_POOLINGS = ("avg", "max", "avgmax", "catavgmax", "gem")  # what we pool a feature map with


def small_cnn(width: int = 64) -> nn.Sequential:
    """Four conv-BN-ReLU blocks, three of them halving the resolution; features of `2 * width` channels."""
    def block(cin, cout, pool):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    w = width
    net: Any = nn.Sequential(*block(3, w // 2, True), *block(w // 2, w, True), *block(w, 2 * w, True),
                        *block(2 * w, 2 * w, False))
    net.num_features = 2 * w
    return net


class FeatureExtractor(nn.Module):
    """A backbone under the name `net` (checkpoint keys `backbone.net.*`): timm's pooled pre-logits feature
    (`pooled`), or its feature map in NCHW (for our pooling), or our BN-Inception's feature map."""

    def __init__(self, net, pooled: bool, nhwc: bool = False, timm_model: bool = True):
        super().__init__()
        self.net, self.pooled, self.nhwc, self.timm_model = net, pooled, nhwc, timm_model

    def forward(self, x):
        if not self.timm_model:
            return self.net(x)
        features = self.net.forward_features(x)
        if self.pooled:
            return self.net.forward_head(features, pre_logits=True)
        return features.permute(0, 3, 1, 2) if self.nhwc else features


@dataclass
class Backbone:
    """A backbone as built: the module, its feature size, whether it pools itself, and what loading needs."""
    module: nn.Module  # images -> (B, features) when pooled, else (B, C, H, W)
    features: int
    pooled: bool
    weights_target: Any  # the module whose state dict a weights file holds (timm's forward_features)
    classifier: tuple[str, ...]  # key prefixes of a weights file that may go unused
    filter_fn: Any = None  # timm's checkpoint_filter_fn(state, model) for this architecture


def _feature_size(name: str, global_pool: str, kwargs: dict, net) -> int:
    """The width of what the backbone gives: the pre-logits feature (pooled) or the feature map's channels, read
    off a twin on the meta device (no memory, no compute); timm's attributes where the meta device cannot run it."""
    size = getattr(getattr(net, "patch_embed", None), "img_size", None) or (net.pretrained_cfg or {}).get(
        "input_size", (3, 224, 224))[1:]
    try:
        with torch.device("meta"):
            twin: Any = timm.create_model(name, pretrained=False, num_classes=0, global_pool=global_pool, **kwargs)
            out = twin.forward_features(torch.empty(1, 3, *size))
            if global_pool:
                return int(twin.forward_head(out, pre_logits=True).shape[-1])
    except Exception:  # noqa: BLE001 - an op the meta device lacks
        return int(getattr(net, "head_hidden_size", None) or net.num_features)
    return int(out.shape[-1] if str(getattr(net, "output_fmt", "NCHW")).endswith("NHWC") else out.shape[1])


def check_backbone(name: str) -> None:
    """Raise ValueError naming model.backbone when `name` is neither ours nor a timm model (the config's check)."""
    if name not in OWN_BACKBONES and not timm.is_model(name):
        raise ValueError(f"model.backbone: {name!r} is not a timm model, 'bninception' or 'small_cnn'")


def new_backbone(name: str, pooling: str = "avg", kwargs: dict | None = None, width: int = 64) -> Backbone:
    """Backbone `name` with random weights (see `Backbone`)."""
    kwargs = dict(kwargs or {})
    net: Any  # timm's attributes (num_features, pretrained_cfg, forward_features) on every kind
    if name == "small_cnn":
        net = small_cnn(width)
        return Backbone(net, net.num_features, False, net, ())
    if name == "bninception":
        from trainer.bninception import CLASSIFIER, BNInception
        net = BNInception()
        extractor = FeatureExtractor(net, pooled=False, timm_model=False)
        return Backbone(extractor, net.num_features, False, net, (CLASSIFIER,))
    pooled = pooling != "gem"
    net = timm.create_model(name, pretrained=False, num_classes=0, global_pool=pooling if pooled else "", **kwargs)
    features = _feature_size(name, pooling if pooled else "", kwargs, net)
    classifier = (net.pretrained_cfg or {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    filter_fn = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    nhwc = str(getattr(net, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC")
    return Backbone(FeatureExtractor(net, pooled=pooled, nhwc=nhwc), features, pooled, net, classifier, filter_fn)


def backbone_kwargs(cfg) -> dict:
    """model.backbone_kwargs as plain Python (lists stay lists): what timm.create_model receives."""
    kwargs = getattr(cfg, "backbone_kwargs", None) or {}
    if type(kwargs).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf
        kwargs = OmegaConf.to_container(kwargs, resolve=True)
    return dict(kwargs)


def check_model(cfg, image_size: int) -> None:
    """The config-time check of the model section against the input size: names, pooling, backbone_kwargs and
    whether the backbone takes `image_size` px (a timm model is built on the meta device: no memory, no weights).
    Raises ValueError whose message starts with the key to change."""
    check_backbone(cfg.backbone)
    kwargs = backbone_kwargs(cfg)
    if cfg.backbone in OWN_BACKBONES:
        if kwargs:
            raise ValueError(f"model.backbone_kwargs: only for timm backbones, not {cfg.backbone!r}")
        if cfg.pooling not in OUR_POOLINGS:
            raise ValueError(f"model.pooling: {cfg.pooling!r} needs a timm model with that pooling; {cfg.backbone} "
                             f"takes one of {', '.join(OUR_POOLINGS)}")
        return
    with torch.device("meta"):
        try:
            b = new_backbone(cfg.backbone, cfg.pooling, kwargs)
        except Exception as e:  # noqa: BLE001 - told as the key that caused it
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if "pool" in msg.lower():
                raise ValueError(f"model.pooling: {cfg.backbone} does not take {cfg.pooling!r} ({msg})") from None
            raise ValueError(f"model.backbone_kwargs: timm cannot build {cfg.backbone} with {kwargs} "
                             f"({type(e).__name__}: {msg})") from None
        try:
            fmap = b.weights_target.forward_features(torch.empty(1, 3, image_size, image_size))
        except AssertionError as e:  # timm's own size checks (patch embedding, windows)
            raise ValueError(f"data.transform.image_size: {image_size} px does not fit {cfg.backbone} ({e}); give "
                             f"model.backbone_kwargs={{img_size: {image_size}}} (or dynamic_img_size: true where "
                             f"the model has it) or its input size") from None
        except Exception:  # noqa: BLE001 - an op the meta device lacks: the first real forward will tell
            return
    if cfg.pooling == "gem" and fmap.ndim != 4:
        raise ValueError(f"model.pooling: gem pools a feature map; {cfg.backbone} gives tokens {tuple(fmap.shape)}: "
                         f"use token or avg")


def backbone_defaults(name: str) -> dict:
    """What the backbone's published weights expect as input: {mean, std, interpolation} (the `auto` values of
    data.transform), from timm's pretrained config (timm.data.resolve_data_config) or BN-Inception's file."""
    if name == "bninception":
        from trainer.bninception import MEAN, STD
        return {"mean": list(MEAN), "std": list(STD), "interpolation": "bilinear"}
    if name == "small_cnn":
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        return {"mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD), "interpolation": "bilinear"}
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg
    pcfg = get_pretrained_cfg(name)
    data = resolve_data_config(pretrained_cfg=pcfg.to_dict() if pcfg is not None else {})
    interp = data.get("interpolation", "bilinear")
    return {"mean": [float(v) for v in data["mean"]], "std": [float(v) for v in data["std"]],
            "interpolation": interp if interp in ("nearest", "bilinear", "bicubic") else "bilinear"}
