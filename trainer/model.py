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

from typing import cast

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from torch import nn

from trainer.backbones import Backbone, FeatureExtractor, backbone_kwargs, new_backbone


class GeM(nn.Module):
    """Generalized-mean pooling (Radenovic, Tolias & Chum, TPAMI 2018): (mean over H, W of x^p)^(1/p), with a
    learned p (initial 3); (B, C, H, W) -> (B, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x):
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


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
        return self.backbone.net if isinstance(self.backbone, FeatureExtractor) and self.backbone.timm_model else None

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
