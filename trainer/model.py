"""The embedder: backbone -> feature (B, F) -> linear embedding of `dim` -> L2 normalisation.

    model = build_model(cfg.model)           # trainer.config.ModelConfig
    emb = model(images)                      # (B, dim), unit norm
    model.head_parameters(), model.backbone_parameters(), model.loaded   # loaded: trainer.weights.Loaded | None

Backbones: any timm model by name, `bninception` (the paper's, trainer/bninception.py: BGR, 0-255,
mean-subtracted input, see the cub200 preset) and `small_cnn` (ours, for the CPU demo and the Omniglot bench).

The feature is timm's own for a timm model: built with `num_classes=0` and `global_pool=model.pooling`, it is
`forward_head(forward_features(x), pre_logits=True)`, so a ViT's class token (or its average over patch
tokens, with fc_norm), an NHWC model's (Swin) or a ConvNeXt's normed pooling are what timm defines.
`model.pooling=gem` (generalized mean, ours) and our own backbones pool the feature map here instead.
Pretrained weights load exactly or not at all (trainer/weights.py): a file (`model.weights_file`) or the published
weights (`model.pretrained` without a file: a local cache, or a download when the source answers).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
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


class GeM(nn.Module):
    """Generalized-mean pooling (Radenovic, Tolias & Chum, TPAMI 2018): (mean over H, W of x^p)^(1/p), with a
    learned p (initial 3); (B, C, H, W) -> (B, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x):
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class _Features(nn.Module):
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
        return Backbone(_Features(net, pooled=False, timm_model=False), net.num_features, False, net, (CLASSIFIER,))
    pooled = pooling != "gem"
    net = timm.create_model(name, pretrained=False, num_classes=0, global_pool=pooling if pooled else "", **kwargs)
    features = _feature_size(name, pooling if pooled else "", kwargs, net)
    classifier = (net.pretrained_cfg or {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    filter_fn = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    nhwc = str(getattr(net, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC")
    return Backbone(_Features(net, pooled=pooled, nhwc=nhwc), features, pooled, net, classifier, filter_fn)


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


def model_config_dict(cfg) -> dict:
    """The `model` config section as plain data (JSON-safe): `build_model(model_config_from_dict(d), False)`
    builds the same module (random weights)."""
    from omegaconf import OmegaConf

    return cast(dict, OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))


def model_config_from_dict(d: dict):
    """A ModelConfig from plain data (model_config_dict's); ValueError naming the key that does not fit."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config import ModelConfig

    try:
        return OmegaConf.merge(OmegaConf.structured(ModelConfig), d)
    except OmegaConfBaseException as e:
        raise ValueError(f"model config: {str(e).splitlines()[0]}") from None


class Embedder(nn.Module):
    def __init__(self, cfg, load_weights: bool = True):
        super().__init__()
        self.model_config = model_config_dict(cfg)  # plain data: rebuilds this module (tracking's offline queue)
        b = new_backbone(cfg.backbone, cfg.pooling, backbone_kwargs(cfg), cfg.small_cnn_width)
        self.backbone = b.module
        self.loaded = load_backbone_weights(cfg, b) if load_weights else None
        self.pool: nn.Module
        if b.pooled:
            self.pool, mult = nn.Identity(), 1
        elif cfg.pooling == "gem":
            self.pool, mult = GeM(), 1
        else:
            pool = SelectAdaptivePool2d(pool_type=cfg.pooling, flatten=True)
            self.pool, mult = pool, pool.feat_mult()
        self.embedding = nn.Linear(b.features * mult, cfg.dim)
        self.normalize = cfg.normalize
        self.freeze_bn = cfg.freeze_bn
        if cfg.embedding_init == "kaiming_normal":  # ours; "torch_default" keeps nn.Linear's (the authors' code)
            nn.init.kaiming_normal_(self.embedding.weight, mode="fan_out")
            nn.init.zeros_(self.embedding.bias)
        elif cfg.embedding_init != "torch_default":
            raise ValueError(f"model.embedding_init: {cfg.embedding_init!r} is not 'kaiming_normal' or 'torch_default'")
        self._frozen = set()
        if self.freeze_bn and cfg.freeze_bn_affine:
            for m in self._batch_norms():
                for p in (m.weight, m.bias):
                    p.requires_grad_(False)
                    self._frozen.add(id(p))

    def _batch_norms(self):
        return [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]

    def has_batch_norm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.backbone.modules())

    def train(self, mode: bool = True):
        """Train mode, except that with model.freeze_bn every BatchNorm stays in eval mode: its running statistics
        stay the pretrained ones (its affine weights learn unless model.freeze_bn_affine)."""
        super().train(mode)
        if self.freeze_bn:
            for m in self._batch_norms():
                m.eval()
        return self

    def forward(self, images):
        x = self.embedding(self.pool(self.backbone(images)))
        return F.normalize(x.float(), dim=1) if self.normalize else x

    def head_parameters(self):
        return list(self.pool.parameters()) + list(self.embedding.parameters())

    def backbone_parameters(self):
        """The trainable backbone parameters (frozen BatchNorm affines excluded)."""
        return [p for p in self.backbone.parameters() if id(p) not in self._frozen]

    def timm_model(self) -> nn.Module | None:
        """The timm model inside the backbone (for timm's parameter grouping), None for our own backbones."""
        return self.backbone.net if isinstance(self.backbone, _Features) and self.backbone.timm_model else None

    def set_backbone_trainable(self, trainable: bool):
        """False during the warm-up epochs: only the embedding head (and the proxies) learn."""
        for p in self.backbone_parameters():
            p.requires_grad_(trainable)


def load_backbone_weights(cfg, b: Backbone):
    """model.pretrained: the weights file, or else the published weights, loaded exactly (trainer.weights);
    small_cnn has no published weights (random unless a file is given). A weights file is loaded whatever
    model.pretrained says: a file given is never ignored. Returns trainer.weights.Loaded | None."""
    if not cfg.weights_file and (not cfg.pretrained or cfg.backbone == "small_cnn"):
        return None
    from trainer.weights import load_exact, pretrained_state_dict
    common = dict(backbone=cfg.backbone, classifier=b.classifier, filter_fn=b.filter_fn)
    if cfg.weights_file:
        return load_exact(b.weights_target, cfg.weights_file, **common)
    state, source = pretrained_state_dict(cfg.backbone)
    return load_exact(b.weights_target, state, source=source, key="model.pretrained", **common)


def check_weights(cfg) -> None:
    """Before any work: the weights the model would load exist and fit it (a weights file is matched against a
    twin on the meta device, nothing loaded), or the published weights are cached or their source answers.
    Raises trainer.weights.WeightsError (one line: the key, the count matched, the unmatched keys, the fix)."""
    if not cfg.weights_file and (not cfg.pretrained or cfg.backbone == "small_cnn"):
        return
    from trainer.weights import check_source, load_exact
    check_source(cfg.backbone, cfg.weights_file)
    if cfg.weights_file:
        with torch.device("meta"):
            b = new_backbone(cfg.backbone, cfg.pooling, backbone_kwargs(cfg), cfg.small_cnn_width)
        load_exact(b.weights_target, cfg.weights_file, backbone=cfg.backbone, classifier=b.classifier,
                   filter_fn=b.filter_fn, check_only=True)


def build_model(cfg, load_weights: bool = True) -> Embedder:
    """The embedder described by the `model` config section (trainer.config.ModelConfig); `load_weights=False`:
    random weights (a checkpoint will overwrite them)."""
    return Embedder(cfg, load_weights)
