"""The embedder: backbone -> global pooling -> linear embedding of `dim` -> L2 normalisation.

    model = build_model(cfg.model)           # trainer.config.ModelConfig
    emb = model(images)                      # (B, dim), unit norm
    model.head_parameters(), model.backbone_parameters()

Backbones: any timm model by name (ImageNet weights from the hub, or a local file for offline clusters),
`bninception` (the paper's, from the optional `pretrainedmodels` package; it expects BGR, 0-255,
mean-subtracted input: set data.transform accordingly, see the cub200 preset) and `small_cnn` (ours, for
the CPU demo and the Omniglot bench).
"""
from __future__ import annotations

import os

import timm
import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from torch import nn


def small_cnn(width: int = 64) -> nn.Sequential:
    """Four conv-BN-ReLU blocks, three of them halving the resolution; features of `2 * width` channels."""
    def block(cin, cout, pool):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    w = width
    net = nn.Sequential(*block(3, w // 2, True), *block(w // 2, w, True), *block(w, 2 * w, True),
                        *block(2 * w, 2 * w, False))
    net.num_features = 2 * w
    return net


class BNInceptionFeatures(nn.Module):
    """The paper's BN-Inception (pretrainedmodels) up to its last feature map (1024 channels)."""

    def __init__(self, pretrained: bool, weights_file: str):
        super().__init__()
        try:
            import pretrainedmodels
        except ImportError:
            raise ImportError("model.backbone=bninception needs the optional package 'pretrainedmodels' "
                              "(pip install pretrainedmodels==0.7.4)") from None
        use_hub = pretrained and not weights_file
        self.net = pretrainedmodels.bninception(num_classes=1000, pretrained="imagenet" if use_hub else None)
        if pretrained and weights_file:
            self.net.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
        self.num_features = 1024

    def forward(self, x):
        return self.net.features(x)


OWN_BACKBONES = ("small_cnn", "bninception")


def check_backbone(name: str) -> None:
    """Raise ValueError naming model.backbone when `name` is neither ours nor a timm model (the config's check)."""
    if name not in OWN_BACKBONES and not timm.is_model(name):
        raise ValueError(f"model.backbone: {name!r} is not a timm model, 'bninception' or 'small_cnn'")


def build_backbone(cfg) -> tuple[nn.Module, int]:
    """(module mapping images to a (B, C, H, W) feature map, C)."""
    if cfg.backbone == "small_cnn":
        net = small_cnn(cfg.small_cnn_width)
        return net, net.num_features
    if cfg.backbone == "bninception":
        net = BNInceptionFeatures(cfg.pretrained, cfg.weights_file)
        return net, net.num_features
    check_backbone(cfg.backbone)
    kwargs = {}
    if cfg.pretrained and cfg.weights_file:
        if not os.path.isfile(cfg.weights_file):
            raise FileNotFoundError(f"model.weights_file: no file {cfg.weights_file!r}")
        kwargs["pretrained_cfg_overlay"] = {"file": cfg.weights_file}
    try:
        net = timm.create_model(cfg.backbone, pretrained=cfg.pretrained, num_classes=0, global_pool="", **kwargs)
    except Exception as e:
        if cfg.pretrained and not cfg.weights_file:
            raise RuntimeError(f"model.pretrained: could not get the weights of {cfg.backbone!r} from the hub "
                               f"({e}); offline, give model.weights_file=PATH or model.pretrained=false") from e
        raise
    return _TimmFeatures(net), net.num_features


class _TimmFeatures(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.forward_features(x)


class Embedder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.backbone, channels = build_backbone(cfg)
        self.pool = SelectAdaptivePool2d(pool_type=cfg.pooling, flatten=True)
        self.embedding = nn.Linear(channels * self.pool.feat_mult(), cfg.dim)
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

    def train(self, mode: bool = True):
        """Train mode, except that with model.freeze_bn every BatchNorm stays in eval mode: its running statistics
        stay the pretrained ones (its affine weights learn unless model.freeze_bn_affine)."""
        super().train(mode)
        if self.freeze_bn:
            for m in self._batch_norms():
                m.eval()
        return self

    def forward(self, images):
        features = self.backbone(images)
        if features.ndim == 3:  # token sequence (B, N, C) of a vision transformer -> (B, C, N, 1)
            features = features.transpose(1, 2).unsqueeze(-1)
        x = self.embedding(self.pool(features))
        return F.normalize(x.float(), dim=1) if self.normalize else x

    def head_parameters(self):
        return list(self.embedding.parameters())

    def backbone_parameters(self):
        """The trainable backbone parameters (frozen BatchNorm affines excluded)."""
        return [p for p in self.backbone.parameters() if id(p) not in self._frozen]

    def set_backbone_trainable(self, trainable: bool):
        """False during the warm-up epochs: only the embedding head (and the proxies) learn."""
        for p in self.backbone_parameters():
            p.requires_grad_(trainable)


def build_model(cfg) -> Embedder:
    """The embedder described by the `model` config section (trainer.config.ModelConfig)."""
    return Embedder(cfg)
